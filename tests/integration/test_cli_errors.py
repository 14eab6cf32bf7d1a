"""The command line reports what goes wrong as one line with an exit status, never a
traceback: refused requests (status 1), an unreachable or uncreatable database (1), a key
secret it cannot use (1), values the database cannot store (1), and usage errors (2, the same
through ``python -m sluicegate.cli.main`` as through the installed script).

Most commands run in-process through ``main()`` (the function behind both); those that would
start a server, or leave PostgreSQL connections open until the process exits, run as the
installed ``sluicegate`` script in a child process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.cli.main import main
from tests.support.pg import free_port, throwaway_database

SECRET = "cli-test-key-secret-0123456789"
SCRIPT = str(Path(sys.executable).parent / "sluicegate")


def write_config(tmp_path: Path, url: str, **extra: Any) -> Path:
    """A gateway.yaml on database ``url`` with one product, ``p``."""
    data: dict[str, Any] = {
        "storage": {"url": url, "spill_dir": str(tmp_path / "spill")},
        "backends": [{"name": "east", "url": "http://127.0.0.1:9"}],
        "deployments": [{"name": "mini", "backend": "east", "model": "gpt-4o-mini"}],
        "products": [{"name": "p"}],
        **extra,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what earlier calls printed is not this call's
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, starts: str) -> None:
    assert "Traceback" not in err
    assert err.startswith(starts), err
    assert err.count("\n") == 1, err  # one line, ended


def run_script(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "SLUICEGATE_KEY_SECRET": SECRET},
    )


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a throwaway database on the shared PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'ledger.db'}"
    else:
        with throwaway_database() as url:
            yield url


# -- refused requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["forecast", "--limit", "0"],
        ["forecast", "--limit", "1001"],
        ["keys", "list", "--limit", "-1"],
        ["keys", "list", "--limit", "2000"],
        ["keys", "list", "--offset", "-5"],
    ],
)
def test_a_page_out_of_range_is_refused_in_one_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    code, out, err = run_cli(capsys, *argv, "-c", str(config))
    assert code == 1
    assert out == ""
    assert err == "error: limit must be 1..1000 and offset >= 0\n"


# -- the database ----------------------------------------------------------------------------

DATABASE_COMMANDS = [
    ["keys", "list"],
    ["keys", "show", "sub_x"],
    ["keys", "create", "--product", "p", "--owner", "o", "--name", "n"],
    ["keys", "suspend", "sub_x"],
    ["keys", "rotate", "sub_x"],
    ["usage", "report"],
    ["forecast"],
]


@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_an_unreachable_postgresql_is_one_line_naming_it_without_its_password(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], secret: None
) -> None:
    port = free_port()  # nothing listens there
    config = write_config(
        tmp_path,
        f"postgresql://postgres:hunter2@127.0.0.1:{port}/sg",
        mode="cluster",
        redis={"url": "redis://127.0.0.1:6379/0"},
    )
    code, out, err = run_cli(capsys, *argv, "-c", str(config))
    assert code == 1
    assert out == ""
    assert_one_line_error(
        err, f"error: database postgresql://postgres:***@127.0.0.1:{port}/sg: OperationalError: "
    )
    assert "Connection refused" in err
    assert "hunter2" not in err


@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_sqlite_directory_that_cannot_be_made_is_one_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain-file").write_text("not a directory")
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'plain-file' / 'db' / 'l.db'}")
    code, out, err = run_cli(capsys, *argv, "-c", str(config))
    assert code == 1
    assert out == ""
    assert_one_line_error(err, "error: [Errno 20] Not a directory: ")


@pytest.mark.parametrize(
    ("value", "problem"),
    [(None, "must hold the key secret"), ("short", "must be at least 16 bytes")],
)
def test_a_key_secret_the_cli_cannot_use_is_one_line(
    value: str | None,
    problem: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLUICEGATE_KEY_SECRET", raising=False)
    if value is not None:
        monkeypatch.setenv("SLUICEGATE_KEY_SECRET", value)
    with throwaway_database() as url:
        config = write_config(
            tmp_path, url, mode="cluster", redis={"url": "redis://127.0.0.1:6379/0"}
        )
        code, _, err = run_cli(
            capsys, "keys", "create", "--product", "p", "--owner", "o", "--name", "n",
            "-c", str(config),
        )  # fmt: skip
    assert code == 1
    assert_one_line_error(err, "error: key secret: ")
    assert problem in err


# -- values the database cannot store --------------------------------------------------------


@pytest.mark.parametrize("field", ["name", "owner"])
def test_a_name_or_owner_over_200_characters_is_refused_on_both_databases(
    field: str, db_url: str, tmp_path: Path
) -> None:
    # As a child process: on PostgreSQL, the CLI leaves its pooled connections to its exit.
    config = write_config(tmp_path, db_url)
    values = {"name": "n", "owner": "o", field: "x" * 201}
    create = ["keys", "create", "-c", str(config), "--product", "p", "--json"]
    done = run_script(*create, "--name", values["name"], "--owner", values["owner"], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"error: {field} must be at most 200 characters (it has 201)\n"
    listed = run_script("keys", "list", "-c", str(config), "--json", cwd=tmp_path)
    assert json.loads(listed.stdout)["total"] == 0

    values[field] = "x" * 200  # the column's length is allowed
    done = run_script(*create, "--name", values["name"], "--owner", values["owner"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[field] == "x" * 200


# -- --expires-in-days -----------------------------------------------------------------------


@pytest.mark.parametrize("days", ["0", "-1", "nan", "inf", "-inf", "1e300"])
def test_an_expiry_that_is_not_a_future_time_is_a_usage_error(
    days: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    code, out, err = run_cli(
        capsys,
        "keys",
        "create",
        "-c",
        str(config),
        "--product",
        "p",
        "--owner",
        "o",
        "--name",
        "n",
        "--json",
        "--expires-in-days",
        days,
    )
    assert code == 2
    assert out == ""
    assert "--expires-in-days" in err and "Traceback" not in err
    code, out, _ = run_cli(capsys, "keys", "list", "-c", str(config), "--json")
    assert code == 0 and json.loads(out)["total"] == 0  # nothing was stored


def test_a_positive_expiry_is_stored_as_that_many_days_from_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    before = time.time()
    code, out, err = run_cli(
        capsys,
        "keys",
        "create",
        "-c",
        str(config),
        "--product",
        "p",
        "--owner",
        "o",
        "--name",
        "n",
        "--json",
        "--expires-in-days",
        "0.5",
    )
    after = time.time()
    assert code == 0, err
    expires = json.loads(out)["expires_at"]
    assert before + 43200 <= expires <= after + 43200


# -- ports -----------------------------------------------------------------------------------


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port this test listens on: a server told to use it fails at once (EADDRINUSE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("option", ["--port", "--sim-port"])
def test_demo_refuses_a_port_out_of_range_before_starting_anything(
    option: str, held_port: int, tmp_path: Path
) -> None:
    # 65536 + held_port is held_port once truncated to 16 bits: a child that took the value
    # as given would fail to listen, quickly, rather than serve on some other port.
    ports = {"--port": str(free_port()), "--sim-port": str(free_port())}
    ports[option] = str(65536 + held_port)
    workdir = tmp_path / "demo"
    done = run_script(
        "demo", *(x for kv in ports.items() for x in kv), "--workdir", str(workdir), cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert option in done.stderr and "65535" in done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("command", ["serve", "simulate"])
def test_serve_and_simulate_refuse_a_port_out_of_range(
    command: str, held_port: int, tmp_path: Path
) -> None:
    argv = [command, "--port", str(65536 + held_port)]
    if command == "serve":
        argv += ["-c", str(write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}"))]
    done = run_script(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--port" in done.stderr and "65535" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_on_a_database_that_does_not_exist_says_so_in_one_line(tmp_path: Path) -> None:
    # An operator's first cluster start: migrations create the tables, not the database.
    config = write_config(tmp_path, f"postgresql://postgres@127.0.0.1:5432/nodb_{free_port()}")
    done = run_script("serve", "-c", str(config), "--port", str(free_port()), cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "could not start" in x]
    message = json.loads(line)["msg"]
    assert message.startswith("the gateway could not start: database postgresql://")
    assert "does not exist" in message
    assert "alembic.runtime.plugins" not in done.stderr  # its eight lines of plugin noise


# -- python -m sluicegate.cli.main -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["usage", "report", "--from", "bad"], "not an ISO date or date-time: 'bad'"),
        (["keys", "create", "--owner", "o", "--name", "n"], "Missing option '--product'"),
        (["keys", "list", "--limit", "many"], "Invalid value for '--limit'"),
    ],
)
def test_python_m_reports_usage_errors_as_the_script_does(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    results = []
    for exe in ([sys.executable, "-m", "sluicegate.cli.main"], [SCRIPT]):
        done = subprocess.run(
            [*exe, *argv, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert message in done.stderr
        results.append(done.stderr.replace("python -m sluicegate.cli.main", "sluicegate"))
    assert results[0] == results[1]
