"""Raw-socket uploads for the body-limit tests of the admin API and the dashboard: a body sent
piece by piece while watching for the server's answer, so that a test can tell a server that
answers mid-body (it stopped reading) from one that reads the whole body first."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back: ``status`` None when nothing did; ``sent``: body bytes sent by then;
    ``closed``: the server closed the connection after its answer."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    sent: int
    closed: bool


def _head(method: str, path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_answer(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes, bool]:
    """One HTTP/1.1 answer with a Content-Length; and whether the connection then closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed mid-answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the connection closed mid-answer")
        body += chunk
    closed = False
    sock.settimeout(0.5)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    return int(status_line.split()[1]), headers, body[:length], closed


def stream_body(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    total: int,
    *,
    wait: float = 5.0,
) -> Answer:
    """Send a chunked body of ``total`` bytes without its final (empty) chunk, stopping as
    soon as an answer arrives; if none came while sending, wait ``wait`` seconds more for
    one. A server that reads the whole body before answering never answers (the body never
    ends): ``status`` is None."""
    piece_size = 64 * 1024
    piece = b"%x\r\n" % piece_size + b"a" * piece_size + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_head(method, path, port, {**headers, "Transfer-Encoding": "chunked"}))
        sock.setblocking(False)
        sent = 0
        pending = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            more = sent < total or bool(pending)
            readable, writable, _ = select.select(
                [sock], [sock] if more else [], [], max(0.0, deadline - time.monotonic())
            )
            if readable:
                status, answer_headers, body, closed = _read_answer(sock, time.monotonic() + 10)
                return Answer(status, answer_headers, body, sent, closed)
            if writable:
                if not pending:
                    pending = piece
                    sent += piece_size
                try:
                    pending = pending[sock.send(pending) :]
                except (BrokenPipeError, ConnectionResetError):
                    break
            if not more:
                deadline = min(deadline, time.monotonic() + wait)
        return Answer(None, {}, b"", sent, False)


def trickle_body(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    length: int = 1000,
    every: float = 0.2,
    wait: float = 10.0,
) -> tuple[Answer, float]:
    """Declare a body of ``length`` bytes and send it a byte every ``every`` seconds, until
    an answer arrives (or ``wait`` seconds pass): the answer and the seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(_head(method, path, port, {**headers, "Content-Length": str(length)}))
        sent = 0
        while time.monotonic() - started < wait and sent < length:
            readable, _, _ = select.select([sock], [], [], every)
            if readable:
                status, answer_headers, body, closed = _read_answer(sock, time.monotonic() + 10)
                return Answer(status, answer_headers, body, sent, closed), (
                    time.monotonic() - started
                )
            sock.sendall(b"a")
            sent += 1
        return Answer(None, {}, b"", sent, False), time.monotonic() - started
