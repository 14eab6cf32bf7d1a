"""PostgreSQL for tests: a private throwaway server, or a throwaway database on the shared one.

Two ways to get a database, pick by what the test does to it:

- ``throwaway_database()`` / the ``pg_database_url`` fixture: a fresh database
  ``sluicegate_t_<random>`` on the shared server at 127.0.0.1:5432 (user ``postgres``, trust
  auth), dropped afterwards. Fast (~0.1 s); for tests that only use the database.
- ``PostgresServer``: a whole cluster of its own (``initdb`` into a temp dir, a free port on
  127.0.0.1), for tests that stop, start or break the server. ~1 s to create and start.

PostgreSQL refuses to run as root; when the tests run as root (CI here), the server's
commands run as the system user ``postgres`` through ``runuser`` and its directory is owned by
that user. Missing binaries fail with the Debian package to install, never a skip.

Use as a fixture in a conftest::

    from tests.support.pg import pg_database_url  # noqa: F401  (re-exported fixture)

or directly::

    with PostgresServer() as server:       # started; stopped and removed on exit
        engine = create_engine_for(server.url)
        server.stop(); server.start()       # same port, same data
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import psycopg
import pytest
from psycopg import sql

SHARED_SERVER_URL = os.environ.get(
    "SLUICEGATE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
"""The shared server's maintenance database (override with ``SLUICEGATE_TEST_PG_URL``)."""

#: Settings for a private server: durability traded for speed, only loopback TCP.
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "32MB",
}

_DB_PREFIX = "sluicegate_t_"


def find_pg_binary(name: str) -> str:
    """Path of a PostgreSQL server program (``initdb``, ``pg_ctl``, ``postgres``).

    Looks on PATH, then in Debian's versioned directories. Raises ``RuntimeError`` naming the
    package to install if it is nowhere.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if candidates:
        return str(candidates[0])
    raise RuntimeError(
        f"{name!r} not found: install the PostgreSQL server "
        "(Debian: apt-get install postgresql; it puts the programs in /usr/lib/postgresql/N/bin)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, on a port of its own.

    ``start()`` creates the cluster on first use (``initdb``, trust auth, superuser
    ``postgres``) and starts it, waiting until it accepts connections; ``stop()`` shuts it
    down ("fast" by default: connections are terminated, as in an outage) and keeps the data,
    so ``start()`` again brings the same database back on the same port. ``cleanup()`` stops
    it and removes its directory; a context manager does start/cleanup.

    Not thread-safe: drive one server from one thread.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        run_as: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        # PostgreSQL will not run as root: borrow the system account for it.
        self.run_as = run_as if run_as is not None else ("postgres" if os.geteuid() == 0 else "")
        self._initdb = find_pg_binary("initdb")
        self._pg_ctl = find_pg_binary("pg_ctl")
        if self.run_as and shutil.which("runuser") is None:
            raise RuntimeError(
                "'runuser' not found: install it (Debian: apt-get install util-linux)"
            )
        self._root: Path | None = None
        self.running = False

    @property
    def url(self) -> str:
        """URL of the ``postgres`` database (``postgresql://`` form; storage pins psycopg)."""
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("the server has not been created yet")
        return self._root / "data"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "server.log"

    def start(self) -> None:
        """Create the cluster if needed, then start it and wait until it is ready."""
        if self.running:
            return
        if self._root is None:
            self._create()
        self._run(
            self._pg_ctl, "start", "-w", "-t", "60", "-D", str(self.data_dir),
            "-l", str(self.log_file),
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down (``fast``: roll back and disconnect everyone; ``immediate``:
        like a crash). The data stays for a later ``start()``."""
        if not self.running:
            return
        self._run(self._pg_ctl, "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data_dir))
        self.running = False

    def cleanup(self) -> None:
        """Stop the server (if running) and delete its directory."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def create_database(self, name: str) -> str:
        """Create a database on this server; return its URL."""
        with psycopg.connect(_libpq(self.url), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {self.host}:{self.port} {state} dir={self._root}>"

    def _create(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="sluicegate-pg-"))
        if self.run_as:
            account = pwd.getpwnam(self.run_as)
            os.chown(root, account.pw_uid, account.pw_gid)
        self._root = root
        self._run(
            self._initdb, "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        lines = {
            "port": str(self.port),
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": "''",  # TCP only: no clash with the system server
            **{k: f"'{v}'" for k, v in self.settings.items()},
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# sluicegate test server\n")
            conf.writelines(f"{key} = {value}\n" for key, value in lines.items())

    def _run(self, *argv: str) -> None:
        command = ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else list(argv)
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            log_tail = ""
            with contextlib.suppress(OSError, RuntimeError):
                log_tail = self.log_file.read_text()[-2000:]
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{log_tail}"
            )


def _libpq(url: str) -> str:
    """A URL psycopg itself accepts (no SQLAlchemy ``+driver`` suffix)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _admin_connect(server_url: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(_libpq(server_url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"cannot reach the shared PostgreSQL test server at {server_url}: {exc}\n"
            "Start it (Debian: apt-get install postgresql; service postgresql start) with "
            "trust auth for user postgres on 127.0.0.1:5432, or point SLUICEGATE_TEST_PG_URL "
            "at another one."
        ) from exc


def _with_database(server_url: str, database: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{database}"


@contextlib.contextmanager
def throwaway_database(server_url: str = SHARED_SERVER_URL) -> Iterator[str]:
    """Create ``sluicegate_t_<random>`` on the server, yield its URL, then drop it.

    The drop forces out connections still open (``WITH (FORCE)``), so a test that forgot to
    dispose an engine does not leave the database behind.
    """
    name = _DB_PREFIX + secrets.token_hex(6)
    with _admin_connect(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(server_url, name)
    finally:
        with _admin_connect(server_url) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """URL of a fresh, empty database on the shared server, dropped after the test."""
    with throwaway_database() as url:
        yield url


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A started private ``PostgresServer`` of the test's own, removed afterwards."""
    with PostgresServer() as server:
        yield server
