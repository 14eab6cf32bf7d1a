"""A subscription's name, owner and product never hold a control or invisible formatting
character (``admin.schemas.text_problem``): such a name reached terminals (the CLI's tables:
escape sequences), logs and CSV exports as it was. The admin API (422), the command line (one
line, exit status 2, nothing stored) and the dashboard (tests/dashboard) refuse it with the
same check."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from sluicegate.admin.schemas import text_problem
from tests.admin.harness import admin_gateway
from tests.integration.test_cli_errors import run_cli, write_config

#: Refused: C0 controls (ESC, line break, NUL, tab), DEL, a C1 control (NEL), a bidi override,
#: a zero-width space, a byte-order mark, the line separator.
REFUSED = {
    "\x1b[31mred": "a control character (U+001B at character 1)",
    "two\nlines": "a control character (U+000A at character 4)",
    "nul\x00": "a control character (U+0000 at character 4)",
    "tab\there": "a control character (U+0009 at character 4)",
    "del\x7f": "a control character (U+007F at character 4)",
    "nel\x85": "a control character (U+0085 at character 4)",
    "gpj.\u202eexe": "an invisible formatting character (U+202E at character 5)",
    "zero\u200bwidth": "an invisible formatting character (U+200B at character 5)",
    "\ufeffbom": "an invisible formatting character (U+FEFF at character 1)",
    "line\u2028sep": "an invisible formatting character (U+2028 at character 5)",
}
#: Accepted: accents, other scripts, emoji sequences (ZERO WIDTH JOINER) and Persian's ZERO
#: WIDTH NON-JOINER.
ACCEPTED = [
    "Équipe données",
    "数据团队",
    "family \U0001f468\u200d\U0001f469",
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
]


@pytest.mark.parametrize("value", ACCEPTED)
def test_ordinary_text_passes(value: str) -> None:
    assert text_problem(value) is None


@pytest.mark.parametrize("field", ["name", "owner", "product"])
@pytest.mark.parametrize(("value", "problem"), REFUSED.items(), ids=range(len(REFUSED)))
def test_the_command_line_refuses_it_in_one_line(
    field: str, value: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    values = {"product": "p", "owner": "o", "name": "n", field: value}
    argv = ["keys", "create", "-c", str(config), "--json"]
    argv += [x for k, v in values.items() for x in (f"--{k}", v)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert out == ""
    assert err == f"error: --{field} must not contain {problem}\n"
    code, out, _ = run_cli(capsys, "keys", "list", "-c", str(config), "--json")
    assert code == 0 and json.loads(out)["total"] == 0  # nothing was stored


def test_the_command_line_takes_ordinary_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", "cli-test-key-secret-0123456789")
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    for value in ACCEPTED:
        argv = ["keys", "create", "-c", str(config), "--json", "--product", "p"]
        code, out, err = run_cli(capsys, *argv, "--owner", value, "--name", value)
        assert code == 0, err
        assert json.loads(out)["name"] == value


def test_the_admin_api_refuses_it_with_422(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h:
        for field in ("name", "owner", "product"):
            for value, problem in REFUSED.items():
                body = {"product": "starter", "owner": "o", "name": "n", field: value}
                r = h.api.post("/subscriptions", json=body)
                assert r.status_code == 422, (field, value, r.text)
                assert r.json()["error"]["message"] == f"{field}: must not contain {problem}"
        for value in ACCEPTED:
            r = h.api.post(
                "/subscriptions", json={"product": "starter", "owner": value, "name": value}
            )
            assert r.status_code == 201, r.text
        listed = h.api.get("/subscriptions").json()
        assert listed["total"] == len(ACCEPTED)


def test_a_name_stored_before_the_check_is_shown_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row written before names were checked (here by hand) is shown with its control
    characters escaped and its brackets as they are: ``keys list`` failed on ``[/b]`` (rich
    read it as markup) and passed ESC to the terminal; ``keys show`` passed it too."""
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", "cli-test-key-secret-0123456789")
    monkeypatch.setenv("COLUMNS", "200")
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    argv = ["keys", "create", "-c", str(config), "--json", "--product", "p"]
    code, out, err = run_cli(capsys, *argv, "--owner", "o", "--name", "n")
    assert code == 0, err
    sub_id = json.loads(out)["id"]
    with contextlib.closing(sqlite3.connect(tmp_path / "l.db")) as db, db:
        db.execute(
            "UPDATE subscriptions SET name = ?, owner = ?",
            ("\x1b[31mred[/b]", "[bold]team\u202e"),
        )
    code, out, err = run_cli(capsys, "keys", "list", "-c", str(config))
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[31mred[/b]" in out and "[bold]team\\u202e" in out
    code, out, err = run_cli(capsys, "keys", "show", sub_id, "-c", str(config))
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out
    assert "name: \\x1b[31mred[/b]" in out and "owner: [bold]team\\u202e" in out
