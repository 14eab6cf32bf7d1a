"""The test-server helpers themselves: restartable, isolated, clear when a binary is missing."""

from __future__ import annotations

import psycopg
import pytest
import redis

from tests.support.pg import PostgresServer, find_pg_binary, throwaway_database
from tests.support.redis_server import RedisServer, find_redis_server


def test_postgres_server_keeps_its_data_and_port_across_a_restart() -> None:
    with PostgresServer() as server:
        url = server.create_database("kept")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        server.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
        root = server.data_dir.parent
    assert not root.exists()


def test_throwaway_database_is_dropped() -> None:
    with throwaway_database() as url:
        name = url.rsplit("/", 1)[1]
        assert name.startswith("sluicegate_t_")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres") as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert exists is None


def test_redis_server_restarts_empty_on_the_same_port() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            server.stop()
            with pytest.raises(redis.ConnectionError):
                client.get("k")
            server.start()
            assert client.get("k") is None
            assert server.url.endswith(f":{server.port}/0")
        finally:
            client.close()


def test_missing_binaries_name_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="apt-get install redis-server"):
        find_redis_server()
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        find_pg_binary("no-such-pg-program")
