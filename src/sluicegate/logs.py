"""Structured logs: one JSON line per request, and JSON formatting for everything else.

No key, token, prompt or completion text is ever logged: the access line is built from the
usage record, which holds none of them.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from typing import Any

import orjson

from sluicegate.accounting.records import UsageRecord

_ACCESS = logging.getLogger("sluicegate.access")

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode("utf-8")


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLog:
    """Writes the access line for a usage record."""

    def write(self, record: UsageRecord) -> None:
        if not _ACCESS.isEnabledFor(logging.INFO):
            return
        fields = asdict(record)
        fields["outcome"] = record.outcome.value
        fields.pop("extra", None)
        _ACCESS.info("request", extra={"request": fields})
