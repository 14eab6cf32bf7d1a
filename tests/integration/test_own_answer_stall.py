"""A client that stops reading one of the gateway's own answers (here the admin API's
subscription listing, ~400 KB; the dashboard's pages, ``/metrics`` and the CSV exports are
written the same way) loses its connection once it has taken nothing for the longest
``timeouts.client_write`` (``server.GatewayHttpProtocol._watch_writes``). uvicorn writes such
an answer whole into the connection's buffer and then, at its keep-alive timeout, closes the
connection with ``close()``, which waits for the buffer to be written: without limit for a
client that never reads, which held its connection and a slot of ``listen.max_connections``
for ever. A client that reads slowly but steadily keeps its connection and gets it all: also
when the kernel's send buffer has grown to megabytes (a kept connection after a large
answer, with Linux's defaults), where the kernel wakes the gateway's writer only after
megabytes went out and the transport's buffer alone showed no progress for seconds (the
watch counts the bytes the client acknowledged, ``server._bytes_acked``); and when a later
answer on the connection adds its bytes while the watch is on.

Real sockets: the stalled client shrinks its receive buffer (``SO_RCVBUF``) before
connecting and reads nothing, so the gateway's writes to it really stop; a slow one reads
at a set rate."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from sluicegate.admin.service import AdminService
from tests.admin.harness import ADMIN_TOKEN, ADMIN_TOKEN_ENV
from tests.integration.conftest import Harness
from tests.integration.test_slow_client import (
    _answer,
    _gateway,
    _open_connections,
    _request,
    _stalled_client,
)
from tests.integration.wire_backend import Request, WireBackend, head, wait_for
from tests.support.gateway import GatewayThread, gateway_config

CLIENT_WRITE = 1.0
SUBSCRIPTIONS = 200
#: A name of 200 four-byte characters: each listed subscription is ~2 KB of JSON.
WIDE = "\U0001f600" * 200


def _listing(limit: int) -> bytes:
    """A request for the first ``limit`` subscriptions (~2 KB each)."""
    return (
        f"GET /admin/api/subscriptions?limit={limit} HTTP/1.1\r\nhost: gw\r\n"
        f"authorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    ).encode()


LISTING = _listing(SUBSCRIPTIONS)


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


#: Bytes per second a slow client takes, and how long it keeps to that pace (past the
#: write watch's first looks) before it takes the rest as fast as it comes.
SLOW_RATE = 200_000
SLOW_FOR = 3 * CLIENT_WRITE
#: A relayed answer's content: more than the kernel's send buffer (4 MB at most, with
#: Linux's ``tcp_wmem``) takes, so that the transport's buffer holds megabytes as well.
LARGE = 6_000_000


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, bytes]]:
    """A gateway with the kernel's default socket buffers, whose backend (``client_write``
    1 s) answers a chat request whose message is a number with that many bytes of content
    (read whole, then relayed in one write); and a chat request for ``LARGE`` bytes."""

    async def sized(request: Request, writer: asyncio.StreamWriter) -> None:
        size = int(request.json()["messages"][0]["content"])
        body = _answer("x" * size, 1000)
        writer.write(head(length=len(body)) + body)
        await writer.drain()

    backend = WireBackend(sized)
    with (
        backend.running(),
        _gateway(tmp_path_factory.mktemp("relayed"), backend, client_write=CLIENT_WRITE) as harness,
    ):
        key = harness.new_key().primary_key or ""
        yield harness, _request(key, {"messages": [{"role": "user", "content": str(LARGE)}]})


def _answer_length(head: bytes) -> int:
    return next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )


def _read_answer(sock: socket.socket, rate: float | None = None, slow_for: float = 0.0) -> int:
    """Read one answer off a kept connection and return its body's length: at ``rate``
    bytes per second for ``slow_for`` seconds (``None``: as fast as it comes), then as fast
    as it comes. Fails if the connection ends first (the gateway dropped it)."""
    received = b""
    started = time.monotonic()
    sock.settimeout(10)
    while True:
        elapsed = time.monotonic() - started
        size = 1 << 20
        if rate is not None and elapsed < slow_for:
            size = min(16384, int(rate * elapsed) + 4096 - len(received))
            if size <= 0:
                time.sleep(0.01)
                continue
        try:
            chunk = sock.recv(size)
        except ConnectionResetError:
            chunk = b""
        head, _, body = (received + chunk).partition(b"\r\n\r\n")
        if not chunk:
            raise AssertionError(
                f"dropped after {len(body)} bytes of the answer, at {elapsed:.2f} s: "
                f"{received[:100]!r}"
            )
        received += chunk
        if body and len(body) >= _answer_length(head):
            assert head.startswith(b"HTTP/1.1 200"), received[:300]
            assert len(body) == _answer_length(head), "more than the answer came"
            return len(body)


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


def test_a_slow_reader_of_a_large_answer_on_a_kept_connection_gets_it_all(
    relayed: tuple[Harness, bytes],
) -> None:
    """A kept connection whose earlier answer (6 MB, taken at once) grew the kernel's send
    buffer to its 4 MB; the next 6 MB answer is taken at 200 KB/s for three periods of the
    write watch. The kernel wakes the gateway's writer only after some 2 MB went out, so
    the transport's buffer does not move for seconds; the watch sees the bytes the client
    acknowledged and keeps the connection (it was dropped at the first look before)."""
    h, request = relayed
    sock = socket.socket()
    # Set before connecting: the window offered stays small, so the client's pace, not
    # its kernel's receive buffer, sets how fast the answer goes out.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    with closing(sock):
        sock.connect(("127.0.0.1", h.gw.port))
        sock.sendall(request)
        assert _read_answer(sock) > LARGE
        sock.sendall(request)
        assert _read_answer(sock, SLOW_RATE, SLOW_FOR) > LARGE


def test_a_client_that_reads_nothing_of_a_large_answer_on_a_kept_connection_is_dropped(
    relayed: tuple[Harness, bytes],
) -> None:
    """The same kept connection, whose client takes nothing of the second answer: the bytes
    its kernel acknowledged stop growing once its receive buffer is full, and the
    connection is dropped within a few periods, most of the answer unsent."""
    h, request = relayed
    wait_for(lambda: _open_connections(h) == 0, within=10, what="no connection at the start")
    with closing(_stalled_client(h.gw.port)) as stalled:
        stalled.sendall(request)
        assert _read_answer(stalled) > LARGE
        started = time.monotonic()
        stalled.sendall(request)
        wait_for(lambda: _open_connections(h) == 0, within=10, what="the connection dropped")
        took = time.monotonic() - started
        assert took < 3 * CLIENT_WRITE + 2, took
        received = _received_until_the_end(stalled)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), received[:200]
        assert len(body) < _answer_length(head), "the whole answer was written"


def test_a_later_answer_on_a_kept_connection_is_not_taken_for_a_stall(h: Harness) -> None:
    """Two listings one after the other on a kept connection. The first (34 subscriptions,
    less than the transport's 64 KB high-water mark: the watch starts when it is complete)
    is taken at a pace that ends it 1.8 periods after it began, so the watch's look at one
    period finds some of it unsent and looks again a period later; meanwhile the second
    (all 200, written in one write) came and is taken at 200 KB/s. Its bytes raise the
    watch's mark (``pause_writing``, ``on_response_complete``): that look compares with
    them, not with the first answer's rest (which dropped the connection there before)."""
    small = _listing(34)
    with closing(socket.create_connection(("127.0.0.1", h.gw.port))) as probe:
        probe.sendall(small)
        length = _read_answer(probe)
    assert 20_000 < length < 65536
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    with closing(sock):
        sock.connect(("127.0.0.1", h.gw.port))
        sock.sendall(small)
        assert _read_answer(sock, (length - 4096) / (1.8 * CLIENT_WRITE), 10.0) == length
        sock.sendall(LISTING)
        assert _read_answer(sock, SLOW_RATE, 10.0) > 300_000
