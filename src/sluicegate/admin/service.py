"""The admin service: every management operation, shared by the CLI, the admin API and the
dashboard (none of them touches the database directly).

Operations are synchronous (they talk to the database); async callers run them in a thread.
A new key's value is returned exactly once, by the call that makes it; only its keyed hash is
stored.

Usage, cost and forecasts need the database engine (``engine=``); every report first brings
the rollups up to date (``Rollups.catch_up``), so what it shows includes every record the
ledger has committed. Backend state and ledger statistics come from the running gateway
(``backend_status=``, ``ledger_stats=``) and are empty when the service runs in the CLI.
"""

from __future__ import annotations

import builtins
import csv
import io
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError
from sqlalchemy.engine import Engine

from sluicegate.accounting.budgets import BudgetStatus, budget_of, compute_statuses
from sluicegate.accounting.chargeback import (
    DIMENSIONS,
    ChargeReport,
    Series,
    charge_report,
    usage_series,
)
from sluicegate.accounting.forecast import BreakEven, Projection, break_even, forecast
from sluicegate.accounting.periods import Granularity
from sluicegate.accounting.pricing import PriceTable, cost_of_records, nanos_text
from sluicegate.accounting.records import UsageRecord
from sluicegate.accounting.rollups import RollupRun, Rollups
from sluicegate.admin import schemas
from sluicegate.auth.keys import KeyHasher, display_prefix, generate_key
from sluicegate.auth.subscriptions import (
    STATE_COMMENT_MAX,
    TRANSITIONS,
    KeySlot,
    Subscription,
    SubscriptionState,
)
from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import BUDGET_PERIOD_DAYS, BudgetConfig, GatewayConfig
from sluicegate.limits.policy import LimitPolicy, merge
from sluicegate.storage.ledger import LedgerStats
from sluicegate.storage.reports import fetch_records
from sluicegate.storage.subscriptions import (
    SubscriptionConflict,
    SubscriptionInvalid,
    SubscriptionNotFound,
    SubscriptionRepository,
)

#: The longest range one report may cover (days): keeps a request from scanning years.
MAX_REPORT_DAYS = 3660

if TYPE_CHECKING:
    from sluicegate.accounting.export import Exporter


