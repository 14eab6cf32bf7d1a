"""docs/simulator.md's worked example, run for real.

The files are the documentation's own code blocks (each names its file on its first line),
loaded with the project's loaders; the simulators and the gateway are started as its commands
say, on free ports instead of 8081/8082/8080; its openai snippet runs unchanged in a
subprocess. What the page claims is checked against the snippet's output, the gateway's
ledger and the simulators' truth logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from sluicegate.accounting.records import UsageRecord
from sluicegate.admin.service import AdminService
from sluicegate.config.loader import load_config, parse_config
from sluicegate.simulator import DEFAULT_SIM_API_KEY, SimConfig, SimulatorThread, load_sim_config
from sluicegate.storage.reports import fetch_records
from tests.support.gateway import GatewayThread

DOC = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"
SNIPPET = "spill.py"
SECTION = "## Worked example"

#: A fenced block starting in column 0: (info string, body). Indented fences (the curl
#: examples inside list items) are left alone.
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: The first line of a block that stands for a file: "# name.ext: what it is".
_FILE_MARKER = re.compile(r"#\s*([\w.-]+\.(?:yaml|py))\b")


@dataclass(frozen=True)
class DocExample:
    """The worked example as the page gives it."""

    files: dict[str, str]
    #: Simulator config file → the port its ``sluicegate simulate`` command gives it.
    simulators: dict[str, int]
    gateway_file: str
    environment: dict[str, str]
    product: str
    #: The snippet's output as the page shows it, line by line.
    output: list[str]


def _read_doc() -> DocExample:
    """The worked example's section of the page, taken apart."""
    page = DOC.read_text(encoding="utf-8")
    start = page.index(f"\n{SECTION}")
    end = page.find("\n## ", start + 1)
    text = page[start : end if end >= 0 else len(page)]
    blocks = [(m.group(1), m.group(2), m.start()) for m in _FENCE.finditer(text)]
    files: dict[str, str] = {}
    snippet_at = -1
    for _, body, at in blocks:
        first = body.split("\n", 1)[0]
        marker = _FILE_MARKER.match(first)
        if marker is not None:
            assert marker.group(1) not in files, f"{marker.group(1)} is given twice"
            files[marker.group(1)] = body
            if marker.group(1) == SNIPPET:
                snippet_at = at
    assert snippet_at >= 0, f"no {SNIPPET} block in {DOC}"
    output = next(body for lang, body, at in blocks if lang == "text" and at > snippet_at)
    shell = "\n".join(body for lang, body, _ in blocks if lang == "sh")
    simulators = {
        name: int(port)
        for name, port in re.findall(r"sluicegate simulate --config (\S+) --port (\d+)", shell)
    }
    served = re.findall(r"sluicegate serve --config (\S+)", shell)
    products = re.findall(r"sluicegate keys create --config \S+ --product (\S+)", shell)
    assert len(served) == 1 and len(products) == 1, (served, products)
    assert set(simulators) | {served[0], SNIPPET} <= set(files), sorted(files)
    return DocExample(
        files=files,
        simulators=simulators,
        gateway_file=served[0],
        environment=dict(re.findall(r"^export (\w+)=(\S+)$", shell, re.MULTILINE)),
        product=products[0],
        output=output.strip().splitlines(),
    )


