"""A request answered before its body was read (401/403 at authentication, 404 for a refused
path, 413 from ``content-length``) on a real gateway over real sockets.

uvicorn keeps such a connection alive and drops the rest of the body, but its idle timer
stops at the client's next read and nothing started a timer again: a client with no key
that sent a body byte now and then after its 401 held a connection slot for ever, and
``listen.max_connections`` of them locked every other client out (503 TooManyConnections).
The gateway's protocol (``server.GatewayHttpProtocol``) now gives the rest of the body
``body_read_timeout_seconds`` from the answer; past that the connection is half-closed and
closed. A body that does come in time leaves the connection alive for the next request,
pipelined or not, and idle under the keep-alive timer as after any answer.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness
from tests.support.gateway import GatewayThread, gateway_config

API_VERSION = "2024-10-21"
CHAT = b"/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
PAYLOAD = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'
MAX_BODY = 2048
#: uvicorn's idle timer between requests, shortened on this test's server (the gateway's
#: own configuration leaves it at 30 s).
KEEP_ALIVE = 1
#: How long a test waits for the gateway to hang up: well past the 1 s timeouts below
#: (plus the 2 s linger after a half-close), well short of anything a stuck connection
#: would reach by itself.
WAIT = 8.0


@pytest.fixture
def h(tmp_path: Path, simulator: SimulatorThread) -> Iterator[Harness]:
    config = gateway_config(
        tmp_path,
        {"sim": simulator.url},
        listen={
            "host": "127.0.0.1",
            "port": 0,
            "graceful_shutdown_seconds": 5,
            "max_connections": 2,
        },
        security={
            "head_read_timeout_seconds": 1,
            "body_read_timeout_seconds": 1,
            "max_body_bytes": MAX_BODY,
        },
    )
    gw = GatewayThread(config)
    gw.server.config.timeout_keep_alive = KEEP_ALIVE  # read by each connection's protocol
    gw.start()
    yield Harness(gw, simulator)
    gw.stop()


def _post(path: bytes, length: int, key: str | None = None, extra: bytes = b"") -> bytes:
    """A POST head declaring a ``length``-byte JSON body (the body is not included),
    ``extra`` header lines last."""
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nhost: gateway\r\n"
        + (b"api-key: " + key.encode() + b"\r\n" if key else b"")
        + b"content-type: application/json\r\ncontent-length: %d\r\n" % length
        + extra
        + b"\r\n"
    )


def _chat(key: str, extra: bytes = b"") -> bytes:
    return _post(CHAT, len(PAYLOAD), key, extra) + PAYLOAD


class _Reader:
    """Whole answers (``content-length`` framed, as the gateway's are) from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def answer(self) -> tuple[int, bytes]:
        """The next answer's status and head; fails if the connection ends first."""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines
            if line.lower().startswith(b"content-length:")
        )
        while len(self.buffer) < length:
            self._more()
        self.buffer = self.buffer[length:]
        return int(lines[0].split()[1]), head

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the connection ended mid-answer: {self.buffer[:200]!r}"
        self.buffer += chunk


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the gateway ends the connection (a read returns b"") within ``seconds``,
    while the client sends ``trickle`` (when given) every 0.1 s as a slow body would."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        if trickle:
            try:
                sock.sendall(trickle)
            except (BrokenPipeError, ConnectionResetError):
                return True
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
        if data == b"":
            return True
        raise AssertionError(f"unexpected bytes: {data[:200]!r}")
    return False


