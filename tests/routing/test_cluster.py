"""Two gateways sharing Redis (cluster mode): a backend one of them tripped is avoided by the
other, which never sends it a request."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from sluicegate.cli.main import main
from tests.routing.harness import body, chat_deployment, cluster_pair, start_sim


def test_a_backend_tripped_by_one_gateway_is_avoided_by_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_prefix: str
) -> None:
    sims = {
        "flaky": start_sim(chat_deployment(error_rate=1.0)),  # answers 500
        "steady": start_sim(),
    }
    routing = {"sync_seconds": 0.1, "circuit_breaker": {"failures": 3, "trip_seconds": 30}}
    pool = [{"backend": "flaky", "priority": 1}, {"backend": "steady", "priority": 2}]
    with cluster_pair(tmp_path, sims, pool, redis_prefix, routing=routing) as (one, two, config):
        with httpx.Client(timeout=30) as client:
            for _ in range(3):  # three 500s trip `flaky` on gateway one
                r = client.post(one.chat_url(), json=body(5), headers={"api-key": one.key})
                assert r.status_code == 200  # each failed over to `steady`
            assert one.states()["flaky"]["state"] == "open"
            seen_by_flaky = len(one.sim_log("flaky"))
            assert seen_by_flaky == 3

            deadline = time.monotonic() + 5
            views = {s["backend"]: s for s in two.gateway.backend_states()}
            while views["flaky"]["state"] != "open" and time.monotonic() < deadline:
                time.sleep(0.05)
                views = {s["backend"]: s for s in two.gateway.backend_states()}
            assert views["flaky"]["state"] == "open"
            assert views["flaky"]["open_reason"] == "500"
            # `sluicegate backends` without --url reads the cluster's shared state.
            path = tmp_path / "gateway.yaml"
            path.write_text(yaml.safe_dump(config))
            assert main(["backends", "--config", str(path), "--json"]) == 0
            shown = json.loads(capsys.readouterr().out)
            rows = {row["backend"]: row for row in shown["items"]}
            assert rows["flaky"]["state"] == "open" and rows["flaky"]["open_reason"] == "500"
            assert rows["steady"]["headroom_tokens"] is not None

            url = f"{two.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
            for _ in range(10):
                r = client.post(url, json=body(5), headers={"api-key": one.key})
                assert r.status_code == 200
        assert len(one.sim_log("flaky")) == seen_by_flaky, "gateway two never tried it"
        assert two.gateway.ledger.flush(10.0)
        records = one.records(3 * 2 + 10)  # one ledger (PostgreSQL) for both gateways
        attempts = Counter((r.attempt, r.backend, r.status) for r in records)
        assert attempts == {(1, "flaky", 500): 3, (2, "steady", 200): 3, (1, "steady", 200): 10}
