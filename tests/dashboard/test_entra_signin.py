"""The dashboard's Entra ID sign-in over HTTP (the browser test clicks through the same flow):
the authorization request (PKCE S256, state, nonce), the pending sign-in cookie, the code
exchange (verifier, redirect URI, client secret), the session; and every way it can fail,
each with its own page and status, a metrics count and no secret in the logs."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.admin.entra import ADMIN_APP, ADMIN_GROUP, ADMIN_ROLE, admin_section, metric
from tests.admin.harness import AdminHarness, admin_gateway
from tests.support.idp import TestIdentityProvider

SECRET_ENV = "SG_TEST_ADMIN_CLIENT_SECRET"
SECRET = "admin-app-client-secret-0123456789"
ADMIN_USER = {"oid": "0ad0ad0a-0000-4000-8000-000000000001", "groups": [ADMIN_GROUP]}


@pytest.fixture
def idp() -> Iterator[TestIdentityProvider]:
    with TestIdentityProvider() as provider:
        yield provider


def callback_url(h: AdminHarness) -> str:
    return f"{h.url}/dashboard/auth/callback"


def start(client: httpx.Client) -> tuple[str, dict[str, str]]:
    """Follow the link on the login page: (authorization URL, its parameters)."""
    r = client.get("/dashboard/auth/start")
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    return location, {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def at_idp(location: str) -> tuple[str, dict[str, str]]:
    """The identity provider's answer to the authorization request: where it sends the browser
    back to (without its query), and the query."""
    r = httpx.get(location, timeout=30)
    assert r.status_code == 302, r.text
    back = urlsplit(r.headers["location"])
    query = {k: v[0] for k, v in parse_qs(back.query).items()}
    return f"{back.scheme}://{back.netloc}{back.path}", query


def sign_in(client: httpx.Client, h: AdminHarness) -> httpx.Response:
    location, _ = start(client)
    _, query = at_idp(location)
    return client.get(f"/dashboard/auth/callback?{urlencode(query)}")


def test_sign_in_with_entra_id(
    tmp_path: Path,
    idp: TestIdentityProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A confidential client (with a secret) and the redirect URI derived from the request."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with (
        admin_gateway(tmp_path, admin=admin_section(idp, client_secret_env=SECRET_ENV)) as h,
        httpx.Client(base_url=h.url, timeout=30) as client,
    ):
        idp.register_client(ADMIN_APP, [callback_url(h)], secret=SECRET)
        idp.sign_in_as(ADMIN_USER)
        login = client.get("/dashboard/login")
        assert 'href="/dashboard/auth/start"' in login.text
        assert "Sign in with Entra ID" in login.text

        r = client.get("/dashboard/auth/start")
        assert r.status_code == 303
        location = r.headers["location"]
        assert location.startswith(idp.authorization_endpoint + "?")
        params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        assert params["client_id"] == ADMIN_APP
        assert params["response_type"] == "code"
        assert params["redirect_uri"] == callback_url(h)
        assert params["code_challenge_method"] == "S256"
        assert "openid" in params["scope"].split()
        assert len(params["state"]) >= 32 and len(params["nonce"]) >= 32
        cookie_header = r.headers["set-cookie"]
        assert cookie_header.startswith("sluicegate_signin=")
        for attribute in ("HttpOnly", "Path=/dashboard/auth", "SameSite=lax", "Max-Age=600"):
            assert attribute in cookie_header, cookie_header

        back, query = at_idp(location)
        assert back == callback_url(h)
        assert query["state"] == params["state"]
        done = client.get(f"/dashboard/auth/callback?{urlencode(query)}")
        assert done.status_code == 200, done.text
        assert 'http-equiv="refresh" content="0; url=/dashboard/"' in done.text
        assert "sluicegate_session" in client.cookies
        assert "sluicegate_signin" not in client.cookies  # one sign-in, one use
        assert client.get("/dashboard/").status_code == 200

        # What the gateway sent to the token endpoint: the verifier of the challenge, the
        # same redirect URI, the secret.
        [form] = idp.token_requests
        assert form["grant_type"] == "authorization_code"
        assert form["redirect_uri"] == callback_url(h)
        assert form["client_id"] == ADMIN_APP and form["client_secret"] == SECRET
        digest = hashlib.sha256(form["code_verifier"].encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert challenge == params["code_challenge"]

        # The same callback again (a replayed URL): its sign-in is gone.
        again = client.get(f"/dashboard/auth/callback?{urlencode(query)}")
        assert again.status_code == 400
        signed_in = [r for r in caplog.records if r.getMessage().startswith("administrator")]
        assert [getattr(r, "caller", None) for r in signed_in] == [ADMIN_USER["oid"]]
        secrets = (SECRET, query["code"], form["code_verifier"], params["state"])
        # The gateway's own log lines (the test's HTTP client logs its URLs, codes and all).
        for record in caplog.records:
            if record.name.startswith("sluicegate"):
                text = record.getMessage() + repr(vars(record))
                assert not any(s in text for s in secrets), text


def test_failed_sign_ins(
    tmp_path: Path, idp: TestIdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A public client (no secret) with a configured redirect URI (as behind a proxy: the
    identity provider sends the browser to that address, the test brings the query here). It
    is http (loopback) because the test talks plain HTTP: an https one makes the sign-in cookie
    Secure, which an HTTP client rightly does not send back over http."""
    caplog.set_level(logging.INFO, logger="sluicegate.admin")
    public = "http://localhost/dashboard/auth/callback"
    with admin_gateway(tmp_path, admin=admin_section(idp, redirect_uri=public)) as h:
        idp.register_client(ADMIN_APP, [public])

        def attempt(client: httpx.Client, **tamper: str) -> httpx.Response:
            location, params = start(client)
            assert params["redirect_uri"] == public
            back, query = at_idp(location)
            assert back == public
            query.update(tamper)
            return client.get(f"/dashboard/auth/callback?{urlencode(query)}")

        def refused(r: httpx.Response, status: int, *words: str) -> None:
            assert r.status_code == status, r.text
            assert 'id="signin-error"' in r.text
            for word in words:
                assert word in r.text, (word, r.text)
            assert "Traceback" not in r.text
            assert "sluicegate_session" not in r.headers.get("set-cookie", "")

        with httpx.Client(base_url=h.url, timeout=30) as client:
            idp.sign_in_as(ADMIN_USER)
            # A state that is not the one this browser started with.
            refused(attempt(client, state="forged-state"), 400, "cannot be matched")
            # A callback in a browser that started nothing (login CSRF).
            _, query = at_idp(start(client)[0])
            with httpx.Client(base_url=h.url, timeout=30) as stranger:
                refused(
                    stranger.get(f"/dashboard/auth/callback?{urlencode(query)}"),
                    400,
                    "cannot be matched",
                )
            # A pending sign-in cookie that was changed.
            location, _ = start(client)
            _, query = at_idp(location)
            cookie = client.cookies["sluicegate_signin"]
            tampered = ("B" if cookie[0] == "A" else "A") + cookie[1:]
            client.cookies.set(
                "sluicegate_signin", tampered, domain="127.0.0.1", path="/dashboard/auth"
            )
            jar = [c.value for c in client.cookies.jar if c.name == "sluicegate_signin"]
            assert jar == [tampered]
            refused(
                client.get(f"/dashboard/auth/callback?{urlencode(query)}"),
                400,
                "cannot be matched",
            )
            # Someone who is not an administrator.
            idp.sign_in_as({"oid": "5e5e5e5e", "groups": ["not-admins"], "roles": ["Reader"]})
            refused(attempt(client), 403, "not an administrator")
            # An ID token with another sign-in's nonce.
            idp.sign_in_as({**ADMIN_USER, "nonce": "someone-elses-nonce"})
            refused(attempt(client), 401, "nonce")
            # The identity provider says no (the user cancelled).
            idp.sign_in_as(ADMIN_USER)
            idp.refuse_sign_in("access_denied", "AADSTS65004: User declined to consent.")
            refused(attempt(client), 403, "access_denied", "User declined to consent")
            # A code that was already redeemed: the token endpoint refuses it.
            location, _ = start(client)
            _, first = at_idp(location)
            assert client.get(f"/dashboard/auth/callback?{urlencode(first)}").status_code == 200
            _, params = start(client)
            used = {"code": first["code"], "state": params["state"]}
            refused(client.get(f"/dashboard/auth/callback?{urlencode(used)}"), 401, "invalid_grant")
            # The role works as well as the group.
            idp.sign_in_as({"oid": "70707070", "roles": [ADMIN_ROLE]})
            assert attempt(client).status_code == 200
            assert all("client_secret" not in form for form in idp.token_requests)

        metrics = httpx.get(f"{h.url}/metrics", timeout=30).text
        assert metric(metrics, "AdminSignInStateInvalid") == 3
        assert metric(metrics, "AdminNotAnAdmin") == 1
        assert metric(metrics, "AdminSignInNonceInvalid") == 1
        assert metric(metrics, "AdminSignInFailed") == 2
        reasons = [getattr(r, "reason", "") for r in caplog.records]
        assert reasons.count("AdminSignInStateInvalid") == 3
        assert [getattr(r, "surface", "") for r in caplog.records if getattr(r, "reason", "")] == [
            "dashboard"
        ] * 7


