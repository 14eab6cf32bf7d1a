"""Functional checks before any load: does the target really proxy, stream and authenticate?

A benchmark of a proxy that answers 401 or relays a truncated stream measures nothing, and
wrk does not look at bodies. So before a target is loaded, one JSON request and one
streaming request go through it and their bodies are checked (usage present, the stream
complete up to ``data: [DONE]``), the upstream's counters must show that both reached it,
and a request without credentials must be refused when the target has authentication.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from typing import Any

from procs import BenchError
from targets import Target
from workload import BODIES

MIN_STREAM_EVENTS = 25


def request(
    port: int, path: str, body: bytes, headers: Mapping[str, str], timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", path, body=body, headers={"content-type": "application/json", **headers}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def upstream_stats(port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/__stats")
        data: dict[str, int] = json.loads(conn.getresponse().read())
        return data
    finally:
        conn.close()


def upstream_requests(port: int) -> int:
    stats = upstream_stats(port)
    return stats.get("json", 0) + stats.get("stream", 0)


def check_json(status: int, body: bytes) -> str | None:
    if status != 200:
        return f"status {status}: {body[:300]!r}"
    try:
        data: Any = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:300]!r}"
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict) or usage.get("total_tokens") != 45:
        return f"no usage with total_tokens 45 in {body[:300]!r}"
    if not data.get("choices"):
        return "no choices in the answer"
    return None


def check_stream(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    if status != 200:
        return f"status {status}: {body[:300]!r}"
    if not headers.get("content-type", "").startswith("text/event-stream"):
        return f"content-type {headers.get('content-type')!r}, not text/event-stream"
    events = [e for e in body.split(b"\n\n") if e.strip()]
    if len(events) < MIN_STREAM_EVENTS:
        return f"only {len(events)} events (expected about 30)"
    if events[-1].strip() != b"data: [DONE]":
        return f"stream does not end with data: [DONE] but {events[-1][-100:]!r}"
    if b'"usage"' not in events[-2] or b'"total_tokens":45' not in events[-2].replace(b" ", b""):
        return "the event before [DONE] carries no usage with total_tokens 45"
    return None


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def probe(
    target: Target, port: int, headers: Mapping[str, str], *, upstream_port: int
) -> dict[str, Any]:
    """Check the target, retrying until its ready timeout while it warms up; raise BenchError
    if it never passes. Returns what was found (event count, auth status) for the record."""
    deadline = time.monotonic() + target.ready_timeout
    problem = "not tried"
    while time.monotonic() < deadline:
        try:
            return _probe_once(target, port, headers, upstream_port)
        except (OSError, http.client.HTTPException, BenchError) as exc:
            problem = str(exc)
            time.sleep(0.5)
    raise BenchError(f"{target.name} does not answer correctly: {problem}")


def _probe_once(
    target: Target, port: int, headers: Mapping[str, str], upstream_port: int
) -> dict[str, Any]:
    stats_before = upstream_stats(upstream_port)
    before = stats_before.get("json", 0) + stats_before.get("stream", 0)
    status, json_headers, body = request(port, target.path, BODIES["json"], headers)
    if (problem := check_json(status, body)) is not None:
        raise BenchError(f"JSON request: {problem}")
    status, resp_headers, body = request(port, target.path, BODIES["stream"], headers)
    if (problem := check_stream(status, resp_headers, body)) is not None:
        raise BenchError(f"streaming request: {problem}")
    events = len([e for e in body.split(b"\n\n") if e.strip()])
    stats = upstream_stats(upstream_port)
    reached = stats.get("json", 0) + stats.get("stream", 0) - before
    if reached != 2:
        raise BenchError(f"{reached} of 2 requests reached the upstream")
    paths = {
        k.removeprefix("path:"): n - stats_before.get(k, 0)
        for k, n in stats.items()
        if k.startswith("path:") and n != stats_before.get(k, 0)
    }
    found: dict[str, Any] = {
        "stream_events": events,
        "upstream_requests": reached,
        "upstream_paths": paths,
    }
    if target.expect_header is not None:
        # Proof that the limiter ran on the request. Without it the target is still measured,
        # with a warning that travels into the report.
        name, value = target.expect_header
        found["limiter_header"] = json_headers.get(name)
        if json_headers.get(name) != value:
            found["warnings"] = [
                f"limiter not verified: the answer carries {name}: {json_headers.get(name)} "
                f"instead of {value}, so the configured TPM/RPM limits may not have run"
            ]
    if target.metrics_path is not None:
        status, metrics = get(port, target.metrics_path)
        if status != 200 or b"# TYPE" not in metrics:
            raise BenchError(f"GET {target.metrics_path} answered {status}, not metrics")
        found["metrics_bytes"] = len(metrics)
    if target.auth_status is not None:
        no_key = {k: v for k, v in headers.items() if k.lower() not in ("api-key", "authorization")}
        status, _, body = request(port, target.path, BODIES["json"], no_key)
        if status != target.auth_status:
            raise BenchError(
                f"a request without credentials got {status}, not {target.auth_status}"
            )
        found["unauthenticated_status"] = status
    return found
