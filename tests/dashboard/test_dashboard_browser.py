"""The dashboard in headless Chromium (Playwright) against a running gateway and simulator:
log in, create a subscription, call the gateway with its key through the openai SDK, find
those calls in the chart and the table, download the CSV and check it against the ledger,
suspend the subscription and see the next call refused, sign out. Screenshots of the main pages
go to test-artifacts/screenshots/."""

from __future__ import annotations

import csv
import io
import shutil
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Page, sync_playwright

from tests.admin.harness import ADMIN_TOKEN, admin_gateway

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
PRICES = [
    {"deployment": "gpt-4o-mini", "input": 0.15, "output": 0.60},
    {"model": "text-embedding-3-small", "input": 0.02},
]
PER_MILLION = {
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "text-embedding-3-small": (Decimal("0.02"), Decimal(0)),
}


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_dashboard_end_to_end(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            f"{CHROMIUM} is missing: install it with 'apt-get install -y chromium chromium-driver'"
        )
    with admin_gateway(tmp_path, prices=PRICES) as h, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True)
            page.on("dialog", lambda dialog: dialog.accept())
            # Log in: the dashboard sends strangers to the login page.
            page.goto(f"{h.url}/dashboard/")
            assert page.url.endswith("/dashboard/login")
            shot(page, "01-login")
            page.fill("#token", "not-the-token")
            page.click("button[type=submit]")
            assert page.locator(".alert").inner_text() == "That is not the admin token."
            page.fill("#token", ADMIN_TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(f"{h.url}/dashboard/")
            cookie = next(c for c in page.context.cookies() if c["name"] == "sluicegate_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert ADMIN_TOKEN not in page.url

            # Create a subscription; its keys are shown once.
            page.goto(f"{h.url}/dashboard/subscriptions")
            page.fill("#create-form input[name=owner]", "team-browser")
            page.fill("#create-form input[name=name]", "browser-app")
            page.click("#create-form button.primary")
            key = page.locator("#primary-key").inner_text()
            sub_id = page.locator("#new-sub-link").inner_text()
            assert key.startswith("sg-") and sub_id.startswith("sub_")
            shot(page, "02-subscription-created")
            page.goto(f"{h.url}/dashboard/subscriptions")
            assert key not in page.content()  # never shown again
            h.gw.gateway.refresher.refresh_now()

            # Use the key with the official SDK.
            client = openai.AzureOpenAI(
                azure_endpoint=h.url, api_key=key, api_version="2024-10-21", max_retries=0
            )
            for i in range(3):
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"hello number {i} " * (i + 1)}],
                )
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                stream=True,
                messages=[{"role": "user", "content": "stream this please"}],
            )
            for _ in stream:
                pass
            client.embeddings.create(model="text-embedding-3-small", input="embed me")
            records = [r for r in h.records(5) if r.subscription_id == sub_id]
            assert len(records) == 5
            tokens = sum(r.total_tokens for r in records)
            cost = sum(
                (
                    (
                        r.prompt_tokens * PER_MILLION[r.deployment or ""][0]
                        + r.completion_tokens * PER_MILLION[r.deployment or ""][1]
                    )
                    / 1_000_000
                    for r in records
                ),
                Decimal(0),
            )

            # The chart and the table show those calls.
            page.goto(f"{h.url}/dashboard/?period=24h&by=subscription")
            bars = page.locator(f"#tokens-chart rect[data-key='{sub_id}']")
            assert bars.count() >= 1
            values = [
                float(bars.nth(i).get_attribute("data-value") or 0) for i in range(bars.count())
            ]
            assert sum(values) == tokens
            row = page.locator(f"#top-table tr[data-key='{sub_id}']")
            assert row.locator("td[data-tokens]").get_attribute("data-tokens") == str(tokens)
            assert "browser-app (team-browser)" in row.inner_text()
            shot(page, "03-overview")

            # The charge-back table and its CSV agree with the ledger.
            page.goto(f"{h.url}/dashboard/usage?period=24h&by=subscription")
            cb_row = page.locator(f"#chargeback tr[data-key='{sub_id}']")
            assert cb_row.locator("td[data-tokens]").get_attribute("data-tokens") == str(tokens)
            shot(page, "04-chargeback")
            with page.expect_download() as info:
                page.click("#csv-download")
            text = Path(info.value.path()).read_text()
            rows = {r["key"]: r for r in csv.DictReader(io.StringIO(text))}
            mine = rows[sub_id]
            assert int(mine["total_tokens"]) == tokens
            assert int(mine["prompt_tokens"]) == sum(r.prompt_tokens for r in records)
            assert int(mine["completion_tokens"]) == sum(r.completion_tokens for r in records)
            assert int(mine["requests"]) == 5
            assert Decimal(mine["cost"]) == cost.quantize(Decimal("1e-9"))
            assert int(mine["unpriced_records"]) == 0
            assert rows["(total)"]["total_tokens"] == mine["total_tokens"]

            page.goto(f"{h.url}/dashboard/forecast")
            assert page.locator(f"#forecast-table tr[data-key='{sub_id}']").count() == 1
            shot(page, "05-forecast")
            page.goto(f"{h.url}/dashboard/backends")
            assert "healthy" in page.locator("#backends").inner_text()
            shot(page, "06-backends")

            # Suspend it; the next call is refused.
            page.goto(f"{h.url}/dashboard/subscriptions/{sub_id}")
            shot(page, "07-subscription")
            page.click("#suspend")
            page.wait_for_selector("#sub-state:has-text('suspended')")
            shot(page, "08-subscription-suspended")
            h.gw.gateway.refresher.refresh_now()
            with pytest.raises(openai.PermissionDeniedError) as refused:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "still there?"}]
                )
            assert refused.value.status_code == 403
            assert "suspended" in str(refused.value)
            client.close()

            # Sign out with the page's own form (it carries the session's CSRF token).
            page.click("form.logout button")
            page.wait_for_url(f"{h.url}/dashboard/login")
            assert all(c["name"] != "sluicegate_session" for c in page.context.cookies())
        finally:
            browser.close()
