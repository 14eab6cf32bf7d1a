"""Bad input gets the right status and an Azure-shaped error, never a stack trace, and the
ledger stays intact."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.integration.conftest import Harness

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _assert_azure_error(resp: httpx.Response, status: int, code: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    if code is not None:
        assert body["error"]["code"] == code


@pytest.fixture
def key(harness: Harness) -> str:
    issued = harness.new_key()
    assert issued.primary_key
    return issued.primary_key


def test_bad_bodies(harness: Harness, key: str) -> None:
    h = {"api-key": key}
    with httpx.Client(base_url=harness.url) as c:
        _assert_azure_error(
            c.post(CHAT, content=b"{not json", headers={**h, "content-type": "application/json"}),
            400,
            "InvalidJson",
        )
        _assert_azure_error(
            c.post(CHAT, content=b"[1,2]", headers={**h, "content-type": "application/json"}),
            400,
            "InvalidJson",
        )
        _assert_azure_error(
            c.post(CHAT, content=b"hello", headers={**h, "content-type": "text/plain"}), 415
        )
        big = b'{"messages": "' + b"x" * (9 * 1024 * 1024) + b'"}'
        _assert_azure_error(
            c.post(CHAT, content=big, headers={**h, "content-type": "application/json"}), 413
        )
        _assert_azure_error(
            c.post("/openai/deployments/nope/chat/completions?api-version=1", json={}, headers=h),
            404,
            "DeploymentNotFound",
        )
        _assert_azure_error(
            c.post("/openai/v1/chat/completions", json={"messages": []}, headers=h),
            400,
            "MissingModel",
        )
        _assert_azure_error(c.get("/not-a-route"), 404)
        # A method the operation does not have: Azure's "wrong path" answer, before the key
        # is looked at (no record, as for any path the gateway does not serve).
        _assert_azure_error(c.get(CHAT, headers=h), 404, "404")
    records = harness.records()
    assert len(records) == 6
    assert all(r.outcome == "rejected" for r in records)
    assert sorted(r.status for r in records) == [400, 400, 400, 404, 413, 415]
    assert harness.sim_log() == []  # nothing bad reached the backend


def test_keys_missing_wrong_suspended_and_ambiguous(harness: Harness, key: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=harness.url) as c:
        _assert_azure_error(c.post(CHAT, json=body), 401)
        _assert_azure_error(c.post(CHAT, json=body, headers={"api-key": "sg-wrong"}), 401)
        _assert_azure_error(
            c.post(CHAT, json=body, headers={"api-key": key, "authorization": "Bearer sg-other"}),
            400,
            "AmbiguousCredentials",
        )
        ok = c.post(CHAT, json=body, headers={"api-key": key, "authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        ok = c.post(CHAT + f"&subscription-key={key}", json=body)
        assert ok.status_code == 200
        sub_id = harness.admin.list()[0][0].id
        harness.admin.suspend(sub_id)
        harness.gw.gateway.refresher.refresh_now()
        _assert_azure_error(
            c.post(CHAT, json=body, headers={"api-key": key}), 403, "SubscriptionInactive"
        )
    # That the key in the query string never reaches the backend is checked on the request
    # line a backend receives: tests/integration/test_query_credentials.py (the simulator's
    # log holds the path without its query).


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send one raw request (it asks to close) and return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_header_with_cr_lf_is_refused_in_azure_shape(harness: Harness, key: str) -> None:
    request = (
        b"POST /openai/deployments/gpt-4o-mini/chat/completions?api-version=1 HTTP/1.1\r\n"
        b"Host: x\r\napi-key: " + key.encode() + b"\r\nx-evil: a\rb\r\n"
        b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    data = _raw_exchange(harness.gw.port, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b'"error"' in body and b"Traceback" not in data
    assert harness.records() == []


def test_paths_that_cannot_be_forwarded_are_refused_and_blame_no_backend(
    harness: Harness, key: str
) -> None:
    """Sent as the bytes below (a client library would normalise some of them): refused
    with 404 before anything goes upstream. A space used to reach the upstream client,
    whose refusal was counted as the backend's connection failure: a few such requests
    opened the breaker for every client."""
    chat = "/openai/deployments/gpt-4o-mini/"
    variants = [
        chat + "chat%20completions",
        chat + "Chat/Completions",
        chat + "%2E/chat/completions",
        chat + "chat/completions%3Fapi-version=2024-10-21%26x=",
        "/openai/deployments/gpt-4o-mini/extensions/chat/completions",
    ]
    for _ in range(4):
        for path in variants:
            answer = _raw_exchange(
                harness.gw.port,
                f"POST {path}?api-version=2024-10-21 HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n"
                "content-type: application/json\r\ncontent-length: 2\r\n"
                "connection: close\r\n\r\n{}".encode(),
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404 "), (path, answer[:300])
            assert b'"error"' in body and b"Traceback" not in answer
    resp = httpx.post(
        harness.url + CHAT,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers={"api-key": key},
    )
    assert resp.status_code == 200, resp.text
    assert [entry["path"] for entry in harness.sim_log()] == [CHAT.split("?")[0]]
    metrics = httpx.get(harness.url + "/metrics").text
    assert "sluicegate_circuit_trips_total{" not in metrics
