"""The admin API refuses every call without the admin token, also with a valid subscription
key; and the admin token is not a subscription key."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.admin.harness import ADMIN_TOKEN, admin_gateway


def test_every_operation_needs_the_admin_token(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h:
        sub_id, key = h.create("team-a", "a")
        doc = h.api.get("/openapi.json")
        assert doc.status_code == 200
        paths = doc.json()["paths"]
        calls = [("get", "/admin/api/openapi.json")]
        for path, ops in paths.items():
            concrete = re.sub(r"\{subscription_id\}", sub_id, path)
            calls.extend((method, concrete) for method in ops)
        assert len(calls) >= 20
        # Cancelling is for good (later changes get 409): it goes last.
        calls.sort(key=lambda call: call[1].endswith("/cancel"))
        bad_headers = [
            {},
            {"Authorization": f"Bearer {key}"},  # a valid subscription key
            {"api-key": key},
            {"Ocp-Apim-Subscription-Key": key},
            {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
            {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
            {"Authorization": ADMIN_TOKEN},
        ]
        with httpx.Client(base_url=h.url) as client:
            for method, path in calls:
                for headers in bad_headers:
                    r = client.request(method, path, headers=headers, json={})
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.json()["error"]["code"] == "Unauthorized"
                body = (
                    {"product": "starter", "owner": "o", "name": "n"}
                    if path == "/admin/api/subscriptions"
                    else {}
                )
                good = client.request(
                    method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json=body
                )
                if "{name}" in path:  # an export's rewind: this gateway has no export
                    assert good.status_code == 404, (method, path, good.text)
                    continue
                if path.endswith("/reject"):  # only a submitted subscription can be rejected
                    assert good.status_code == 409, (method, path, good.text)
                    continue
                assert good.status_code < 400, (method, path, good.text)
            # Unknown admin paths are refused the same way, not revealed.
            assert client.get("/admin/api/nothing-here").status_code == 401
            # The dashboard needs a session: the API token as a header does not open it.
            page = client.get("/dashboard/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert page.status_code == 303 and page.headers["location"] == "/dashboard/login"
            for header in ({"api-key": key}, {"Cookie": f"sluicegate_session={key}"}):
                assert client.get("/dashboard/usage", headers=header).status_code == 303
            # The admin token does not work as a subscription key.
            for header in ({"api-key": ADMIN_TOKEN}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
                r = client.post(
                    "/openai/deployments/gpt-4o-mini/chat/completions",
                    params={"api-version": "2024-10-21"},
                    headers=header,
                    json={"messages": [{"role": "user", "content": "x"}]},
                )
                assert r.status_code == 401, r.text


def test_admin_api_is_off_without_a_token(tmp_path: Path) -> None:
    with admin_gateway(tmp_path, admin={"token_env": "SG_TEST_NO_SUCH_TOKEN"}) as h:
        r = httpx.get(f"{h.url}/admin/api/products", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 503
        assert "SG_TEST_NO_SUCH_TOKEN" in r.json()["error"]["message"]
        login = httpx.post(f"{h.url}/dashboard/login", data={"token": ""})
        assert login.status_code == 401 and "SG_TEST_NO_SUCH_TOKEN" in login.text


def test_backend_state_shows_routing_per_deployment(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h:
        _, key = h.create("team-a", "a")
        assert h.chat(key, "gpt-4o-mini", "hello there") == 200
        r = h.api.get("/backends")
        assert r.status_code == 200
        items = r.json()["items"]
        assert items
        views = [v for b in items for v in b["routing"]]
        used = [v for v in views if v["deployment"] == "gpt-4o-mini"]
        assert used
        assert used[0]["state"] == "closed"
        assert used[0]["last_status"] == 200
        assert used[0]["headroom_tokens"] is not None  # the simulator reports its headroom