def _hung_up_within(sock: socket.socket, seconds: float) -> bool:
    """Whether, after its half-close, the gateway also stops reading (its socket is closed:
    the client's writes fail) within ``seconds``, the client still sending a byte each
    0.05 s; so its connection slot is free."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("answered", "status"),
    [("no key", 401), ("refused path", 404), ("declared too large", 413)],
)
def test_a_client_that_trickles_its_body_after_an_early_answer_loses_the_connection(
    h: Harness, answered: str, status: int
) -> None:
    key = h.new_key().primary_key
    assert key
    heads = {
        "no key": _post(CHAT, 1000),
        "refused path": _post(b"/openai/deployments/x/Chat/Completions", 1000, key),
        "declared too large": _post(CHAT, MAX_BODY * 10, key),
    }
    port = h.gw.port
    # As many such clients as the gateway takes connections (2): each gets its early
    # answer, then sends a body byte every 0.1 s (each read stopped uvicorn's idle timer).
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(heads[answered] + b"{")
            got, _ = _Reader(sock).answer()
            assert got == status
        for sock in held:
            assert _closed_within(sock, WAIT, trickle=b"x"), "still open"
            assert _hung_up_within(sock, WAIT), "half-closed, but still read"
        # Their slots are free: a new client is served, not refused 503.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(_chat(key))
            got, head = _Reader(sock).answer()
            assert got == 200, head
    finally:
        for sock in held:
            sock.close()


def test_a_body_sent_in_time_after_an_early_answer_keeps_the_connection(h: Harness) -> None:
    key = h.new_key().primary_key
    assert key
    with socket.create_connection(("127.0.0.1", h.gw.port), timeout=5) as sock:
        reader = _Reader(sock)
        sock.sendall(_post(CHAT, len(PAYLOAD)) + PAYLOAD[:1])
        assert reader.answer()[0] == 401
        sock.sendall(PAYLOAD[1:])  # the rest of the body, in time: dropped
        sock.sendall(_chat(key))  # the connection's next request is served
        assert reader.answer()[0] == 200
        # The rest of the body and the next request in one write; that request is answered
        # after longer than the keep-alive time (the backend waits 2 s): the connection is
        # not idle while it is, though the body's end left it idle for a moment.
        sock.sendall(_post(CHAT, len(PAYLOAD)) + PAYLOAD[:1])
        assert reader.answer()[0] == 401
        sock.sendall(PAYLOAD[1:] + _chat(key, b"x-sim-fault: slow:%d\r\n" % (KEEP_ALIVE * 2000)))
        assert reader.answer()[0] == 200
        # Pipelined: an early-answered request and another behind it, in one write. The
        # second is not lost in the first one's body.
        sock.sendall(_post(CHAT, len(PAYLOAD)) + PAYLOAD + _chat(key))
        assert reader.answer()[0] == 401
        assert reader.answer()[0] == 200
        # An early answer, then its body, then nothing: idle, the connection is closed by
        # the keep-alive timer as after any answer (no timer ran once the body came in).
        sock.sendall(_post(CHAT, len(PAYLOAD)) + PAYLOAD[:1])
        assert reader.answer()[0] == 401
        sock.sendall(PAYLOAD[1:])
        assert _closed_within(sock, WAIT), "an idle connection was kept"


class _Answer(Protocol):
    """An SDK's HTTP response (httpx's, or the client library the SDK is built on)."""

    @property
    def extensions(self) -> Mapping[str, Any]: ...


def _local_port(response: _Answer) -> int:
    """The client's port of the connection ``response`` came on (still open: just read)."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


def test_the_sdk_after_a_401_and_a_413_goes_on_on_the_same_connection(h: Harness) -> None:
    """Each refusal comes from the head, while the SDK is still sending a 200 KB body: the
    SDK reads the answer whole, and its next request is served on the same connection."""
    key = h.new_key().primary_key
    assert key
    refused = openai.AzureOpenAI(
        azure_endpoint=h.url, api_key="not-a-key", api_version=API_VERSION, max_retries=0
    )
    client = refused.with_options(api_key=key)  # the same HTTP client: the same pool
    big: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x" * (MAX_BODY * 100)}]
    ports = []
    try:
        for sdk, status in ((refused, 401), (client, 413)):
            with pytest.raises(openai.APIStatusError) as early:
                sdk.chat.completions.create(model="gpt-4o-mini", messages=big, max_tokens=3)
            assert early.value.status_code == status
            assert early.value.code == {401: "401", 413: "RequestEntityTooLarge"}[status]
            ports.append(_local_port(early.value.response))
            done = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=3
            )
            assert done.parse().choices
            ports.append(_local_port(done.http_response))
    finally:
        refused.close()
    assert len(set(ports)) == 1, ports
