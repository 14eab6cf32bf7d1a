"""Server-sent event plans: the exact byte sequence of a streamed answer.

A ``StreamPlan`` is ``head`` (events before the first token), one event per token, and
``tail`` (events after the last token). The writer in ``app`` paces the tokens and may stop
half-way (the ``cut`` fault); building the events is pure and cheap (token events are a
pre-encoded word between two per-request byte strings).

Chat completions, as Azure sends them::

    data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[…]}
    data: {"choices":[{… "delta":{"content":"","refusal":null,"role":"assistant"} …}], …}
    data: {"choices":[{… "delta":{"content":"The"} …}], …}          (one per token)
    data: {"choices":[{… "delta":{},"finish_reason":"stop" …}], …}   ("length" if cut by max)
    data: {"choices":[],…,"usage":{…}}        (only with stream_options.include_usage)
    data: [DONE]

With ``n`` > 1 every chunk still carries one choice, told apart by its ``index``: a role
chunk per choice, then the tokens of the choices interleaved (token *t* of every choice
before token *t+1* of any), then a finish chunk per choice; the usage chunk sums all of
them. An answer stopped by the content filter ends each choice with ``finish_reason:
"content_filter"`` and the filter results marking the category (azure-openai-api.md §6).

Legacy completions follow the same framing with ``text_completion`` chunks. The Responses API
streams named events (``response.created`` … ``response.completed``) and no ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sluicegate.simulator.payloads import (
    CHUNK_FILTER,
    PROMPT_FILTER_RESULTS,
    Answer,
    answer_usage,
    response_message_id,
    response_object,
)
from sluicegate.simulator.tokens import WORDS

DONE = b"data: [DONE]\n\n"
_FIRST_PIECE = orjson.dumps(WORDS[0])
_LATER_PIECES = tuple(orjson.dumps(" " + w) for w in WORDS)
_CHUNK_FILTER = orjson.dumps(CHUNK_FILTER)


def _piece(i: int) -> bytes:
    return _FIRST_PIECE if i == 0 else _LATER_PIECES[i % len(_LATER_PIECES)]


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _named(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


@dataclass(frozen=True, slots=True)
class StreamPlan:
    head: bytes
    tail: bytes
    count: int
    token: Callable[[int], bytes]

    def tokens(self, start: int, stop: int) -> bytes:
        """The events of tokens ``start`` … ``stop - 1``."""
        return b"".join(self.token(i) for i in range(start, stop))

    def whole(self) -> bytes:
        return self.head + self.tokens(0, self.count) + self.tail


def _prompt_filter_event() -> bytes:
    return _event(
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
        }
    )


_PROMPT_FILTER_EVENT = _prompt_filter_event()


def _common(answer: Answer, obj: str, include_usage: bool) -> dict[str, Any]:
    common: dict[str, Any] = {
        "created": answer.created,
        "id": answer.response_id,
        "model": answer.model,
        "object": obj,
        "system_fingerprint": answer.system_fingerprint,
    }
    if include_usage:
        common["usage"] = None  # as Azure/OpenAI do on every chunk but the usage one
    return common


def _usage_event(answer: Answer, obj: str) -> bytes:
    common = _common(answer, obj, include_usage=False)
    return _event({"choices": [], **common, "usage": answer_usage(answer)})


def _finish_filter(answer: Answer) -> dict[str, Any]:
    """The finish chunk's filter results: empty, or the category that stopped the answer."""
    return answer.choice_filter if answer.filtered is not None else {}


