"""SQL storage (SQLAlchemy Core): SQLite by default, PostgreSQL for clusters.

- ``engine``: ``create_engine_for(url)``, ``ping(engine)``
- ``schema``: the tables; ``migrations``: ``migrate(url)`` (Alembic, run from code)
- ``subscriptions``: ``SubscriptionRepository``
- ``ledger``: ``LedgerWriter``, the batching, spilling usage-record writer
- ``reports``: ``usage_report``, ``ledger_totals``, ``fetch_records``

Nothing here is on the request path except ``LedgerWriter.submit()``, which does no I/O.
"""

from sluicegate.storage.engine import create_engine_for, normalize_url, ping
from sluicegate.storage.ledger import LedgerStats, LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.reports import ReportRow, fetch_records, ledger_totals, usage_report
from sluicegate.storage.subscriptions import (
    SubscriptionConflict,
    SubscriptionNotFound,
    SubscriptionRepository,
)

__all__ = [
    "LedgerStats",
    "LedgerWriter",
    "ReportRow",
    "SubscriptionConflict",
    "SubscriptionNotFound",
    "SubscriptionRepository",
    "create_engine_for",
    "fetch_records",
    "ledger_totals",
    "migrate",
    "normalize_url",
    "ping",
    "usage_report",
]
