import itertools

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluicegate.tokens import usage
from sluicegate.tokens.usage import (
    RELAYED_KEPT_BYTES,
    StreamScanner,
    Usage,
    answer_text,
    usage_from_body,
)


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 3,
    "total_tokens": 12,
    "prompt_tokens_details": {"cached_tokens": 2},
    "completion_tokens_details": {"reasoning_tokens": 1},
}

STREAM = (
    _event({"choices": [], "id": "", "model": "", "prompt_filter_results": []})
    + _event(
        {
            "choices": [{"delta": {"content": "Hello", "role": "assistant"}, "index": 0}],
            "model": "gpt-4o-mini",
            "usage": None,
        }
    )
    + _event({"choices": [{"delta": {"content": " world"}, "index": 0}]})
    + _event({"choices": [{"delta": {}, "finish_reason": "stop", "index": 0}]})
    + _event({"choices": [], "model": "gpt-4o-mini-2024", "usage": USAGE})
    + b"data: [DONE]\n\n"
)


def test_json_body_usage() -> None:
    usage, model = usage_from_body(orjson.dumps({"model": "m", "usage": USAGE}))
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 3, 12)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (2, 1)
    assert model == "m"
    assert usage_from_body(b"not json") == (None, None)


def test_responses_api_usage_shape() -> None:
    body = orjson.dumps({"usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}})
    usage, _ = usage_from_body(body)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 7)


def test_stream_passes_everything_when_the_client_asked_for_usage() -> None:
    scanner = StreamScanner(strip_usage_chunk=False)
    out = b"".join(scanner.feed(STREAM[i : i + 7]) for i in range(0, len(STREAM), 7))
    out += scanner.flush()
    assert out == STREAM
    assert scanner.usage is not None and scanner.usage.total_tokens == 12
    assert scanner.model == "gpt-4o-mini-2024"
    assert scanner.done


def test_stream_hides_the_usage_chunk_the_gateway_asked_for() -> None:
    scanner = StreamScanner(strip_usage_chunk=True)
    out = scanner.feed(STREAM) + scanner.flush()
    assert b'"usage":{' not in out
    assert out.endswith(b"data: [DONE]\n\n")
    assert scanner.usage is not None and scanner.usage.prompt_tokens == 9
    assert out == STREAM.replace(
        _event({"choices": [], "model": "gpt-4o-mini-2024", "usage": USAGE}), b""
    )


def test_relayed_text_for_estimates() -> None:
    scanner = StreamScanner(strip_usage_chunk=True)
    half = STREAM.index(b'data: {"choices":[{"delta":{},')
    scanner.feed(STREAM[:half])
    assert scanner.relayed_text() == "Hello world"
    assert scanner.usage is None and not scanner.done


def test_a_long_stream_keeps_a_bounded_share_for_its_estimate() -> None:
    """The events relayed are kept for an estimate only up to RELAYED_KEPT_BYTES: a long
    answer is not held whole in memory; the rest is counted, and the share says how much."""
    word = _event({"choices": [{"delta": {"content": "word "}}]})
    scanner = StreamScanner(strip_usage_chunk=True)
    chunk = word * 100
    for _ in range(RELAYED_KEPT_BYTES // len(chunk) * 4):
        assert scanner.feed(chunk) == chunk
    kept = sum(len(b) for b in scanner.relayed)
    assert RELAYED_KEPT_BYTES <= kept < RELAYED_KEPT_BYTES + len(chunk)
    assert scanner.relayed_share == pytest.approx(0.25, abs=0.01)
    assert scanner.relayed_text() == "word " * (kept // len(word))


USAGE_EVENT = _event({"choices": [], "model": "gpt-4o-mini-2024", "usage": USAGE})
#: The same chunk as some servers write it, with spaces (the spaced marker).
SPACED_USAGE_EVENT = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "total_tokens": 6}}\n\n'


@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM) + 200), max_size=12),
    strip=st.booleans(),
    spaced=st.booleans(),
    usage_first=st.booleans(),
    crlf=st.booleans(),
)
def test_any_chunking_gives_the_same_events_and_usage(
    cuts: list[int], strip: bool, spaced: bool, usage_first: bool, crlf: bool
) -> None:
    """Whatever the chunking, and whether the backend ends its lines with LF (Azure) or with
    CR LF (SSE allows it; some OpenAI-compatible servers do), the events are forwarded whole
    (with LF line ends) and the usage is read."""
    usage_event = SPACED_USAGE_EVENT if spaced else USAGE_EVENT
    body = STREAM.replace(USAGE_EVENT, b"")
    # The usage chunk last (as Azure sends it) or, to cover the edges, as the very first event.
    done = b"data: [DONE]\n\n"
    stream = usage_event + body if usage_first else body.replace(done, usage_event + done)
    expected = stream.replace(usage_event, b"") if strip else stream
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    scanner = StreamScanner(strip_usage_chunk=strip)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    out = b"".join(scanner.feed(stream[a:b]) for a, b in itertools.pairwise(bounds))
    out += scanner.flush()
    assert out == expected
    assert scanner.usage is not None
    assert scanner.usage.total_tokens == (6 if spaced else 12)
    assert scanner.done


