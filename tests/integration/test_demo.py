"""`sluicegate demo` prints examples that work as printed (the dashboard and cost included),
refuses to start on a port in use before it writes anything, ends with an error and the
child's log when a child exits, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.gateway import free_port

REPO = Path(__file__).resolve().parents[2]


def demo_command(workdir: Path, port: int, sim_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sluicegate.cli.main",
        "demo",
        "--port",
        str(port),
        "--sim-port",
        str(sim_port),
        "--workdir",
        str(workdir),
    ]


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    workdir: Path
    port: int
    sim_port: int
    #: What it printed up to "Press Ctrl-C" (stdout and stderr).
    text: str
    #: What it printed after that, once it has ended.
    rest: str = field(default="")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        found = re.search(r"Sign in with the admin token: (\S+)", self.text)
        assert found, self.text
        return found.group(1)

    def children(self) -> dict[str, int]:
        """The demo's child processes: their command (``serve``, ``simulate``) → pid."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                for command in ("serve", "simulate"):
                    if command.encode() in argv:
                        found[command] = int(entry.name)
        return found


@contextlib.contextmanager
def running_demo(workdir: Path) -> Iterator[Demo]:
    """A demo started as the user starts it, once it has printed its examples; stopped with
    Ctrl-C (SIGINT) at the end unless it has ended already."""
    port, sim_port = free_port(), free_port()
    proc = subprocess.Popen(
        demo_command(workdir, port, sim_port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    demo = Demo(proc, workdir, port, sim_port, "")
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        demo.text = "".join(lines)
        assert "Press Ctrl-C" in demo.text, demo.text
        yield demo
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        demo.rest, _ = proc.communicate(timeout=60)


def usage_total(demo: Demo, requests: int) -> dict[str, object]:
    """The admin API's usage total, once it counts ``requests`` requests (a record is written
    just after its answer)."""
    deadline = time.monotonic() + 20
    while True:
        resp = httpx.get(
            f"{demo.url}/admin/api/usage",
            headers={"Authorization": f"Bearer {demo.admin_token}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        total: dict[str, object] = resp.json()["total"]
        if total["requests"] == requests or time.monotonic() > deadline:
            return total
        time.sleep(0.1)


def test_demo_examples_work_as_printed(tmp_path: Path) -> None:
    with running_demo(tmp_path / "demo") as demo:
        text = demo.text
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

        # Cost: the demo's deployments have prices, so both requests are priced.
        total = usage_total(demo, requests=2)
        assert total["requests"] == 2, total
        assert total["unpriced_records"] == 0, total
        assert Decimal(str(total["cost"])) > 0, total
        # The usage report it points to runs as printed, without a warning.
        usage = re.search(r"Usage and cost so far:  \.venv/bin/sluicegate (usage report .*)", text)
        assert usage
        out = subprocess.run(
            [sys.executable, "-m", "sluicegate.cli.main", *usage.group(1).split()],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "warning" not in out.stderr, out.stderr

        # The dashboard: signed into with the printed token.
        dashboard = re.search(r"^  (http://\S+/dashboard/)$", text, re.M)
        assert dashboard and dashboard.group(1) == f"{demo.url}/dashboard/"
        with httpx.Client(base_url=demo.url, timeout=30) as browser:
            login = browser.post("/dashboard/login", data={"token": demo.admin_token})
            assert login.status_code == 303, login.text
            page = browser.get("/dashboard/")
            assert page.status_code == 200, page.text
            assert "have no price" not in page.text
        token_file = demo.workdir / "admin-token"
        assert token_file.read_text().strip() == demo.admin_token
        assert token_file.stat().st_mode & 0o777 == 0o600
    assert demo.proc.returncode == 0
    assert "demo stopped" in demo.rest
    # The simulator's backend key (random, in its configuration) is in no output.
    sim = yaml.safe_load((demo.workdir / "simulator.yaml").read_text())
    (backend_key,) = sim["api_keys"]
    assert len(backend_key) >= 16
    assert backend_key not in text + demo.rest
    assert "1 from the configuration (not shown)" in text
    assert (demo.workdir / "simulator.yaml").stat().st_mode & 0o777 == 0o600


def subscriptions(workdir: Path) -> int:
    with contextlib.closing(sqlite3.connect(workdir / "ledger.db")) as db:
        (count,) = db.execute("SELECT count(*) FROM subscriptions").fetchone()
    return int(count)


def test_a_second_demo_on_the_same_ports_stops_before_writing_anything(tmp_path: Path) -> None:
    with running_demo(tmp_path / "demo") as first:
        files = {
            path.name: path.read_bytes()
            for path in first.workdir.iterdir()
            if path.suffix == ".yaml" or path.name == "admin-token"
        }
        assert {"gateway.yaml", "simulator.yaml"} <= set(files)
        before = subscriptions(first.workdir)
        second = subprocess.run(
            demo_command(first.workdir, first.port, first.sim_port),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert "sluicegate is running" not in second.stdout
        assert (
            f"error: port {first.port} (the gateway's) and port {first.sim_port} (the "
            "simulator's) are in use (another demo still running?): stop it, or run "
            "`make demo PORT="
        ) in second.stderr
        for name, content in files.items():
            assert (first.workdir / name).read_bytes() == content, name
        assert subscriptions(first.workdir) == before
        # The first one goes on.
        assert first.proc.poll() is None
        assert httpx.get(f"{first.url}/healthz", timeout=30).status_code == 200
    assert first.proc.returncode == 0


@pytest.mark.parametrize("role", ["gateway", "simulator"])
def test_a_port_held_by_another_program_is_named(tmp_path: Path, role: str) -> None:
    port, sim_port = free_port(), free_port()
    held = port if role == "gateway" else sim_port
    workdir = tmp_path / "demo"
    with socket.socket() as other:
        other.bind(("127.0.0.1", held))
        other.listen()
        done = subprocess.run(
            demo_command(workdir, port, sim_port), capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stdout + done.stderr
    sim = "sim-" if role == "simulator" else ""
    found = re.search(
        rf"^error: port {held} \(the {role}'s\) is in use \(another demo still running\?\): "
        rf"stop it, or run `make demo {sim.upper().replace('-', '_')}PORT=(\d+)` "
        rf"\(`sluicegate demo --{sim}port (\d+)`\)$",
        done.stderr,
        re.M,
    )
    assert found, done.stderr
    assert found.group(1) == found.group(2) != str(held)
    # Nothing written: no configuration, no key, no subscription.
    assert not workdir.exists()


def test_a_child_that_exits_ends_the_demo_with_an_error_and_its_log(tmp_path: Path) -> None:
    with running_demo(tmp_path / "demo") as demo:
        children = demo.children()
        assert set(children) == {"serve", "simulate"}, children
        # A crash: nothing the gateway could log on its way out.
        os.kill(children["serve"], signal.SIGKILL)
        demo.rest, _ = demo.proc.communicate(timeout=60)
    assert demo.proc.returncode == 1, demo.rest
    assert "demo failed: the gateway was killed by SIGKILL" in demo.rest
    log = demo.rest.split(f"The last lines of {demo.workdir / 'gateway.log'}:\n", 1)
    assert len(log) == 2, demo.rest
    assert '"msg":"gateway started"' in log[1]
    assert "demo stopped" in demo.rest
    # The simulator was stopped with it.
    assert not Path(f"/proc/{children['simulate']}").exists()
