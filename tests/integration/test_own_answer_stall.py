"""A client that stops reading one of the gateway's own answers (here the admin API's
subscription listing, ~400 KB; the dashboard's pages, ``/metrics`` and the CSV exports are
written the same way) loses its connection once it has taken nothing for the longest
``timeouts.client_write`` (``server.GatewayHttpProtocol._watch_writes``). uvicorn writes such
an answer whole into the connection's buffer and then, at its keep-alive timeout, closes the
connection with ``close()``, which waits for the buffer to be written: without limit for a
client that never reads, which held its connection and a slot of ``listen.max_connections``
for ever. A client that reads slowly but steadily keeps its connection and gets it all.

Real sockets: the stalled client shrinks its receive buffer (``SO_RCVBUF``) before
connecting and reads nothing, so the gateway's writes to it really stop."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from sluicegate.admin.service import AdminService
from tests.admin.harness import ADMIN_TOKEN, ADMIN_TOKEN_ENV
from tests.integration.conftest import Harness
from tests.integration.test_slow_client import _open_connections, _stalled_client
from tests.integration.wire_backend import wait_for
from tests.support.gateway import GatewayThread, gateway_config

CLIENT_WRITE = 1.0
SUBSCRIPTIONS = 200
#: A name of 200 four-byte characters: each listed subscription is ~2 KB of JSON.
WIDE = "\U0001f600" * 200
LISTING = (
    f"GET /admin/api/subscriptions?limit={SUBSCRIPTIONS} HTTP/1.1\r\nhost: gw\r\n"
    f"authorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
).encode()


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A gateway (admin API on) whose one backend has ``client_write`` 1 s, holding
    ``SUBSCRIPTIONS`` subscriptions with wide names."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
        config = gateway_config(
            tmp_path_factory.mktemp("own"),
            {"b": "http://127.0.0.1:9"},
            admin={"token_env": ADMIN_TOKEN_ENV},
        )
        config["backends"][0]["timeouts"] = {"client_write": CLIENT_WRITE}
        gw = GatewayThread(config).start()
        for server in gw.server.servers:
            for listening in server.sockets:
                # Inherited by each accepted connection (Linux): the kernel then holds a
                # few KB of an answer instead of up to 4 MB (tcp_wmem), so that an answer of
                # a few hundred KB already fills the connection (as a larger one would with
                # the kernel's defaults).
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        g = gw.gateway
        admin = AdminService(g.config, g.repository, g.hasher)
        for _ in range(SUBSCRIPTIONS):
            admin.create_subscription(product="starter", owner=WIDE, name=WIDE)
        yield Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
        gw.stop()


def _answer_length(head: bytes) -> int:
    return next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )


def _received_until_the_end(sock: socket.socket) -> bytes:
    received = b""
    sock.settimeout(10)
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("requests", [1, 2], ids=["one answer", "one queued behind another"])
def test_a_client_that_reads_nothing_of_an_own_answer_is_dropped(h: Harness, requests: int) -> None:
    """One answer: written whole into the buffer, then the client takes nothing. Two
    pipelined: the second answer's ``send`` waits for the buffer to drain (a response in
    progress gets one period more, for a sender with a bound of its own)."""
    wait_for(lambda: _open_connections(h) == 0, within=10, what="no connection at the start")
    with closing(_stalled_client(h.gw.port)) as stalled:
        started = time.monotonic()
        stalled.sendall(LISTING * requests)
        wait_for(lambda: _open_connections(h) == 1, within=10, what="the connection counted")
        wait_for(lambda: _open_connections(h) == 0, within=10, what="the connection dropped")
        took = time.monotonic() - started
        assert took < 2 * CLIENT_WRITE * requests + 5, took
        # Dropped, not closed after the answer was written: part of it never came.
        received = _received_until_the_end(stalled)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), received[:200]
        assert len(body) < _answer_length(head), "the whole answer was written"


def test_a_client_that_reads_slowly_gets_the_whole_answer(h: Harness) -> None:
    """A client with a 16 KB receive buffer that takes what has come every 0.4
    ``client_write``: its answer takes a few periods to write (how many depends on the
    kernel's buffers), and it is never dropped."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    with closing(sock):
        sock.connect(("127.0.0.1", h.gw.port))
        sock.sendall(LISTING)
        sock.setblocking(False)
        received = b""
        while True:
            time.sleep(0.4 * CLIENT_WRITE)
            try:
                while chunk := sock.recv(1 << 20):
                    received += chunk
            except BlockingIOError:
                pass
            else:
                raise AssertionError(f"dropped after {len(received)} bytes: {received[:300]!r}")
            head, _, body = received.partition(b"\r\n\r\n")
            if body and len(body) == _answer_length(head):
                break
        assert len(body) > 300_000
