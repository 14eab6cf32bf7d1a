"""The ledger's usage of a quota counter key over a time range: what seeds a quota counter
that was created after its period began (``limits/seeding.py``, docs/limits.md).

A counter key (``policy.resolve_counter_key``: ``sub:abc``, ``owner:team-a``,
``product:gold``, ``caller:<oid>``, ``ip:203.0.113.7``, ``hdr:…``) matches ledger records by
one column, :data:`COUNTER_KEY_COLUMNS`; a key kind missing there cannot be seeded (``ip:``
and ``hdr:``: the ledger stores neither the client's address nor the header's value).
Another kind of key is one line there.

Tokens are ``SUM(total_tokens)`` over every record of the key in ``start <= ts < before``
(``ts`` is the request's arrival, epoch seconds), whatever its outcome: a failed attempt
followed by a retry is a record of its own with no tokens (``proxy/failover.py``), a
refusal has none, so nothing is counted twice.

Seeds are batched (:func:`quota_usages`): the ledger has an index on ``ts`` and on
``(subscription_id, ts)`` but none on ``(caller, ts)``, ``owner`` or ``product`` with ``ts``
(each would cost the ledger writer on every record), so a seed of such a key scans the
period's records; one query per key kind and period start sums every key of a batch at once
(``GROUP BY`` the column, the keys in chunks of :data:`IN_CHUNK`) over ``[start, since_min)``,
and each key whose own ``since`` is later adds a short tail ``[since_min, since)`` (the ``ts``
index). In embedded mode every counter has the same ``since`` (the gateway's start): one
query per kind and period.

A request quota's counter (``measure="requests"``) is seeded with the number of requests
instead, the ones the counter charged: records of a request's first attempt (``attempt = 1``,
one per request) of a metered operation (the ones admission counts) with a deployment (a
request is admitted only once its deployment is resolved: a client gone while sending its
body was not), whose outcome is not ``rejected`` (a refusal by the limits, or before them,
was never admitted) unless its code is one of :data:`ADMITTED_REFUSAL_CODES` (content
safety's, which refuses only admitted requests); not the semantic cache's embeddings calls
(``cache/semantic.py``: a record of the call marked ``extra.semantic_cache = "embedding"``,
whose failed attempts before it share its ``request_id``), which the gateway makes on a
request's behalf without admitting them. Where the ledger cannot tell (a request refused
after admission with a code also answered before it: ``InvalidRequest`` from the relay), the
seed counts less than the counter held, never more.

A ``sub:`` counter that is the fallback of a ``counter_key: caller`` policy (requests with a
subscription key and no token) is seeded from the subscription's records without a caller
only (``without_caller``); the seeder decides that (``limits/seeding.py``).

Every read runs in one transaction bounded on PostgreSQL by ``SET LOCAL statement_timeout``
and ``lock_timeout`` (a ``LOCK TABLE usage_records`` elsewhere makes the seed fail and be
retried, not wait); on SQLite by the engine's busy timeout (``engine.py``), although a
reader of a WAL database does not wait for writers anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy import ColumnElement, exists, func, or_, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from sluicegate.accounting.records import Outcome
from sluicegate.proxy.routes import METERED_OPERATIONS
from sluicegate.storage.engine import database_problem
from sluicegate.storage.schema import rollup_state, usage_records

#: Counter key kind (its prefix, before the first ``:``) -> the ledger column it matches.
COUNTER_KEY_COLUMNS: dict[str, ColumnElement[Any]] = {
    "sub": usage_records.c.subscription_id,
    "owner": usage_records.c.owner,
    "product": usage_records.c.product,
    "caller": usage_records.c.caller,  # the token's caller (RequestContext.caller)
}

#: Error codes of refusals the gateway answers only after admitting the request (a record
#: ``rejected`` with one of them was counted by a request quota): content safety's
#: (``guardrails/content_safety.py``) and a continuation of a stored response the
#: subscription does not hold (``proxy/failover.py``, ``unknown_response``).
ADMITTED_REFUSAL_CODES = frozenset(
    {
        "content_filter",
        "ContentSafetyTokenPrompt",
        "ContentSafetyTextTooLong",
        "ContentSafetyUnavailable",
        "ContentSafetyError",
        "previous_response_not_found",
    }
)
#: How ``cache/semantic.py`` marks the record of an embeddings call it made for a request
#: (``extra`` is stored as compact JSON with sorted keys, ``storage/rows.py``).
_EMBEDDING_MARK = '"semantic_cache":"embedding"'

Measure = Literal["tokens", "requests"]
"""What a seed sums: the records' ``total_tokens`` (a token quota), or the requests admitted
(a request quota: see the module docstring)."""

#: Keys per ``IN (...)`` list of a batched seed query.
IN_CHUNK = 500
#: Bounds of a seed's statements on PostgreSQL (seconds): a seed that cannot run now is
#: retried later, and must never hold a connection (or the gateway's stop) for long.
SEED_STATEMENT_TIMEOUT_S = 30.0
SEED_LOCK_TIMEOUT_S = 2.0


class QuotaUsageError(Exception):
    """The ledger could not be read; the message holds no SQL and no parameters."""


def seedable(key: str) -> bool:
    """Whether the ledger can tell ``key``'s usage (its kind is in :data:`COUNTER_KEY_COLUMNS`)."""
    kind, sep, value = key.partition(":")
    return bool(sep and value) and kind in COUNTER_KEY_COLUMNS