def test_sign_in_needs_its_secret(tmp_path: Path, idp: TestIdentityProvider) -> None:
    """``client_secret_env`` names a variable that is not set: the link is not offered, the
    start says why, and the admin token still signs in."""
    config = admin_section(idp, client_secret_env="SG_TEST_NO_SUCH_SECRET")
    with admin_gateway(tmp_path, admin=config) as h:
        login = httpx.get(f"{h.url}/dashboard/login", timeout=30)
        assert "Sign in with Entra ID" not in login.text
        assert "SG_TEST_NO_SUCH_SECRET" in login.text
        r = httpx.get(f"{h.url}/dashboard/auth/start", timeout=30)
        assert r.status_code == 503 and "SG_TEST_NO_SUCH_SECRET" in r.text
        assert h.api.get("/products").status_code == 200


def test_sign_in_cookie_is_secure_behind_a_tls_proxy(
    tmp_path: Path, idp: TestIdentityProvider
) -> None:
    """The gateway speaks http to a TLS-terminating proxy; the public redirect URI is https:
    the pending sign-in cookie is Secure (the browser reaches the callback over https)."""
    public = "https://gateway.example.test/dashboard/auth/callback"
    with admin_gateway(tmp_path, admin=admin_section(idp, redirect_uri=public)) as h:
        r = httpx.get(f"{h.url}/dashboard/auth/start", timeout=30)
        assert r.status_code == 303
        assert parse_qs(urlsplit(r.headers["location"]).query)["redirect_uri"] == [public]
        assert "; secure" in r.headers["set-cookie"].lower()
