"""Usage reports on SQLite and PostgreSQL: grouping, counting rules, ranges, ordering."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.reports import (
    ReportRow,
    count_records,
    fetch_records,
    ledger_totals,
    usage_report,
)
from tests.storage.conftest import build_record

T0 = 1_700_000_000.0


def rec(n: int, **kw: object) -> UsageRecord:
    base: dict[str, object] = {
        "ts": T0 + n,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }
    base.update(kw)
    return build_record(n, **base)


LEDGER = [
    # team-a / sub-a: two requests, one retried after a 429 on another backend
    rec(1, subscription_id="sub-a", owner="team-a", backend="east", model="m1",
        prompt_tokens=100, completion_tokens=50, total_tokens=150, cached_tokens=20),
    rec(2, request_id="req-retried", attempt=1, subscription_id="sub-a", owner="team-a",
        backend="east", model=None, status=429, outcome=Outcome.BACKEND_ERROR),
    rec(3, request_id="req-retried", attempt=2, subscription_id="sub-a", owner="team-a",
        backend="west", model="m1", prompt_tokens=10, completion_tokens=5, total_tokens=15,
        reasoning_tokens=3),
    # team-a / sub-b: an aborted stream with estimated usage, and a rejected request
    rec(4, subscription_id="sub-b", owner="team-a", backend="west", model="m2",
        outcome=Outcome.ABORTED, usage_estimated=True, prompt_tokens=40, total_tokens=40),
    rec(5, subscription_id="sub-b", owner="team-a", backend=None, deployment=None, model=None,
        status=429, outcome=Outcome.REJECTED),
    # team-b / sub-c: the biggest spender, and a client error
    rec(6, subscription_id="sub-c", owner="team-b", backend="east", model="m2",
        prompt_tokens=1000, completion_tokens=500, total_tokens=1500),
    rec(7, subscription_id="sub-c", owner="team-b", backend="east", model="m2", status=400,
        outcome=Outcome.CLIENT_ERROR),
    # outside the range [T0, T0 + 100)
    rec(100, subscription_id="sub-a", owner="team-a", total_tokens=99999),
    rec(-1, subscription_id="sub-a", owner="team-a", total_tokens=99999),
]  # fmt: skip


@pytest.fixture
def ledger(engine: Engine, tmp_path: Path) -> Engine:
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl")
    writer.start()
    for r in LEDGER:
        writer.submit(r)
    writer.close(10)
    assert count_records(engine) == len(LEDGER)
    return engine


def row(key: str | None, **kw: int) -> ReportRow:
    values = dict.fromkeys(
        ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
         "reasoning_tokens", "aborted", "estimated", "errors"),
        0,
    )  # fmt: skip
    values.update(kw)
    return ReportRow(key=key, **values)


def test_by_subscription(ledger: Engine) -> None:
    assert usage_report(ledger, start=T0, end=T0 + 100, by="subscription") == [
        row("sub-c", requests=2, prompt_tokens=1000, completion_tokens=500, total_tokens=1500,
            errors=1),
        row("sub-a", requests=2, prompt_tokens=110, completion_tokens=55, total_tokens=165,
            cached_tokens=20, reasoning_tokens=3, errors=1),
        row("sub-b", requests=2, prompt_tokens=40, total_tokens=40, aborted=1, estimated=1,
            errors=1),
    ]  # fmt: skip


def test_by_owner_counts_a_retried_request_once(ledger: Engine) -> None:
    report = usage_report(ledger, start=T0, end=T0 + 100, by="owner")
    assert [(r.key, r.requests, r.total_tokens, r.errors) for r in report] == [
        ("team-b", 2, 1500, 1),
        ("team-a", 4, 205, 2),
    ]


def test_by_backend_and_model_keep_missing_values_as_none_last(ledger: Engine) -> None:
    by_backend = usage_report(ledger, start=T0, end=T0 + 100, by="backend")
    assert [(r.key, r.requests, r.total_tokens) for r in by_backend] == [
        ("east", 4, 1650),  # req-retried's first attempt was on east
        ("west", 2, 55),
        (None, 1, 0),
    ]
    by_model = usage_report(ledger, start=T0, end=T0 + 100, by="model")
    assert [(r.key, r.requests, r.total_tokens) for r in by_model] == [
        ("m2", 3, 1540),
        ("m1", 2, 165),
        (None, 2, 0),
    ]


def test_by_product_and_deployment(ledger: Engine) -> None:
    (product,) = usage_report(ledger, start=T0, end=T0 + 100, by="product")
    assert (product.key, product.requests, product.total_tokens) == ("standard", 6, 1705)
    deployments = usage_report(ledger, start=T0, end=T0 + 100, by="deployment")
    assert [(r.key, r.requests) for r in deployments] == [("gpt-4o", 5), (None, 1)]


def test_range_is_half_open_and_subscription_filter_applies(ledger: Engine) -> None:
    assert usage_report(ledger, start=T0 + 2, end=T0 + 4, by="subscription") == [
        row("sub-a", requests=1, prompt_tokens=10, completion_tokens=5, total_tokens=15,
            reasoning_tokens=3, errors=1),
    ]  # fmt: skip
    only_a = usage_report(ledger, start=T0 - 10, end=T0 + 1000, by="model", subscription_id="sub-a")
    assert [(r.key, r.total_tokens) for r in only_a] == [
        ("gpt-4o-2024-08-06", 199998),  # the two records outside the main range
        ("m1", 165),
        (None, 0),  # the attempt that got a 429
    ]
    assert usage_report(ledger, start=T0 + 500, end=T0 + 600, by="owner") == []


def test_totals(ledger: Engine) -> None:
    assert ledger_totals(ledger, start=T0, end=T0 + 100) == row(
        None, requests=6, prompt_tokens=1150, completion_tokens=555, total_tokens=1705,
        cached_tokens=20, reasoning_tokens=3, aborted=1, estimated=1, errors=3,
    )  # fmt: skip
    everything = ledger_totals(ledger)
    assert (everything.requests, everything.total_tokens) == (8, 1705 + 2 * 99999)
    assert ledger_totals(ledger, subscription_id="sub-c").total_tokens == 1500


def test_totals_of_an_empty_ledger_are_zero(engine: Engine) -> None:
    assert ledger_totals(engine) == row(None)


def test_fetch_records_orders_filters_and_pages(ledger: Engine) -> None:
    everything = fetch_records(ledger)
    assert everything == sorted(LEDGER, key=lambda r: (r.ts, r.request_id, r.attempt))
    assert fetch_records(ledger, start=T0 + 2, end=T0 + 4) == LEDGER[1:3]
    assert fetch_records(ledger, subscription_id="sub-c") == LEDGER[5:7]
    assert fetch_records(ledger, limit=2, offset=1) == everything[1:3]


def test_unknown_grouping_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="cannot group by 'team'"):
        usage_report(engine, start=0, end=1, by="team")  # type: ignore[arg-type]
