"""After a known run, the Prometheus counters scraped from /metrics equal the ledger's totals
(both are fed from the same usage records)."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.admin.harness import admin_gateway


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(samples: list[tuple[dict[str, str], float]], **match: str) -> float:
    return sum(v for labels, v in samples if all(labels.get(k) == m for k, m in match.items()))


def test_prometheus_counters_equal_ledger_totals(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h:
        _, key_a = h.create("team-a", "a")
        _, key_b = h.create("team-b", "b")
        sent = 0
        for i in range(6):
            text = f"question {i} " * (i + 1)
            assert h.chat(key_a, "gpt-4o-mini", text, stream=i % 2 == 0) == 200
            assert h.chat(key_b, "gpt-4o", f"other {i}") == 200
            sent += 2
        assert h.embed(key_b, "text-embedding-3-small", "some text to embed") == 200
        sent += 1
        # A refused request that reached a subscription is in both (no tokens).
        r = httpx.post(
            f"{h.url}/openai/deployments/nope/chat/completions",
            params={"api-version": "2024-10-21"},
            headers={"api-key": key_a},
            json={"messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 404
        sent += 1
        records = h.records(sent)
        m = scrape(h.url)

    tokens = m["gen_ai_client_token_usage_total"]
    assert total(tokens, token_type="input") == sum(r.prompt_tokens for r in records)
    assert total(tokens, token_type="output") == sum(r.completion_tokens for r in records)
    for sub in {r.subscription_id for r in records}:
        assert sub is not None
        mine = [r for r in records if r.subscription_id == sub]
        assert total(tokens, subscription=sub, token_type="input") == sum(
            r.prompt_tokens for r in mine
        )
    for dep in {r.deployment for r in records if r.deployment}:
        mine = [r for r in records if r.deployment == dep]
        assert total(tokens, deployment=dep, token_type="output") == sum(
            r.completion_tokens for r in mine
        )
    requests = m["sluicegate_requests_total"]
    assert total(requests) == len(records)
    assert total(requests, status="200", outcome="ok") == sum(1 for r in records if r.status == 200)
    assert total(requests, status="404") == 1
    # Latency histograms saw every record too.
    assert total(m["gen_ai_server_request_duration_seconds_count"]) == len(records)
    assert total(m["sluicegate_ledger_written_records"]) == len(records)
    assert total(m["sluicegate_backend_state"], backend="sim", state="healthy") == 1