def _interleaved(prefix: bytes, suffixes: tuple[bytes, ...]) -> Callable[[int], bytes]:
    """Event ``k`` is token ``k // n`` of choice ``k % n`` (choices written side by side)."""
    n = len(suffixes)
    if n == 1:
        suffix = suffixes[0]
        return lambda k: prefix + _piece(k) + suffix
    return lambda k: prefix + _piece(k // n) + suffixes[k % n]


def chat_plan(answer: Answer, include_usage: bool) -> StreamPlan:
    common = _common(answer, "chat.completion.chunk", include_usage)
    indexes = range(answer.choices)
    roles = b"".join(
        _event(
            {
                "choices": [
                    {
                        "content_filter_results": {},
                        "delta": {"content": "", "refusal": None, "role": "assistant"},
                        "finish_reason": None,
                        "index": i,
                        "logprobs": None,
                    }
                ],
                **common,
            }
        )
        for i in indexes
    )
    finishes = b"".join(
        _event(
            {
                "choices": [
                    {
                        "content_filter_results": _finish_filter(answer),
                        "delta": {},
                        "finish_reason": answer.finish_reason,
                        "index": i,
                        "logprobs": None,
                    }
                ],
                **common,
            }
        )
        for i in indexes
    )
    head = _PROMPT_FILTER_EVENT + roles
    tail = finishes
    if include_usage:
        tail += _usage_event(answer, "chat.completion.chunk")
    tail += DONE
    prefix = (
        b'data: {"choices":[{"content_filter_results":' + _CHUNK_FILTER + b',"delta":{"content":'
    )
    # The rest of the chunk after the choice, re-using orjson for correct escaping of ids.
    rest = orjson.dumps(common)[1:] + b"\n\n"
    suffixes = tuple(
        b'},"finish_reason":null,"index":%d,"logprobs":null}],' % i + rest for i in indexes
    )
    count = answer.completion_tokens * answer.choices
    return StreamPlan(head, tail, count, _interleaved(prefix, suffixes))


def completions_plan(answer: Answer, include_usage: bool) -> StreamPlan:
    common = _common(answer, "text_completion", include_usage)
    indexes = range(answer.choices)
    head = _PROMPT_FILTER_EVENT
    tail = b"".join(
        _event(
            {
                "choices": [
                    {
                        "content_filter_results": _finish_filter(answer),
                        "finish_reason": answer.finish_reason,
                        "index": i,
                        "logprobs": None,
                        "text": "",
                    }
                ],
                **common,
            }
        )
        for i in indexes
    )
    if include_usage:
        tail += _usage_event(answer, "text_completion")
    tail += DONE
    prefix = b'data: {"choices":[{"content_filter_results":' + _CHUNK_FILTER
    rest = b"}]," + orjson.dumps(common)[1:] + b"\n\n"
    # Key order as before: finish_reason, index, logprobs, text (the piece), then the rest.
    prefixes = tuple(
        prefix + b',"finish_reason":null,"index":%d,"logprobs":null,"text":' % i for i in indexes
    )
    n = answer.choices
    count = answer.completion_tokens * n

    def token(k: int) -> bytes:
        return prefixes[k % n] + _piece(k // n) + rest

    return StreamPlan(head, tail, count, token)


def responses_plan(answer: Answer, request: dict[str, Any]) -> StreamPlan:
    """Responses API events; ``sequence_number`` runs 0, 1, … across the whole stream."""
    item_id = response_message_id(answer)
    pending = response_object(answer, request, done=False)
    final = response_object(answer, request, done=True)
    item_done = final["output"][0]
    part_done = item_done["content"][0]
    item_open = {**item_done, "status": "in_progress", "content": []}
    part_open = {**part_done, "text": ""}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    n = answer.completion_tokens
    end = "response.completed" if final["status"] == "completed" else "response.incomplete"

    def named(seq: int, kind: str, **fields: Any) -> bytes:
        return _named(kind, {"type": kind, **fields, "sequence_number": seq})

    head = b"".join(
        (
            named(0, "response.created", response=pending),
            named(1, "response.in_progress", response=pending),
            named(2, "response.output_item.added", output_index=0, item=item_open),
            named(3, "response.content_part.added", **where, part=part_open),
        )
    )
    seq = 4 + n
    tail = b"".join(
        (
            named(seq, "response.output_text.done", **where, text=answer.text, logprobs=[]),
            named(seq + 1, "response.content_part.done", **where, part=part_done),
            named(seq + 2, "response.output_item.done", output_index=0, item=item_done),
            named(seq + 3, end, response=final),
        )
    )
    prefix = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"content_index":0,"delta":'
    )
    middle = b',"item_id":' + orjson.dumps(item_id) + b',"logprobs":[],"output_index":0,'

    def token(i: int) -> bytes:
        return prefix + _piece(i) + middle + b'"sequence_number":%d}\n\n' % (4 + i)

    return StreamPlan(head, tail, n, token)
