"""The message log's pure part: bodies and streams to text, cut and chunked
(``messages/flatten.py``)."""

from __future__ import annotations

import orjson
import pytest

from sluicegate.messages.flatten import (
    Clipped,
    StreamText,
    answer_text,
    chunks,
    clip,
    entries,
    request_text,
)


def test_chat_messages_are_role_and_content_lines_with_parts_named_not_copied() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "look", "arguments": '{"x":1}'}}
                ],
            },
            {"role": "tool", "content": "a sluice gate"},
        ]
    }
    text = request_text(body)
    assert text == (
        "system: Be brief.\n"
        "user: What is in this picture?\n[image]\n"
        'assistant: [tool call look] {"x":1}\n'
        "tool: a sluice gate"
    )
    assert "base64" not in text
    assert request_text(orjson.dumps(body)) == text  # raw bytes are parsed the same


def test_responses_input_instructions_and_prompts() -> None:
    assert request_text({"input": "Hello", "instructions": "Answer in Dutch."}) == (
        "instructions: Answer in Dutch.\nHello"
    )
    items = {
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
        ]
    }
    assert request_text(items) == "user: Hi\n[tool call f] {}\n[tool output] 42"
    assert request_text({"prompt": ["one", "two"]}) == "one\ntwo"
    assert request_text({"input": [1, 2, 3]}) == "[3 tokens]"


def test_bodies_of_no_known_shape_are_logged_raw() -> None:
    assert request_text(b"not json \xff") == "not json \ufffd"
    assert request_text({"file": "x"}) == '{"file":"x"}'
    assert answer_text(b"<html>Bad gateway</html>", "chat/completions") == (
        "<html>Bad gateway</html>"
    )
    assert answer_text(b'{"object":"list"}', "chat/completions") == '{"object":"list"}'


def test_a_raw_body_leaves_out_credentials() -> None:
    # A body without messages, input or prompt is logged raw: On Your Data's sources hold the
    # search or Cosmos DB service's key, an MCP tool the MCP server's token; never logged.
    source = {"type": "azure_search", "parameters": {"authentication": {"key": "search-key"}}}
    logged = request_text({"model": "m", "data_sources": [source], "msg": "hi"})
    assert logged == '{"model":"m","msg":"hi"}'
    assert "search-key" not in request_text(orjson.dumps({"data_sources": [source]}))
    mcp = {"type": "mcp", "server_label": "x", "headers": {"Authorization": "Bearer mcp-token"}}
    assert request_text({"previous_response_id": "r", "tools": [mcp]}) == (
        '{"previous_response_id":"r"}'
    )


def test_answer_text_of_each_shape() -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hallo"}}]}
    assert answer_text(orjson.dumps(chat), "chat/completions") == "Hallo"
    completion = {"choices": [{"text": "one"}, {"text": "two"}]}
    assert answer_text(orjson.dumps(completion), "completions") == "one\ntwo"
    response = {
        "object": "response",
        "error": None,
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "Dag"}]},
        ],
    }
    assert answer_text(orjson.dumps(response), "responses") == "Dag"
    error = {"error": {"code": "content_filter", "message": "filtered", "status": 400}}
    assert orjson.loads(answer_text(orjson.dumps(error), "chat/completions")) == error["error"]
    vectors = {"object": "list", "data": [{"embedding": [0.1, 0.2]}]}
    assert answer_text(orjson.dumps(vectors), "embeddings") == ""


def _chat_event(index: int, text: str) -> bytes:
    choice = {"index": index, "delta": {"content": text}}
    chunk = {"object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def test_stream_text_of_chat_and_responses_streams() -> None:
    chat = StreamText(1024)
    chat.feed(_chat_event(0, "Hel") + _chat_event(1, "Other"))
    chat.feed(_chat_event(0, "lo") + b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n')
    chat.feed(b"data: [DONE]\n\n")
    assert chat.text() == "Hello\nOther"
    assert chat.original_bytes == len("HelloOther")

    responses = StreamText(1024)
    responses.feed(
        b'event: response.created\ndata: {"type":"response.created","response":{}}\n\n'
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"delta":"Goede"}\n\n'
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"delta":"morgen"}\n\n'
        b'event: response.output_text.done\ndata: {"type":"response.output_text.done",'
        b'"text":"Goedemorgen"}\n\n'
    )
    assert responses.text() == "Goedemorgen"


