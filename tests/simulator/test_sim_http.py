"""JSON answers, auth, routing errors, headers and the truth log, over real loopback HTTP."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest

from sluicegate.simulator import SimulatorHandle
from sluicegate.simulator.tokens import completion_text, embedding_vector
from tests.simulator.conftest import API, BEARER, KEY, chat_url

HELLO = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there friend"},
    ]
}
HELLO_PROMPT = (4 + 2) + (4 + 3) + 3


async def test_chat_json_is_azure_shaped_and_deterministic(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url("free"), json={**HELLO, "max_tokens": 7})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-2024-08-06"
    assert body["id"].startswith("chatcmpl-")
    assert body["system_fingerprint"].startswith("fp_")
    assert body["prompt_filter_results"][0]["content_filter_results"]["jailbreak"] == {
        "filtered": False,
        "detected": False,
    }
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == completion_text(7)
    assert choice["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        HELLO_PROMPT,
        7,
        HELLO_PROMPT + 7,
    )
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    again = (await client.post(chat_url("free"), json={**HELLO, "max_tokens": 7})).json()
    assert again["usage"] == usage
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert again["id"] != body["id"]


async def test_default_length_without_max_tokens(client: httpx.AsyncClient) -> None:
    body = (await client.post(chat_url("free"), json=HELLO)).json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_common_headers(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url(), json=HELLO, headers={"x-ms-client-request-id": "abc"})
    assert resp.status_code == 200
    h = resp.headers
    assert h["x-ms-region"] == "Test Region"
    assert h["x-ms-deployment-name"] == "chat"
    assert h["x-ms-client-request-id"] == "abc"
    assert h["apim-request-id"]
    assert len(h["x-request-id"]) == 36
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-limit-requests"]) == ("1000", "600")
    assert h["x-ratelimit-remaining-tokens"] == str(1000 - (HELLO_PROMPT + 16))
    assert h["x-ratelimit-remaining-requests"] == "99"  # the 10-s budget: 600 / 6 - 1
    free = await client.post(chat_url("free"), json=HELLO)
    assert "x-ratelimit-remaining-tokens" not in free.headers  # no limit set, no header


async def test_unauthorized_bodies(sim: SimulatorHandle) -> None:
    expected = {
        "error": {
            "code": "401",
            "message": (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
                "provide a valid key for an active subscription and use a correct regional API "
                "endpoint for your resource."
            ),
        }
    }
    async with httpx.AsyncClient(base_url=sim.url) as c:
        for headers in (
            {},
            {"api-key": "wrong"},
            {"authorization": "Bearer wrong"},
            {"api-key": BEARER},
            {"authorization": f"Basic {KEY}"},
        ):
            resp = await c.post(chat_url("free"), json=HELLO, headers=headers)
            assert resp.status_code == 401, headers
            assert resp.json() == expected
            assert resp.headers["x-request-id"]
        for headers in (
            {"api-key": KEY},
            {"authorization": f"Bearer {KEY}"},
            {"authorization": f"bearer {BEARER}"},
        ):
            resp = await c.post(chat_url("free"), json=HELLO, headers=headers)
            assert resp.status_code == 200, headers


async def test_deployment_not_found(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url("nope"), json=HELLO)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "DeploymentNotFound"
    assert "does not exist" in resp.json()["error"]["message"]
    v1 = await client.post("/openai/v1/chat/completions", json={**HELLO, "model": "nope"})
    assert v1.status_code == 404
    assert v1.json()["error"]["code"] == "DeploymentNotFound"


async def test_missing_api_version_and_unknown_paths(client: httpx.AsyncClient) -> None:
    resource_not_found = {"error": {"code": "404", "message": "Resource not found"}}
    resp = await client.post("/openai/deployments/free/chat/completions", json=HELLO)
    assert resp.status_code == 404
    assert resp.json() == resource_not_found
    other = await client.post(f"/openai/deployments/free/bogus?{API}", json=HELLO)
    assert other.status_code == 404
    assert other.json() == resource_not_found


async def test_bad_bodies_get_openai_style_400(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        chat_url("free"), content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = await client.post(chat_url("free"), json={"messages": []})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "messages"
    resp = await client.post("/openai/v1/chat/completions", json=HELLO)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "model"


async def test_stream_options_before_2024_08_01_is_an_unknown_argument(
    client: httpx.AsyncClient,
) -> None:
    """As Azure answers API versions older than stream_options: 400, an unrecognized argument;
    newer versions and the v1 API take it."""
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    for version in ("2024-06-01", "2024-02-15-preview", "2024-07-01-preview"):
        url = f"/openai/deployments/chat/chat/completions?api-version={version}"
        resp = await client.post(url, json=body)
        assert resp.status_code == 400, version
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] is None
        assert error["message"].startswith("Unrecognized request argument supplied: stream_options")
    for url in (
        "/openai/deployments/chat/chat/completions?api-version=2024-08-01-preview",
        chat_url(),
    ):
        assert (await client.post(url, json=body)).status_code == 200
    v1 = await client.post("/openai/v1/chat/completions", json={**body, "model": "chat"})
    assert v1.status_code == 200


async def test_operation_not_supported(client: httpx.AsyncClient) -> None:
    resp = await client.post(f"/openai/deployments/embed/chat/completions?{API}", json=HELLO)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "OperationNotSupported"
    resp = await client.post(f"/openai/deployments/free/embeddings?{API}", json={"input": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "OperationNotSupported"


async def test_embeddings_floats_and_base64(client: httpx.AsyncClient) -> None:
    url = f"/openai/deployments/embed/embeddings?{API}"
    resp = await client.post(url, json={"input": ["hello world", "x"], "dimensions": 16})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert body["model"] == "text-embedding-3-small"
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == pytest.approx(list(embedding_vector("hello world", 16)))
    assert len(body["data"][1]["embedding"]) == 16
    full = (await client.post(url, json={"input": "hello world"})).json()
    assert len(full["data"][0]["embedding"]) == 64
    b64 = (
        await client.post(url, json={"input": "hello world", "encoding_format": "base64"})
    ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    floats = struct.unpack("<64f", raw)
    assert floats == pytest.approx(full["data"][0]["embedding"], abs=1e-6)


async def test_v1_routes_take_the_deployment_from_the_body(sim: SimulatorHandle) -> None:
    async with httpx.AsyncClient(
        base_url=sim.url + "/openai/v1", headers={"authorization": f"Bearer {KEY}"}
    ) as c:
        chat = await c.post("/chat/completions", json={**HELLO, "model": "chat", "max_tokens": 3})
        assert chat.status_code == 200
        assert chat.headers["x-ms-deployment-name"] == "chat"
        assert chat.json()["usage"]["completion_tokens"] == 3
        emb = await c.post("/embeddings", json={"model": "embed", "input": "a b c"})
        assert emb.json()["usage"]["prompt_tokens"] == 3
        models = (await c.get("/models")).json()
        assert [m["id"] for m in models["data"]] == ["chat", "free", "embed"]
        resp = await c.post(
            "/responses", json={"model": "free", "input": "hello you", "max_output_tokens": 4}
        )
        body = resp.json()
        assert body["object"] == "response"
        assert body["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["output"][0]["content"][0]["text"] == completion_text(4)
        assert body["usage"]["input_tokens"] == 4 + 2 + 3
        assert body["usage"]["output_tokens"] == 4
        assert body["usage"]["total_tokens"] == 4 + 2 + 3 + 4
    async with httpx.AsyncClient(base_url=sim.url, headers={"api-key": KEY}) as c:
        dated = await c.post(
            "/openai/responses?api-version=2025-04-01-preview",
            json={"model": "free", "input": "hi"},
        )
        assert dated.json()["status"] == "completed"
        assert (await c.get(f"/openai/models?{API}")).status_code == 200
        assert (await c.get("/openai/models", headers={"api-key": "no"})).status_code == 401


async def test_legacy_completions(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        f"/openai/deployments/free/completions?{API}", json={"prompt": "say this", "max_tokens": 2}
    )
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == completion_text(2)
    assert body["usage"] == {"completion_tokens": 2, "prompt_tokens": 2, "total_tokens": 4}


async def test_truth_log_records_requests_without_secrets(
    sim: SimulatorHandle, client: httpx.AsyncClient
) -> None:
    await client.delete("/_sim/log")
    ok = await client.post(
        chat_url("free"), json={**HELLO, "max_tokens": 3}, headers={"x-ms-client-request-id": "c-1"}
    )
    await client.post(chat_url("nope"), json=HELLO)
    await client.post(chat_url("free"), json=HELLO, headers={"api-key": "bad"})
    log = (await client.get("/_sim/log")).json()
    assert [e["status"] for e in log] == [200, 404, 401]
    first = log[0]
    assert first["request_id"] == ok.headers["x-request-id"]
    assert (first["deployment"], first["operation"], first["api_version"]) == (
        "free",
        "chat",
        "2024-10-21",
    )
    assert (first["prompt_tokens"], first["completion_tokens"]) == (HELLO_PROMPT, 3)
    assert first["streamed"] is False
    assert first["include_usage"] is False
    assert first["headers"]["x-ms-client-request-id"] == "c-1"
    assert first["api_key_present"] is True
    assert first["authorization_present"] is False
    assert "api-key" not in first["headers"]
    assert KEY not in str(log)
    assert "bad" not in str(log[2]["headers"])
    assert len(sim.state.truth) == 3
    cleared = await client.delete("/_sim/log")
    assert cleared.json() == {"cleared": 3}
    assert (await client.get("/_sim/log")).json() == []
    assert (await client.get("/_sim/health")).status_code == 200