@dataclass
class Trial:
    """The example's simulators and gateway, started."""

    doc: DocExample
    #: Where the page's files were saved.
    workdir: Path
    gateway: GatewayThread
    #: Backend name → its simulator, and that simulator's configuration.
    sims: dict[str, SimulatorThread]
    configs: dict[str, SimConfig]
    key: str

    def run_snippet(self) -> list[str]:
        """The snippet's output lines, run as ``python spill.py`` with the page's variables."""
        env = dict(os.environ, GATEWAY=self.gateway.url, SLUICEGATE_KEY=self.key)
        done = subprocess.run(
            [sys.executable, str(self.workdir / SNIPPET)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    def backend_of_region(self, region: str) -> str:
        (name,) = [n for n, c in self.configs.items() if c.region == region]
        return name

    def records(self, expect: int) -> list[UsageRecord]:
        """The ledger's records (one per upstream attempt), by arrival then attempt. A record
        is submitted as its response ends, so the last may trail the client's read a little."""
        g = self.gateway.gateway
        deadline = time.monotonic() + 10
        while True:
            assert g.ledger.flush(10.0)
            rows = fetch_records(g.engine, limit=10_000)
            if len(rows) >= expect or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert len(rows) == expect, rows
        return sorted(rows, key=lambda r: (r.ts, r.attempt))

    def sim_log(self, backend: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.sims[backend].url}/_sim/log", timeout=10)
        resp.raise_for_status()
        log: list[dict[str, Any]] = resp.json()
        return log


def _start(tmp: Path, monkeypatch: pytest.MonkeyPatch, headroom: bool) -> Iterator[Trial]:
    doc = _read_doc()
    for name, body in doc.files.items():
        (tmp / name).write_text(body, encoding="utf-8")
    gateway_text = doc.files[doc.gateway_file]
    if not headroom:
        # "Uncomment `routing: {headroom: false}`", as the page says.
        assert "\n# routing: {headroom: false}" in gateway_text
        gateway_text = gateway_text.replace("\n# routing:", "\nrouting:", 1)
    (tmp / doc.gateway_file).write_text(gateway_text, encoding="utf-8")
    checked = load_config(tmp / doc.gateway_file)  # the file as written must be valid

    # The backend key, as the page exports it: the simulators' built-in key.
    for backend in checked.backends:
        assert backend.auth.key_env is not None
        assert doc.environment[backend.auth.key_env] == DEFAULT_SIM_API_KEY
    for name, value in doc.environment.items():
        monkeypatch.setenv(name, value)

    started: list[SimulatorThread] = []
    gateway: GatewayThread | None = None
    try:
        by_port: dict[int, tuple[SimulatorThread, SimConfig]] = {}
        for name, port in doc.simulators.items():
            config = load_sim_config(tmp / name)
            sim = SimulatorThread(config).start()
            started.append(sim)
            by_port[port] = (sim, config)
        # The same gateway file, with the simulators where they really listen and the
        # ledger in the test's directory.
        data = yaml.safe_load(gateway_text)
        sims: dict[str, SimulatorThread] = {}
        configs: dict[str, SimConfig] = {}
        for backend in data["backends"]:
            sim, config = by_port[int(urlsplit(backend["url"]).port or 0)]
            backend["url"] = sim.url
            sims[backend["name"]] = sim
            configs[backend["name"]] = config
        data["storage"] = {"url": f"sqlite:///{tmp / 'ledger.db'}", "spill_dir": str(tmp / "spill")}
        gateway = GatewayThread(parse_config(data, str(tmp / doc.gateway_file))).start()
        g = gateway.gateway
        issued = AdminService(g.config, g.repository, g.hasher).create_subscription(
            product=doc.product, owner="me", name="spill-over trial"
        )
        g.refresher.refresh_now()
        assert issued.primary_key is not None
        yield Trial(doc, tmp, gateway, sims, configs, issued.primary_key)
    finally:
        if gateway is not None:
            gateway.stop()
        for sim in started:
            sim.stop()


@pytest.fixture
def trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Trial]:
    yield from _start(tmp_path, monkeypatch, headroom=True)


@pytest.fixture
def trial_without_headroom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Trial]:
    yield from _start(tmp_path, monkeypatch, headroom=False)


def test_the_page_names_its_files_and_commands(tmp_path: Path) -> None:
    doc = _read_doc()
    assert len(doc.simulators) == 2
    assert len(set(doc.simulators.values())) == 2, "each simulator on its own port"
    regions = set()
    for name in doc.simulators:
        (tmp_path / name).write_text(doc.files[name], encoding="utf-8")
        regions.add(load_sim_config(tmp_path / name).region)
    assert len(regions) == 2, "the regions tell the simulators apart"