def test_stream_errors_are_logged_after_the_text() -> None:
    stream = StreamText(1024)
    stream.feed(_chat_event(0, "Half an ans"))
    stream.feed(b'data: {"error":{"code":"StreamInterrupted","message":"cut"}}\n\n')
    text, error = stream.text().split("\n")
    assert text == "Half an ans"
    assert orjson.loads(error) == {"code": "StreamInterrupted", "message": "cut"}
    failed = StreamText(1024)
    failed.feed(
        b'event: response.failed\ndata: {"type":"response.failed","response":'
        b'{"error":{"code":"server_error","message":"boom"},"usage":null}}\n\n'
    )
    assert orjson.loads(failed.text()) == {"code": "server_error", "message": "boom"}


def test_stream_text_keeps_its_limit_and_counts_the_rest() -> None:
    stream = StreamText(10)
    for _ in range(100):
        stream.feed(_chat_event(0, "€uro "))  # 7 bytes each
    assert stream.original_bytes == 700
    kept = stream.text()
    assert 10 <= len(kept.encode()) <= 10 + 7  # up to the limit, plus the delta crossing it
    clipped = clip(kept, 10, stream.original_bytes)
    assert clipped == Clipped("€uro €".encode(), 700, True)  # 10 bytes: the limit


def test_clip_never_splits_a_character() -> None:
    text = "a€b"  # 1 + 3 + 1 bytes
    assert clip(text, 5) == Clipped(text.encode(), 5, False)
    assert clip(text, 3) == Clipped(b"a", 5, True)  # the euro sign does not fit whole
    assert clip(text, 4) == Clipped("a€".encode(), 5, True)


@pytest.mark.parametrize("text", ["x" * 5000, "é" * 2500, "a€" * 1100 + "z", ""])
def test_chunks_are_at_most_their_size_cut_between_characters(text: str) -> None:
    data = text.encode()
    pieces = chunks(data, 1024)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 1024 for p in pieces)
    assert all(len(p.encode()) > 1024 - 4 for p in pieces[:-1])  # full, but for a character


def test_entries_split_both_sides_and_number_them() -> None:
    request = clip("q" * 2500, 4096)
    response = clip("a" * 100, 4096)
    found = entries({"RequestId": "r1"}, request, response, 1024)
    assert [e["SequenceNumber"] for e in found] == [0, 1, 2]
    assert all(e["RequestId"] == "r1" for e in found)
    assert "".join(e["RequestMessages"] for e in found) == "q" * 2500
    assert [e["ResponseMessages"] for e in found] == ["a" * 100, "", ""]
    assert found[0]["RequestOriginalBytes"] == 2500 and found[0]["RequestTruncated"] is False
    (only,) = entries({}, None, clip("", 10), 1024)
    assert only["RequestMessages"] is None and only["RequestTruncated"] is None
    assert only["ResponseMessages"] == "" and only["ResponseOriginalBytes"] == 0


