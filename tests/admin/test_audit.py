"""Every change through the admin API leaves an audit line, and no answer may be cached."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.admin.harness import ADMIN_TOKEN, admin_gateway


def test_changes_are_logged_with_their_caller_and_answers_are_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.admin")
    with admin_gateway(tmp_path) as h:
        created = h.api.post(
            "/subscriptions", json={"product": "starter", "owner": "team-a", "name": "k"}
        )
        assert created.status_code == 201
        assert created.headers["cache-control"] == "no-store"  # it holds the new keys
        sub_id, key = created.json()["subscription"]["id"], created.json()["primary_key"]
        rotated = h.api.post(f"/subscriptions/{sub_id}/rotate", json={"slot": "secondary"})
        assert rotated.headers["cache-control"] == "no-store"
        missing = h.api.post("/subscriptions/sub_nope/suspend")
        assert missing.status_code == 404 and missing.headers["cache-control"] == "no-store"
        listed = h.api.get("/subscriptions")
        assert listed.headers["cache-control"] == "no-store"
    audit = [r.getMessage() for r in caplog.records if r.name == "sluicegate.admin"]
    assert audit == [
        "admin API: POST /admin/api/subscriptions by token: 201",
        f"admin API: POST /admin/api/subscriptions/{sub_id}/rotate by token: 200",
        "admin API: POST /admin/api/subscriptions/sub_nope/suspend by token: 404",
    ]
    for text in caplog.text, *audit:
        assert key not in text and ADMIN_TOKEN not in text
