"""Pipelined requests (HTTP/1.1: several requests sent before the first answer) whose client
hangs up: each request still being answered hears of it, as a lone request does.

uvicorn tells only the newest request of a connection (the queued one) that the connection
was lost; the one being answered went on writing to the closed socket (uvloop raised), so a
JSON answer was recorded as a 500 backend error and a stream was relayed to nobody until its
end. The gateway's protocol tells every request in flight (``server.GatewayHttpProtocol``).
"""

from __future__ import annotations

import socket
import time

from sluicegate.accounting.records import UsageRecord
from tests.integration.conftest import Harness

_PATH = b"/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _request(key: str, body: bytes) -> bytes:
    return (
        b"POST " + _PATH + b" HTTP/1.1\r\nHost: gateway\r\napi-key: " + key.encode() + b"\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    )


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def _records(harness: Harness, expect: int) -> list[UsageRecord]:
    deadline = time.monotonic() + 10
    while True:
        records = harness.records()
        if len(records) >= expect or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_a_pipelined_client_that_hangs_up_is_no_backend_error(
    slow_harness: Harness,
) -> None:
    """Three requests in one send; the client hangs up after the first answer, while the
    second is with the backend (its answer takes ~0.3 s): that one is written to a closed
    connection, and is dropped there, not a 500 recorded as the backend's error."""
    key = slow_harness.new_key().primary_key
    assert key
    body = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
    with socket.create_connection(("127.0.0.1", slow_harness.gw.port), timeout=10) as sock:
        sock.sendall(_request(key, body) * 3)
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 200")
    records = _records(slow_harness, 2)
    time.sleep(0.5)  # the second answer's write to the closed connection, then its record
    records = slow_harness.records()
    assert len(records) == 2, records  # the third never started: the connection was gone
    assert [r.status for r in records] == [200, 200], records
    assert all(r.outcome == "ok" and r.total_tokens > 0 for r in records)


def test_a_stream_answered_before_a_pipelined_request_is_aborted_when_the_client_goes(
    slow_harness: Harness,
) -> None:
    key = slow_harness.new_key().primary_key
    assert key
    stream = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":200,"stream":true}'
    plain = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
    with socket.create_connection(("127.0.0.1", slow_harness.gw.port), timeout=10) as sock:
        sock.sendall(_request(key, stream) + _request(key, plain))
        data = _read_head(sock)
        assert data.startswith(b"HTTP/1.1 200")
        while data.count(b'"content"') < 5:  # a few tokens, then hang up (200 take 10 s)
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    (record,) = _records(slow_harness, 1)
    assert record.streamed and record.outcome == "aborted", record
    assert record.usage_estimated and record.completion_tokens < 100
    time.sleep(0.5)
    (entry,) = [e for e in slow_harness.sim_log() if e.get("streamed")]
    assert entry["client_gone"] is True, "the backend's stream was closed at once"
    assert entry["tokens_sent"] < 100
