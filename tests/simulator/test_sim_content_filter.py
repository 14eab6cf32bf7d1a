"""Content-filter faults: a blocked prompt (400 ``content_filter``) and an answer stopped by
the filter (200, ``finish_reason: "content_filter"``), azure-openai-api.md §5–§6."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from sluicegate.simulator.server import SimulatorThread
from sluicegate.simulator.tokens import completion_text
from tests.simulator.conftest import API, KEY, chat_url, sse_json

ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}  # 8 prompt tokens
FILTER = "x-sim-fault"


async def _log(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    return (await client.get("/_sim/log")).json()  # type: ignore[no-any-return]


async def test_blocked_prompt_is_azures_400(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url(), json=ASK, headers={FILTER: "filter-prompt"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "content_filter"
    assert (error["param"], error["type"], error["status"]) == ("prompt", None, 400)
    assert "content management policy" in error["message"]
    inner = error["innererror"]
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"] == {
        "hate": {"filtered": False, "severity": "safe"},
        "jailbreak": {"filtered": True, "detected": True},  # the reference's example
        "self_harm": {"filtered": False, "severity": "safe"},
        "sexual": {"filtered": False, "severity": "safe"},
        "violence": {"filtered": False, "severity": "safe"},
    }
    # Azure counts a request at arrival, before the filter: it is charged.
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - 18)
    (entry,) = await _log(client)
    assert (entry["status"], entry["fault"], entry["completion_tokens"]) == (
        400,
        "filter-prompt",
        None,
    )


async def test_blocked_prompt_category_and_stream(client: httpx.AsyncClient) -> None:
    body = {**ASK, "stream": True}
    resp = await client.post(
        chat_url("free"), json=body, headers={FILTER: "filter-prompt:violence"}
    )
    assert resp.status_code == 400  # a blocked prompt never starts a stream
    assert resp.headers["content-type"].startswith("application/json")
    result = resp.json()["error"]["innererror"]["content_filter_result"]
    assert result["violence"] == {"filtered": True, "severity": "high"}
    assert result["jailbreak"] == {"filtered": False, "detected": False}


async def test_filtered_answer_json(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url(), json=ASK, headers={FILTER: "filter-answer"})
    assert resp.status_code == 200
    body = resp.json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == completion_text(5)  # stopped half-way
    assert choice["content_filter_results"]["hate"] == {"filtered": True, "severity": "high"}
    assert choice["content_filter_results"]["violence"] == {"filtered": False, "severity": "safe"}
    assert body["usage"]["completion_tokens"] == 5  # usage is still reported
    assert body["usage"]["total_tokens"] == 8 + 5
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - 18)  # charged as asked
    (entry,) = await _log(client)
    assert (entry["finish_reason"], entry["completion_tokens"], entry["tokens_sent"]) == (
        "content_filter",
        5,
        5,
    )


@pytest.mark.parametrize("include_usage", [False, True])
async def test_filtered_answer_stream(client: httpx.AsyncClient, include_usage: bool) -> None:
    body: dict[str, Any] = {**ASK, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {FILTER: "filter-answer:sexual"}
    chunks = sse_json((await client.post(chat_url("free"), json=body, headers=headers)).text)
    with_choices = [c for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    assert text == completion_text(5)
    last = with_choices[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter"
    assert last["content_filter_results"]["sexual"] == {"filtered": True, "severity": "high"}
    assert [c["choices"][0]["finish_reason"] for c in with_choices[:-1]] == [None] * 6
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 5
    else:
        assert all("usage" not in c for c in chunks)


async def test_filtered_answer_with_n_and_legacy_completions(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        chat_url("free"), json={**ASK, "n": 2}, headers={FILTER: "filter-answer"}
    )
    body = resp.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["content_filter"] * 2
    assert body["usage"]["completion_tokens"] == 10
    legacy = await client.post(
        f"/openai/deployments/free/completions?{API}",
        json={"prompt": "a b", "max_tokens": 4, "stream": True},
        headers={FILTER: "filter-answer:protected_material_text"},
    )
    chunks = sse_json(legacy.text)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter"
    assert last["content_filter_results"]["protected_material_text"] == {
        "filtered": True,
        "detected": True,
    }


async def test_filtered_answer_on_the_responses_api(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/openai/v1/responses",
        json={"model": "free", "input": "hi", "max_output_tokens": 10},
        headers={FILTER: "filter-answer"},
    )
    body = resp.json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "content_filter"}
    assert body["usage"]["output_tokens"] == 5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("filter-prompt:rudeness", "category must be one of jailbreak"),
        ("filter-answer:jailbreak", "category must be one of hate"),
    ],
)
async def test_bad_filter_category_is_a_400(
    client: httpx.AsyncClient, value: str, message: str
) -> None:
    resp = await client.post(chat_url(), json=ASK, headers={FILTER: value})
    assert resp.status_code == 400
    assert message in resp.json()["error"]["message"]


async def test_embeddings_are_not_filtered(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        f"/openai/deployments/embed/embeddings?{API}",
        json={"input": "x"},
        headers={FILTER: "filter-prompt"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "x-sim-fault"


def test_openai_sdk_raises_bad_request_for_a_blocked_prompt(sim_thread: SimulatorThread) -> None:
    with openai.AzureOpenAI(
        azure_endpoint=sim_thread.url, api_key=KEY, api_version="2024-10-21", max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="free",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={FILTER: "filter-prompt"},
            )
        assert info.value.code == "content_filter"
        reply = client.chat.completions.create(
            model="free",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_headers={FILTER: "filter-answer"},
        )
        assert reply.choices[0].finish_reason == "content_filter"
        assert reply.usage is not None and reply.usage.completion_tokens == 2