def test_null_usage_fields_are_passed_over_and_either_spacing_is_found() -> None:
    # OpenAI-style streams carry "usage":null in every chunk but the last; some servers
    # write JSON with a space after the colon.
    events = [
        b'data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n',
        b'data: {"choices":[{"delta":{"content":"!"}}],"usage": null}\n\n',
        b'data: {"choices":[],"model":"m","usage": {"prompt_tokens":3,"completion_tokens":2,'
        b'"total_tokens":5}}\n\n',
        b"data: [DONE]\n\n",
    ]
    scanner = StreamScanner(strip_usage_chunk=True)
    out = scanner.feed(b"".join(events))
    assert out == events[0] + events[1] + events[3]
    assert scanner.usage is not None and scanner.usage.total_tokens == 5
    assert scanner.model == "m" and scanner.done


def test_the_last_usage_object_of_a_chunk_counts_and_an_unreadable_one_is_passed_over() -> None:
    early = b'data: {"choices":[],"usage":{"prompt_tokens":1,"total_tokens":1}}\n\n'
    final = b'data: {"choices":[],"model":"m2","usage":{"prompt_tokens":7,"total_tokens":9}}\n\n'
    broken = b'data: {"choices":[],"usage":{"prompt_tokens":8,\n\n'
    for strip in (False, True):
        scanner = StreamScanner(strip_usage_chunk=strip)
        scanner.feed(early + final + broken + b"data: [DONE]\n\n")
        assert scanner.usage is not None and scanner.usage.total_tokens == 9
        assert scanner.model == "m2" and scanner.done


def test_responses_stream_usage_is_read_from_response_completed() -> None:
    events = [
        _event({"type": "response.created", "response": {"id": "r", "usage": None}}),
        _event({"type": "response.output_text.delta", "delta": "Hi"}),
        _event(
            {
                "type": "response.completed",
                "response": {
                    "id": "r",
                    "model": "gpt-4o",
                    "usage": {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6},
                },
            }
        ),
    ]
    scanner = StreamScanner(strip_usage_chunk=False)
    out = scanner.feed(b"".join(events))
    assert out == b"".join(events)
    assert scanner.usage is not None and scanner.usage.prompt_tokens == 4
    assert scanner.model == "gpt-4o" and scanner.done


def _named(obj: dict[str, object]) -> bytes:
    """A Responses event as Azure and OpenAI send it: its type as the event's name too."""
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


RESPONSES_USAGE = {
    "input_tokens": 4,
    "input_tokens_details": {"cached_tokens": 1},
    "output_tokens": 2,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 6,
}


def _responses_stream(end: str, usage: dict[str, object] | None, named: bool) -> list[bytes]:
    """The events of a Responses stream that ends with ``end`` reporting ``usage``."""
    event = _named if named else _event
    pending = {"id": "r", "status": "in_progress", "usage": None}
    status = end.removeprefix("response.")
    final = {"id": "r", "model": "gpt-4o", "status": status, "usage": usage}
    where = {"item_id": "m", "output_index": 0, "content_index": 0}
    return [
        event({"type": "response.created", "response": pending, "sequence_number": 0}),
        event({"type": "response.in_progress", "response": pending, "sequence_number": 1}),
        event({"type": "response.output_text.delta", **where, "delta": "Hi", "sequence_number": 2}),
        event({"type": "response.output_text.done", **where, "text": "Hi", "sequence_number": 3}),
        event({"type": end, "response": final, "sequence_number": 4}),
    ]


def _feed_in_pieces(scanner: StreamScanner, stream: bytes, size: int) -> bytes:
    out = b"".join(scanner.feed(stream[i : i + size]) for i in range(0, len(stream), size))
    return out + scanner.flush()


