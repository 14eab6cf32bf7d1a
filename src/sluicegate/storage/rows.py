"""Conversions between the domain dataclasses and table rows / spill-file JSON.

Kept in one place so that the ledger writer, the spill file, the reports and the subscription
repository agree on one encoding. All functions are pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.auth.subscriptions import Subscription, SubscriptionState


def encode_json(value: Mapping[str, Any]) -> str:
    """Canonical JSON text for a stored JSON object (raises TypeError if not encodable)."""
    # sort_keys: the same mapping is always stored as the same text.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_to_row(record: UsageRecord) -> dict[str, Any]:
    """The ``usage_records`` row (without the surrogate ``id``) for ``record``."""
    return {
        "request_id": record.request_id,
        "attempt": record.attempt,
        "ts": record.ts,
        "subscription_id": record.subscription_id,
        "owner": record.owner,
        "product": record.product,
        "deployment": record.deployment,
        "backend": record.backend,
        "operation": record.operation,
        "status": record.status,
        "outcome": str(record.outcome),
        "model": record.model,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens,
        "cached_tokens": record.cached_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "streamed": record.streamed,
        "usage_estimated": record.usage_estimated,
        "ttfb_ms": record.ttfb_ms,
        "duration_ms": record.duration_ms,
        "caller": record.caller,
        "error_code": record.error_code,
        "extra": encode_json(record.extra),
    }


def record_from_row(row: Mapping[Any, Any]) -> UsageRecord:
    """Rebuild a record from a ``usage_records`` row (or a spill-file object).

    ``extra`` may be JSON text (a table row) or already a mapping (a spill-file line).
    Raises ``KeyError``/``ValueError``/``TypeError`` on a malformed row.
    """
    extra = row["extra"]
    if isinstance(extra, str):
        extra = json.loads(extra)
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a JSON object, got {type(extra).__name__}")
    return UsageRecord(
        request_id=row["request_id"],
        ts=float(row["ts"]),
        subscription_id=row["subscription_id"],
        owner=row["owner"],
        product=row["product"],
        deployment=row["deployment"],
        backend=row["backend"],
        operation=row["operation"],
        status=int(row["status"]),
        outcome=Outcome(row["outcome"]),
        model=row["model"],
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        total_tokens=int(row["total_tokens"]),
        cached_tokens=int(row["cached_tokens"]),
        reasoning_tokens=int(row["reasoning_tokens"]),
        streamed=bool(row["streamed"]),
        usage_estimated=bool(row["usage_estimated"]),
        ttfb_ms=None if row["ttfb_ms"] is None else float(row["ttfb_ms"]),
        duration_ms=float(row["duration_ms"]),
        attempt=int(row["attempt"]),
        caller=row["caller"],
        error_code=row["error_code"],
        extra={str(k): str(v) for k, v in extra.items()},
    )


def record_to_json(record: UsageRecord) -> str:
    """One spill-file line (without the newline): the row as a JSON object."""
    row = record_to_row(record)
    row["extra"] = dict(record.extra)
    return encode_json(row)


def record_from_json(line: str) -> UsageRecord:
    """Parse one spill-file line. Raises ``ValueError`` (or a subclass) if it is not a record."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise TypeError("not a JSON object")
        return record_from_row(obj)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a usage record: {exc}") from exc


def subscription_to_row(sub: Subscription) -> dict[str, Any]:
    """The ``subscriptions`` row for ``sub``."""
    return {
        "id": sub.id,
        "name": sub.name,
        "owner": sub.owner,
        "product": sub.product,
        "state": str(sub.state),
        "primary_key_hash": sub.primary_key_hash,
        "secondary_key_hash": sub.secondary_key_hash,
        "primary_key_prefix": sub.primary_key_prefix,
        "secondary_key_prefix": sub.secondary_key_prefix,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
        "expires_at": sub.expires_at,
        "overrides": encode_json(sub.overrides),
    }


def subscription_from_row(row: Mapping[Any, Any]) -> Subscription:
    """Rebuild a subscription from a ``subscriptions`` row."""
    return Subscription(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        product=row["product"],
        state=SubscriptionState(row["state"]),
        primary_key_hash=bytes(row["primary_key_hash"]),
        secondary_key_hash=bytes(row["secondary_key_hash"]),
        primary_key_prefix=row["primary_key_prefix"],
        secondary_key_prefix=row["secondary_key_prefix"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
        overrides=json.loads(row["overrides"]),
    )
