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
    chat_usage,
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
    return _event(
        {
            "choices": [],
            **common,
            "usage": chat_usage(answer.prompt_tokens, answer.completion_tokens),
        }
    )


def chat_plan(answer: Answer, include_usage: bool) -> StreamPlan:
    common = _common(answer, "chat.completion.chunk", include_usage)
    role: dict[str, Any] = {
        "content_filter_results": {},
        "delta": {"content": "", "refusal": None, "role": "assistant"},
        "finish_reason": None,
        "index": 0,
        "logprobs": None,
    }
    finish: dict[str, Any] = {
        "content_filter_results": {},
        "delta": {},
        "finish_reason": answer.finish_reason,
        "index": 0,
        "logprobs": None,
    }
    head = _PROMPT_FILTER_EVENT + _event({"choices": [role], **common})
    tail = _event({"choices": [finish], **common})
    if include_usage:
        tail += _usage_event(answer, "chat.completion.chunk")
    tail += DONE
    prefix = (
        b'data: {"choices":[{"content_filter_results":' + _CHUNK_FILTER + b',"delta":{"content":'
    )
    # The rest of the chunk after the choice, re-using orjson for correct escaping of ids.
    suffix = (
        b'},"finish_reason":null,"index":0,"logprobs":null}],' + orjson.dumps(common)[1:] + b"\n\n"
    )
    return StreamPlan(head, tail, answer.completion_tokens, lambda i: prefix + _piece(i) + suffix)


def completions_plan(answer: Answer, include_usage: bool) -> StreamPlan:
    common = _common(answer, "text_completion", include_usage)
    finish: dict[str, Any] = {
        "content_filter_results": {},
        "finish_reason": answer.finish_reason,
        "index": 0,
        "logprobs": None,
        "text": "",
    }
    head = _PROMPT_FILTER_EVENT
    tail = _event({"choices": [finish], **common})
    if include_usage:
        tail += _usage_event(answer, "text_completion")
    tail += DONE
    prefix = (
        b'data: {"choices":[{"content_filter_results":'
        + _CHUNK_FILTER
        + b',"finish_reason":null,"index":0,"logprobs":null,"text":'
    )
    suffix = b"}]," + orjson.dumps(common)[1:] + b"\n\n"
    return StreamPlan(head, tail, answer.completion_tokens, lambda i: prefix + _piece(i) + suffix)


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
