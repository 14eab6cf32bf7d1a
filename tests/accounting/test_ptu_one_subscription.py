"""A charge-back report for one subscription, grouped by anything but subscription, charges it
its own PTU share (as in the report by subscription), not the whole share of every group it
is in: a reservation used by two subscriptions is not charged twice."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import charge_report
from sluicegate.accounting.pricing import NANOS, PriceTable
from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.accounting.rollups import Rollups
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from tests.accounting.conftest import write_ledger

JANUARY = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
FEBRUARY = datetime(2026, 2, 1, tzinfo=UTC).timestamp()
CONFIG = {
    "backends": [{"name": "east", "url": "http://e"}, {"name": "west", "url": "http://w"}],
    "deployments": [
        {"name": "gpt-4o", "backend": "east", "model": "gpt-4o"},
        {"name": "gpt-4o-mini", "backend": "east", "model": "gpt-4o-mini"},
        {"name": "paygo", "backend": "west", "model": "gpt-4o-mini"},
    ],
    "products": [{"name": "p"}],
    "prices": [{"model": "gpt-4o-mini", "input": 1, "output": 1}],
    "ptu": [{"backend": "east", "monthly_cost": 3100, "effective_from": "2026-01-01"}],
}


def record(n: int, sub: str, deployment: str, tokens: int, hour: int) -> UsageRecord:
    backend = "west" if deployment == "paygo" else "east"
    return UsageRecord(
        request_id=f"r{n}",
        ts=JANUARY + 2 * 86400 + hour * 3600 + 10,
        subscription_id=sub,
        owner=f"team-{sub}",
        product="p",
        deployment=deployment,
        backend=backend,
        operation="chat/completions",
        status=200,
        outcome=Outcome.OK,
        model="gpt-4o-mini" if deployment != "gpt-4o" else "gpt-4o",
        prompt_tokens=tokens,
        total_tokens=tokens,
    )


def load(engine: Engine, tmp: Path, recs: list[UsageRecord]) -> PriceTable:
    write_ledger(engine, tmp, recs)
    prices = PriceTable(parse_config(CONFIG))
    Rollups(engine, prices, FakeClock(FEBRUARY)).catch_up()
    return prices


def test_one_subscription_by_model_is_charged_its_own_share(engine: Engine, tmp_path: Path) -> None:
    """The reviewer's case: $3,100 on backend east for January, A sent 100 tokens, B 900."""
    prices = load(
        engine,
        tmp_path,
        [record(0, "A", "gpt-4o", 100, 1), record(1, "B", "gpt-4o", 900, 1)],
    )
    by_sub = charge_report(engine, prices, start=JANUARY, end=FEBRUARY, by="subscription")
    assert {r.key: r.ptu_nanos for r in by_sub.rows} == {"A": 310 * NANOS, "B": 2790 * NANOS}
    for sub, share in (("A", 310 * NANOS), ("B", 2790 * NANOS)):
        for by in ("model", "owner", "deployment", "backend", "product"):
            rep = charge_report(
                engine, prices, start=JANUARY, end=FEBRUARY, by=by, subscription_id=sub
            )
            assert [r.ptu_nanos for r in rep.rows] == [share], (sub, by)
            assert rep.total.cost_nanos == share


def test_a_subscriptions_rows_split_its_share_exactly(engine: Engine, tmp_path: Path) -> None:
    """A used the reservation through two deployments (and pay-as-you-go elsewhere), B through
    one; shares that do not divide evenly. A's rows by deployment add up to its line in the
    report by subscription to the nano, each in proportion to its tokens (within a nano), and
    A's and B's lines add up to the reservation's cost."""
    prices = load(
        engine,
        tmp_path,
        [
            record(0, "A", "gpt-4o", 1, 1),
            record(1, "A", "gpt-4o-mini", 2, 2),
            record(2, "A", "paygo", 1000, 3),
            record(3, "B", "gpt-4o", 4, 1),
            record(4, "B", "gpt-4o-mini", 0, 5),
        ],
    )
    cost = 3100 * NANOS
    by_sub = {
        r.key: r.ptu_nanos for r in charge_report(engine, prices, start=JANUARY, end=FEBRUARY).rows
    }
    assert sum(by_sub.values()) == cost
    assert abs(by_sub["A"] - cost * 3 / 7) < 1 and abs(by_sub["B"] - cost * 4 / 7) < 1
    rep = charge_report(
        engine, prices, start=JANUARY, end=FEBRUARY, by="deployment", subscription_id="A"
    )
    rows = {r.key: r for r in rep.rows}
    assert set(rows) == {"gpt-4o", "gpt-4o-mini", "paygo"}
    assert rows["paygo"].ptu_nanos == 0 and rows["paygo"].paygo_nanos == 1000 * 1000
    assert sum(r.ptu_nanos for r in rep.rows) == by_sub["A"]
    assert abs(rows["gpt-4o"].ptu_nanos - by_sub["A"] / 3) < 1
    assert abs(rows["gpt-4o-mini"].ptu_nanos - by_sub["A"] * 2 / 3) < 1
    # B's reservation tokens were all on gpt-4o: its whole share is there.
    rep_b = charge_report(
        engine, prices, start=JANUARY, end=FEBRUARY, by="deployment", subscription_id="B"
    )
    assert {r.key: r.ptu_nanos for r in rep_b.rows} == {"gpt-4o": by_sub["B"], "gpt-4o-mini": 0}