def _sse(obj: dict[str, object], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _tool_delta(index: int, call: dict[str, object], content: str | None = None) -> bytes:
    delta: dict[str, object] = {"tool_calls": [call]}
    if content is not None:
        delta["content"] = content
    choice = {"index": index, "delta": delta, "finish_reason": None}
    return _sse({"object": "chat.completion.chunk", "choices": [choice]})


def test_a_chat_streams_tool_calls_are_assembled_as_a_whole_answers() -> None:
    """Azure streams a tool call as its name (with empty arguments) then the arguments in
    fragments, each delta naming the call's index; parallel calls' fragments interleave.
    The stream's text is what the same answer whole would log."""
    first = {"index": 0, "id": "call_1", "type": "function"}
    second = {"index": 1, "id": "call_2", "type": "function"}
    events = [
        _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}),
        _tool_delta(0, {**first, "function": {"name": "get_level", "arguments": ""}}),
        _tool_delta(0, {"index": 0, "function": {"arguments": '{"gate": "'}}),
        _tool_delta(0, {**second, "function": {"name": "open_gate", "arguments": ""}}),
        _tool_delta(0, {"index": 1, "function": {"arguments": '{"width"'}}),
        _tool_delta(0, {"index": 0, "function": {"arguments": 'Sluis €1"}'}}),
        _tool_delta(0, {"index": 1, "function": {"arguments": ": 2}"}}),
        _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        b"data: [DONE]\n\n",
    ]
    stream = StreamText(1024)
    stream.feed(b"".join(events[:4]))  # handed over in two parts, split between fragments
    stream.feed(b"".join(events[4:]))
    whole = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            **first,
                            "function": {"name": "get_level", "arguments": '{"gate": "Sluis €1"}'},
                        },
                        {**second, "function": {"name": "open_gate", "arguments": '{"width": 2}'}},
                    ],
                },
            }
        ]
    }
    expected = answer_text(orjson.dumps(whole), "chat/completions")
    assert (
        expected == '[tool call get_level] {"gate": "Sluis €1"}\n[tool call open_gate] {"width": 2}'
    )
    assert stream.text() == expected
    assert clip(stream.text(), 1024, stream.original_bytes) == clip(expected, 1024)  # uncut

    # Text and a call in the same choice, and a second choice: content first, then the call.
    mixed = StreamText(1024)
    mixed.feed(
        _chat_event(0, "Let me look.")
        + _tool_delta(0, {"index": 0, "function": {"name": "look", "arguments": "{}"}})
        + _chat_event(1, "No tools here.")
    )
    assert mixed.text() == "Let me look.\n[tool call look] {}\nNo tools here."


def test_a_responses_streams_function_calls_are_assembled_as_a_whole_answers() -> None:
    item = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_level"}
    events = [
        _sse({"type": "response.created", "response": {}}, "response.created"),
        _sse(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "arguments": ""},
            },
            "response.output_item.added",
        ),
        *(
            _sse(
                {
                    "type": "response.function_call_arguments.delta",
                    "output_index": 0,
                    "item_id": "fc_1",
                    "delta": d,
                },
                "response.function_call_arguments.delta",
            )
            for d in ('{"gate"', ': "Dijk"}')
        ),
        _sse(
            {
                "type": "response.function_call_arguments.done",
                "output_index": 0,
                "item_id": "fc_1",
                "arguments": '{"gate": "Dijk"}',
            },
            "response.function_call_arguments.done",
        ),
        _sse(
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": {**item, "arguments": '{"gate": "Dijk"}'},
            },
            "response.output_item.done",
        ),
        _sse(
            {
                "type": "response.output_text.delta",
                "output_index": 1,
                "content_index": 0,
                "delta": "Checking",
            },
            "response.output_text.delta",
        ),
        _sse(
            {
                "type": "response.output_text.delta",
                "output_index": 1,
                "content_index": 0,
                "delta": " now.",
            },
            "response.output_text.delta",
        ),
    ]
    stream = StreamText(1024)
    stream.feed(b"".join(events))
    whole = {
        "object": "response",
        "output": [
            {**item, "arguments": '{"gate": "Dijk"}'},
            {"type": "message", "content": [{"type": "output_text", "text": "Checking now."}]},
        ],
    }
    expected = answer_text(orjson.dumps(whole), "responses")
    assert expected == '[tool call get_level] {"gate": "Dijk"}\nChecking now.'
    assert stream.text() == expected  # the arguments once: not again from the ".done" events

    # A stream that carried no argument deltas: the call's arguments from its "done" event.
    done_only = StreamText(1024)
    done_only.feed(events[1] + events[5])
    assert done_only.text() == '[tool call get_level] {"gate": "Dijk"}'


def test_tool_call_fragments_count_against_the_limit() -> None:
    stream = StreamText(20)
    stream.feed(_tool_delta(0, {"index": 0, "function": {"name": "f", "arguments": ""}}))
    for _ in range(100):
        stream.feed(_tool_delta(0, {"index": 0, "function": {"arguments": "€bc"}}))  # 5 bytes
    assert stream.kept_bytes <= 20
    assert stream.original_bytes >= 500
    assert stream.text().startswith("[tool call f] €bc€bc€bc")
