"""callgrind's output → instructions per function: a synthetic file with known answers, and a
real callgrind run whose self costs must add up to the total callgrind itself wrote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import instructions
from instructions import Phase, parse_callgrind

#: Compressed names defined on first use (by ``cfn`` as well as ``fn``), an inlined file,
#: relative positions, and calls whose inclusive cost belongs to the callee.
SYNTHETIC = """\
# callgrind format
version: 1
positions: line
events: Ir
summary: 930

ob=(1) /usr/lib/libpython.so
fl=(1) ceval.c
fn=(1) eval_frame
10 100
+2 50
cob=(2) /usr/lib/libc.so
cfi=(2) memcpy.S
cfn=(2) memcpy
calls=3 20
* 400
fi=(3) inline.h
-1 25
fe=(1)
cfn=(3) helper
calls=1 5
+1 70

ob=(2)
fl=(2)
fn=(2)
20 400
fn=(3)
ob=(1)
5 70
fn=(4) idle
7 285
totals: 930
"""


def test_self_costs_skip_the_inclusive_cost_of_calls() -> None:
    profile = parse_callgrind(SYNTHETIC.splitlines(keepends=True))
    assert profile.functions == {"eval_frame": 175, "memcpy": 400, "helper": 70, "idle": 285}
    assert profile.objects == {"/usr/lib/libpython.so": 530, "/usr/lib/libc.so": 400}
    assert profile.total == 930


def test_two_position_columns_are_read_as_positions() -> None:
    text = "positions: instr line\nevents: Ir Dr\nfn=(1) f\n0x10 3 7 2\n+4 1 5 1\n"
    assert parse_callgrind(text.splitlines()).functions == {"f": 12}


def test_a_real_callgrind_file_adds_up_to_its_totals(tmp_path: Path) -> None:
    assert shutil.which("valgrind"), "valgrind is missing: apt-get install valgrind"
    out = tmp_path / "callgrind.out"
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         "-S", "-c", "sum(range(10000))"],
        check=True, capture_output=True,
    )  # fmt: skip
    text = out.read_text()
    totals = next(int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("totals:"))
    profile = parse_callgrind(text.splitlines(keepends=True))
    assert profile.total == totals
    assert any("EvalFrame" in name for name in profile.functions)


def test_the_summary_compares_kinds_per_request() -> None:
    def phase(kind: str, requests: int, copy: int, frame: int) -> Phase:
        text = f"positions: line\nevents: Ir\nfn=(1) memcpy\n1 {copy}\nfn=(2) frame\n1 {frame}\n"
        profile = parse_callgrind(text.splitlines())
        return Phase("sg", kind, requests, profile)

    phases = [phase("json", 10, 1000, 9000), phase("stream", 20, 8000, 20000)]
    text = "\n".join(instructions.summarise(phases, ["json", "stream"], top=2))
    assert "sg: stream ×1.4000 the instructions of json" in text
    # memcpy: 100 → 400 per request (+300); frame: 900 → 1000 (+100).
    lines = text.splitlines()
    first = lines.index("by function, largest differences (sg stream minus sg json):") + 1
    assert lines[first].split()[0] == "+300" and lines[first].endswith("memcpy")
    assert lines[first + 1].split()[0] == "+100" and lines[first + 1].endswith("frame")
