"""``n`` and ``best_of``: charged at arrival for every generated answer, ``n`` choices back,
usage covering all of them, in JSON and in streams (azure-openai-api.md §8)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.plan import BadRequest, plan_request
from sluicegate.simulator.server import SimulatorThread
from sluicegate.simulator.tokens import completion_text
from tests.simulator.conftest import API, KEY, chat_url, sse_json

HI = [{"role": "user", "content": "hi"}]  # 8 prompt tokens
DEP = SimDeployment(name="d", model="m", completion_tokens=16, completion_cap_factor=4)
COMPLETIONS = f"/openai/deployments/free/completions?{API}"
LIMITED_COMPLETIONS = f"/openai/deployments/chat/completions?{API}"


def test_plan_charges_max_tokens_times_n() -> None:
    plan = plan_request("chat", {"messages": HI, "max_tokens": 5, "n": 3}, DEP)
    assert (plan.choices, plan.generated, plan.completion_tokens) == (3, 3, 5)
    assert plan.estimate == 8 + 5 * 3
    assert plan.usage_completion_tokens == 15
    default = plan_request("chat", {"messages": HI, "n": 2}, DEP)
    assert default.estimate == 8 + 16 * 2  # the default length, for each answer


def test_plan_charges_best_of_on_legacy_completions() -> None:
    plan = plan_request(
        "completions", {"prompt": "a b", "max_tokens": 4, "n": 2, "best_of": 5}, DEP
    )
    assert (plan.choices, plan.generated) == (2, 5)
    assert plan.estimate == 2 + 4 * 5
    assert plan.usage_completion_tokens == 20  # every candidate is generated and billed


@pytest.mark.parametrize(
    ("operation", "body", "param"),
    [
        ("chat", {"messages": HI, "n": 0}, "n"),
        ("chat", {"messages": HI, "n": 129}, "n"),
        ("chat", {"messages": HI, "n": "2"}, "n"),
        ("completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ("completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
        ("completions", {"prompt": "x", "best_of": 21}, "best_of"),
    ],
)
def test_plan_rejects_bad_n_and_best_of(operation: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        plan_request(operation, body, DEP)  # type: ignore[arg-type]
    assert info.value.param == param


async def test_chat_returns_n_choices_and_sums_usage(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url(), json={"messages": HI, "max_tokens": 4, "n": 3})
    assert resp.status_code == 200
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == completion_text(4) for c in body["choices"])
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == 8 + 12
    # Charged at arrival: prompt + max_tokens × n.
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - (8 + 4 * 3))
    (entry,) = [e for e in (await client.get("/_sim/log")).json() if e["status"] == 200]
    assert (entry["estimate"], entry["completion_tokens"], entry["tokens_sent"]) == (20, 12, 12)


async def test_n_can_exhaust_tpm_where_one_answer_fits(client: httpx.AsyncClient) -> None:
    # 8 + 300 fits in 1000 TPM; 8 + 300 × 4 does not: refused on arrival.
    one = await client.post(chat_url(), json={"messages": HI, "max_tokens": 300})
    assert one.status_code == 200
    four = await client.post(chat_url(), json={"messages": HI, "max_tokens": 300, "n": 4})
    assert four.status_code == 429
    assert "token rate limit" in four.json()["error"]["message"]


async def test_legacy_completions_best_of(client: httpx.AsyncClient) -> None:
    body = {"prompt": "a b", "max_tokens": 3, "n": 2, "best_of": 3}
    resp = await client.post(LIMITED_COMPLETIONS, json=body)
    assert resp.status_code == 200
    data = resp.json()
    assert [c["index"] for c in data["choices"]] == [0, 1]  # n come back …
    assert all(c["text"] == completion_text(3) for c in data["choices"])
    assert data["usage"] == {"completion_tokens": 9, "prompt_tokens": 2, "total_tokens": 11}
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - (2 + 3 * 3))  # … 3 paid


async def test_chat_stream_with_n_carries_an_index_per_choice(client: httpx.AsyncClient) -> None:
    body = {
        "messages": HI,
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = sse_json((await client.post(chat_url("free"), json=body)).text)
    assert chunks[0]["choices"] == []  # prompt filter results
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-1]["usage"]["total_tokens"] == 8 + 6
    with_choices = [c for c in chunks[1:-1]]
    assert all(len(c["choices"]) == 1 for c in with_choices)
    texts: dict[int, str] = {0: "", 1: ""}
    roles: list[int] = []
    finishes: dict[int, str] = {}
    for chunk in with_choices:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        if delta.get("role") == "assistant":
            roles.append(choice["index"])
        texts[choice["index"]] += delta.get("content") or ""
        if choice["finish_reason"] is not None:
            finishes[choice["index"]] = choice["finish_reason"]
    assert roles == [0, 1]
    assert texts == {0: completion_text(3), 1: completion_text(3)}
    assert finishes == {0: "length", 1: "length"}


async def test_legacy_completions_stream_with_n(client: httpx.AsyncClient) -> None:
    body = {"prompt": "a b", "max_tokens": 2, "n": 3, "stream": True}
    chunks = sse_json((await client.post(COMPLETIONS, json=body)).text)
    texts: dict[int, str] = {}
    for chunk in chunks[1:]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {i: completion_text(2) for i in range(3)}
    assert [c["choices"][0]["finish_reason"] for c in chunks[-3:]] == ["length"] * 3


def test_openai_sdk_reads_n_choices(sim_thread: SimulatorThread) -> None:
    with openai.AzureOpenAI(
        azure_endpoint=sim_thread.url, api_key=KEY, api_version="2024-10-21"
    ) as client:
        result = client.chat.completions.create(
            model="free", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2
        )
        assert [c.index for c in result.choices] == [0, 1]
        assert result.usage is not None and result.usage.completion_tokens == 4
        stream = client.chat.completions.create(
            model="free",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            n=2,
            stream=True,
        )
        seen = {c.choices[0].index for c in stream if c.choices}
        assert seen == {0, 1}
