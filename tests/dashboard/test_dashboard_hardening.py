"""The dashboard over HTTP, where it must hold against strangers and mistakes: form bodies are
read with a hard cap and a time bound (also before sign-in), every cookie is ``Secure`` behind
a TLS-terminating proxy (an https ``redirect_uri``), out-of-range dates get a page saying so,
and signing out needs the session's CSRF token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

from sluicegate.admin.api import MAX_TIME
from sluicegate.dashboard.views import FORM_LIMIT
from tests.admin.entra import ADMIN_APP, ADMIN_GROUP, admin_section
from tests.admin.harness import ADMIN_TOKEN, admin_gateway
from tests.admin.uploads import stream_body, trickle_body
from tests.dashboard.test_entra_signin import at_idp
from tests.support.idp import TestIdentityProvider

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PUBLIC_CALLBACK = "https://gateway.example.com/dashboard/auth/callback"


@pytest.fixture
def idp() -> Iterator[TestIdentityProvider]:
    with TestIdentityProvider() as provider:
        yield provider


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _log_in(client: httpx.Client) -> None:
    r = client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
    assert r.status_code == 303, r.text
    assert "sluicegate_session" in client.cookies


def _set_cookies(response: httpx.Response) -> dict[str, str]:
    """Each ``Set-Cookie`` of ``response``, by cookie name."""
    return {
        value.split("=", 1)[0]: value
        for name, value in response.headers.multi_items()
        if name == "set-cookie"
    }


def _attributes(set_cookie: str) -> set[str]:
    return {part.strip().split("=", 1)[0].lower() for part in set_cookie.split(";")[1:]}


def test_form_bodies_over_the_limit_are_refused_without_reading_them(tmp_path: Path) -> None:
    """The login form, without credentials: 16 MiB streamed (chunked) gets 413 while the body
    is still coming; one declared too large gets 413 before a byte of it is sent. A server
    that read the whole body first could not answer before its end, which never comes. The
    same for a signed-in form."""
    with admin_gateway(tmp_path) as h, httpx.Client(base_url=h.url, timeout=30) as client:
        port = _port(h.url)
        answer = stream_body(port, "POST", "/dashboard/login", FORM, 256 * FORM_LIMIT)
        assert answer.status == 413, answer
        assert answer.headers["content-type"].startswith("text/html")
        assert f"larger than the {FORM_LIMIT} bytes" in answer.body.decode()

        declared, _ = trickle_body(port, "POST", "/dashboard/login", FORM, length=FORM_LIMIT + 1)
        assert declared.status == 413 and declared.sent == 0, declared

        _log_in(client)
        session = f"sluicegate_session={client.cookies['sluicegate_session']}"
        answer = stream_body(
            port,
            "POST",
            "/dashboard/subscriptions",
            {**FORM, "Cookie": session},
            256 * FORM_LIMIT,
        )
        assert answer.status == 413, answer
        assert f"larger than the {FORM_LIMIT} bytes" in answer.body.decode()
        # The session is untouched, and small forms still work.
        assert client.get("/dashboard/").status_code == 200


def test_a_trickling_login_form_gets_408_and_the_connection_closes(tmp_path: Path) -> None:
    with admin_gateway(tmp_path, security={"body_read_timeout_seconds": 1}) as h:
        answer, took = trickle_body(_port(h.url), "POST", "/dashboard/login", FORM)
        assert answer.status == 408, answer
        assert "did not arrive within 1 seconds" in answer.body.decode()
        assert answer.headers["connection"] == "close" and answer.closed
        assert took < 5


def test_every_cookie_is_secure_with_an_https_redirect_uri(
    tmp_path: Path, idp: TestIdentityProvider
) -> None:
    """Plain http to the gateway, as from a TLS-terminating proxy, with an https
    ``redirect_uri`` configured: the sign-in cookie, the session cookie (Entra ID sign-in
    and the admin token alike), and their deletions all carry ``Secure``."""
    admin = admin_section(idp, redirect_uri=PUBLIC_CALLBACK)
    with (
        admin_gateway(tmp_path, admin=admin) as h,
        httpx.Client(base_url=h.url, timeout=30) as client,
    ):
        idp.register_client(ADMIN_APP, [PUBLIC_CALLBACK])
        idp.sign_in_as({"oid": "0ad0ad0a-0000-4000-8000-000000000002", "groups": [ADMIN_GROUP]})
        r = client.get("/dashboard/auth/start")
        assert r.status_code == 303, r.text
        pending = _set_cookies(r)["sluicegate_signin"]
        assert "secure" in _attributes(pending), pending
        _, query = at_idp(r.headers["location"])
        done = client.get(
            f"/dashboard/auth/callback?{urlencode(query)}",
            # By hand: like a browser, httpx sends no Secure cookie over plain http. (The
            # browser's side of the proxy is https.)
            headers={"Cookie": pending.split(";")[0]},
        )
        assert done.status_code == 200, done.text
        cookies = _set_cookies(done)
        assert "secure" in _attributes(cookies["sluicegate_session"]), cookies
        assert "secure" in _attributes(cookies["sluicegate_signin"]), cookies  # the deletion

        login = httpx.post(f"{h.url}/dashboard/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303
        session = _set_cookies(login)["sluicegate_session"]
        assert "secure" in _attributes(session), session
        token = session.split(";")[0]
        page = httpx.get(f"{h.url}/dashboard/", headers={"Cookie": token})
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        out = httpx.post(
            f"{h.url}/dashboard/logout", data={"csrf": csrf.group(1)}, headers={"Cookie": token}
        )
        assert out.status_code == 303
        assert "secure" in _attributes(_set_cookies(out)["sluicegate_session"])


def test_the_token_login_cookie_stays_plain_over_plain_http(tmp_path: Path) -> None:
    """No https anywhere (no ``redirect_uri``, a plain-http request): no ``Secure``, or the
    browser would drop the cookie and nobody could sign in."""
    with admin_gateway(tmp_path) as h:
        login = httpx.post(f"{h.url}/dashboard/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303
        assert "secure" not in _attributes(_set_cookies(login)["sluicegate_session"])


def test_out_of_range_dates_get_a_page_saying_so(tmp_path: Path) -> None:
    """The review's 500s (a plain "Internal Server Error", a reset connection for the CSV):
    now 422 with the dashboard's page naming the parameter and the range."""
    with admin_gateway(tmp_path) as h, httpx.Client(base_url=h.url, timeout=30) as client:
        _log_in(client)
        for path in ("/dashboard/", "/dashboard/usage", "/dashboard/usage.csv"):
            for when, name in (
                ({"from": "100000000000000", "to": "100000000000001"}, "from"),
                ({"from": "2024-01-01", "to": "10000000000000"}, "to"),
            ):
                r = client.get(path, params=when)
                assert r.status_code == 422, (path, when, r.text)
                assert r.headers["content-type"].startswith("text/html")
                assert f"&#39;{name}&#39; must be from 1970-01-01 up to 9999-01-01" in r.text
            # The latest accepted time works (hourly and daily charts).
            for days in (2, 40):
                end = int(MAX_TIME)
                r = client.get(path, params={"from": end - days * 86400, "to": end})
                assert r.status_code == 200, (path, days, r.text)


