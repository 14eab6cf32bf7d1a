"""`sluicegate demo` prints examples that work as printed, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

from tests.support.gateway import free_port


def test_demo_examples_work_as_printed(tmp_path: Path) -> None:
    port, sim_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluicegate.cli.main",
            "demo",
            "--port",
            str(port),
            "--sim-port",
            str(sim_port),
            "--workdir",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "Press Ctrl-C" in text, text
        curl = re.search(r"^  (curl .*?)\n\n", text, re.S | re.M)
        assert curl
        out = subprocess.run(
            curl.group(1).replace("\\\n", " "),
            shell=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert '"usage"' in out.stdout, out.stdout + out.stderr
        python = re.search(r"^(  from openai import AzureOpenAI\n.*?)\n\n", text, re.S | re.M)
        assert python
        code = textwrap.dedent(python.group(1))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "completion_tokens" in out.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "demo stopped" in rest
    # The simulator's backend key (random, in its configuration) is in no output.
    sim = yaml.safe_load((tmp_path / "demo" / "simulator.yaml").read_text())
    (backend_key,) = sim["api_keys"]
    assert len(backend_key) >= 16
    assert backend_key not in text + rest
    assert "1 from the configuration (not shown)" in text
