"""The subscription repository: subscriptions stored in SQL, with a change counter.

Not on the request path: the gateway loads every subscription at start (``load_all``), keeps
them in memory, and reloads when ``version()`` changes. Every change made here bumps that
counter in the same transaction as the change itself, so a reader that sees a new version is
guaranteed to see the change.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from typing import Any

from sqlalchemy import ColumnElement, String, and_, false, func, not_, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from sluicegate.auth.subscriptions import (
    FINAL_STATES,
    STORED_STATES,
    KeySlot,
    Subscription,
    SubscriptionState,
)
from sluicegate.clock import Clock, SystemClock
from sluicegate.storage.engine import first_line
from sluicegate.storage.rows import encode_json, subscription_from_row, subscription_to_row
from sluicegate.storage.schema import STATE_VERSION_ROW_ID, state_version, subscriptions

#: The most rows one ``list()`` call returns, whatever ``limit`` asks for.
MAX_PAGE = 1_000

_KEY_IN_USE = "this key hash is already in use; generate another key"


class SubscriptionNotFound(KeyError):
    """No subscription has the given id."""

    def __init__(self, subscription_id: str) -> None:
        super().__init__(subscription_id)
        self.subscription_id = subscription_id

    def __str__(self) -> str:
        return f"no subscription with id {self.subscription_id!r}"


class SubscriptionConflict(ValueError):
    """A subscription could not be stored because it clashes with a stored one.

    ``field`` names what clashed: ``"id"`` (the id is taken), ``"key"`` (a key hash is
    already used by some subscription; regenerate the key) or ``"state"`` (the subscription
    is in a state the change may not start from: cancelled for good, for one).
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class SubscriptionInvalid(ValueError):
    """The database cannot store a subscription's values as given: a text longer than its
    column allows (``field`` names it), or a value the database refuses otherwise (``field``
    is None). The message names the problem, never the values themselves."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SubscriptionRepository:
    """Subscriptions in the ``subscriptions`` table.

    Thread-safe: each call uses its own connection and transaction from the engine's pool, so
    one repository may be shared by threads. Calls block on database I/O: from asyncio, run
    them in a worker thread (``asyncio.to_thread``). Database errors propagate as SQLAlchemy
    exceptions, except those documented per method.
    """

    def __init__(self, engine: Engine, *, clock: Clock | None = None) -> None:
        self._engine = engine
        self._clock = clock or SystemClock()

    def __repr__(self) -> str:
        return f"SubscriptionRepository({self._engine.url.render_as_string(hide_password=True)})"

    def create(self, sub: Subscription) -> Subscription:
        """Store a new subscription as given (timestamps included) and return it.

        Raises ``SubscriptionConflict`` if the id is taken, if the two key hashes are equal, or
        if either is already the hash of any stored key (primary or secondary): a key must
        identify exactly one subscription. Raises ``SubscriptionInvalid`` if a text is longer
        than its column (checked here, so that SQLite, which stores any length, refuses what
        PostgreSQL does), or if the database refuses a value (``DataError``).
        """
        if sub.primary_key_hash == sub.secondary_key_hash:
            raise SubscriptionConflict("the two keys must differ", field="key")
        row = subscription_to_row(sub)
        _check_lengths(row)
        try:
            with self._engine.begin() as conn:
                if conn.execute(
                    select(subscriptions.c.id).where(subscriptions.c.id == sub.id)
                ).first():
                    raise SubscriptionConflict(
                        f"a subscription with id {sub.id!r} already exists", field="id"
                    )
                # The unique indexes cover each slot; a hash used in the *other* slot of some
                # subscription would make one key resolve to two, so look across slots too.
                if _key_owner(conn, sub.primary_key_hash) or _key_owner(
                    conn, sub.secondary_key_hash
                ):
                    raise SubscriptionConflict(_KEY_IN_USE, field="key")
                conn.execute(subscriptions.insert().values(row))
                _bump(conn)
        except DataError as exc:
            # From None: SQLAlchemy's text of the error holds the INSERT's parameters (the key
            # hashes among them); the driver's first line says what is wrong without them.
            reason = first_line(str(exc.orig))
            raise SubscriptionInvalid(f"the database refused the subscription: {reason}") from None
        except IntegrityError as exc:
            if self.get(sub.id) is not None:
                raise SubscriptionConflict(
                    f"a subscription with id {sub.id!r} already exists", field="id"
                ) from exc
            raise SubscriptionConflict(_KEY_IN_USE, field="key") from exc
        return sub

    def get(self, subscription_id: str) -> Subscription | None:
        """The subscription with this id, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(subscriptions).where(subscriptions.c.id == subscription_id)
            ).first()
        return None if row is None else subscription_from_row(row._mapping)

    def list(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        search: str | None = None,
        product: str | None = None,
        state: SubscriptionState | None = None,
    ) -> tuple[builtins.list[Subscription], int]:
        """One page of subscriptions and the total number matching the filters.

        ``state`` filters by the effective state at this repository's clock
        (``Subscription.effective_state``): ``expired`` finds the subscriptions past their
        ``expires_at``, ``active`` only those that are not.

        ``search`` matches a case-insensitive substring of id, name or owner (``%`` and ``_``
        are literal). Ordered by creation time, then id. ``limit`` is capped at ``MAX_PAGE``.
        """
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        conditions: builtins.list[ColumnElement[bool]] = []
        if search:
            pattern = "%" + _escape_like(search) + "%"
            conditions.append(
                or_(
                    subscriptions.c.id.ilike(pattern, escape="\\"),
                    subscriptions.c.name.ilike(pattern, escape="\\"),
                    subscriptions.c.owner.ilike(pattern, escape="\\"),
                )
            )
        if product is not None:
            conditions.append(subscriptions.c.product == product)
        if state is not None:
            # The effective state: ``expired`` and the states it hides depend on the time.
            conditions.append(_effective_state_in((state,), self._clock.now()))
        where = and_(*conditions) if conditions else None
        page = select(subscriptions).order_by(subscriptions.c.created_at, subscriptions.c.id)
        count = select(func.count()).select_from(subscriptions)
        if where is not None:
            page = page.where(where)
            count = count.where(where)
        page = page.offset(offset).limit(min(limit, MAX_PAGE))
        # One transaction: the page and the total describe the same snapshot.
        with self._engine.begin() as conn:
            total = conn.execute(count).scalar_one()
            rows = conn.execute(page).all()
        return [subscription_from_row(r._mapping) for r in rows], int(total)

    def set_state(
        self,
        subscription_id: str,
        state: SubscriptionState,
        *,
        allowed_from: Collection[SubscriptionState] | None = None,
        comment: str | None = None,
    ) -> Subscription:
        """Change the state and its comment (None clears it: a comment describes the state it
        came with); return the updated subscription.

        ``allowed_from``: the *effective* states (``Subscription.effective_state``, at this
        repository's clock) the subscription may be in; None: any but cancelled, or any at all
        to cancel. Raises ``SubscriptionNotFound``, ``ValueError`` for ``expired`` (computed,
        never stored), ``SubscriptionInvalid`` for a comment longer than its column, or
        ``SubscriptionConflict`` (field ``"state"``) when the subscription
        is in another state. Checked by the UPDATE itself, so that a resume racing a cancel
        cannot bring the subscription (and its keys) back, nor an approval a rejection."""
        state = SubscriptionState(state)
        if state not in STORED_STATES:
            raise ValueError(f"state {state.value!r} is computed, never stored")
        if allowed_from is None:
            allowed_from = set(SubscriptionState)
            if state is not SubscriptionState.CANCELLED:
                allowed_from.discard(SubscriptionState.CANCELLED)
        now = self._clock.now()
        guard = None
        if set(allowed_from) != set(SubscriptionState):
            guard = _effective_state_in(allowed_from, now)
        values = {"state": str(state), "state_comment": comment}
        _check_lengths(values)
        return self._update(subscription_id, values, guard=guard, now=now)

    def set_key(
        self, subscription_id: str, slot: KeySlot, key_hash: bytes, prefix: str
    ) -> Subscription:
        """Replace one key (its hash and display prefix); the other slot is unchanged.

        Raises ``SubscriptionNotFound``, or ``SubscriptionConflict`` if the hash is that of any
        other stored key (including this subscription's other slot).
        """
        if slot not in ("primary", "secondary"):
            raise ValueError(f"unknown key slot {slot!r}")
        values = {f"{slot}_key_hash": key_hash, f"{slot}_key_prefix": prefix}
        try:
            return self._update(subscription_id, values, new_key=(key_hash, slot))
        except IntegrityError as exc:
            raise SubscriptionConflict(_KEY_IN_USE, field="key") from exc

    def set_overrides(self, subscription_id: str, overrides: dict[str, Any]) -> Subscription:
        """Replace the policy overrides (a JSON object). Raises ``SubscriptionNotFound``."""
        return self._update(subscription_id, {"overrides": encode_json(overrides)})

    def load_all(self) -> builtins.list[Subscription]:
        """Every subscription, in creation order (what a gateway holds in memory)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(subscriptions).order_by(subscriptions.c.created_at, subscriptions.c.id)
            ).all()
        return [subscription_from_row(r._mapping) for r in rows]

    def load_all_versioned(self) -> tuple[int, builtins.list[Subscription]]:
        """``version()`` then ``load_all()``: what a gateway needs to (re)load.

        The version is read first, so it is never newer than the data returned: a change that
        lands between the two reads is in the data and makes the next poll reload once more,
        which is harmless, while no change can be missed.
        """
        version = self.version()
        return version, self.load_all()

    def version(self) -> int:
        """The change counter: it grows with every change made through any repository."""
        with self._engine.connect() as conn:
            return _read_version(conn)

    def _update(
        self,
        subscription_id: str,
        values: dict[str, Any],
        *,
        new_key: tuple[bytes, KeySlot] | None = None,
        guard: ColumnElement[bool] | None = None,
        now: float | None = None,
    ) -> Subscription:
        """Update one subscription's ``values``; with ``guard``, only if the row meets it
        (else ``SubscriptionConflict``, field ``"state"``: the only guard is on the state)."""
        now = self._clock.now() if now is None else now
        values = {**values, "updated_at": now}
        statement = update(subscriptions).where(subscriptions.c.id == subscription_id)
        if guard is not None:
            statement = statement.where(guard)
        with self._engine.begin() as conn:
            # The UPDATE comes first so that a SQLite transaction takes the write lock at once.
            result = conn.execute(statement.values(values))
            if result.rowcount == 0:
                found = conn.execute(
                    select(subscriptions.c.id).where(subscriptions.c.id == subscription_id)
                ).first()
                if found is None:
                    raise SubscriptionNotFound(subscription_id)
                current = conn.execute(
                    select(subscriptions).where(subscriptions.c.id == subscription_id)
                ).one()
                raise SubscriptionConflict(
                    _state_conflict(subscription_from_row(current._mapping), now),
                    field="state",
                )
            if new_key is not None:
                key_hash, slot = new_key
                if _key_owner(conn, key_hash) != [(subscription_id, slot)]:
                    raise SubscriptionConflict(_KEY_IN_USE, field="key")  # rolls back
            _bump(conn)
            row = conn.execute(
                select(subscriptions).where(subscriptions.c.id == subscription_id)
            ).one()
        return subscription_from_row(row._mapping)


def _state_conflict(sub: Subscription, now: float) -> str:
    """Why a guarded state change was refused: the state the subscription is in."""
    state = sub.effective_state(now)
    if state is SubscriptionState.CANCELLED:
        return f"subscription {sub.id} is cancelled for good"
    return f"subscription {sub.id} is {state.value}"


def _effective_state_in(states: Collection[SubscriptionState], now: float) -> ColumnElement[bool]:
    """SQL: the row's effective state (``Subscription.effective_state`` at ``now``) is one
    of ``states``."""
    c = subscriptions.c
    expired = and_(c.expires_at.is_not(None), c.expires_at <= now)
    wanted = set(states)
    final = [str(s) for s in wanted & FINAL_STATES]
    live = [str(s) for s in (wanted & STORED_STATES) - FINAL_STATES]
    either: builtins.list[ColumnElement[bool]] = []
    if final:
        either.append(c.state.in_(final))
    if live:
        either.append(and_(c.state.in_(live), not_(expired)))
    if SubscriptionState.EXPIRED in wanted:
        either.append(and_(c.state.not_in([str(s) for s in FINAL_STATES]), expired))
    return or_(*either) if either else false()


def _check_lengths(row: dict[str, Any]) -> None:
    """``SubscriptionInvalid`` for the first text longer than its column's declared length."""
    for column in subscriptions.columns:
        value = row.get(column.name)
        length = column.type.length if isinstance(column.type, String) else None
        if length is not None and isinstance(value, str) and len(value) > length:
            raise SubscriptionInvalid(
                f"{column.name} must be at most {length} characters (it has {len(value)})",
                field=column.name,
            )


