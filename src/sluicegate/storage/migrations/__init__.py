"""Schema migrations (Alembic), run from code: no ``alembic.ini`` is needed at run time.

``migrate(url)`` brings a database to the newest revision. It is idempotent (a database at
head is left untouched) and safe when several gateway processes start at once: the whole
upgrade runs in one transaction, serialised by an advisory lock on PostgreSQL and by an
immediate (write-locking) transaction on SQLite, so exactly one process applies each revision
and the others then find the database at head.

To change the schema: edit ``schema.py`` and add a revision module ``versions/NNNN_what.py``
(``revision`` / ``down_revision`` set; ``script.py.mako`` is the template Alembic's
``revision`` command uses with ``script_location`` pointing here). Never edit a released
revision. ``tests/storage/test_migrations.py`` fails until the migrated database and
``schema.metadata`` agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, Engine

from sluicegate.storage.engine import create_engine_for

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent

#: The newest revision in ``versions/``, known without loading Alembic: a gateway starting
#: on an up-to-date database never imports it (about 11 MiB of resident memory per worker).
#: ``tests/storage/test_migrations.py`` checks it against Alembic's own view.
HEAD = "0004"

# Alembic 1.16+ announces each of its autogenerate plugins at INFO whenever it runs (eight
# lines before "Running upgrade …" in every new gateway's log); they say nothing to an operator.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

#: Key of the PostgreSQL advisory lock held while migrating (any fixed 64-bit number).
_PG_LOCK_KEY = 0x51_0C_E6_A7_E0_00_00_01


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic ``Config`` for this package's migrations, built in code."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url is not None:
        rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        # ConfigParser interpolation: a literal % (URL-encoded passwords) must be doubled.
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision this code knows (from Alembic's script directory)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {SCRIPT_LOCATION}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(url: str | URL) -> None:
    """Upgrade the database at ``url`` to the newest revision (creating the schema if empty).

    Idempotent and safe to call from several processes at once (see the module docstring).
    Raises SQLAlchemy's errors if the database cannot be reached.
    """
    engine = create_engine_for(url)
    try:
        if _at_head(engine):
            return
        from alembic import command

        with engine.connect() as conn:
            _lock(conn)
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
    finally:
        engine.dispose()


def _at_head(engine: Engine) -> bool:
    """The database says it is at :data:`HEAD` (read without Alembic; anything unexpected,
    such as a missing version table, means "not known to be at head": migrate)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    except sa_exc.DBAPIError:
        return False
    return [row[0] for row in rows] == [HEAD]


def _lock(conn: Connection) -> None:
    """Open the migration transaction with a lock that serialises concurrent migrators."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _to_int64(_PG_LOCK_KEY)})
    elif conn.dialect.name == "sqlite":
        # pysqlite leaves DDL outside any transaction unless one is open; an immediate
        # transaction takes the write lock now, so DDL and the version stamp commit together.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
