"""A cancelled subscription is cancelled for good, through the admin API."""

from __future__ import annotations

from pathlib import Path

from tests.admin.harness import admin_gateway


def test_a_cancelled_subscription_takes_no_new_key_and_no_other_state(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h:
        sub_id, _ = h.create("team-a", "k")
        assert h.api.post(f"/subscriptions/{sub_id}/cancel").status_code == 200
        for path, body in (
            (f"/subscriptions/{sub_id}/rotate", {"slot": "primary"}),
            (f"/subscriptions/{sub_id}/resume", None),
            (f"/subscriptions/{sub_id}/suspend", None),
        ):
            r = h.api.post(path, json=body)
            assert r.status_code == 409, (path, r.text)
            error = r.json()["error"]
            assert "cancelled for good" in error["message"]
            assert "primary_key" not in r.text
        shown = h.api.get(f"/subscriptions/{sub_id}").json()
        assert shown["state"] == "cancelled"
