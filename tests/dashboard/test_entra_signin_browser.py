"""The Entra ID sign-in in headless Chromium: click "Sign in with Entra ID" on the login page,
"Continue" on the (test) identity provider's page, and land on the dashboard signed in; a
user who is not an administrator gets the refusal page; a state changed on the way is refused.

The dashboard is opened as ``http://localhost:<port>`` and the identity provider answers on
``127.0.0.1``: two different sites, as in production, so the browser applies its cross-site
cookie rules (SameSite) to the return from the identity provider: the session cookie is
SameSite=Strict, and a redirect from the callback (a navigation the identity provider's page
started) would arrive without it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Route, sync_playwright

from tests.admin.entra import ADMIN_APP, ADMIN_GROUP, admin_section, metric
from tests.admin.harness import admin_gateway
from tests.support.idp import TestIdentityProvider

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            f"{CHROMIUM} is missing: install it with 'apt-get install -y chromium chromium-driver'"
        )
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def test_sign_in_with_entra_id_in_a_browser(tmp_path: Path, browser: Browser) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with TestIdentityProvider() as idp, admin_gateway(tmp_path, admin=admin_section(idp)) as h:
        site = f"http://localhost:{h.gw.port}"
        idp.register_client(ADMIN_APP, [f"{site}/dashboard/auth/callback"])
        idp.interactive = True  # the way back is a click on the IdP's page (a cross-site start)

        # An administrator: from the login page through the IdP onto the dashboard.
        idp.sign_in_as({"oid": "0ad0ad0a", "name": "Ada Admin", "groups": [ADMIN_GROUP]})
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.goto(f"{site}/dashboard/")
        assert page.url == f"{site}/dashboard/login"
        page.screenshot(path=str(SHOTS / "10-login-with-entra.png"))
        page.click("#entra-sign-in")
        page.wait_for_url(f"{idp.authorization_endpoint}?*")
        page.click("#continue")
        page.wait_for_url(f"{site}/dashboard/")
        assert page.locator("nav a[aria-current=page]").inner_text() == "Overview"
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies["sluicegate_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert "sluicegate_signin" not in cookies
        page.goto(f"{site}/dashboard/subscriptions")  # the session holds
        assert page.url == f"{site}/dashboard/subscriptions"
        context.close()

        # Someone who is not an administrator gets the refusal page, and no session.
        idp.sign_in_as({"oid": "5e5e5e5e", "preferred_username": "sam@example.test"})
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{site}/dashboard/login")
        page.click("#entra-sign-in")
        with page.expect_response(lambda r: "/dashboard/auth/callback" in r.url) as answer:
            page.click("#continue")
        assert answer.value.status == 403
        message = page.locator("#signin-error").inner_text()
        assert "sam@example.test" in message and "not an administrator" in message
        page.screenshot(path=str(SHOTS / "11-entra-not-an-admin.png"))
        assert "sluicegate_session" not in {c["name"] for c in context.cookies()}
        page.goto(f"{site}/dashboard/")
        assert page.url == f"{site}/dashboard/login"
        context.close()

        # A state changed on the way (by whoever sits between the browser and the IdP, which
        # sends it back as given). Redirects cannot be routed, so the change is made to the
        # gateway's answer that starts the chain.
        idp.sign_in_as({"oid": "0ad0ad0a", "groups": [ADMIN_GROUP]})
        context = browser.new_context()
        page = context.new_page()

        def forge_state(route: Route) -> None:
            response = route.fetch(max_redirects=0)
            headers = dict(response.headers)
            parts = urlsplit(headers["location"])
            query = dict(parse_qsl(parts.query))
            query["state"] = "forged-" + query["state"][7:]
            headers["location"] = parts._replace(query=urlencode(query)).geturl()
            route.fulfill(response=response, headers=headers)

        page.route("**/dashboard/auth/start", forge_state)
        page.goto(f"{site}/dashboard/login")
        page.click("#entra-sign-in")
        with page.expect_response(lambda r: "/dashboard/auth/callback" in r.url) as answer:
            page.click("#continue")
        callback = answer.value
        assert callback.status == 400
        assert "state=forged-" in callback.url
        # The browser did bring its pending sign-in: the state is what was refused.
        assert "sluicegate_signin=" in callback.request.all_headers().get("cookie", "")
        assert "cannot be matched" in page.locator("#signin-error").inner_text()
        assert "sluicegate_session" not in {c["name"] for c in context.cookies()}
        context.close()

        text = httpx.get(f"{h.url}/metrics", timeout=30).text
        assert metric(text, "AdminNotAnAdmin") == 1
        assert metric(text, "AdminSignInStateInvalid") == 1