def quota_usages(
    engine: Engine,
    kind: str,
    start_ms: int,
    sinces: Mapping[str, int],
    *,
    without_caller: bool = False,
    measure: Measure = "tokens",
    statement_timeout_s: float = SEED_STATEMENT_TIMEOUT_S,
    lock_timeout_s: float = SEED_LOCK_TIMEOUT_S,
) -> tuple[dict[str, int], float | None]:
    """``(tokens by value, raw_purged_before)`` for the keys ``{kind}:{value}`` of ``sinces``
    (value -> ``since_ms``): each value's tokens in ``start_ms <= ts < since_ms`` (epoch ms),
    every value of ``sinces`` present (0 when none), and the time (epoch s) before which raw
    records have been purged (None: none). ``without_caller``: only records with no caller.
    ``measure="requests"``: the number of requests admitted instead of tokens (the module
    docstring).
    At most ``ceil(len / IN_CHUNK)`` grouped queries, one tail query per value whose
    ``since`` is later than the smallest, and one read of the purge horizon. Blocks on the
    database; raises :class:`QuotaUsageError`, and ``ValueError`` for a kind the ledger
    cannot tell."""
    column = COUNTER_KEY_COLUMNS.get(kind)
    if column is None:
        raise ValueError(f"counter key kind {kind!r} cannot be seeded from the ledger")
    tokens = dict.fromkeys(sinces, 0)
    # A counter created when its period began (or before) has nothing before it to add.
    values = [value for value, since in sinces.items() if since > start_ms]
    since_min = min([sinces[value] for value in values], default=start_ms)
    total: ColumnElement[Any]
    scope: list[ColumnElement[bool]] = []
    if measure == "requests":
        total = func.count()
        records = usage_records.c
        # The semantic cache's call: its marked record (the last attempt) shares the
        # request_id of its failed attempts before it (the UNIQUE (request_id, attempt)
        # index finds it). Looked for on embeddings records only.
        marked = usage_records.alias("marked")
        embedding_call = (
            exists()
            .where(
                marked.c.request_id == records.request_id,
                marked.c.extra.contains(_EMBEDDING_MARK, autoescape=True),
            )
            .correlate(usage_records)
        )
        scope += [
            records.attempt == 1,
            records.operation.in_(sorted(METERED_OPERATIONS)),
            records.deployment.is_not(None),
            or_(
                records.outcome != Outcome.REJECTED.value,
                records.error_code.in_(sorted(ADMITTED_REFUSAL_CODES)),
            ),
            or_(records.operation != "embeddings", ~embedding_call),
        ]
    else:
        total = func.coalesce(func.sum(usage_records.c.total_tokens), 0)
    if without_caller:
        scope.append(usage_records.c.caller.is_(None))
    try:
        with engine.begin() as conn:
            _bound(conn, statement_timeout_s, lock_timeout_s)
            for i in range(0, len(values), IN_CHUNK):
                chunk = values[i : i + IN_CHUNK]
                query = (
                    select(column, total)
                    .where(
                        usage_records.c.ts >= start_ms / 1000,
                        usage_records.c.ts < since_min / 1000,
                        column.in_(chunk),
                        *scope,
                    )
                    .group_by(column)
                )
                for value, summed in conn.execute(query):
                    if value in tokens:
                        tokens[value] += int(summed)
            for value in values:
                since = sinces[value]
                if since <= since_min:
                    continue
                tail = select(total).where(
                    column == value,
                    usage_records.c.ts >= since_min / 1000,
                    usage_records.c.ts < since / 1000,
                    *scope,
                )
                tokens[value] += int(conn.execute(tail).scalar_one())
            purged = conn.execute(
                select(rollup_state.c.raw_purged_before).where(rollup_state.c.id == 1)
            ).scalar()
    except SQLAlchemyError as exc:
        raise QuotaUsageError(database_problem(exc)) from exc
    return tokens, None if purged is None else float(purged)


