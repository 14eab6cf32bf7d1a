"""Engines for the two supported databases: SQLite (embedded mode) and PostgreSQL (cluster mode).

Everything in ``sluicegate.storage`` takes an :class:`~sqlalchemy.engine.Engine` made here, so
that both databases are set up the same way wherever they are used (gateway, CLI, tests).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

#: How long SQLite waits for another connection's write lock before giving up (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 5_000

#: libpq connection parameters applied unless the URL sets them itself. A short connect timeout
#: and aggressive TCP keepalives make an outage visible in seconds instead of minutes, which is
#: what lets the ledger writer switch to buffering and spilling quickly.
POSTGRES_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms: give up on unacknowledged writes to a vanished server
    "application_name": "sluicegate",
}


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pin the driver: ``postgresql://`` and ``postgres://`` mean psycopg 3.

    An explicit driver (``postgresql+psycopg2://``) is left alone. SQLite URLs are unchanged.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine_for(url: str | URL) -> Engine:
    """Create an engine for ``url``, configured for sluicegate.

    SQLite (file): WAL journal (readers never block the writer), ``synchronous=NORMAL`` (a
    committed transaction survives a process crash; after a power loss the last few may be
    rolled back), a busy timeout, foreign keys on; the file's directory is created if missing.
    PostgreSQL: psycopg 3, ``pool_pre_ping`` (a connection killed by a server restart is
    replaced transparently), a 3 s connect timeout and TCP keepalives.

    The engine is thread-safe as SQLAlchemy engines are: share it, but not its connections.
    Use a SQLite *file*: with ``sqlite://`` (in memory) every thread would see its own empty
    database, and the ledger writer writes from a thread of its own.
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        connect_args = {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in parsed.query}
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:///PATH or "
        "postgresql://USER@HOST/DB"
    )


def _bind_as_null(_value: None) -> None:
    return None


def _register_sqlite_adapters() -> None:
    """Adapters that bind ``bool`` and ``None`` exactly as sqlite3 does without them (0/1,
    NULL), only cheaper.

    Why: sqlite3 binds only exact ``int``, ``float``, ``str`` and ``bytearray`` directly.
    Any other value goes through its adapter lookup, which on a miss asks the protocol type
    for ``__adapt__``; on Python 3.11 that formats an ``AttributeError`` it then throws
    away. That is ~1,200 instructions (~160 ns) per value, and a ledger row has four such
    values (two flags, two optional fields that are usually ``None``). A registered
    adapter is found first, in a dict (`bench/instructions.py` counted the difference).
    The registry is the process's; these two entries change no value that is stored."""
    sqlite3.register_adapter(bool, int)
    sqlite3.register_adapter(type(None), _bind_as_null)


def _sqlite_engine(url: URL) -> Engine:
    _register_sqlite_adapters()
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL itself needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    return engine


def ping(engine: Engine) -> bool:
    """Return whether the database answers a trivial query now. Never raises."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        log.debug("database ping failed: %s", exc)
        return False
    return True


def describe(engine: Engine) -> str:
    """The engine's URL with any password hidden, for logs and error messages."""
    return engine.url.render_as_string(hide_password=True)


def database_problem(exc: SQLAlchemyError) -> str:
    """What went wrong, in one line that holds no SQL and no parameters: the exception's
    class and the first line of the driver's message (of SQLAlchemy's when there is no
    driver error). SQLAlchemy's own text goes on with the statement and its parameters (key
    hashes among them), and a driver's second line may quote a stored value."""
    orig = getattr(exc, "orig", None)
    text = first_line(str(orig if isinstance(orig, BaseException) else exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def first_line(text: str) -> str:
    """``text``'s first line, stripped."""
    return text.strip().split("\n", 1)[0].strip()


#: What the driver says when the server could not be reached (lower case). psycopg 3 gives
#: connection-phase errors no SQLSTATE, so the text is all there is to tell "down" from
#: "misconfigured" (a database that does not exist, a role or password refused, a host name
#: that does not resolve).
_NETWORK_PHRASES = (
    "connection refused",
    "timeout expired",
    "timed out",
    "no route to host",
    "network is unreachable",
    "connection reset",
    "server closed the connection",
)

#: What a server that answered says when it is not taking connections *yet* (a ``FATAL``
#: that passes by itself, unlike "database does not exist").
_NOT_NOW_PHRASES = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "terminating connection due to administrator command",
)

#: SQLSTATEs of a server that is going away or not there yet (class 08: connection
#: exception; 57P01-57P03: shutdown, crash shutdown, cannot connect now).
_UNREACHABLE_SQLSTATES = frozenset(
    {"08000", "08001", "08003", "08004", "08006", "57P01", "57P02", "57P03"}
)


def database_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked": another connection held the write
    lock for longer than the busy timeout (a long rollup rebuild, a purge). It passes by
    itself, so callers answer "retry", not "failed"."""
    if not isinstance(exc, SQLAlchemyError):
        return False
    orig = getattr(exc, "orig", None)
    return isinstance(orig, sqlite3.OperationalError) and "database is locked" in str(orig)


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database server is down or unreachable (connection refused,
    timed out, starting up or shutting down): a condition that may pass by itself, as
    opposed to a configuration error that will not (a database that does not exist, a
    refused role or password, a host name that does not resolve, a schema too new).

    A gateway may start and wait for the first; it must stop on the second, so when in
    doubt this says False."""
    if not isinstance(exc, SQLAlchemyError):
        return False
    orig = getattr(exc, "orig", None)
    if not isinstance(orig, BaseException):
        return False
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _UNREACHABLE_SQLSTATES:
        return True
    message = str(orig).lower()
    if any(phrase in message for phrase in _NOT_NOW_PHRASES):
        return True
    if "fatal:" in message:
        return False  # the server answered and refused: a configuration problem
    return any(phrase in message for phrase in _NETWORK_PHRASES)
