"""The command line's subscription states: ``keys create --state/--comment`` on a product with
``approval_required``, ``keys approve``/``reject`` with ``--comment``, refused transitions
(one line, exit status 1, nothing changed), ``keys list --state`` and the computed ``expired``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from sluicegate.config.loader import load_config
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.schema import subscriptions
from sluicegate.storage.subscriptions import SubscriptionRepository
from tests.integration.test_cli_output import SECRET, run_cli, write_config


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    return write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'l.db'}",
        products=[{"name": "p"}, {"name": "reviewed", "approval_required": True}],
    )


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_approval_and_rejection_from_the_command_line(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["-c", str(config)]
    base = ["keys", "create", *c, "--owner", "team", "--name", "n"]
    asked = _json(capsys, *base, "--product", "reviewed", "--comment", "ticket 42")
    assert (asked["state"], asked["state_comment"]) == ("submitted", "ticket 42")
    assert _json(capsys, *base, "--product", "reviewed", "--state", "active")["state"] == "active"
    plain = _json(capsys, *base, "--product", "p")
    assert plain["state"] == "active"
    other = _json(capsys, *base, "--product", "p", "--state", "submitted")
    assert other["state"] == "submitted"

    code, out, err = run_cli(
        capsys, "keys", "approve", asked["id"], *c, "--comment", "ok by FinOps"
    )
    assert (code, out, err) == (0, f"{asked['id']}: active\n", "")
    shown = _json(capsys, "keys", "show", asked["id"], *c)
    assert (shown["state"], shown["state_comment"]) == ("active", "ok by FinOps")
    rejected = _json(capsys, "keys", "reject", other["id"], *c, "--comment", "duplicate")
    assert (rejected["state"], rejected["state_comment"]) == ("rejected", "duplicate")

    for action, sub_id, state in (
        ("approve", other["id"], "rejected"),
        ("reject", plain["id"], "active"),
        ("resume", other["id"], "rejected"),
    ):
        code, out, err = run_cli(capsys, "keys", action, sub_id, *c)
        assert (code, out) == (1, ""), (action, err)
        assert err == f"error: subscription {sub_id} is {state}: cannot {action} it\n"
    assert _json(capsys, "keys", "show", other["id"], *c)["state_comment"] == "duplicate"

    code, _, err = run_cli(capsys, *base, "--product", "p", "--state", "suspended")
    assert code == 2 and "--state" in err
    code, _, err = run_cli(capsys, "keys", "suspend", plain["id"], *c, "--comment", "a\x1bb")
    assert code == 2 and "--comment must not contain a control character" in err
    assert _json(capsys, "keys", "show", plain["id"], *c)["state"] == "active"

    def listed(state: str) -> list[str]:
        return [s["id"] for s in _json(capsys, "keys", "list", *c, "--state", state)["items"]]

    assert listed("rejected") == [other["id"]]
    assert listed("submitted") == []
    assert len(listed("active")) == 3


def test_an_expired_subscription_reads_as_expired(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["-c", str(config)]
    made = _json(capsys, "keys", "create", *c, "--product", "p", "--owner", "o", "--name", "n")
    engine = create_engine_for(load_config(config).storage.url)
    try:  # no command sets a past expiry: move it back as time would
        repo = SubscriptionRepository(engine)
        stored = repo.get(made["id"])
        assert stored is not None
        with engine.begin() as conn:
            conn.execute(
                subscriptions.update()
                .where(subscriptions.c.id == made["id"])
                .values(expires_at=time.time() - 1)
            )
    finally:
        engine.dispose()
    assert _json(capsys, "keys", "show", made["id"], *c)["state"] == "expired"
    code, out, _ = run_cli(capsys, "keys", "list", *c, "--state", "expired")
    assert code == 0 and made["id"] in out and "expired" in out
    code, _, err = run_cli(capsys, "keys", "resume", made["id"], *c)
    assert code == 1 and err == f"error: subscription {made['id']} is expired: cannot resume it\n"
    assert _json(capsys, "keys", "cancel", made["id"], *c)["state"] == "cancelled"
