"""The truth log: what the simulator really received and answered, for tests to check against.

One record per request under ``/openai/`` (also 401/404/429s), appended when the handler
finishes — so also for a hang the client gave up on (``status`` 0 = no answer was sent).
Credentials are never stored: only whether ``api-key`` / ``authorization`` were present.
Bounded (oldest records drop first). Served as JSON by ``GET /_sim/log``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

DEFAULT_CAPACITY = 100_000
_SECRET_HEADERS = frozenset({"api-key", "authorization"})


@dataclass(slots=True)
class TruthRecord:
    """One request as the simulator saw it.

    ``request_id`` is the ``x-request-id`` the simulator sent back. ``prompt_tokens`` and
    ``completion_tokens`` are what the usage would report (None when the request never got
    that far); ``tokens_sent`` is how many completion tokens actually went out (fewer on a
    ``cut``). ``fault`` names an injected fault, ``client_gone`` says the client disconnected
    before the answer was complete.
    """

    request_id: str
    time: float
    method: str
    path: str
    operation: str | None = None
    deployment: str | None = None
    api_version: str | None = None
    status: int = 0
    streamed: bool = False
    include_usage: bool = False
    stream_options: Any = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimate: int | None = None
    tokens_sent: int | None = None
    finish_reason: str | None = None
    fault: str | None = None
    client_gone: bool = False
    api_key_present: bool = False
    authorization_present: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_headers(items: Any) -> tuple[dict[str, str], bool, bool]:
    """(headers without credentials, api-key present, authorization present).

    ``items`` iterates (name, value) pairs; repeated names are joined with ``", "``.
    """
    headers: dict[str, str] = {}
    api_key = authorization = False
    for name, value in items:
        lower = name.lower()
        if lower in _SECRET_HEADERS:
            if lower == "api-key":
                api_key = True
            else:
                authorization = True
            continue
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return headers, api_key, authorization


class TruthLog:
    """A bounded in-memory record list. Used from one event loop; reads copy."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._records: deque[TruthRecord] = deque(maxlen=capacity)

    def append(self, record: TruthRecord) -> None:
        self._records.append(record)

    def records(self) -> list[TruthRecord]:
        return list(self._records)

    def clear(self) -> None:
        self._records.clear()

    def to_json(self) -> bytes:
        return orjson.dumps(list(self._records))  # orjson serialises dataclasses natively

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"TruthLog(records={len(self._records)}, capacity={self._records.maxlen})"
