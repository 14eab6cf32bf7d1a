"""Spending budgets: a subscription over its budget for the period is refused (or warned of).

A budget is ``amount`` (in the prices' currency) per calendar ``period`` (daily, weekly,
monthly, cut in ``timezone`` exactly as token quotas are: ``limits.periods``). A product's
``budget`` applies to each of its subscriptions; a subscription's overrides may replace it
(``{"budget": {...}}``, whole) or lift it (``{"budget": null}``).

How it is enforced, off the request path: the rollup job (``accounting.job``), right after
each catch-up (which rolls every record committed so far into the current hour's rollup),
calls :meth:`Budgets.refresh`. That prices each budgeted subscription's period so far with
the charge-back report (``chargeback.charge_report``: the pay-as-you-go cost priced when
rolled up; with ``include_ptu``, plus its PTU share from the period's start until now, never
the rest of the period) and publishes a new dict of the subscriptions whose budget refuses.
The request path looks its subscription up in that dict (:meth:`Budgets.check`): one dict
lookup and one comparison, no I/O.

In a cluster every instance runs the job against the shared PostgreSQL ledger and computes
the same dict: no publication through Redis (no second source of truth to keep in sync, no
extra round trip), at the price of one grouped read of the rollups per instance and run.

A budget is a cost figure computed after the fact: what is spent between two runs (every
``retention.rollup_interval_seconds``, more under load: ``job.PACING``) and by requests in
progress goes over it. It is a budget, not a limit: a hard cap is a ``token_quota``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

from pydantic import ValidationError
from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import charge_report
from sluicegate.accounting.periods import ceil_hour, iso
from sluicegate.accounting.pricing import NANOS, PriceTable, format_money, nanos_text
from sluicegate.auth.subscriptions import Subscription, SubscriptionState
from sluicegate.clock import Clock
from sluicegate.config.model import BudgetConfig, GatewayConfig, ProductConfig
from sluicegate.limits.periods import PERIOD_NOUNS, period_bounds, zone
from sluicegate.proxy.errors import GatewayError

log = logging.getLogger("sluicegate.budgets")

CODE_BUDGET = "BudgetExceeded"
Source = Literal["product", "subscription"]


def budget_of(
    sub: Subscription, products: Mapping[str, ProductConfig]
) -> tuple[BudgetConfig, Source] | None:
    """The budget that applies to ``sub`` and where it comes from, or None. Raises
    ``pydantic.ValidationError`` for an override that does not validate (the admin API
    refuses those; only a row written by other means can hold one)."""
    overrides = sub.overrides if isinstance(sub.overrides, dict) else {}
    if "budget" in overrides:
        raw = overrides["budget"]
        if raw is None:
            return None
        return BudgetConfig.model_validate(raw), "subscription"
    product = products.get(sub.product)
    if product is None or product.budget is None:
        return None
    return product.budget, "product"


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One subscription's budget and what it has spent in the current period (nanos of
    ``currency``; the period ``[period_start, period_end)`` in epoch seconds)."""

    subscription_id: str
    product: str
    source: Source
    budget: BudgetConfig
    currency: str
    spent_nanos: int
    period_start: float
    period_end: float
    unpriced_records: int = 0

    @property
    def amount_nanos(self) -> int:
        return int(self.budget.amount * NANOS)

    @property
    def ratio(self) -> float:
        return self.spent_nanos / self.amount_nanos

    @property
    def over(self) -> bool:
        return self.spent_nanos >= self.amount_nanos

    @property
    def refuses(self) -> bool:
        return self.over and self.budget.action == "refuse"

    def noun(self) -> str:
        return PERIOD_NOUNS[self.budget.period]

    def renews(self) -> str:
        """The period's end in the budget's time zone (ISO 8601, with its offset)."""
        return datetime.fromtimestamp(self.period_end, zone(self.budget.timezone)).isoformat()

    def line(self) -> str:
        """``"Budget: 12.34 of 2,000.00 USD this month"`` (for the dashboard and the CLI)."""
        return (
            f"Budget: {format_money(self.spent_nanos)} of {format_money(self.amount_nanos)} "
            f"{self.currency} this {self.noun()}"
            + (" (over: refused)" if self.refuses else " (over)" if self.over else "")
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON view (admin API, CLI): amounts as exact decimal strings."""
        return {
            "subscription_id": self.subscription_id,
            "product": self.product,
            "source": self.source,
            "amount": str(self.budget.amount),
            "currency": self.currency,
            "period": self.budget.period,
            "timezone": self.budget.timezone,
            "action": self.budget.action,
            "warn_at": list(self.budget.warn_at),
            "spent": nanos_text(self.spent_nanos),
            "ratio": round(self.ratio, 6),
            "over": self.over,
            "refused": self.refuses,
            "period_start": iso(self.period_start),
            "period_end": iso(self.period_end),
            "unpriced_records": self.unpriced_records,
        }


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    days, rest = divmod(minutes, 1440)
    hours, minutes = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else ""]
    parts.append(f"{minutes} min" if minutes or not (days or hours) else "")
    return " ".join(p for p in parts if p)


def budget_exceeded(status: BudgetStatus, now: float) -> GatewayError:
    """The 403 for a subscription whose budget refuses: Azure's error shape, ``Retry-After``
    until the period renews and ``x-should-retry: false`` (as an exhausted token quota)."""
    wait = max(status.period_end - now, 0.0)
    where = "its product's" if status.source == "product" else "its own"
    message = (
        f"Subscription {status.subscription_id} has spent its budget ({where}) of "
        f"{format_money(status.amount_nanos)} {status.currency} per {status.noun()} "
        f"({format_money(status.spent_nanos)} {status.currency} spent this {status.noun()}); "
        f"it renews at {status.renews()} (in {_duration(wait)}). Ask the gateway's operators "
        "for a larger budget."
    )
    return GatewayError(403, CODE_BUDGET, message, retry_after=wait, should_retry=False)


def compute_statuses(
    engine: Engine,
    prices: PriceTable,
    budgeted: Iterable[tuple[Subscription, BudgetConfig, Source]],
    now: float,
    on_missing_hours: Callable[[float, str], None] | None = None,
) -> list[BudgetStatus]:
    """Each budgeted subscription's spending in its period containing ``now``, read from the
    rollups (catch them up first to include the latest records): one charge-back report by
    subscription per distinct period (only that subscription's rows when it is alone in it).

    What is spent: the pay-as-you-go cost; with ``include_ptu``, plus the subscription's
    share of each PTU reservation's cost from the period's start until ``now`` (never a
    later hour's). Rollups hold whole hours: a period that starts within an hour (a zone
    whose offset is not whole hours) is counted from the next whole hour. Where the hourly
    rollups of the period's first day are purged (``retention.hourly_rollups_days``), only
    the hours still kept from the period's start on are counted, never an earlier hour of
    that day; ``on_missing_hours(period_start, note)`` is then called (once per run and
    period)."""
    groups: dict[tuple[int, int], list[tuple[Subscription, BudgetConfig, Source]]] = {}
    for item in budgeted:
        bounds = period_bounds(item[1].period, now, item[1].timezone)
        groups.setdefault(bounds, []).append(item)
    out: list[BudgetStatus] = []
    for (start_ms, end_ms), items in groups.items():
        start, end = start_ms / 1000, end_ms / 1000
        first = ceil_hour(start)
        # Nothing after now: the period's end is in the future, and a PTU reservation's
        # cost up to it is not spent yet.
        until = min(end, max(now, first + 1))
        alone = items[0][0].id if len(items) == 1 else None
        report = charge_report(
            engine,
            prices,
            start=first,
            end=until,
            subscription_id=alone,
            ptu=any(budget.include_ptu for _, budget, _ in items),
            ptu_until=max(now, first),
            widen=False,
        )
        if report.note and on_missing_hours is not None:
            on_missing_hours(start, report.note)
        rows = {row.key: row for row in report.rows}
        for sub, budget, source in items:
            row = rows.get(sub.id)
            spent = 0
            if row is not None:
                spent = row.cost_nanos if budget.include_ptu else row.paygo_nanos
            out.append(
                BudgetStatus(
                    sub.id,
                    sub.product,
                    source,
                    budget,
                    prices.currency,
                    spent,
                    start,
                    end,
                    row.unpriced_records if row is not None else 0,
                )
            )
    return out


class BudgetObserver(Protocol):
    """Where :class:`Budgets` reports (the gateway's metrics)."""

    def budget_threshold(self, action: str) -> None:
        """A budget crossed one of its thresholds (once per threshold per period)."""

    def budget_unpriced(self, records: int) -> None:
        """Usage records without a price in budgeted subscriptions' current periods (their
        total, at every refresh): a budget does not count them."""


@dataclass(frozen=True, slots=True)
class _Thresholds:
    """A budget's thresholds, computed once per ``BudgetConfig``: ascending ``(nanos,
    fraction)``, the whole budget included."""

    budget: BudgetConfig  # held so that the ``id`` keying the cache is not reused
    amount_nanos: int
    steps: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, budget: BudgetConfig) -> _Thresholds:
        amount = budget.amount * NANOS
        fractions = sorted({*budget.warn_at, 1.0})
        steps = tuple((int(amount * Decimal(str(f))), f) for f in fractions)
        return cls(budget, int(amount), steps)


class Budgets:
    """The budgets of one gateway process: computed by :meth:`refresh` (the rollup job's
    thread, after each catch-up) and checked by :meth:`check` (the request path).

    ``subscriptions`` gives the subscriptions to consider (read at every refresh, so an
    override changed through the admin API applies at the next run)."""

    def __init__(
        self,
        config: GatewayConfig,
        engine: Engine,
        clock: Clock,
        subscriptions: Callable[[], Iterable[Subscription]],
        observer: BudgetObserver | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.prices = PriceTable(config)
        self.observer = observer
        self._subscriptions = subscriptions
        self._products = {p.name: p for p in config.products}
        #: Subscription id → its status, for those whose budget refuses now. Replaced whole
        #: by ``refresh`` (an atomic assignment), read by ``check``.
        self.refused: dict[str, BudgetStatus] = {}
        #: Every budgeted subscription's status at the last refresh.
        self.statuses: dict[str, BudgetStatus] = {}
        self.last_refresh: float | None = None
        #: Subscription id → (period start, the highest fraction logged in that period):
        #: a fraction, not a count, so a ``warn_at`` changed mid-period still works.
        self._warned: dict[str, tuple[float, float]] = {}
        self._periods: frozenset[float] = frozenset()
        self._invalid: set[str] = set()
        #: Subscription id → (its raw budget override, what it validated to): validating
        #: thousands of overrides at every run would cost more than the run's query.
        self._overrides: dict[str, tuple[object, BudgetConfig]] = {}
        self._thresholds: dict[int, _Thresholds] = {}
        #: (subscription id, period start) whose unpriced records were logged already.
        self._unpriced_logged: set[tuple[str, float]] = set()
        #: Period starts whose missing hourly rollups were logged already.
        self._missing_logged: set[float] = set()

    def __repr__(self) -> str:
        return f"<Budgets statuses={len(self.statuses)} refused={len(self.refused)}>"

    @property
    def configured(self) -> bool:
        """Whether any product has a budget (subscriptions' overrides may add some anyway)."""
        return any(p.budget is not None for p in self._products.values())

    def check(self, subscription_id: str, now: float) -> None:
        """The request path: raise the 403 ``BudgetExceeded`` if this subscription's budget
        refuses. A period that has ended serves again at once, before the next refresh."""
        status = self.refused.get(subscription_id)
        if status is not None and now < status.period_end:
            raise budget_exceeded(status, now)

    def budgeted(self) -> list[tuple[Subscription, BudgetConfig, Source]]:
        """The active subscriptions with a budget, and their budget."""
        out: list[tuple[Subscription, BudgetConfig, Source]] = []
        products = self._products
        cached_before = self._overrides
        # Rebuilt at each run: a subscription deleted, cancelled or without its override
        # since leaves the cache with the run that no longer sees it.
        cache: dict[str, tuple[object, BudgetConfig]] = {}
        self._overrides = cache
        active = SubscriptionState.ACTIVE
        for sub in self._subscriptions():
            if sub.state is not active:
                continue
            overrides = sub.overrides
            if isinstance(overrides, dict) and "budget" in overrides:
                raw = overrides["budget"]
                if raw is None:
                    continue
                cached = cached_before.get(sub.id)
                # ``==`` too: a refreshed view holds equal but new dicts.
                if cached is not None and (cached[0] is raw or cached[0] == raw):
                    cache[sub.id] = cached
                    out.append((sub, cached[1], "subscription"))
                    continue
                try:
                    budget = BudgetConfig.model_validate(raw)
                except ValidationError as exc:
                    if sub.id not in self._invalid:  # once, not at every run
                        self._invalid.add(sub.id)
                        log.warning(
                            "budgets: subscription %s has an invalid budget override, ignored: %s",
                            sub.id,
                            str(exc).splitlines()[0],
                        )
                    continue
                cache[sub.id] = (raw, budget)
                out.append((sub, budget, "subscription"))
                continue
            product = products.get(sub.product)
            if product is not None and product.budget is not None:
                out.append((sub, product.budget, "product"))
        return out

    def refresh(self) -> list[BudgetStatus]:
        """Compute every budget's spending now and publish the refused set. Blocks on the
        database (call it from a worker thread, after a catch-up); raises what it raises,
        leaving the last published set in force."""
        now = self.clock.now()
        statuses = compute_statuses(
            self.engine, self.prices, self.budgeted(), now, self._missing_hours
        )
        self.statuses = {s.subscription_id: s for s in statuses}
        self.refused = {s.subscription_id: s for s in statuses if s.refuses}
        self.last_refresh = now
        self._alert(statuses)
        self._unpriced(statuses)
        return statuses

    def _missing_hours(self, period_start: float, note: str) -> None:
        """Once per period: the hourly rollups of its first day are purged (the
        configuration check refuses a retention this short; it may have changed since)."""
        if period_start in self._missing_logged:
            return
        self._missing_logged.add(period_start)
        log.warning(
            "budgets: the period starting %s is counted from the hourly rollups still kept: "
            "%s; raise retention.hourly_rollups_days above the longest budget period",
            iso(period_start),
            note,
        )

    def _unpriced(self, statuses: list[BudgetStatus]) -> None:
        """Log once per subscription and period that it has usage without a price (which its
        budget does not count), and report the total to the observer."""
        total = 0
        for s in statuses:
            if not s.unpriced_records:
                continue
            total += s.unpriced_records
            key = (s.subscription_id, s.period_start)
            if key in self._unpriced_logged:
                continue
            if len(self._unpriced_logged) > 4 * len(statuses) + 1000:
                current = {(x.subscription_id, x.period_start) for x in statuses}
                self._unpriced_logged &= current
            self._unpriced_logged.add(key)
            log.warning(
                "budget of subscription %s: %d usage record(s) this %s have no price and are "
                "not counted as spent (add a price for their deployment or model)",
                s.subscription_id,
                s.unpriced_records,
                s.noun(),
            )
        if self.observer is not None:
            self.observer.budget_unpriced(total)

    def _thresholds_of(self, budget: BudgetConfig) -> _Thresholds:
        found = self._thresholds.get(id(budget))
        if found is None or found.budget is not budget:
            if len(self._thresholds) > 100_000:  # overrides replaced many times over
                self._thresholds.clear()
            found = self._thresholds[id(budget)] = _Thresholds.of(budget)
        return found

    def _alert(self, statuses: list[BudgetStatus]) -> None:
        """Log once per threshold per period (and per process): each ``warn_at`` fraction,
        and the whole budget. Subscription id and amounts only: never a key.

        Cheap per run: a budget below its lowest threshold, or with no new threshold
        reached, costs a comparison or two; the warned state is pruned only when the set of
        periods changes (a period renewed, or a budget with another period appeared)."""
        periods = frozenset(s.period_start for s in statuses)
        warned = self._warned
        if periods != self._periods:
            current = {s.subscription_id: s.period_start for s in statuses}
            warned = {k: v for k, v in warned.items() if current.get(k) == v[0]}
            self._warned = warned
            self._periods = periods
        for s in statuses:
            steps = self._thresholds_of(s.budget).steps
            spent = s.spent_nanos
            if spent < steps[0][0]:
                continue
            seen = warned.get(s.subscription_id)
            done = seen[1] if seen is not None and seen[0] == s.period_start else 0.0
            if done >= steps[-1][1]:
                continue  # every threshold of this period logged already
            crossed = [f for nanos, f in steps if f > done and spent >= nanos]
            if not crossed:
                continue
            warned[s.subscription_id] = (s.period_start, crossed[-1])
            for fraction in crossed:
                self._log_threshold(s, fraction)

    def _log_threshold(self, s: BudgetStatus, fraction: float) -> None:
        if self.observer is not None:
            self.observer.budget_threshold(s.budget.action)
        if not log.isEnabledFor(logging.WARNING):
            return
        what = (
            "spent: further requests are refused until it renews"
            if fraction >= 1.0 and s.budget.action == "refuse"
            else "spent (action warn: still served)"
            if fraction >= 1.0
            else f"{fraction:.0%} spent"
        )
        log.warning(
            "budget of subscription %s %s: %s of %s %s this %s (renews %s)",
            s.subscription_id,
            what,
            format_money(s.spent_nanos),
            format_money(s.amount_nanos),
            s.currency,
            s.noun(),
            s.renews(),
        )

    def ratios(self) -> list[tuple[str, float]]:
        """``(subscription id, spent / amount)`` of every budget at the last refresh."""
        return [(s.subscription_id, s.ratio) for s in self.statuses.values()]