class AdminError(Exception):
    """A management request that cannot be carried out; ``status`` is the HTTP status the
    admin API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def validation_message(exc: ValidationError, where: str = "") -> str:
    """The first problem of a pydantic error as ``<path of the field>: <what is wrong>``,
    the path prefixed with ``where`` (``"body"`` when there is no path at all)."""
    first = exc.errors(include_url=False)[0]
    path = [where] if where else []
    path += (str(p) for p in first["loc"])
    return f"{'.'.join(path) or 'body'}: {first['msg']}"


@dataclass(frozen=True, slots=True)
class IssuedKeys:
    """A subscription with the key values made for it: shown once, never stored."""

    subscription: Subscription
    primary_key: str | None = None
    secondary_key: str | None = None


def subscription_view(sub: Subscription, now: float | None = None) -> dict[str, Any]:
    """What may be shown of a subscription (no hashes, only key prefixes). ``state`` is the
    effective state at ``now`` (default: the current time): ``expired`` past ``expires_at``."""
    when = time.time() if now is None else now
    return {
        "id": sub.id,
        "name": sub.name,
        "owner": sub.owner,
        "product": sub.product,
        "state": sub.effective_state(when).value,
        "state_comment": sub.state_comment,
        "primary_key_prefix": sub.primary_key_prefix,
        "secondary_key_prefix": sub.secondary_key_prefix,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
        "expires_at": sub.expires_at,
        "overrides": sub.overrides,
    }


class AdminService:
    """``hasher`` makes the stored hash of a new key (``create_subscription``, ``rotate``);
    ``None`` serves every other operation (the CLI's reports and listings run without the key
    secret) and makes those two raise ``AdminError(503)``."""

    def __init__(
        self,
        config: GatewayConfig,
        repository: SubscriptionRepository,
        hasher: KeyHasher | None,
        clock: Clock | None = None,
        *,
        engine: Engine | None = None,
        backend_status: Callable[[], list[dict[str, Any]]] | None = None,
        ledger_stats: Callable[[], LedgerStats] | None = None,
        exporters: Sequence[Exporter] = (),
    ) -> None:
        self.config = config
        self.repository = repository
        self.hasher = hasher
        self.clock = clock or SystemClock()
        self._products = {p.name for p in config.products}
        #: Products whose new subscriptions await an administrator's approval.
        self._approval_required = {p.name for p in config.products if p.approval_required}
        #: Per product, the policies a subscription's limit overrides are merged into.
        self._per_subscription: dict[str, tuple[LimitPolicy, ...]] = {
            p.name: tuple(x for x in p.limit_policies() if x.counter_key == "subscription")
            for p in config.products
        }
        self.engine = engine
        self.prices = PriceTable(config)
        self.rollups = Rollups(engine, self.prices, self.clock) if engine is not None else None
        self._backend_status = backend_status
        self._ledger_stats = ledger_stats
        #: The running gateway's exports (their counts since it started); empty in the CLI.
        self._exporters = {e.config.name: e for e in exporters}

    def products(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "description": p.description,
                "deployments": p.deployments,
                "limits": p.limits,
                "approval_required": p.approval_required,
            }
            for p in self.config.products
        ]

    def create_subscription(
        self,
        *,
        product: str,
        owner: str,
        name: str,
        expires_at: float | None = None,
        overrides: dict[str, Any] | None = None,
        state: SubscriptionState | str | None = None,
        state_comment: str | None = None,
    ) -> IssuedKeys:
        """A new subscription and its two keys. Its ``state`` is ``submitted`` (awaiting
        ``approve``) or ``active``; None: ``submitted`` for a product with
        ``approval_required``, else ``active``. Only administrators call this (the admin API,
        the CLI and the dashboard are all theirs), so one may pass ``active`` to skip the
        approval. 422 for an unknown product, empty texts, bad overrides or another state."""
        if product not in self._products:
            raise AdminError(
                422, f"unknown product {product!r} (known: {', '.join(sorted(self._products))})"
            )
        if not owner.strip() or not name.strip():
            raise AdminError(422, "owner and name must not be empty")
        checked = self.check_overrides(product, overrides or {}, where="overrides")
        if state is None:
            initial = (
                SubscriptionState.SUBMITTED
                if product in self._approval_required
                else SubscriptionState.ACTIVE
            )
        else:
            if str(state) not in (SubscriptionState.SUBMITTED, SubscriptionState.ACTIVE):
                raise AdminError(
                    422, f"state: a new subscription is 'submitted' or 'active', not {state!r}"
                )
            initial = SubscriptionState(state)
        comment = _comment(state_comment)
        primary, secondary = generate_key(), generate_key()
        now = self.clock.now()
        sub = Subscription(
            id="sub_" + secrets.token_hex(8),
            name=name.strip(),
            owner=owner.strip(),
            product=product,
            state=initial,
            primary_key_hash=self._digest(primary),
            secondary_key_hash=self._digest(secondary),
            primary_key_prefix=display_prefix(primary),
            secondary_key_prefix=display_prefix(secondary),
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            overrides=checked,
            state_comment=comment,
        )
        try:
            # The repository checks the columns' lengths (name, owner: 200), on every database.
            self.repository.create(sub)
        except SubscriptionInvalid as exc:
            raise AdminError(422, str(exc)) from None
        return IssuedKeys(sub, primary, secondary)

    def _digest(self, key: str) -> bytes:
        if self.hasher is None:
            raise AdminError(503, "making a key needs the key secret: no key hasher was given")
        return self.hasher.digest(key)

    def get(self, subscription_id: str) -> Subscription:
        sub = self.repository.get(subscription_id)
        if sub is None:
            raise AdminError(404, f"no subscription {subscription_id!r}")
        return sub

    def list(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        search: str | None = None,
        product: str | None = None,
        state: str | None = None,
    ) -> tuple[list[Subscription], int]:
        if limit < 1 or limit > 1000 or offset < 0:
            raise AdminError(422, "limit must be 1..1000 and offset >= 0")
        st = None
        if state is not None:
            try:
                st = SubscriptionState(state)
            except ValueError:
                raise AdminError(422, f"unknown state {state!r}") from None
        return self.repository.list(
            offset=offset, limit=limit, search=search, product=product, state=st
        )

    def rotate(self, subscription_id: str, slot: KeySlot) -> IssuedKeys:
        """A new key in ``slot``. 409 for a cancelled, rejected or expired subscription
        (its effective state): its keys never work again, so issuing one would only hand out
        a useless secret. A submitted one's key may be replaced (it works once approved)."""
        state = self.get(subscription_id).effective_state(self.clock.now())
        if state is SubscriptionState.CANCELLED:
            raise AdminError(409, f"subscription {subscription_id} is cancelled for good")
        if state in (SubscriptionState.REJECTED, SubscriptionState.EXPIRED):
            raise AdminError(
                409, f"subscription {subscription_id} is {state.value}: its keys never work again"
            )
        key = generate_key()
        sub = self.repository.set_key(subscription_id, slot, self._digest(key), display_prefix(key))
        if slot == "primary":
            return IssuedKeys(sub, primary_key=key)
        return IssuedKeys(sub, secondary_key=key)

    def check_overrides(
        self, product: str, overrides: Mapping[str, Any], *, where: str = ""
    ) -> dict[str, Any]:
        """``overrides`` as they are to be stored, or ``AdminError(422)`` whose message names
        the field at fault (its path prefixed with ``where``: ``"overrides"`` inside a
        creation body).

        ``budget`` (``schemas.Overrides``) is a ``BudgetConfig`` (stored with every field) or
        null (lifts the product's). ``limits``: limit policy fields that
        ``limits.policy.merge`` accepts on their own (``merge(None, limits)``) and over each
        of ``product``'s policies counted per subscription (those the gateway merges them
        into), so that what is stored does not fail there. Values are kept as the policy
        reads them (``"Hourly"`` is stored as ``"hourly"``, ``"100"`` as ``100``).
        """
        try:
            parsed = schemas.Overrides.model_validate(overrides)
        except ValidationError as exc:
            raise AdminError(422, validation_message(exc, where)) from None
        checked = parsed.model_dump(exclude_unset=True)
        if checked.get("budget") is not None:
            try:
                budget = BudgetConfig.model_validate(checked["budget"])
            except ValidationError as exc:
                at = f"{where}.budget" if where else "budget"
                raise AdminError(422, validation_message(exc, at)) from None
            self._check_budget_retention(budget, where)
            checked["budget"] = budget.model_dump(mode="json")
        if "limits" not in checked:
            return checked
        limits = parsed.limits
        at = f"{where}.limits" if where else "limits"
        try:
            merged = merge(None, limits)
        except ValidationError as exc:
            raise AdminError(422, validation_message(exc, at)) from None
        for policy in self._per_subscription.get(product, ()):
            try:
                merge(policy, limits)
            except ValidationError as exc:
                raise AdminError(
                    422,
                    f"{validation_message(exc, at)} (merged over the limits of product "
                    f"{product!r})",
                ) from None
        canonical = merged.model_dump(mode="json")
        checked["limits"] = {name: canonical[name] for name in limits}
        return checked

    def set_overrides(self, subscription_id: str, overrides: Mapping[str, Any]) -> Subscription:
        """Replace a subscription's overrides (``check_overrides``) and bump the state
        version, so running gateways apply them at their next poll. 404 for an unknown
        subscription, 422 for invalid overrides, 409 for a cancelled subscription (like
        ``rotate``: nothing it holds is used again)."""
        sub = self.get(subscription_id)
        checked = self.check_overrides(sub.product, overrides)
        if sub.state is SubscriptionState.CANCELLED:
            raise AdminError(409, f"subscription {subscription_id} is cancelled for good")
        try:
            return self.repository.set_overrides(subscription_id, checked)
        except SubscriptionNotFound:
            raise AdminError(404, f"no subscription {subscription_id!r}") from None

    def change_state(
        self, subscription_id: str, action: str, comment: str | None = None
    ) -> Subscription:
        """Carry out ``action`` (a key of ``auth.subscriptions.TRANSITIONS``: approve, reject,
        suspend, resume, cancel) and keep ``comment`` with the new state (None clears the
        last one). 404 for an unknown subscription, 409 when its effective state is not one
        the action starts from (checked by the database's UPDATE itself, so a concurrent
        change is never undone: a cancelled subscription stays cancelled), 422 for an
        unknown action or a comment that is too long or holds control characters."""
        transition = TRANSITIONS.get(action)
        if transition is None:
            raise AdminError(422, f"unknown action {action!r}")
        text = _comment(comment)
        try:
            return self.repository.set_state(
                subscription_id, transition.target, allowed_from=transition.sources, comment=text
            )
        except SubscriptionNotFound:
            raise AdminError(404, f"no subscription {subscription_id!r}") from None
        except SubscriptionConflict as exc:
            raise AdminError(409, f"{exc}: cannot {action} it") from None
        except SubscriptionInvalid as exc:
            raise AdminError(422, str(exc)) from None

    def approve(self, subscription_id: str, comment: str | None = None) -> Subscription:
        """submitted → active."""
        return self.change_state(subscription_id, "approve", comment)

    def reject(self, subscription_id: str, comment: str | None = None) -> Subscription:
        """submitted → rejected (for good: a new request is a new subscription)."""
        return self.change_state(subscription_id, "reject", comment)

    def suspend(self, subscription_id: str, comment: str | None = None) -> Subscription:
        """active → suspended."""
        return self.change_state(subscription_id, "suspend", comment)

    def resume(self, subscription_id: str, comment: str | None = None) -> Subscription:
        """suspended → active."""
        return self.change_state(subscription_id, "resume", comment)

    def cancel(self, subscription_id: str, comment: str | None = None) -> Subscription:
        """Any state → cancelled, for good."""
        return self.change_state(subscription_id, "cancel", comment)

    # -- usage, cost, forecasts ----------------------------------------------------------------

    def _rollups(self) -> Rollups:
        if self.rollups is None:
            raise AdminError(503, "usage reports need the database: build the service with engine=")
        return self.rollups

    def _range(self, start: float, end: float) -> None:
        if not (0 <= start < end):
            raise AdminError(422, "'from' must be before 'to' (and not before 1970)")
        if end - start > MAX_REPORT_DAYS * 86400:
            raise AdminError(422, f"a report covers at most {MAX_REPORT_DAYS} days")

    def refresh_rollups(self) -> RollupRun:
        """Bring the rollups up to date now (reports do this themselves)."""
        return self._rollups().catch_up()

    def rebuild_rollups(self, start: float, end: float) -> RollupRun:
        """Recompute and re-price ``[start, end)`` from the raw records still kept."""
        self._range(start, end)
        return self._rollups().rebuild(start, end)

    def _check_budget_retention(self, budget: BudgetConfig, where: str) -> None:
        """``AdminError(422)`` when the hourly rollups are purged sooner than ``budget``'s
        period lasts: the configuration check refuses such a product budget at load
        (``GatewayConfig._budgets_outlive_hourly_rollups``), and an override is held to the
        same rule, or the hours purged within its period would stop counting as spent."""
        days = self.config.retention.hourly_rollups_days
        least = BUDGET_PERIOD_DAYS[budget.period] + 1
        if days is not None and days < least:
            at = f"{where}.budget.period" if where else "budget.period"
            raise AdminError(
                422,
                f"{at}: a {budget.period} budget needs the hourly rollups kept for at least "
                f"{least:g} days (retention.hourly_rollups_days is {days:g}): a budget counts "
                "its period from them",
            )

    def budgets(self, subscription_id: str | None = None) -> builtins.list[BudgetStatus]:
        """What each active subscription with a budget (or only ``subscription_id``: 404 if
        unknown, empty if it has none) has spent in its current period, computed now from
        freshly caught-up rollups (the gateway's own refusals use its job's last run)."""
        rollups = self._rollups()
        if subscription_id is not None:
            subs = [self.get(subscription_id)]
        else:
            subs = self.repository.load_all()
        products = {p.name: p for p in self.config.products}
        budgeted = []
        for sub in subs:
            if sub.state is not SubscriptionState.ACTIVE:
                continue
            try:
                found = budget_of(sub, products)
            except ValidationError:
                continue  # refused by check_overrides: only a row written by hand has one
            if found is not None:
                budgeted.append((sub, *found))
        if not budgeted:
            return []
        rollups.catch_up()
        return compute_statuses(rollups.engine, self.prices, budgeted, self.clock.now())

    def usage_report(
        self,
        *,
        start: float,
        end: float,
        by: str = "subscription",
        subscription_id: str | None = None,
    ) -> ChargeReport:
        """Tokens and cost per ``by`` over ``[start, end)`` (widened to whole hours, and an edge
        in a day whose hourly rollups are purged to the whole day: the report's
        ``start``/``end`` are the range covered, its ``note`` says why it is wider)."""
        self._range(start, end)
        if by not in DIMENSIONS:
            raise AdminError(422, f"'by' must be one of {', '.join(DIMENSIONS)}")
        rollups = self._rollups()
        rollups.catch_up()
        return charge_report(
            rollups.engine,
            self.prices,
            start=start,
            end=end,
            by=by,
            subscription_id=subscription_id,
        )

    def usage_series(
        self,
        *,
        start: float,
        end: float,
        granularity: Granularity = "day",
        by: str = "subscription",
        top: int = 8,
        subscription_id: str | None = None,
    ) -> Series:
        """Per-bucket tokens and cost of the ``top`` keys (the rest as ``(other)``); 422 by
        hour over a day whose hourly rollups are purged."""
        self._range(start, end)
        if by not in DIMENSIONS:
            raise AdminError(422, f"'by' must be one of {', '.join(DIMENSIONS)}")
        if not 1 <= top <= 50:
            raise AdminError(422, "'top' must be 1..50")
        rollups = self._rollups()
        rollups.catch_up()
        try:
            return usage_series(
                rollups.engine,
                self.prices,
                start=start,
                end=end,
                granularity=granularity,
                by=by,
                top=top,
                subscription_id=subscription_id,
            )
        except ValueError as exc:
            raise AdminError(422, str(exc)) from None

    def forecast(
        self, *, offset: int = 0, limit: int = 50, subscription_id: str | None = None
    ) -> tuple[builtins.list[Projection], Projection, int]:
        """Month-end projections per subscription (a page, by MTD cost) and of the total."""
        if limit < 1 or limit > 1000 or offset < 0:
            raise AdminError(422, "limit must be 1..1000 and offset >= 0")
        rollups = self._rollups()
        rollups.catch_up()
        return forecast(
            rollups.engine,
            self.prices,
            self.clock.now(),
            offset=offset,
            limit=limit,
            subscription_id=subscription_id,
        )

    def break_even(self) -> builtins.list[BreakEven]:
        """PTU against pay-as-you-go per deployment, for this month's traffic."""
        rollups = self._rollups()
        rollups.catch_up()
        return break_even(rollups.engine, self.prices, self.config, self.clock.now())

    def records(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        subscription_id: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> builtins.list[tuple[UsageRecord, int | None]]:
        """Raw records (oldest first) with their cost in nanos (None: unpriced)."""
        if limit < 1 or limit > 1000 or offset < 0:
            raise AdminError(422, "limit must be 1..1000 and offset >= 0")
        engine = self._rollups().engine
        recs = fetch_records(
            engine,
            start=start,
            end=end,
            subscription_id=subscription_id,
            limit=limit,
            offset=offset,
        )
        costs = cost_of_records(
            self.prices,
            [
                (
                    r.deployment,
                    r.model,
                    r.backend,
                    r.ts,
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.completion_tokens,
                )
                for r in recs
            ],
        )
        return list(zip(recs, costs, strict=True))

    def prices_view(self) -> dict[str, Any]:
        """The price table as configured, and the deployments it leaves unpriced."""
        return {
            "currency": self.prices.currency,
            "prices": [
                {
                    "deployment": p.deployment,
                    "model": p.model,
                    "input_per_million": str(p.input),
                    "cached_input_per_million": str(
                        p.cached_input if p.cached_input is not None else p.input
                    ),
                    "output_per_million": str(p.output),
                    "currency": p.currency,
                    "effective_from": p.effective_from.timestamp() if p.effective_from else None,
                }
                for p in self.config.prices
            ],
            "ptu": [
                {
                    "backend": p.backend,
                    "deployment": p.deployment,
                    "monthly_cost": str(p.monthly_cost),
                    "currency": p.currency,
                    "effective_from": p.effective_from.timestamp() if p.effective_from else None,
                    "units": p.units,
                }
                for p in self.config.ptu
            ],
            "unpriced": self.prices.unpriced_deployments(),
        }

    def backends(self) -> builtins.list[dict[str, Any]]:
        """Each backend's state as the running gateway sees it (empty outside a gateway)."""
        if self._backend_status is None:
            from sluicegate.routing.overview import breaker_rule

            return [
                {
                    "name": b.name,
                    "url": b.url,
                    "kind": b.kind,
                    "state": "unknown",
                    "circuit_breaker": breaker_rule(self.config, b.name),
                }
                for b in self.config.backends
            ]
        return self._backend_status()

    def ledger(self) -> dict[str, Any]:
        """Ledger writer statistics and the rollups' progress."""
        out: dict[str, Any] = {}
        if self._ledger_stats is not None:
            s = self._ledger_stats()
            out.update(
                pending=s.pending,
                written=s.written,
                failures=s.failures,
                spilled=s.spilled,
                rejected=s.rejected,
                last_write_seconds=s.last_write_seconds,
                healthy=s.healthy,
            )
        if self.rollups is not None:
            last_id, purged = self.rollups.state()
            out.update(rollup_last_record_id=last_id, raw_purged_before=purged)
        return out

    # -- usage exports -------------------------------------------------------------------------

    def exports(self) -> builtins.list[dict[str, Any]]:
        """Each configured export, then each export with a cursor in the database but no
        longer configured (``configured: false``): its cursor, the ledger's newest record
        id and the lag (ids between them: the ``sluicegate_export_lag_records`` gauge's
        value), the events delivered since the cursor was created (``exported``) and, in a
        running gateway, since it started (``sent_since_start``; None in the CLI)."""
        from sluicegate.accounting.export import cursor_views, newest_record_id

        engine = self._rollups().engine
        views = cursor_views(engine)
        newest = newest_record_id(engine)
        out = []
        names = [e.name for e in self.config.exports]
        configs = {e.name: e for e in self.config.exports}
        for name in [*names, *(n for n in views if n not in configs)]:
            config = configs.get(name)
            view = views.get(name)
            running = self._exporters.get(name)
            upto = None if view is None else view.last_record_id
            out.append(
                {
                    "name": name,
                    "configured": config is not None,
                    "type": None if config is None else config.type,
                    "url": None if config is None else _bare_url(config.url),
                    "products": None if config is None else config.products,
                    "started": view is not None,
                    "last_record_id": upto,
                    "gap_ids": None if view is None else view.gap_ids,
                    "newest_record_id": newest,
                    "lag_records": None if upto is None else max((newest or 0) - upto, 0),
                    "exported": None if view is None else view.exported,
                    "lost": None if view is None else view.lost,
                    "created_at": None if view is None else view.created_at,
                    "updated_at": None if view is None else view.updated_at,
                    "sent_since_start": None if running is None else running.sent,
                    "failures_since_start": None if running is None else running.failures,
                    "last_failure": None if running is None else running.last_failure,
                }
            )
        return out

    def export(self, name: str) -> dict[str, Any]:
        """One export as :meth:`exports` shows it; 404 when neither configured nor in the
        database."""
        for item in self.exports():
            if item["name"] == name:
                return item
        raise AdminError(404, f"no export {name!r}")

    def rewind_export(
        self,
        name: str,
        *,
        after_record_id: int | None = None,
        since: float | None = None,
        skip: bool = False,
    ) -> dict[str, Any]:
        """Move export ``name``'s cursor (``accounting.export.rewind``): its next cycle sends
        the records above ``after_record_id``, or from the first at or after ``since``. 404
        for an unknown export (or one that has not started: no cursor yet), 409 for a forward
        move past undelivered records without ``skip`` or past the newest record, or while a
        cycle keeps the cursor, 422 without exactly one of ``after_record_id`` and ``since``.
        Answers the move (``previous_record_id``, ``last_record_id``, ``skipped``) and the
        export after it."""
        from sluicegate.accounting.export import ExportBusy, ExportNotFound, RewindRefused, rewind

        if (after_record_id is None) == (since is None):
            raise AdminError(422, "body: give after_record_id or since, exactly one")
        engine = self._rollups().engine
        try:
            moved = rewind(
                engine,
                name,
                after_record_id=after_record_id,
                since=since,
                skip=skip,
                clock=self.clock,
            )
        except ExportNotFound:
            configured = any(e.name == name for e in self.config.exports)
            raise AdminError(
                404,
                f"export {name!r} has not started yet (no cursor)"
                if configured
                else f"no export {name!r}",
            ) from None
        except (ExportBusy, RewindRefused) as exc:
            raise AdminError(409, str(exc)) from None
        return {
            "name": name,
            "previous_record_id": moved.previous_record_id,
            "last_record_id": moved.last_record_id,
            "skipped": moved.skipped,
            "export": self.export(name),
        }


def _comment(comment: str | None) -> str | None:
    """A state comment as stored (stripped; None when empty), or ``AdminError(422)``."""
    if comment is None or not comment.strip():
        return None
    text = comment.strip()
    if len(text) > STATE_COMMENT_MAX:
        raise AdminError(
            422, f"state_comment must be at most {STATE_COMMENT_MAX} characters ({len(text)})"
        )
    problem = schemas.text_problem(text)
    if problem is not None:
        raise AdminError(422, f"state_comment {problem}")
    return text


def _bare_url(url: str) -> str:
    """``url`` without credentials, query or fragment (what an operator may be shown)."""
    parts = urlsplit(url)
    # The host and port as written (``parts.port`` raises on a port it cannot read).
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def money(nanos: int) -> str:
    """Nanos as an exact decimal string of the currency unit (``"12.345000000"``)."""
    return nanos_text(nanos)


REPORT_COLUMNS = (
    "key",
    "requests",
    "attempts",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "errors",
    "paygo_cost",
    "ptu_cost",
    "cost",
    "currency",
    "unpriced_records",
    "unpriced_tokens",
)


def report_rows(report: ChargeReport) -> list[dict[str, Any]]:
    """The report as plain rows (money as exact decimal strings), the total last."""
    rows = []
    for row in [*report.rows, report.total]:
        rows.append(
            {
                "key": row.key if row is not report.total else "(total)",
                "requests": row.requests,
                "attempts": row.attempts,
                "prompt_tokens": row.prompt_tokens,
                "cached_tokens": row.cached_tokens,
                "completion_tokens": row.completion_tokens,
                "total_tokens": row.total_tokens,
                "errors": row.errors,
                "paygo_cost": money(row.paygo_nanos),
                "ptu_cost": money(row.ptu_nanos),
                "cost": money(row.cost_nanos),
                "currency": report.currency,
                "unpriced_records": row.unpriced_records,
                "unpriced_tokens": row.unpriced_tokens,
            }
        )
    return rows


#: A spreadsheet reads a cell starting with one of these as a formula (``=HYPERLINK(…)``,
#: ``@SUM(…)``, ``+cmd|…``): "CSV injection" (OWASP). The report's text cells are names
#: teams chose (owner, subscription, deployment), so such a cell is written with a leading
#: ``'``, which spreadsheets show as text. Numbers never start with one (money is ≥ 0).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def report_csv(report: ChargeReport) -> str:
    """The charge-back report as CSV: a header line, one line per group, the total last
    (key ``(total)``). Money columns are exact decimals in the currency unit. A text cell
    that a spreadsheet would take for a formula gets a leading ``'`` (:data:`_FORMULA_START`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in report_rows(report):
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


__all__ = [
    "AdminError",
    "AdminService",
    "IssuedKeys",
    "money",
    "report_csv",
    "report_rows",
    "subscription_view",
    "validation_message",
]
