"""The fake upstream speaks enough HTTP/1.1 for every proxy under test, and answers right."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import Spawn

import probe
from workload import BODIES

AZURE = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _raw(port: int, payload: bytes, until: bytes, count: int = 1) -> bytes:
    """Send raw bytes; read until ``until`` was seen ``count`` times or the peer closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        data = b""
        while data.count(until) < count:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


@pytest.mark.parametrize(
    "path", [AZURE, "/openai/v1/chat/completions", "/v1/chat/completions", "/chat/completions"]
)
def test_json_answer_on_every_path_shape(upstream: int, path: str) -> None:
    status, headers, body = probe.request(upstream, path, BODIES["json"], {})
    assert probe.check_json(status, body) is None
    assert headers["content-type"].startswith("application/json")
    assert 600 <= len(body) <= 900
    assert json.loads(body)["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_stream_has_about_thirty_events_usage_and_done(upstream: int) -> None:
    status, headers, body = probe.request(upstream, AZURE, BODIES["stream"], {})
    assert probe.check_stream(status, headers, body) is None
    events = [e for e in body.split(b"\n\n") if e]
    assert 30 <= len(events) <= 36
    assert json.loads(events[0].removeprefix(b"data: "))["choices"] == []


def test_stream_without_include_usage_has_no_usage_chunk(upstream: int) -> None:
    body = json.dumps({"messages": [], "stream": True}).encode()
    status, _, data = probe.request(upstream, AZURE, body, {})
    assert status == 200
    assert b'"usage"' not in data
    assert data.endswith(b"data: [DONE]\n\n")


def test_wrong_path_and_method_get_azure_404(upstream: int) -> None:
    status, _, body = probe.request(upstream, "/openai/deployments/x/embeddings", b"{}", {})
    assert status == 404
    assert json.loads(body)["error"]["code"] == "404"
    assert probe.get(upstream, AZURE)[0] == 404
    # The dated route needs its api-version, as Azure's does.
    status, _, _ = probe.request(upstream, "/openai/deployments/x/chat/completions", b"{}", {})
    assert status == 404


def test_chunked_request_body_is_read(upstream: int) -> None:
    body = BODIES["stream"]
    half = len(body) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half,
                                                     body[half:])  # fmt: skip
    payload = (
        b"POST " + AZURE.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
    )  # fmt: skip
    data = _raw(upstream, payload, b"0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert b"text/event-stream" in data
    assert b"data: [DONE]" in data


def test_pipelined_and_split_requests(upstream: int) -> None:
    one = _post(AZURE, BODIES["json"])
    # Two requests in one write, and a third split in the middle of its headers.
    with socket.create_connection(("127.0.0.1", upstream), timeout=5) as sock:
        sock.sendall(one + one + one[:20])
        sock.sendall(one[20:])
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 3 or not data.endswith(b"}}"):
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            data += chunk
    assert data.count(b'"total_tokens":45') == 3


def test_http10_stream_is_close_delimited(upstream: int) -> None:
    body = BODIES["stream"]
    payload = (
        b"POST " + AZURE.encode() + b" HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    data = _raw(upstream, payload, b"never", count=1)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert rest.endswith(b"data: [DONE]\n\n")


def test_stats_count_requests_by_path_and_kind(upstream: int) -> None:
    probe.request(upstream, AZURE, BODIES["json"], {})
    probe.request(upstream, "/v1/chat/completions", BODIES["stream"], {})
    stats = probe.upstream_stats(upstream)
    assert stats["path:azure"] == 1
    assert stats["path:openai-v1"] == 1
    assert stats["json"] == 1
    assert stats["stream"] == 1
    assert probe.upstream_requests(upstream) == 2


def test_stream_written_once_is_the_same_stream(upstream: int, spawn: Spawn) -> None:
    """``--stream-writes once`` changes how the stream is written, not what it says."""
    once = spawn("upstream.py", ["--stream-writes", "once"])
    _, _, apart = probe.request(upstream, AZURE, BODIES["stream"], {})
    status, headers, whole = probe.request(once, AZURE, BODIES["stream"], {})
    assert probe.check_stream(status, headers, whole) is None
    assert whole == apart


def test_paced_stream_spaces_the_same_events_in_time(upstream: int, spawn: Spawn) -> None:
    """``--stream-gap-ms`` changes when the events are written, not what they say."""
    paced = spawn("upstream.py", ["--stream-gap-ms", "5"])
    _, _, at_once = probe.request(upstream, AZURE, BODIES["stream"], {})
    events = len([e for e in at_once.split(b"\n\n") if e])
    started = time.monotonic()
    status, headers, spaced = probe.request(paced, AZURE, BODIES["stream"], {})
    took = time.monotonic() - started
    assert probe.check_stream(status, headers, spaced) is None
    assert spaced == at_once
    assert took >= (events - 1) * 0.005


def test_paced_stream_answers_a_pipelined_request_after_its_end(spawn: Spawn) -> None:
    """A request sent while a paced stream is still being written is answered after the
    stream's end, not in the middle of it."""
    paced = spawn("upstream.py", ["--stream-gap-ms", "2"])
    payload = _post(AZURE, BODIES["stream"]) + _post(AZURE, BODIES["json"])
    data = _raw(paced, payload, b'"total_tokens":45', count=2)
    second = data.index(b"HTTP/1.1 200", 1)
    assert data[:second].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), data[second - 80 : second]
    assert b"application/json" in data[second:]