def test_requests_beyond_the_ptu_budget_are_answered_by_pay_as_you_go(trial: Trial) -> None:
    ptu = next(n for n, b in _backend_kinds(trial).items() if b == "ptu")
    paygo = next(n for n in trial.sims if n != ptu)
    lines = trial.run_snippet()

    # The snippet prints exactly what the page shows.
    assert lines == trial.doc.output
    served = [trial.backend_of_region(_region(line)) for line in lines]
    spill = served.index(paygo)
    assert spill > 0 and served == [ptu] * spill + [paygo] * (len(lines) - spill)

    # The ledger: one record per request (no failed attempt), on the backend that answered.
    records = trial.records(expect=len(lines))
    assert [r.backend for r in records] == served
    assert all(r.status == 200 and r.attempt == 1 for r in records)
    assert [r.extra.get("backend_kind") for r in records] == [
        _backend_kinds(trial)[b] for b in served
    ]

    # The simulators: the PTU one admitted what fits in its minute and refused nothing (the
    # gateway spilled on headroom, before a 429); pay-as-you-go took the rest.
    ptu_log, paygo_log = trial.sim_log(ptu), trial.sim_log(paygo)
    assert [e["status"] for e in ptu_log] == [200] * spill
    assert [e["status"] for e in paygo_log] == [200] * (len(lines) - spill)
    tpm = trial.configs[ptu].deployments[0].tpm
    assert tpm is not None and sum(e["estimate"] for e in ptu_log) <= tpm
    # "Hello" with max_tokens 92 is charged 100 tokens (the page's arithmetic).
    assert {(e["prompt_tokens"], e["estimate"]) for e in ptu_log + paygo_log} == {(8, 100)}
    # A simulator record matches its ledger record through x-ms-client-request-id.
    for backend, log in ((ptu, ptu_log), (paygo, paygo_log)):
        ids = {e["headers"]["x-ms-client-request-id"] for e in log}
        assert ids == {r.request_id for r in records if r.backend == backend}

    # Asked directly for more than it has left, the PTU simulator answers 429 + retry-after.
    deployment = trial.configs[ptu].deployments[0].name
    direct = httpx.post(
        f"{trial.sims[ptu].url}/openai/deployments/{deployment}/chat/completions"
        "?api-version=2024-10-21",
        headers={"api-key": DEFAULT_SIM_API_KEY},
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 500},
        timeout=10,
    )
    assert direct.status_code == 429
    assert direct.json()["error"]["code"] == "429"
    assert 1 <= int(direct.headers["retry-after"]) <= 60
    assert int(direct.headers["retry-after-ms"]) > 0


def test_without_headroom_the_ptu_429_is_failed_over_inside_the_request(
    trial_without_headroom: Trial,
) -> None:
    trial = trial_without_headroom
    ptu = next(n for n, b in _backend_kinds(trial).items() if b == "ptu")
    paygo = next(n for n in trial.sims if n != ptu)
    lines = trial.run_snippet()

    # "Requests 1-10 are answered by Sweden Central, … 12-15 go straight to West Europe."
    served = [trial.backend_of_region(_region(line)) for line in lines]
    assert served == [ptu] * 10 + [paygo] * (len(lines) - 10)

    # The PTU simulator refused the 11th with the page's one 429; the client never saw it.
    ptu_log = trial.sim_log(ptu)
    assert [e["status"] for e in ptu_log] == [200] * 10 + [429]
    assert [e["status"] for e in trial.sim_log(paygo)] == [200] * (len(lines) - 10)

    # The ledger: attempt 1 on the PTU backend (429), attempt 2 on pay-as-you-go.
    records = trial.records(expect=len(lines) + 1)
    failed = [r for r in records if r.attempt > 1 or r.status != 200]
    first, second = sorted(failed, key=lambda r: r.attempt)
    assert (first.attempt, first.backend, first.status) == (1, ptu, 429)
    assert (second.attempt, second.backend, second.status) == (2, paygo, 200)
    assert first.request_id == second.request_id


def _region(line: str) -> str:
    """The region in a line of the snippet's output: "<n> <region…> <deployment> <tokens>"."""
    return " ".join(line.split()[1:-2])


def _backend_kinds(trial: Trial) -> dict[str, str]:
    return {b.name: b.kind for b in trial.gateway.config.backends}
