"""A request that says ``Expect: 100-continue`` and is answered from its head (401 without a
key, 404 for a refused path, 413 from ``content-length``) before the gateway asked for its
body: the client, waiting for ``100 Continue``, will not send the body (RFC 9110 §10.1.1),
so the gateway does not wait ``body_read_timeout_seconds`` for it. The answer comes whole
with ``connection: close`` and the connection ends at once. A request whose body the gateway
does read gets its ``100 Continue`` and keeps its connection, as does one that sent its body
without waiting."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness
from tests.integration.test_early_answer_idle import CHAT, MAX_BODY, PAYLOAD, _post, _Reader
from tests.support.gateway import GatewayThread, gateway_config

#: The bound on the rest of an early-answered body: far longer than the test waits.
DRAIN = 30
EXPECT = b"expect: 100-continue\r\n"


@pytest.fixture
def h(tmp_path: Path, simulator: SimulatorThread) -> Iterator[Harness]:
    config = gateway_config(
        tmp_path,
        {"sim": simulator.url},
        security={"body_read_timeout_seconds": DRAIN, "max_body_bytes": MAX_BODY},
    )
    gw = GatewayThread(config).start()
    yield Harness(gw, simulator)
    gw.stop()


def _ended_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the gateway ends the connection (a read returns b"" or is reset), or
    None if it has not within ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - start
    assert data == b"", data[:200]
    return time.monotonic() - start


@pytest.mark.parametrize(
    ("answered", "status"),
    [("no key", 401), ("refused path", 404), ("declared too large", 413)],
)
def test_an_answer_before_100_continue_closes_the_connection_at_once(
    h: Harness, answered: str, status: int
) -> None:
    key = h.new_key().primary_key
    assert key
    heads = {
        "no key": _post(CHAT, 1000, extra=EXPECT),
        "refused path": _post(b"/openai/deployments/x/Chat/Completions", 1000, key, EXPECT),
        "declared too large": _post(CHAT, MAX_BODY * 10, key, EXPECT),
    }
    with socket.create_connection(("127.0.0.1", h.gw.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(heads[answered])  # and waits for "100 Continue", which never comes
        reader = _Reader(sock)
        got, head = reader.answer()  # whole: content-length framed
        assert got == status, head
        assert b"connection: close" in head.lower().split(b"\r\n"), head
        assert b"100 Continue" not in head
        assert reader.buffer == b""
        took = _ended_within(sock, DRAIN / 3)
        assert took is not None, "the connection waits for a body that will not come"
        assert time.monotonic() - started < 5


def test_a_body_the_gateway_reads_gets_100_continue_and_keeps_the_connection(
    h: Harness,
) -> None:
    key = h.new_key().primary_key
    assert key
    with socket.create_connection(("127.0.0.1", h.gw.port), timeout=10) as sock:
        reader = _Reader(sock)
        for _ in range(2):
            sock.sendall(_post(CHAT, len(PAYLOAD), key, EXPECT))
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += sock.recv(1)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(PAYLOAD)
            got, head = reader.answer()
            assert got == 200, head
            assert b"connection: close" not in head.lower()
        # A client that does not wait for "100 Continue" sends its body with the head: an
        # early answer then leaves the connection open for its next request.
        sock.sendall(_post(CHAT, len(PAYLOAD), extra=EXPECT) + PAYLOAD)
        got, head = reader.answer()
        assert got == 401 and b"connection: close" not in head.lower(), head
        sock.sendall(_post(CHAT, len(PAYLOAD), key) + PAYLOAD)
        assert reader.answer()[0] == 200
