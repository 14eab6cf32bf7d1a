"""Deterministic token counts, answer text, embeddings and the request plan (pure)."""

from __future__ import annotations

import math

import pytest

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.plan import BadRequest, plan_request
from sluicegate.simulator.tokens import (
    WORDS,
    chat_prompt_tokens,
    completion_text,
    embedding_vector,
    input_tokens,
    responses_input_tokens,
    token_piece,
)

DEP = SimDeployment(name="d", model="m", completion_tokens=16, completion_cap_factor=4)
EMB = SimDeployment(name="e", model="m", kind="embeddings", dimensions=32)


def test_chat_prompt_tokens_rule() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one two three"},
                {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    # The remote image's size is unknown: taken as 1024×1024, 85 + 4 × 170 = 765 tokens.
    assert chat_prompt_tokens(messages) == (4 + 2) + (4 + 3 + 765) + (4 + 0) + 3


def test_input_tokens_for_strings_lists_and_ids() -> None:
    assert input_tokens("a b  c\n d") == 4
    assert input_tokens(["a b", "c"]) == 3
    assert input_tokens([1, 2, 3]) == 3
    assert input_tokens([[1, 2], [3]]) == 3


def test_responses_input_counts_like_chat() -> None:
    assert responses_input_tokens({"input": "hello world"}) == 4 + 2 + 3
    body = {"instructions": "be nice", "input": [{"role": "user", "content": "x y z"}]}
    assert responses_input_tokens(body) == (4 + 2) + (4 + 3) + 3


@pytest.mark.parametrize("n", [1, 2, len(WORDS), len(WORDS) + 7, 500])
def test_answer_text_has_one_word_per_token_and_matches_the_pieces(n: int) -> None:
    text = completion_text(n)
    assert len(text.split()) == n
    assert "".join(token_piece(i) for i in range(n)) == text


def test_embeddings_are_deterministic_unit_vectors_and_truncate_consistently() -> None:
    a = embedding_vector("hello", 64)
    assert a == embedding_vector("hello", 64)
    assert a != embedding_vector("hellp", 64)
    assert math.isclose(sum(v * v for v in a), 1.0, rel_tol=1e-6)
    short = embedding_vector("hello", 8)
    norm = math.sqrt(sum(v * v for v in a[:8]))
    assert short == pytest.approx([v / norm for v in a[:8]], abs=1e-6)


def test_plan_without_max_tokens_uses_the_default_and_stops() -> None:
    plan = plan_request("chat", {"messages": [{"role": "user", "content": "hi"}]}, DEP)
    assert (plan.prompt_tokens, plan.completion_tokens, plan.finish_reason) == (8, 16, "stop")
    assert plan.estimate == 8 + 16
    assert not plan.stream


def test_plan_with_max_tokens_writes_that_many_and_reports_length() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    plan = plan_request("chat", body, DEP)
    assert (plan.completion_tokens, plan.finish_reason, plan.estimate) == (5, "length", 13)


def test_plan_caps_long_answers_but_charges_the_requested_maximum() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}
    plan = plan_request("chat", body, DEP)
    assert (plan.completion_tokens, plan.finish_reason) == (64, "stop")  # 16 × 4
    assert plan.estimate == 8 + 1000  # Azure charges what was asked for


def test_plan_max_completion_tokens_wins_over_max_tokens() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9,
        "max_completion_tokens": 3,
    }
    assert plan_request("chat", body, DEP).completion_tokens == 3


def test_plan_stream_options() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    plan = plan_request("chat", body, DEP)
    assert plan.stream
    assert plan.include_usage
    assert plan.stream_options == {"include_usage": True}
    with pytest.raises(BadRequest, match="only allowed when 'stream'"):
        plan_request("chat", {**body, "stream": False}, DEP)


@pytest.mark.parametrize(
    ("operation", "body", "param"),
    [
        ("chat", {}, "messages"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"content": "x"}], "max_tokens": 0}, "max_tokens"),
        ("chat", {"messages": [{"content": "x"}], "max_tokens": "5"}, "max_tokens"),
        ("chat", {"messages": [{"content": "x"}], "stream": "yes"}, "stream"),
        ("completions", {}, "prompt"),
        ("responses", {}, "input"),
    ],
)
def test_plan_rejects_bad_bodies(operation: str, body: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        plan_request(operation, body, DEP)  # type: ignore[arg-type]
    assert info.value.param == param


def test_plan_embeddings() -> None:
    plan = plan_request("embeddings", {"input": ["a b", "c"], "dimensions": 8}, EMB)
    assert (plan.prompt_tokens, plan.estimate, plan.dimensions) == (3, 3, 8)
    assert plan.inputs == ["a b", "c"]
    assert plan_request("embeddings", {"input": [1, 2, 3]}, EMB).inputs == [[1, 2, 3]]
    with pytest.raises(BadRequest, match="more than 32"):
        plan_request("embeddings", {"input": "x", "dimensions": 33}, EMB)
    with pytest.raises(BadRequest):
        plan_request("embeddings", {"input": ""}, EMB)
    with pytest.raises(BadRequest):
        plan_request("embeddings", {"input": "x", "stream": True}, EMB)
