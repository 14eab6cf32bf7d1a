"""The message log, found by review: streamed tool calls whose deltas carry no ``index``."""

from __future__ import annotations

import orjson

from sluicegate.messages.flatten import StreamText, answer_text


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
