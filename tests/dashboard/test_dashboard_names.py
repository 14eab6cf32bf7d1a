"""The dashboard's "New subscription" form refuses a name or owner with a control or
invisible formatting character, with the admin API's check (``admin.schemas.text_problem``)
shown in the form's error line (422), and stores nothing; ordinary text from other scripts
is taken."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx

from tests.admin.harness import ADMIN_TOKEN, admin_gateway
from tests.integration.test_printable_names import ACCEPTED, REFUSED


def _csrf(client: httpx.Client) -> str:
    page = client.get("/dashboard/subscriptions")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def test_the_new_subscription_form_refuses_control_characters(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h, httpx.Client(base_url=h.url, timeout=30) as client:
        login = client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303, login.text
        csrf = _csrf(client)
        for field in ("owner", "name"):
            for value, problem in REFUSED.items():
                form = {"csrf": csrf, "product": "starter", "owner": "o", "name": "n"}
                form[field] = value
                r = client.post("/dashboard/subscriptions", data=form)
                assert r.status_code == 422, (field, value)
                alert = re.search(r'<p class="alert" role="alert">([^<]*)</p>', r.text)
                assert alert is not None, r.text
                expected = f"{field.capitalize()} must not contain {problem}."
                assert html.unescape(alert.group(1)) == expected
        assert h.api.get("/subscriptions").json()["total"] == 0
        for value in ACCEPTED:
            form = {"csrf": csrf, "product": "starter", "owner": value, "name": value}
            r = client.post("/dashboard/subscriptions", data=form)
            assert r.status_code == 200, r.text
        listed = h.api.get("/subscriptions").json()
        assert sorted(s["name"] for s in listed["items"]) == sorted(ACCEPTED)
