"""Alembic environment: runs the revisions on the connection that ``migrate()`` hands over.

Run through :func:`sluicegate.storage.migrations.migrate`, which opens the transaction (and, on
PostgreSQL, takes the advisory lock) so that concurrent starts migrate exactly once. Running
the ``alembic`` command line against this directory also works: then the URL comes from the
config's ``sqlalchemy.url`` option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url set")
    engine = create_engine_for(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


_main()