@pytest.mark.parametrize("named", [True, False], ids=["named", "data-only"])
@pytest.mark.parametrize("end", ["response.completed", "response.incomplete", "response.failed"])
def test_every_event_that_ends_a_responses_stream_ends_it_with_its_usage(
    end: str, named: bool
) -> None:
    """``response.incomplete`` (cut at max_output_tokens) and ``response.failed`` end a
    Responses stream as ``response.completed`` does, and their usage is the backend's."""
    events = _responses_stream(end, RESPONSES_USAGE, named)
    stream = b"".join(events)
    before_end = StreamScanner(strip_usage_chunk=False)
    before_end.feed(b"".join(events[:-1]))
    assert not before_end.done and before_end.usage is None
    for size in (len(stream), 64, 7, 1):
        scanner = StreamScanner(strip_usage_chunk=False)
        assert _feed_in_pieces(scanner, stream, size) == stream
        assert scanner.done
        assert scanner.usage == Usage(4, 2, 6, 1, 0)
        assert scanner.model == "gpt-4o"
        assert scanner.failed is (end == "response.failed")


def test_a_failed_responses_stream_without_usage_has_still_ended() -> None:
    """``response.failed`` with ``"usage":null``: nothing to read, but nothing is missing
    either (no interruption to report); no usage is made up."""
    stream = b"".join(_responses_stream("response.failed", None, named=True))
    for size in (len(stream), 64, 7, 1):
        scanner = StreamScanner(strip_usage_chunk=False)
        assert _feed_in_pieces(scanner, stream, size) == stream
        assert scanner.done
        assert scanner.failed  # the relay records the failure and estimates the usage
        assert scanner.usage is None


def test_a_model_name_is_one_shared_string_whatever_answer_reports_it() -> None:
    """Records waiting for the ledger hold their model name: equal names from separate
    answers (JSON bodies and streams alike) are one object, so a record costs a pointer."""
    names = []
    for _ in range(3):
        _, model = usage_from_body(orjson.dumps({"model": "gpt-4o-2024-08-06", "usage": USAGE}))
        names.append(model)
    scanner = StreamScanner(strip_usage_chunk=False)
    scanner.feed(_event({"choices": [], "model": "gpt-4o-2024-08-06", "usage": USAGE}))
    names.append(scanner.model)
    assert names[0] == "gpt-4o-2024-08-06"
    assert all(name is names[0] for name in names)
    assert usage_from_body(orjson.dumps({"model": "", "usage": USAGE}))[1] is None


def test_model_names_from_a_backend_are_shared_up_to_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backend that reported a new name in every answer would otherwise grow the table
    without end: past the bound, names are still returned, only not kept."""
    # An empty table of its own, so that the names filling it do not crowd out the names
    # other tests in this process expect to be shared.
    monkeypatch.setattr(usage, "_MODELS", {})
    many = [f"model-{i}" for i in range(2_000)]
    seen = [usage_from_body(orjson.dumps({"model": m, "usage": USAGE}))[1] for m in many]
    assert seen == many
    again = [usage_from_body(orjson.dumps({"model": m, "usage": USAGE}))[1] for m in many]
    assert again == many
    assert sum(a is b for a, b in zip(seen, again, strict=True)) == usage._MAX_MODELS


def test_answer_text_is_the_generated_text_of_every_kind_of_answer() -> None:
    """What an estimate counts when a whole answer came without usage."""
    chat = {"choices": [{"message": {"content": "a"}}, {"message": {"content": "b"}}]}
    completions = {"choices": [{"text": "c"}]}
    responses = {
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "d"}]},
        ]
    }
    assert answer_text(orjson.dumps(chat)) == "ab"
    assert answer_text(orjson.dumps(completions)) == "c"
    assert answer_text(orjson.dumps(responses)) == "d"
    assert answer_text(orjson.dumps({"data": [{"embedding": [0.1]}]})) == ""
    assert answer_text(b"not json") == answer_text(b"[1]") == ""
    assert answer_text(orjson.dumps({"choices": [None, {"message": None}], "output": [1]})) == ""


def test_answer_text_of_an_answer_of_unexpected_shape_is_empty_not_an_error() -> None:
    """A backend's answer without usage is estimated from its text; members of the wrong
    type hold no text (the gateway must relay the answer, not fail with a 500)."""
    for body in (
        b'{"choices": 1}',
        b'{"choices": {"a": 1}}',
        b'{"output": true}',
        b'{"output": [{"content": 5}]}',
        b'{"output": [{"content": "text"}]}',
    ):
        assert answer_text(body) == "", body
    assert answer_text(b'{"output": [{"content": [{"text": "hi"}]}], "choices": 1}') == "hi"


def test_relayed_text_of_events_of_unexpected_shape_is_empty_not_an_error() -> None:
    scanner = StreamScanner(strip_usage_chunk=False)
    scanner.feed(b'data: {"choices": 1}\n\ndata: {"choices": [{"delta": {"content": "ok"}}]}\n\n')
    assert scanner.relayed_text() == "ok"
