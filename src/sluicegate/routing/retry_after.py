"""How long a backend asked to be left alone: ``retry-after-ms``, ``retry-after`` and, as a
last resort, the "Please retry after N seconds" of an Azure error message.

Pure functions. ``retry-after-ms`` wins (it is the precise one Azure sends beside the rounded
``retry-after``); ``retry-after`` is seconds (integer or decimal) or an HTTP date (RFC 9110
§10.2.3), read against the wall clock passed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime

_MESSAGE_WAIT = re.compile(rb"(?:retry after|wait)\s+(\d+(?:\.\d+)?)\s+second", re.IGNORECASE)


def _number(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    return number


def parse_retry_after_ms(value: str | None) -> float | None:
    """``retry-after-ms`` in seconds, or None when absent or not a non-negative number."""
    if value is None:
        return None
    number = _number(value)
    return None if number is None else number / 1000.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``retry-after`` in seconds from ``now`` (epoch seconds): delta-seconds or an HTTP date
    (a date in the past gives 0). None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    number = _number(value)
    if number is not None:
        return number
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime dates carry no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def retry_after_from_headers(
    headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]], now: float
) -> float | None:
    """The backend's requested wait in seconds, preferring ``retry-after-ms``; None if it
    sent neither header (or neither could be read). Header names may be any case."""
    ms: str | None = None
    plain: str | None = None
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        lower = name.lower()
        if lower == "retry-after-ms":
            ms = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        elif lower == "retry-after":
            plain = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
    wait = parse_retry_after_ms(ms)
    if wait is not None:
        return wait
    return parse_retry_after(plain, now)


def retry_after_from_body(body: bytes) -> float | None:
    """The wait an Azure error message names ("Please retry after 6 seconds", "Please wait
    33 seconds before retrying"), for 429s that came without headers."""
    match = _MESSAGE_WAIT.search(body[:4096])
    return float(match.group(1)) if match else None
