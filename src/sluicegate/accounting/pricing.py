"""The price table: which price applies to a usage record, and what the record costs.

Money is counted in integer *nanos* (1e-9 of the currency unit). A price per million tokens
``p`` is ``p * 1000`` nanos per token, so prices with up to three decimal places (every list
price we know of: 0.15, 0.075, 2.50 per million) give exact costs; prices with up to six
decimals are allowed and their costs are rounded half-to-even to the nano once per rollup row.

Resolution for a record of deployment ``d`` (with the configured model ``m``) served by
backend ``b`` at time ``t``, first match wins:

1. a PTU reservation in force at ``t`` whose ``backend``/``deployment`` match (every given
   field must match): no per-token price, the reservation's monthly cost is allocated instead;
2. the latest ``deployment: d`` price with ``effective_from <= t``;
3. the latest ``model: m`` price with ``effective_from <= t`` (for a deployment no longer in
   the configuration, ``m`` is the model the backend reported);
4. otherwise the record is *unpriced*: flagged in every report, never counted as free.

Pure and immutable: build one per configuration and share it between threads.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from sluicegate.config.model import GatewayConfig, PriceConfig, PtuCostConfig, PtuQuoteConfig

NANOS = 1_000_000_000
_PER_TOKEN = Decimal(NANOS) / Decimal(1_000_000)  # nanos per token for a price of 1 per million


def nanos_text(nanos: int) -> str:
    """An amount in nanos as an exact decimal string with 9 places (``"0.000193450"``)."""
    whole, frac = divmod(abs(nanos), NANOS)
    return f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}"


def nanos_to_decimal(nanos: int) -> Decimal:
    """An amount in nanos as an exact Decimal of the currency unit (9 decimal places)."""
    return Decimal(nanos_text(nanos))


def format_money(nanos: int, places: int = 2) -> str:
    """``1234567890000`` → ``"1,234.57"`` (rounded half-even to ``places`` decimals). An
    amount that would show as zero keeps two significant digits instead (``20000`` nanos →
    ``"0.000020"``; at most 9 decimals): a request costs a few millionths, and a report of
    two of them must not read 0.0000."""
    value = nanos_to_decimal(nanos)
    if 0 < abs(value) < Decimal(1).scaleb(-places):
        places = min(9, -math.floor(math.log10(abs(value))) + 1)
    value = value.quantize(Decimal(1).scaleb(-places), ROUND_HALF_EVEN)
    return f"{value:,.{places}f}"


def _epoch(entry: PriceConfig | PtuCostConfig) -> float:
    return entry.effective_from.timestamp() if entry.effective_from is not None else float("-inf")


@dataclass(frozen=True, slots=True)
class Rate:
    """The per-token price applied to a group of records (nanos per token)."""

    source: str  # which entry, e.g. "deployment gpt-4o from 2026-01-01" or "PTU backend east"
    input: Decimal
    cached_input: Decimal
    output: Decimal
    ptu: bool = False

    def cost_nanos(self, prompt: int, cached: int, completion: int) -> int:
        """Cost of these tokens. ``cached`` is the part of ``prompt`` served from cache."""
        cached = min(max(cached, 0), prompt)
        exact = (prompt - cached) * self.input + cached * self.cached_input
        exact += completion * self.output
        return int(exact.to_integral_value(ROUND_HALF_EVEN))


def _rate(entry: PriceConfig) -> Rate:
    cached = entry.cached_input if entry.cached_input is not None else entry.input
    when = entry.effective_from.date().isoformat() if entry.effective_from else "always"
    match = f"deployment {entry.deployment}" if entry.deployment else f"model {entry.model}"
    return Rate(
        source=f"{match} from {when}",
        input=entry.input * _PER_TOKEN,
        cached_input=cached * _PER_TOKEN,
        output=entry.output * _PER_TOKEN,
    )


class _Timeline:
    """Entries of one match, sorted by start; ``at(t)`` is the one in force at ``t``."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.values: list[Rate] = []

    def add(self, start: float, value: Rate) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.values.insert(i, value)

    def at(self, t: float) -> Rate | None:
        i = bisect.bisect_right(self.starts, t)
        return self.values[i - 1] if i else None

    def first_start(self) -> float:
        return self.starts[0]


@dataclass(frozen=True, slots=True)
class PtuInterval:
    """A PTU reservation's cost over ``[start, end)``: ``cost_nanos`` to be allocated."""

    entry: PtuCostConfig
    start: float
    end: float
    cost_nanos: int

    @property
    def label(self) -> str:
        parts = [f"backend {self.entry.backend}"] if self.entry.backend else []
        if self.entry.deployment:
            parts.append(f"deployment {self.entry.deployment}")
        return "PTU " + ", ".join(parts)