def _bound(conn: Connection, statement_timeout_s: float, lock_timeout_s: float) -> None:
    """On PostgreSQL, the transaction's statement and lock timeouts (whole ms, at least 1:
    0 would mean none)."""
    if conn.dialect.name != "postgresql":
        return  # SQLite: the engine's busy timeout
    statement_ms = max(1, round(statement_timeout_s * 1000))
    lock_ms = max(1, round(lock_timeout_s * 1000))
    conn.execute(text(f"SET LOCAL statement_timeout = {int(statement_ms)}"))
    conn.execute(text(f"SET LOCAL lock_timeout = {int(lock_ms)}"))


def quota_usage(
    engine: Engine, key: str, start_ms: int, before_ms: int
) -> tuple[int, float | None] | None:
    """``(tokens, raw_purged_before)``: the ledger's tokens of counter key ``key`` in
    ``start_ms <= ts < before_ms`` (epoch ms), as :func:`quota_usages` (all records of the
    key); ``None`` when ``key`` cannot be seeded. Blocks on the database; raises
    :class:`QuotaUsageError`."""
    kind, _, value = key.partition(":")
    if kind not in COUNTER_KEY_COLUMNS or not value:
        return None
    tokens, purged = quota_usages(engine, kind, start_ms, {value: before_ms})
    return tokens[value], purged


class LedgerUsage:
    """The seeder's usage source on ``engine``: :meth:`batch` is :func:`quota_usages`; a
    call is :func:`quota_usage` (one key). ``statement_timeout_s`` and ``lock_timeout_s``
    bound each read on PostgreSQL."""

    def __init__(
        self,
        engine: Engine,
        *,
        statement_timeout_s: float = SEED_STATEMENT_TIMEOUT_S,
        lock_timeout_s: float = SEED_LOCK_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.statement_timeout_s = statement_timeout_s
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return f"LedgerUsage({self.engine.dialect.name})"

    def __call__(self, key: str, start_ms: int, before_ms: int) -> tuple[int, float | None] | None:
        return quota_usage(self.engine, key, start_ms, before_ms)

    def batch(
        self,
        kind: str,
        start_ms: int,
        sinces: Mapping[str, int],
        *,
        without_caller: bool,
        measure: Measure = "tokens",
    ) -> tuple[dict[str, int], float | None]:
        """:func:`quota_usages` (blocking)."""
        return quota_usages(
            self.engine,
            kind,
            start_ms,
            sinces,
            without_caller=without_caller,
            measure=measure,
            statement_timeout_s=self.statement_timeout_s,
            lock_timeout_s=self.lock_timeout_s,
        )


def ledger_usage(engine: Engine) -> LedgerUsage:
    """The seeder's usage source on ``engine`` (:class:`LedgerUsage`)."""
    return LedgerUsage(engine)
