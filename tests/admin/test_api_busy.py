"""A database that is busy (SQLite's write lock held past the busy timeout) gets the admin
API's 503 with ``Retry-After``, not its 500: the condition passes by itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.admin.harness import admin_gateway


def test_a_locked_sqlite_database_is_a_503_to_retry(tmp_path: Path) -> None:
    with admin_gateway(tmp_path) as h:
        holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another writer, for longer than 5 s
            r = h.api.post("/rollups/rebuild", params={"from": "2026-01-01", "to": "2026-01-02"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "DatabaseBusy"
            assert r.headers["retry-after"] == "5"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        r = h.api.post("/rollups/rebuild", params={"from": "2026-01-01", "to": "2026-01-02"})
        assert r.status_code == 200, r.text
