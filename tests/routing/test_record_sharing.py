"""Records waiting for the ledger share what requests routed alike have in common (the
routing details, the model name), and a failover gives its records their own copy."""

from __future__ import annotations

from pathlib import Path

import httpx

from sluicegate.accounting.records import UsageRecord
from tests.routing.harness import Routed, body, pool_config, start_sim


def test_records_routed_alike_share_their_details_and_a_failover_copies_them(
    tmp_path: Path,
) -> None:
    sims = {"a": start_sim(), "b": start_sim()}
    routed = Routed(
        pool_config(tmp_path, sims, [{"backend": "a"}, {"backend": "b", "priority": 2}]), sims
    )
    seen: list[UsageRecord] = []
    routed.gw.gateway.sinks.append(seen.append)  # beside the ledger, as any sink
    try:
        for _ in range(2):
            r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
            assert r.status_code == 200
        first, second = seen
        assert dict(first.extra) == {"backend_deployment": "gpt-4o", "backend_kind": "paygo"}
        assert second.extra is first.extra
        assert first.model == "gpt-4o-2024-08-06" and second.model is first.model

        sims["a"].stop()  # refused: the next request fails over to b
        r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
        assert r.status_code == 200
        failed, served = seen[2:]
        assert (failed.backend, failed.attempt, served.backend, served.attempt) == ("a", 1, "b", 2)
        assert failed.extra["upstream_error"] and "upstream_error" not in served.extra
        assert failed.extra is not first.extra
        # What the first two records hold is as it was: no later request changed it.
        assert dict(first.extra) == {"backend_deployment": "gpt-4o", "backend_kind": "paygo"}
        stored = routed.records(4)
        assert [dict(x.extra) for x in stored] == [dict(x.extra) for x in seen]
    finally:
        routed.stop()
        sims["b"].stop()
