"""Engine construction: URL normalisation, SQLite pragmas, PostgreSQL outage detection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from sluicegate.storage.engine import create_engine_for, normalize_url, ping
from tests.support.pg import free_port


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("postgresql://u@h:5432/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2"),
        ("sqlite:////tmp/x.db", "sqlite"),
    ],
)
def test_normalize_url_pins_psycopg(given: str, driver: str) -> None:
    assert normalize_url(given).drivername == driver


def test_normalize_url_keeps_everything_else() -> None:
    url = normalize_url("postgresql://alice:s%40cret@db.example:6543/ledger?sslmode=require")
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "alice",
        "s@cret",
        "db.example",
        6543,
        "ledger",
    )
    assert url.query == {"sslmode": "require"}


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        create_engine_for("mysql://root@127.0.0.1/test")


def test_sqlite_binds_flags_and_none_as_it_always_did(tmp_path: Path) -> None:
    """The engine registers sqlite3 adapters for ``bool`` and ``None`` (a cheaper lookup);
    what is stored must not change: flags as integers 0/1, ``None`` as NULL, through the
    driver (as the ledger writer binds) and through SQLAlchemy alike."""
    engine = create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (a, b, c, d)")
            conn.exec_driver_sql("INSERT INTO t VALUES (?, ?, ?, ?)", (True, False, None, 7))
            conn.execute(
                text("INSERT INTO t VALUES (:a, :b, :c, :d)"),
                {"a": False, "b": True, "c": None, "d": "x"},
            )
            rows = conn.exec_driver_sql(
                "SELECT a, typeof(a), b, typeof(b), c, typeof(c), d FROM t ORDER BY rowid"
            ).all()
        assert [tuple(r) for r in rows] == [
            (1, "integer", 0, "integer", None, "null", 7),
            (0, "integer", 1, "integer", None, "null", "x"),
        ]
    finally:
        engine.dispose()


def test_sqlite_creates_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "ledger.db"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.execute(text(f"PRAGMA {name}")).scalar_one()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert pragmas == {
            "journal_mode": "wal",
            "synchronous": 1,  # NORMAL
            "busy_timeout": 5000,
            "foreign_keys": 1,
        }
        assert path.exists()
        assert ping(engine)
    finally:
        engine.dispose()


def test_postgresql_engine_answers(pg_database_url: str) -> None:
    engine = create_engine_for(pg_database_url)
    try:
        assert engine.dialect.driver == "psycopg"
        assert ping(engine)
    finally:
        engine.dispose()


def test_ping_reports_an_unreachable_server_quickly() -> None:
    engine = create_engine_for(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    try:
        started = time.monotonic()
        assert ping(engine) is False
        assert time.monotonic() - started < 5
    finally:
        engine.dispose()
