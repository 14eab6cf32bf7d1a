"""``database_unreachable``: which database errors a gateway may wait out at start (the server
down or not answering) and which it must stop on (configuration errors)."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from sluicegate.storage.engine import create_engine_for, database_unreachable
from tests.support.pg import SHARED_SERVER_URL, PostgresServer, free_port


def _error(url: str) -> SQLAlchemyError:
    engine = create_engine_for(url)
    try:
        with pytest.raises(SQLAlchemyError) as caught, engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return caught.value


def test_a_stopped_server_is_unreachable(postgres_server: PostgresServer) -> None:
    postgres_server.stop()
    assert database_unreachable(_error(postgres_server.url))


def test_nothing_listening_is_unreachable() -> None:
    assert database_unreachable(_error(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))


def test_a_database_that_does_not_exist_is_a_configuration_error() -> None:
    base = SHARED_SERVER_URL.rpartition("/")[0]
    assert not database_unreachable(_error(f"{base}/nodb_{secrets.token_hex(4)}"))


def test_a_role_that_does_not_exist_is_a_configuration_error() -> None:
    url = SHARED_SERVER_URL.replace("postgres@", f"norole_{secrets.token_hex(4)}@", 1)
    assert not database_unreachable(_error(url))


def test_a_host_name_that_does_not_resolve_is_a_configuration_error() -> None:
    assert not database_unreachable(_error("postgresql://postgres@nohost.invalid:5432/x"))


def test_errors_other_than_the_databases_are_not_unreachable() -> None:
    assert not database_unreachable(ConnectionRefusedError("not through SQLAlchemy"))
    assert not database_unreachable(SQLAlchemyError("no driver error"))
