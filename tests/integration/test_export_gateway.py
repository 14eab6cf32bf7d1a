"""A gateway with a usage export: requests made with the openai SDK reach the (fake) Event Hub
as events with their ledger fields, and no key; after a clean stop and a start, the export
goes on where it was: nothing sent twice, nothing missed (a record written by the stop's
flush is sent by the next start)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluicegate.simulator.event_hub import EventHubThread, FakeEventHub
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness
from tests.support.gateway import BACKEND_KEY, GatewayThread, gateway_config

KEY_ENV = "SG_TEST_EVENTHUB_KEY"


def wait_until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def chat(h: Harness, key: str, n: int) -> None:
    client = h.sdk(key)
    for i in range(n):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"hello {i}"}]
        )


def test_usage_reaches_the_event_hub_once_across_a_restart(
    tmp_path: Path, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EventHubThread(FakeEventHub(key_name="send")) as hub:
        monkeypatch.setenv(KEY_ENV, hub.key)
        export: dict[str, Any] = {
            "name": "usage",
            "type": "event_hub",
            "url": hub.url,
            "sas_key_name": "send",
            "sas_key_env": KEY_ENV,
            "interval_seconds": 0.05,
        }
        config = gateway_config(tmp_path, {"sim": simulator.url}, exports=[export])
        first = Harness(GatewayThread(config).start(), simulator)
        try:
            issued = first.new_key(owner="team-x")
            key = issued.primary_key
            assert key is not None
            chat(first, key, 3)
            wait_until(lambda: len(hub.events()) >= 3)
            chat(first, key, 1)  # its record may be written only by the stop's flush
        finally:
            first.gw.stop()
        second = Harness(GatewayThread(config).start(), simulator)
        try:
            chat(second, key, 1)
            ledger = second.records(expect=5)
            wait_until(lambda: len(hub.events()) >= 5)
        finally:
            second.gw.stop()
        # Read once stopped: the counter moves just after the hub accepted the batch.
        metrics = second.gw.gateway.metrics.render().decode()
        events = [e.json() for e in hub.events()]
    assert len(events) == 5 and len({e["record_id"] for e in events}) == 5
    by_request = {e["request_id"]: e for e in events}
    assert set(by_request) == {r.request_id for r in ledger}
    for rec in ledger:
        event = by_request[rec.request_id]
        assert event["subscription_id"] == issued.subscription.id
        assert event["owner"] == "team-x" and event["product"] == "starter"
        assert (event["deployment"], event["backend"], event["status"]) == (
            "gpt-4o-mini",
            "sim",
            200,
        )
        assert (event["prompt_tokens"], event["completion_tokens"]) == (
            rec.prompt_tokens,
            rec.completion_tokens,
        )
        assert event["total_tokens"] == rec.total_tokens > 0
    wire = repr([(e.body, e.user_properties) for e in hub.events()])
    for secret in (key, issued.secondary_key, BACKEND_KEY, hub.key):
        assert secret is not None and secret not in wire
    assert 'sluicegate_export_events_total{export="usage"}' in metrics