def _bump(conn: Connection) -> None:
    result = conn.execute(
        update(state_version)
        .where(state_version.c.id == STATE_VERSION_ROW_ID)
        .values(version=state_version.c.version + 1)
    )
    if result.rowcount != 1:
        raise RuntimeError("state_version row missing: was the database migrated?")


def _key_owner(conn: Connection, key_hash: bytes) -> builtins.list[tuple[str, KeySlot]]:
    """Every (subscription id, slot) whose key has this hash."""
    c = subscriptions.c
    rows = conn.execute(
        select(c.id, c.primary_key_hash, c.secondary_key_hash).where(
            or_(c.primary_key_hash == key_hash, c.secondary_key_hash == key_hash)
        )
    ).all()
    owners: builtins.list[tuple[str, KeySlot]] = []
    for sub_id, primary, secondary in rows:
        if bytes(primary) == key_hash:
            owners.append((sub_id, "primary"))
        if bytes(secondary) == key_hash:
            owners.append((sub_id, "secondary"))
    return sorted(owners)


def _read_version(conn: Connection) -> int:
    value = conn.execute(
        select(state_version.c.version).where(state_version.c.id == STATE_VERSION_ROW_ID)
    ).scalar_one_or_none()
    if value is None:
        raise RuntimeError("state_version row missing: was the database migrated?")
    return int(value)


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
