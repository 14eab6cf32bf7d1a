"""Subscription states on the dashboard, in headless Chromium (Playwright): a subscription of
a product with ``approval_required`` is created ``submitted``; the page offers approve and
reject (not suspend or resume); approving with a comment makes the key work through the
openai SDK; a rejected one offers only cancel; the list filters by every state, ``expired``
included."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Page, sync_playwright

from tests.admin.harness import ADMIN_TOKEN, AdminHarness, admin_gateway
from tests.dashboard.test_dashboard_browser import CHROMIUM, shot

PRODUCTS = [
    {"name": "reviewed", "deployments": ["*"], "approval_required": True},
    {"name": "starter", "deployments": ["*"]},
]


def _log_in(page: Page, h: AdminHarness) -> None:
    page.goto(f"{h.url}/dashboard/login")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{h.url}/dashboard/")


def _buttons(page: Page) -> set[str]:
    return set(
        page.locator("form.actions button[name=action]").evaluate_all(
            "els => els.map(e => e.value)"
        )
    )


def test_approve_reject_and_state_filters_in_the_browser(tmp_path: Path) -> None:
    with admin_gateway(tmp_path, products=PRODUCTS) as h, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("dialog", lambda dialog: dialog.accept())
            _log_in(page, h)

            # Created on the dashboard for the reviewed product: submitted, key refused.
            page.goto(f"{h.url}/dashboard/subscriptions")
            page.select_option("#create-form select[name=product]", "reviewed")
            page.fill("#create-form input[name=owner]", "team-browser")
            page.fill("#create-form input[name=name]", "needs-approval")
            page.click("#create-form button.primary")
            key = page.locator("#primary-key").inner_text()
            sub_id = page.locator("#new-sub-link").inner_text()
            h.gw.gateway.refresher.refresh_now()
            client = openai.AzureOpenAI(
                azure_endpoint=h.url, api_key=key, api_version="2024-10-21", max_retries=0
            )
            messages: list[openai.types.chat.ChatCompletionMessageParam] = [
                {"role": "user", "content": "hi"}
            ]
            with pytest.raises(openai.PermissionDeniedError, match="is submitted"):
                client.chat.completions.create(model="gpt-4o-mini", messages=messages)

            page.goto(f"{h.url}/dashboard/subscriptions/{sub_id}")
            assert page.locator("#sub-state").inner_text() == "submitted"
            assert _buttons(page) == {
                "approve",
                "reject",
                "rotate-primary",
                "rotate-secondary",
                "cancel",
            }
            shot(page, "states-01-submitted")
            page.fill("#state-comment-input", "approved in ticket 7")
            page.click("#approve")
            page.wait_for_selector("#sub-state:has-text('active')")
            assert page.locator("#state-comment").inner_text() == "approved in ticket 7"
            assert "approve" not in _buttons(page) and "suspend" in _buttons(page)
            started = time.monotonic()
            while True:  # the background refresh (0.2 s) brings the approval
                try:
                    client.chat.completions.create(model="gpt-4o-mini", messages=messages)
                    break
                except openai.PermissionDeniedError:
                    assert time.monotonic() - started < 1.5
                    time.sleep(0.02)
            client.close()

            # Another one rejected: only cancelling remains.
            page.goto(f"{h.url}/dashboard/subscriptions")
            page.select_option("#create-form select[name=product]", "reviewed")
            page.fill("#create-form input[name=owner]", "team-browser")
            page.fill("#create-form input[name=name]", "to-reject")
            page.click("#create-form button.primary")
            other = page.locator("#new-sub-link").inner_text()
            page.goto(f"{h.url}/dashboard/subscriptions/{other}")
            page.click("#reject")
            page.wait_for_selector("#sub-state:has-text('rejected')")
            assert _buttons(page) == {"cancel"}
            shot(page, "states-02-rejected")

            # One that has expired, made through the admin API.
            r = h.api.post(
                "/subscriptions",
                json={
                    "product": "starter",
                    "owner": "team-browser",
                    "name": "too-late",
                    "expires_at": time.time() - 1,
                },
            )
            expired = r.json()["subscription"]["id"]

            # The list's state filter offers all six states and filters by each.
            page.goto(f"{h.url}/dashboard/subscriptions")
            options = page.locator("select[name=state] option").evaluate_all(
                "els => els.map(e => e.value)"
            )
            assert options == [
                "",
                "submitted",
                "active",
                "suspended",
                "rejected",
                "cancelled",
                "expired",
            ]
            for state, expected in (
                ("active", sub_id),
                ("rejected", other),
                ("expired", expired),
            ):
                page.select_option("select[name=state]", state)
                page.click("form.toolbar button")
                page.wait_for_url(f"**state={state}**")
                rows = page.locator("#subscriptions tbody tr[data-id]").evaluate_all(
                    "els => els.map(e => e.dataset.id)"
                )
                assert rows == [expected], state
                badge = page.locator(f"tr[data-id='{expected}'] .badge").inner_text()
                assert badge == state
            shot(page, "states-03-expired-filter")
        finally:
            browser.close()
