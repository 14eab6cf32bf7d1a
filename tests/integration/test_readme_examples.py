"""The README's client examples run as printed, against a real gateway and the simulator.

A newcomer pastes them first; one printed ``None`` at the end of every stream (the usage-only
chunk's ``delta.content``) before this test."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import Harness

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def client_blocks(language: str) -> list[str]:
    return [b for b in blocks(language) if "SLUICEGATE_KEY" in b]


def test_the_readme_has_client_examples() -> None:
    assert len(client_blocks("python")) >= 2
    assert len(client_blocks("sh")) >= 1


@pytest.mark.parametrize("index", [0, 1])
def test_a_python_example_runs_as_printed(harness: Harness, index: int) -> None:
    code = client_blocks("python")[index]
    key = harness.new_key().primary_key
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"GATEWAY": harness.url, "SLUICEGATE_KEY": key})
    assert "None" not in out.getvalue()
    assert len(harness.records(expect=1)) == 1


def test_the_curl_example_runs_as_printed(harness: Harness) -> None:
    (code,) = [b for b in client_blocks("sh") if b.startswith("curl")]
    key = harness.new_key().primary_key
    done = subprocess.run(
        ["sh", "-c", code],
        env={"GATEWAY": harness.url, "SLUICEGATE_KEY": key or "", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert b'"choices"' in done.stdout and b'"usage"' in done.stdout