class PriceTable:
    """The compiled ``prices``/``ptu``/``ptu_quotes`` sections of a configuration."""

    def __init__(self, config: GatewayConfig) -> None:
        currencies = [e.currency for e in config.prices] + [e.currency for e in config.ptu]
        self.currency = currencies[0] if currencies else "USD"
        self._deployment_models = {d.name: d.model for d in config.deployments}
        self._deployment_backends = {d.name: d.backend for d in config.deployments}
        self._by_deployment: dict[str, _Timeline] = {}
        self._by_model: dict[str, _Timeline] = {}
        for entry in config.prices:
            book = self._by_deployment if entry.deployment else self._by_model
            name = entry.deployment or entry.model
            assert name is not None
            book.setdefault(name, _Timeline()).add(_epoch(entry), _rate(entry))
        self.ptu: tuple[PtuCostConfig, ...] = tuple(config.ptu)
        self.quotes: tuple[PtuQuoteConfig, ...] = tuple(config.ptu_quotes)
        points = {_epoch(e) for e in config.prices} | {_epoch(e) for e in config.ptu}
        self.boundaries: tuple[float, ...] = tuple(sorted(p for p in points if p != float("-inf")))

    def __repr__(self) -> str:
        return (
            f"<PriceTable {self.currency} deployments={sorted(self._by_deployment)} "
            f"models={sorted(self._by_model)} ptu={len(self.ptu)}>"
        )

    # -- resolution ------------------------------------------------------------------------

    def ptu_entry(
        self, backend: str | None, deployment: str | None, at: float
    ) -> PtuCostConfig | None:
        """The PTU reservation covering this backend/deployment at ``at`` (latest start)."""
        best: PtuCostConfig | None = None
        for entry in self.ptu:
            if entry.backend is not None and entry.backend != backend:
                continue
            if entry.deployment is not None and entry.deployment != deployment:
                continue
            if _epoch(entry) > at:
                continue
            if best is None or _epoch(entry) >= _epoch(best):
                best = entry
        return best

    def paygo_rate(self, deployment: str | None, model: str | None, at: float) -> Rate | None:
        """The pay-as-you-go price in force, ignoring PTU reservations (rules 2 and 3)."""
        if deployment is not None and deployment in self._by_deployment:
            rate = self._by_deployment[deployment].at(at)
            if rate is not None:
                return rate
        configured = self._deployment_models.get(deployment) if deployment else None
        for name in (configured, model):
            if name is not None and name in self._by_model:
                rate = self._by_model[name].at(at)
                if rate is not None:
                    return rate
        return None

    def resolve(
        self, deployment: str | None, model: str | None, backend: str | None, at: float
    ) -> Rate | None:
        """The rate for records of this deployment/model/backend at ``at`` (None: unpriced)."""
        entry = self.ptu_entry(backend, deployment, at)
        if entry is not None:
            zero = Decimal(0)
            return Rate(PtuInterval(entry, at, at, 0).label, zero, zero, zero, ptu=True)
        return self.paygo_rate(deployment, model, at)

    def segments(self, start: float, end: float) -> list[tuple[float, float]]:
        """``[start, end)`` split where any price or PTU entry starts: prices are constant
        within each piece."""
        cuts = [b for b in self.boundaries if start < b < end]
        points = [start, *cuts, end]
        return list(itertools.pairwise(points))

    # -- PTU -------------------------------------------------------------------------------

    def ptu_intervals(self, start: float, end: float) -> list[PtuInterval]:
        """Each reservation's cost over ``[start, end)``: its monthly cost accrues evenly over
        each calendar month (UTC), from its ``effective_from`` until the next entry with the
        same match starts."""
        from sluicegate.accounting.periods import month_bounds

        out: list[PtuInterval] = []
        for entry in self.ptu:
            begin = max(start, _epoch(entry))
            later = [
                _epoch(e)
                for e in self.ptu
                if (e.backend, e.deployment) == (entry.backend, entry.deployment)
                and _epoch(e) > _epoch(entry)
            ]
            stop = min([end, *later])
            t = begin
            while t < stop:
                m0, m1 = month_bounds(t)
                piece_end = min(stop, m1)
                share = Decimal(str(piece_end - t)) / Decimal(str(m1 - m0))
                cost = entry.monthly_cost * NANOS * share
                out.append(
                    PtuInterval(entry, t, piece_end, int(cost.to_integral_value(ROUND_HALF_EVEN)))
                )
                t = piece_end
        return out

    def quote_for(self, deployment: str) -> PtuQuoteConfig | None:
        model = self._deployment_models.get(deployment)
        for quote in self.quotes:
            if quote.deployment == deployment:
                return quote
        for quote in self.quotes:
            if quote.model is not None and quote.model == model:
                return quote
        return None

    # -- configuration checks --------------------------------------------------------------

    def unpriced_deployments(self) -> list[str]:
        """Configured deployments with no price (and no PTU reservation) at some time from
        now on: each line says which and since when it is priced, if ever."""
        problems: list[str] = []
        for name, model in self._deployment_models.items():
            backend = self._deployment_backends[name]
            if any(
                (e.backend in (None, backend)) and (e.deployment in (None, name)) for e in self.ptu
            ):
                continue
            timelines = [
                t
                for t in (self._by_deployment.get(name), self._by_model.get(model or ""))
                if t is not None
            ]
            if not timelines:
                problems.append(
                    f"deployment {name!r} (model {model or 'not set'}) has no price: its records "
                    "will be flagged as unpriced"
                )
                continue
            first = min(t.first_start() for t in timelines)
            if first != float("-inf"):
                from datetime import UTC, datetime

                when = datetime.fromtimestamp(first, UTC).isoformat()
                problems.append(
                    f"deployment {name!r} has no price before {when}: records before then are "
                    "flagged as unpriced"
                )
        return problems


def cost_of_records(
    table: PriceTable,
    rows: Sequence[tuple[str | None, str | None, str | None, float, int, int, int]],
) -> list[int | None]:
    """Cost in nanos of each ``(deployment, model, backend, ts, prompt, cached, completion)``;
    None where unpriced (a record without tokens costs 0 and is never unpriced)."""
    out: list[int | None] = []
    for deployment, model, backend, ts, prompt, cached, completion in rows:
        rate = table.resolve(deployment, model, backend, ts)
        if rate is None:
            out.append(0 if prompt + completion == 0 else None)
        else:
            out.append(rate.cost_nanos(prompt, cached, completion))
    return out
