import orjson

from sluicegate.tokens.usage import StreamScanner, usage_from_body


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
