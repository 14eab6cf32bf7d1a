"""The message log, found by review: streamed tool calls whose deltas carry no ``index``;
the deprecated chat ``function_call`` and the Responses API's other tool calls (custom tools,
MCP, the code interpreter), whole and streamed."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sluicegate.messages.flatten import StreamText, answer_text, clip, request_text


def _sse(obj: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _tool_delta(call: dict[str, object]) -> bytes:
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    return _sse({"object": "chat.completion.chunk", "choices": [choice]})


def test_streamed_tool_calls_without_an_index_are_told_apart_by_their_ids() -> None:
    """A server that leaves ``index`` out of its tool call deltas: a delta with an ``id``
    starts a call, one without continues the last. Two calls are two lines, each with its
    own name, as the whole answer logs them, not one call with both calls' arguments."""
    events = [
        _tool_delta({"id": "call_1", "type": "function", "function": {"name": "get_level"}}),
        _tool_delta({"function": {"arguments": '{"gate": '}}),
        _tool_delta({"function": {"arguments": '"Sluis"}'}}),
        _tool_delta(
            {"id": "call_2", "type": "function", "function": {"name": "open", "arguments": "{}"}}
        ),
        b"data: [DONE]\n\n",
    ]
    stream = StreamText(1024)
    stream.feed(b"".join(events[:2]))  # handed over in two parts
    stream.feed(b"".join(events[2:]))
    whole = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "function": {"name": "get_level", "arguments": '{"gate": "Sluis"}'},
                        },
                        {"id": "call_2", "function": {"name": "open", "arguments": "{}"}},
                    ],
                },
            }
        ]
    }
    assert stream.text() == answer_text(orjson.dumps(whole), "chat/completions")
    assert stream.text() == '[tool call get_level] {"gate": "Sluis"}\n[tool call open] {}'


def _event(obj: dict[str, Any]) -> bytes:
    """A Responses stream event, named as Azure names them."""
    return f"event: {obj['type']}\n".encode() + _sse({"sequence_number": 1, **obj})


def test_a_chats_deprecated_function_call_is_logged_as_a_tool_call() -> None:
    """``functions`` (deprecated, still served): the answer's ``message.function_call`` and a
    stream's ``delta.function_call`` fragments (no index: one call per choice) are logged as
    tool calls are, in a request's assistant message too."""
    call = {"name": "water_level", "arguments": '{"lock": "Kornwerderzand"}'}
    whole = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "function_call": call},
                "finish_reason": "function_call",
            }
        ]
    }
    line = '[tool call water_level] {"lock": "Kornwerderzand"}'
    assert answer_text(orjson.dumps(whole), "chat/completions") == line

    def delta(function_call: dict[str, str]) -> bytes:
        choice = {"index": 0, "delta": {"function_call": function_call}, "finish_reason": None}
        return _sse({"object": "chat.completion.chunk", "choices": [choice]})

    stream = StreamText(1024)
    stream.feed(delta({"name": "water_level", "arguments": ""}) + delta({"arguments": '{"lock": '}))
    stream.feed(delta({"arguments": '"Kornwerderzand"}'}) + b"data: [DONE]\n\n")
    assert stream.text() == line

    body = {
        "messages": [
            {"role": "user", "content": "How high is the water?"},
            {"role": "assistant", "content": None, "function_call": call},
            {"role": "function", "name": "water_level", "content": "1.2 m"},
        ]
    }
    assert request_text(body) == (
        f"user: How high is the water?\nassistant: {line}\nfunction: 1.2 m"
    )


#: The Responses API's other tool calls, as a whole answer's output items: a custom tool's
#: input, an MCP server's tool call, the code interpreter's code.
CUSTOM: dict[str, Any] = {
    "type": "custom_tool_call",
    "id": "ctc_1",
    "call_id": "call_1",
    "name": "sql",
    "input": "SELECT level FROM locks",
}
MCP: dict[str, Any] = {
    "type": "mcp_call",
    "id": "mcp_1",
    "server_label": "waterworks",
    "name": "open_gate",
    "arguments": '{"gate": 3}',
    "output": "opened",
}
CODE: dict[str, Any] = {
    "type": "code_interpreter_call",
    "id": "ci_1",
    "container_id": "cntr_1",
    "code": "print(1 + 1)",
    "outputs": None,
    "status": "completed",
}
LINES = [
    "[tool call sql] SELECT level FROM locks",
    '[tool call open_gate] {"gate": 3}',
    "[tool call code_interpreter] print(1 + 1)",
]


def test_the_responses_apis_other_tool_calls_are_logged_in_a_whole_answer() -> None:
    answer = {
        "object": "response",
        "output": [
            CUSTOM,
            MCP,
            CODE,
            {"type": "message", "content": [{"type": "output_text", "text": "Done."}]},
        ],
    }
    assert answer_text(orjson.dumps(answer), "responses") == "\n".join([*LINES, "Done."])
    # Sent back as input (a custom tool's call and its output), they are logged as well.
    request = {
        "input": [
            CUSTOM,
            {"type": "custom_tool_call_output", "call_id": "call_1", "output": "1.2"},
        ]
    }
    assert request_text(request) == f"{LINES[0]}\n[tool output] 1.2"


@pytest.mark.parametrize("fragments", [True, False])
def test_the_responses_apis_other_tool_calls_are_assembled_in_a_stream(
    fragments: bool,
) -> None:
    """Each kind streams its item announced (``output_item.added``: name, no arguments), its
    arguments (input, code) in ``delta`` fragments, then whole (``….done``, and the item
    done): logged once, as the whole answer logs it. Without the fragments (a stream that
    leaves them out), the done events bring them."""
    deltas = {
        "custom_tool_call": ("response.custom_tool_call_input", "input"),
        "mcp_call": ("response.mcp_call_arguments", "arguments"),
        "code_interpreter_call": ("response.code_interpreter_call_code", "code"),
    }
    events: list[bytes] = []
    for n, item in enumerate([CUSTOM, MCP, CODE]):
        prefix, key = deltas[str(item["type"])]
        value = str(item[key])
        announced = {**item, key: "" if key != "code" else None}
        added = {"type": "response.output_item.added", "output_index": n, "item": announced}
        events.append(_event(added))
        if fragments:
            half = len(value) // 2
            for fragment in (value[:half], value[half:]):
                fields = {"output_index": n, "item_id": item["id"], "delta": fragment}
                events.append(_event({"type": f"{prefix}.delta", **fields}))
        events.append(
            _event({"type": f"{prefix}.done", "output_index": n, "item_id": item["id"], key: value})
        )
        done = {"type": "response.output_item.done", "output_index": n, "item": item}
        events.append(_event(done))
    stream = StreamText(1024)
    stream.feed(b"".join(events[:4]))  # handed over in two parts
    stream.feed(b"".join(events[4:]))
    assert stream.text() == "\n".join(LINES)
    assert clip(stream.text(), 1024, stream.original_bytes).truncated is False
