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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from sluicegate.storage.engine import database_problem
from sluicegate.storage.schema import rollup_state, usage_records

#: Counter key kind (its prefix, before the first ``:``) -> the ledger column it matches.
COUNTER_KEY_COLUMNS: dict[str, ColumnElement[Any]] = {
    "sub": usage_records.c.subscription_id,
    "owner": usage_records.c.owner,
    "product": usage_records.c.product,
    "caller": usage_records.c.caller,  # the token's caller (RequestContext.caller)
}


class QuotaUsageError(Exception):
    """The ledger could not be read; the message holds no SQL and no parameters."""


def seedable(key: str) -> bool:
    """Whether the ledger can tell ``key``'s usage (its kind is in :data:`COUNTER_KEY_COLUMNS`)."""
    kind, sep, value = key.partition(":")
    return bool(sep and value) and kind in COUNTER_KEY_COLUMNS


def quota_usage(
    engine: Engine, key: str, start_ms: int, before_ms: int
) -> tuple[int, float | None] | None:
    """``(tokens, raw_purged_before)``: the ledger's tokens of counter key ``key`` in
    ``start_ms <= ts < before_ms`` (epoch ms), and the time (epoch s) before which raw records
    have been purged by retention (None: none purged; tokens before it are missing). ``None``
    when ``key`` cannot be seeded. Blocks on the database; raises :class:`QuotaUsageError`.
    """
    kind, _, value = key.partition(":")
    column = COUNTER_KEY_COLUMNS.get(kind)
    if column is None or not value:
        return None
    tokens_query = select(func.coalesce(func.sum(usage_records.c.total_tokens), 0)).where(
        column == value,
        usage_records.c.ts >= start_ms / 1000,
        usage_records.c.ts < before_ms / 1000,
    )
    try:
        with engine.connect() as conn:
            tokens = int(conn.execute(tokens_query).scalar_one())
            purged = conn.execute(
                select(rollup_state.c.raw_purged_before).where(rollup_state.c.id == 1)
            ).scalar()
    except SQLAlchemyError as exc:
        raise QuotaUsageError(database_problem(exc)) from exc
    return tokens, None if purged is None else float(purged)


def ledger_usage(engine: Engine) -> Callable[[str, int, int], tuple[int, float | None] | None]:
    """:func:`quota_usage` on ``engine``, as the seeder's ``usage`` callable."""

    def usage(key: str, start_ms: int, before_ms: int) -> tuple[int, float | None] | None:
        return quota_usage(engine, key, start_ms, before_ms)

    return usage
