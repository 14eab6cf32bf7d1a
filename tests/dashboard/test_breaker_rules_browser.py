"""The dashboard's backends page shows each backend's circuit breaker rule (its own merged
over the global one, the global one, or off), in headless Chromium (Playwright) against a
running gateway. A screenshot goes to test-artifacts/screenshots/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.admin.harness import ADMIN_TOKEN, admin_gateway
from tests.admin.test_breaker_rules import BACKENDS, BREAKERS, DEPLOYMENTS, ROUTING
from tests.dashboard.test_dashboard_browser import CHROMIUM, shot


def test_the_backends_page_shows_each_backends_breaker_rule(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            f"{CHROMIUM} is missing: install it with 'apt-get install -y chromium chromium-driver'"
        )
    with (
        admin_gateway(
            tmp_path, backends=BACKENDS, breakers=BREAKERS, routing=ROUTING, deployments=DEPLOYMENTS
        ) as h,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"{h.url}/dashboard/login")
            page.fill("#token", ADMIN_TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(f"{h.url}/dashboard/")
            page.goto(f"{h.url}/dashboard/backends")
            headers = page.locator("#backends thead th").all_inner_texts()
            assert headers[-1].lower() == "circuit breaker rule"  # upper case by CSS

            def rule(backend: str) -> str:
                return page.locator(f"#backends td.breaker[data-backend='{backend}']").inner_text()

            assert rule("ptu") == (
                "out after 4 failures or 1 × 429 in 15 s, for 300 s (doubling per failed probe, "
                "at most 600 s); retry-after ignored\n"
                "its own rule over routing.circuit_breaker"
            )
            assert rule("paygo") == (
                "out after 4 failures or 2 × 429 in 15 s, for 20 s (doubling per failed probe, "
                "at most 600 s); retry-after ignored\n"
                "routing.circuit_breaker"
            )
            assert rule("vllm") == "off\nits own rule over routing.circuit_breaker"
            shot(page, "backends-breaker-rules")
        finally:
            browser.close()
