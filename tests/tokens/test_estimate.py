"""Request token estimates against OpenAI's published counting rules."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluicegate.tokens.counting import count_tokens
from sluicegate.tokens.estimate import (
    AUDIO_PART_TOKENS,
    FILE_PART_TOKENS,
    IMAGE_LOW_DETAIL_TOKENS,
    IMAGE_TOKENS,
    estimate_request_tokens,
    normalise_operation,
)

# The example conversation of OpenAI's cookbook "How to count tokens with tiktoken"; the
# cookbook reports (and the API returned) 129 prompt tokens for gpt-4 / gpt-3.5-turbo and
# 124 for gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 129), ("gpt-35-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_chat_prompt_matches_openai_published_counts(model: str, expected: int) -> None:
    body = {"messages": COOKBOOK_MESSAGES, "max_tokens": 50, "n": 2}
    estimate = estimate_request_tokens(body, "chat.completions", model, 1024)
    assert estimate.prompt_tokens == expected
    assert estimate.completion_tokens == 100
    assert estimate.exact_tokenizer
    assert estimate.total_tokens == expected + 100


def test_model_comes_from_the_body_when_not_given() -> None:
    body = {"model": "gpt-4o", "messages": COOKBOOK_MESSAGES}
    estimate = estimate_request_tokens(body, "ChatCompletions_Create", None, 1024)
    assert (estimate.prompt_tokens, estimate.completion_tokens) == (124, 1024)
    assert estimate.method == "tiktoken:o200k_base"


def test_unknown_model_uses_characters_within_a_documented_tolerance() -> None:
    estimate = estimate_request_tokens(
        {"messages": COOKBOOK_MESSAGES}, "chat.completions", "mistral-large", 256
    )
    assert not estimate.exact_tokenizer
    assert estimate.method == "chars/4"
    assert estimate.completion_tokens == 256
    # English prose: the character rule stays within 30 % of the real count.
    assert 124 * 0.7 <= estimate.prompt_tokens <= 129 * 1.3


def test_completion_budget_fields() -> None:
    chat = "chat.completions"
    assert (
        estimate_request_tokens({"max_completion_tokens": 7}, chat, "o3", 1).completion_tokens == 7
    )
    both = {"max_completion_tokens": 7, "max_tokens": 9, "n": 3}
    assert estimate_request_tokens(both, chat, "o3", 1).completion_tokens == 21
    assert estimate_request_tokens({"max_tokens": True}, chat, "o3", 5).completion_tokens == 5
    assert estimate_request_tokens({"max_tokens": -1}, chat, "o3", 5).completion_tokens == 5


def test_images_cost_a_fixed_documented_count() -> None:
    def content(detail: str | None) -> dict[str, object]:
        image: dict[str, object] = {"url": "data:image/png;base64,AAAA"}
        if detail:
            image["detail"] = detail
        return {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hello world"},
                        {"type": "image_url", "image_url": image},
                    ],
                }
            ]
        }

    base = 3 + 1 + 2 + 3  # message + "user" + "hello world" + reply priming
    high = estimate_request_tokens(content(None), "chat.completions", "gpt-4o", 0)
    low = estimate_request_tokens(content("low"), "chat.completions", "gpt-4o", 0)
    assert high.prompt_tokens == base + IMAGE_TOKENS == base + 1200
    assert low.prompt_tokens == base + IMAGE_LOW_DETAIL_TOKENS


def test_tool_calls_and_tool_definitions_are_counted() -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
    messages = [
        {"role": "user", "content": "What's the weather like in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_current_weather",
                        "arguments": '{"location":"Paris"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"},
    ]
    plain = estimate_request_tokens({"messages": messages}, "chat.completions", "gpt-4o", 0)
    with_tools = estimate_request_tokens(
        {"messages": messages, "tools": [weather]}, "chat.completions", "gpt-4o", 0
    )
    arguments = count_tokens('{"location":"Paris"}', "gpt-4o")
    assert plain.prompt_tokens > 3 * 3 + arguments  # the call's arguments are in
    # OpenAI's rule of thumb for this kind of function: a few dozen tokens.
    assert 30 <= with_tools.prompt_tokens - plain.prompt_tokens <= 80


def test_embeddings_count_strings_and_token_arrays() -> None:
    body = {"input": ["hello world", "hello world"]}
    estimate = estimate_request_tokens(body, "embeddings", "text-embedding-3-small", 1024)
    assert (estimate.prompt_tokens, estimate.completion_tokens) == (4, 0)
    assert (
        estimate_request_tokens(
            {"input": "hello world"}, "embeddings", "text-embedding-ada-002", 0
        ).prompt_tokens
        == 2
    )
    assert estimate_request_tokens({"input": [1, 2, 3]}, "embeddings", None, 0).prompt_tokens == 3
    arrays = {"input": [[1, 2], [3, 4, 5]]}
    assert estimate_request_tokens(arrays, "embeddings", None, 0).prompt_tokens == 5


def test_responses_api_input_and_max_output_tokens() -> None:
    simple = estimate_request_tokens(
        {"model": "gpt-5", "input": "hello world", "max_output_tokens": 300}, "responses", None, 9
    )
    assert (simple.prompt_tokens, simple.completion_tokens) == (3 + 2 + 3, 300)
    items = {
        "instructions": "hello world",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "hello world"},
            {"type": "item_reference", "id": "msg_1"},
        ],
    }
    estimate = estimate_request_tokens(items, "responses", "gpt-4.1", 77)
    assert estimate.completion_tokens == 77
    assert estimate.prompt_tokens == (3 + 2) + (3 + 1 + 2) + (3 + 1 + 1) + (3 + 2) + 3


def test_legacy_completions_multiply_by_prompts_and_best_of() -> None:
    body = {"prompt": ["hello world", "hello world"], "max_tokens": 10, "n": 2, "best_of": 3}
    estimate = estimate_request_tokens(body, "completions", "gpt-35-turbo-instruct", 0)
    assert (estimate.prompt_tokens, estimate.completion_tokens) == (4, 10 * 3 * 2)


def test_malformed_bodies_never_raise() -> None:
    for body in (
        {},
        {"messages": "nope"},
        {"messages": [None, 3, {"content": [None, {"type": "image_url"}]}]},
        {"tools": [None, {"function": 3}], "messages": []},
        {"input": {"weird": True}},
    ):
        for operation in ("chat.completions", "responses", "embeddings", "completions", "x"):
            estimate = estimate_request_tokens(body, operation, "gpt-4o", 10)
            assert estimate.prompt_tokens >= 0


def test_unknown_operations_count_the_text_they_carry() -> None:
    estimate = estimate_request_tokens({"prompt": "hello world", "size": 1024}, "images", "x", 5)
    # Only strings count: ceil(len("hello world") / 4) with an unknown model.
    assert (estimate.prompt_tokens, estimate.completion_tokens) == (3, 0)


def test_operation_spellings() -> None:
    assert normalise_operation("ChatCompletions_Create") == "chat.completions"
    assert normalise_operation("chat/completions") == "chat.completions"
    assert normalise_operation("Embeddings_Create") == "embeddings"
    assert normalise_operation("responses") == "responses"


def test_prompt_counting_can_be_skipped() -> None:
    body = {"messages": COOKBOOK_MESSAGES, "max_tokens": 40}
    estimate = estimate_request_tokens(body, "chat.completions", "gpt-4o", 1, count_prompt=False)
    assert (estimate.prompt_tokens, estimate.completion_tokens) == (0, 40)
    assert (estimate.exact_tokenizer, estimate.method) == (False, "not-counted")


SCREENSHOT = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAA" * 8_000  # ~200 KB


def _responses_prompt(*items: dict[str, Any]) -> int:
    return estimate_request_tokens({"input": list(items)}, "responses", "gpt-4o", 0).prompt_tokens


def test_a_computer_calls_screenshot_is_an_image_not_its_base64() -> None:
    """A 200 KB screenshot was counted as 25,033 tokens of text (real: about 1,000)."""
    prompt = _responses_prompt(
        {
            "type": "computer_call_output",
            "call_id": "call_1",
            "output": {"type": "computer_screenshot", "image_url": SCREENSHOT},
        }
    )
    assert IMAGE_TOKENS <= prompt <= IMAGE_TOKENS + 40  # the image, the call id, the JSON
    low = _responses_prompt(
        {
            "type": "computer_call_output",
            "call_id": "call_1",
            "output": {"type": "computer_screenshot", "image_url": SCREENSHOT, "detail": "low"},
        }
    )
    assert prompt - low == IMAGE_TOKENS - IMAGE_LOW_DETAIL_TOKENS


def test_an_earlier_image_generation_is_an_image_not_its_base64() -> None:
    call = {"type": "image_generation_call", "id": "ig_1", "status": "completed"}
    prompt = _responses_prompt({**call, "result": SCREENSHOT.split(",", 1)[1]})
    assert prompt - _responses_prompt(call) == IMAGE_TOKENS
    assert _responses_prompt({**call, "result": ""}) == _responses_prompt(call)


def test_media_parts_inside_other_items_cost_their_fixed_amounts() -> None:
    """Image, audio and file parts wherever an item of another kind holds them, and an image
    given as a bare data URL; the rest of the item still counts as its JSON."""
    base = _responses_prompt({"type": "custom_tool_call_output", "call_id": "c", "output": []})
    parts = [
        {"type": "input_image", "image_url": SCREENSHOT, "detail": "low"},
        {"type": "input_image", "image_url": SCREENSHOT},
        {"type": "input_file", "file_data": "A" * 100_000},
        {"type": "input_audio", "input_audio": {"data": "A" * 100_000, "format": "wav"}},
    ]
    expected = IMAGE_LOW_DETAIL_TOKENS + IMAGE_TOKENS + FILE_PART_TOKENS + AUDIO_PART_TOKENS
    prompt = _responses_prompt({"type": "custom_tool_call_output", "call_id": "c", "output": parts})
    assert expected <= prompt - base <= expected + 60  # the placeholders' JSON
    bare = _responses_prompt({"type": "mcp_call_output", "image": SCREENSHOT})
    assert IMAGE_TOKENS <= bare <= IMAGE_TOKENS + 20


def test_a_reasoning_summary_that_is_not_a_list_is_not_counted() -> None:
    """It raised TypeError (a 500 for the client) though malformed bodies never raise."""
    for summary in (5, 2.5, True, {"text": "hi"}, "hello world"):
        body = {"input": [{"type": "reasoning", "summary": summary}]}
        assert estimate_request_tokens(body, "responses", "gpt-4o", 0).prompt_tokens == 3


@pytest.mark.parametrize("operation", ["chat.completions", "responses", "completions", "x"])
def test_bodies_nested_as_deep_as_the_parser_allows_never_raise(operation: str) -> None:
    """orjson parses 1,023 levels, deeper than json.dumps can print (RecursionError)."""
    deep = "[" * 1000 + '"hello world"' + "]" * 1000
    for raw in (
        '{"messages":[{"role":"user","content":{"a":' + deep + '}}],"tools":[' + deep + "]}",
        '{"input":[{"type":"shell_call","action":' + deep + '}],"prompt":' + deep + "}",
    ):
        body = orjson.loads(raw)
        for model in ("gpt-4o", "unknown-model"):
            assert estimate_request_tokens(body, operation, model, 1).prompt_tokens >= 0


# Keys and strings the estimator looks for, so that generated bodies reach its branches.
_KEYS = [
    *("type", "role", "content", "text", "image_url", "url", "detail", "summary", "output"),
    *("result", "input", "messages", "tools", "functions", "function", "name", "arguments"),
    *("parameters", "properties", "enum", "description", "items", "anyOf", "oneOf"),
    *("tool_calls", "function_call", "refusal", "instructions", "format", "schema", "prompt"),
    *("suffix", "n", "best_of", "max_tokens", "max_completion_tokens", "max_output_tokens"),
    *("response_format", "json_schema", "call_id", "model"),
]
_STRINGS = [
    *("message", "function_call", "function_call_output", "reasoning", "item_reference"),
    *("computer_call_output", "computer_screenshot", "image_generation_call", "input_image"),
    *("image_url", "input_audio", "file", "input_file", "refusal", "text", "input_text"),
    *("low", "high", "user", "gpt-4o", "gpt-4", "data:image/png;base64,AAAA"),
]
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson parses
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(_STRINGS)
    | st.text(max_size=12)
)
_JSON = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)
_BODIES = st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BODIES)
@example(body={"input": [{"type": "reasoning", "summary": 5}]})
def test_no_json_body_makes_the_estimate_raise(body: dict[str, Any]) -> None:
    """Whatever JSON the client sends, for every operation, model kind and counting mode,
    the estimate is made (a limiter must answer 429 or admit, never 500)."""
    for operation in ("chat.completions", "responses", "embeddings", "completions", "images"):
        for model in ("gpt-4o", "gpt-4", "unknown-model", None):
            for count_prompt in (True, False):
                estimate = estimate_request_tokens(
                    body, operation, model, 16, count_prompt=count_prompt
                )
                assert estimate.prompt_tokens >= 0 and estimate.completion_tokens >= 0
