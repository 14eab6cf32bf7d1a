"""Costs end to end: mixed requests through a real gateway to the simulator, with known
prices, a price change in the middle of the period (mid-hour) and a PTU reservation, give
exactly the expected cost per team. The expectation is computed here from the ledger's raw
records and the prices written out below, not with the code under test."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from sluicegate.accounting.records import UsageRecord
from sluicegate.clock import FakeClock
from tests.admin.harness import admin_gateway

MARCH = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
APRIL = datetime(2026, 4, 1, tzinfo=UTC).timestamp()
CHANGE = datetime(2026, 3, 10, 10, 30, tzinfo=UTC).timestamp()  # mid-hour on purpose
PTU_MONTHLY = Decimal("7440")
NANO = Decimal("1e-9")

DEPLOYMENTS = [
    {"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"},
    {"name": "gpt-4o", "backend": "sim", "model": "gpt-4o"},
    {"name": "text-embedding-3-small", "backend": "sim", "model": "text-embedding-3-small"},
    {
        "name": "gpt-4o-ptu",
        "backend": "ptu-east",
        "backend_deployment": "gpt-4o",
        "model": "gpt-4o",
    },
    {"name": "custom", "backend": "sim", "backend_deployment": "gpt-4o", "model": "custom-x"},
]
PRICES = [
    {
        "deployment": "gpt-4o-mini",
        "input": 0.15,
        "cached_input": 0.075,
        "output": 0.60,
        "effective_from": "2026-01-01",
    },
    {
        "deployment": "gpt-4o-mini",
        "input": 0.10,
        "cached_input": 0.05,
        "output": 0.40,
        "effective_from": "2026-03-10T10:30:00Z",
    },
    {"model": "gpt-4o", "input": 2.50, "cached_input": 1.25, "output": 10.00},
    {"model": "text-embedding-3-small", "input": 0.02},
]


def per_million(record: UsageRecord) -> tuple[Decimal, Decimal] | None:
    """The test's own price table: (input, output) per million tokens, None if unpriced."""
    if record.backend == "ptu-east":
        return Decimal(0), Decimal(0)
    if record.deployment == "gpt-4o-mini":
        if record.ts < CHANGE:
            return Decimal("0.15"), Decimal("0.60")
        return Decimal("0.10"), Decimal("0.40")
    if record.deployment == "gpt-4o":
        return Decimal("2.50"), Decimal("10.00")
    if record.deployment == "text-embedding-3-small":
        return Decimal("0.02"), Decimal(0)
    return None


def test_cost_per_team_with_price_change_and_ptu(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 10, 9, 5, tzinfo=UTC).timestamp())
    with admin_gateway(
        tmp_path,
        clock,
        backends={"sim": "SIM", "ptu-east": "SIM"},
        deployments=DEPLOYMENTS,
        products=[{"name": "starter", "deployments": ["*"]}],
        prices=PRICES,
        ptu=[{"backend": "ptu-east", "monthly_cost": str(PTU_MONTHLY), "units": 50}],
    ) as h:
        _, key_a1 = h.create("team-a", "a-chat")
        _, key_a2 = h.create("team-a", "a-batch")
        _, key_b = h.create("team-b", "b-app")
        sent = 0

        def burst(words: str) -> None:
            nonlocal sent
            assert h.chat(key_a1, "gpt-4o-mini", f"hello {words}") == 200
            assert h.chat(key_a1, "gpt-4o-mini", f"stream {words} please", stream=True) == 200
            assert h.chat(key_a2, "gpt-4o", f"summarise {words} {words}") == 200
            assert h.embed(key_a2, "text-embedding-3-small", f"embed {words}") == 200
            assert h.chat(key_b, "gpt-4o-mini", f"b asks {words} twice {words}") == 200
            assert h.chat(key_b, "gpt-4o-ptu", f"reserved capacity {words}") == 200
            assert h.chat(key_a1, "gpt-4o-ptu", f"a on ptu {words}", stream=True) == 200
            assert h.chat(key_b, "custom", f"no price for {words}") == 200
            sent += 8

        burst("before the change")
        clock.advance(20 * 60)  # 09:25
        burst("still the old price")
        clock.set(CHANGE - 1)  # one second before the new price
        burst("last second of the old price")
        clock.set(CHANGE)  # the new price applies from this second on
        burst("first second of the new price")
        clock.set(datetime(2026, 3, 17, 16, 0, tzinfo=UTC).timestamp())
        burst("a week later")

        records = h.records(sent)
        r = h.api.get("/usage", params={"by": "owner", "from": "2026-03-01", "to": "2026-04-01"})
        assert r.status_code == 200, r.text
        report = r.json()

    # The test's own expectation, record by record.
    paygo: dict[str, Decimal] = {}
    ptu_tokens: dict[str, int] = {}
    unpriced: dict[str, int] = {}
    for rec in records:
        assert rec.owner is not None and rec.status == 200 and rec.prompt_tokens > 0
        price = per_million(rec)
        if price is None:
            unpriced[rec.owner] = unpriced.get(rec.owner, 0) + 1
            continue
        p_in, p_out = price
        cost = (rec.prompt_tokens * p_in + rec.completion_tokens * p_out) / 1_000_000
        paygo[rec.owner] = paygo.get(rec.owner, Decimal(0)) + cost
        if rec.backend == "ptu-east":
            ptu_tokens[rec.owner] = ptu_tokens.get(rec.owner, 0) + rec.total_tokens
    assert any(rec.ts < CHANGE for rec in records if rec.deployment == "gpt-4o-mini")
    assert any(rec.ts >= CHANGE for rec in records if rec.deployment == "gpt-4o-mini")

    assert report["start"] == MARCH and report["end"] == APRIL
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {"team-a", "team-b"}
    all_ptu = sum(ptu_tokens.values())
    ptu_shares = {team: Decimal(rows[team]["ptu_cost"]) for team in rows}
    # The whole month's reservation is charged, split by tokens sent to it, to the nano.
    assert sum(ptu_shares.values()) == PTU_MONTHLY
    for team, row in rows.items():
        assert Decimal(row["paygo_cost"]) == paygo[team].quantize(NANO), team
        exact_share = PTU_MONTHLY * ptu_tokens[team] / all_ptu
        assert abs(ptu_shares[team] - exact_share) <= NANO, team
        assert Decimal(row["cost"]) == Decimal(row["paygo_cost"]) + ptu_shares[team]
        assert row["unpriced_records"] == unpriced.get(team, 0)
        tokens = sum(r.total_tokens for r in records if r.owner == team)
        assert row["total_tokens"] == tokens
    # Records without a price are flagged, never free: team-b's "custom" calls.
    assert rows["team-b"]["unpriced_records"] == 5 and rows["team-a"]["unpriced_records"] == 0
    assert report["total"]["unpriced_records"] == 5
    assert Decimal(report["total"]["cost"]) == sum(Decimal(r["cost"]) for r in rows.values())