def _logout_form(page: str) -> dict[str, str]:
    """The fields of the page's sign-out form, as a browser would send them."""
    form = re.search(r'<form method="post" action="/dashboard/logout"[^>]*>(.*?)</form>', page)
    assert form is not None, page
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form.group(1)))


def test_signing_out_needs_the_csrf_token(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h, httpx.Client(base_url=h.url, timeout=30) as client:
        _log_in(client)
        page = client.get("/dashboard/")
        assert page.status_code == 200
        fields = _logout_form(page.text)
        assert set(fields) == {"csrf"} and fields["csrf"]

        # Another site's form: no token, or a wrong one. Refused; the session goes on.
        for data in ({}, {"csrf": "forged"}, {"csrf": fields["csrf"][:-1]}):
            r = client.post("/dashboard/logout", data=data)
            assert r.status_code == 403, (data, r.text)
            assert "The form expired" in r.text
            assert "sluicegate_session" not in _set_cookies(r)
            # The refusal page's own sign-out form works.
            assert _logout_form(r.text) == fields
            assert client.get("/dashboard/").status_code == 200

        # The page's own form: signed out.
        r = client.post("/dashboard/logout", data=fields)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
        assert "sluicegate_session" not in client.cookies
        gone = client.get("/dashboard/")
        assert gone.status_code == 303 and gone.headers["location"] == "/dashboard/login"
