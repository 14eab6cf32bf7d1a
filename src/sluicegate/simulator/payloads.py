"""Whole (non-streamed) response bodies shaped like Azure OpenAI's.

Each function is pure: given the decided ``Answer`` it returns the JSON bytes. Shared pieces
(content filter results, usage objects) are built here and reused by ``sse``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.errors import Operation
from sluicegate.simulator.tokens import completion_text, embedding_base64, embedding_vector

FinishReason = Literal["stop", "length", "content_filter"]

_SAFE = {"filtered": False, "severity": "safe"}
_NOT_DETECTED = {"filtered": False, "detected": False}

#: ``choices[i].content_filter_results`` of an unfiltered completion.
COMPLETION_FILTER: dict[str, Any] = {
    "hate": _SAFE,
    "protected_material_code": _NOT_DETECTED,
    "protected_material_text": _NOT_DETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
#: Per-token filter results in a stream (Azure's default, synchronous filter mode).
CHUNK_FILTER: dict[str, Any] = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
#: Categories the content filter rates: prompts (with the jailbreak shield) and completions.
PROMPT_FILTER_CATEGORIES = ("hate", "jailbreak", "self_harm", "sexual", "violence")
ANSWER_FILTER_CATEGORIES = (
    "hate",
    "protected_material_code",
    "protected_material_text",
    "self_harm",
    "sexual",
    "violence",
)
_DETECTION_CATEGORIES = frozenset(
    {"jailbreak", "protected_material_code", "protected_material_text"}
)


def filter_results(categories: tuple[str, ...], hit: str | None) -> dict[str, Any]:
    """``content_filter_results`` over ``categories`` with ``hit`` filtered (None: clean).

    Severity categories read ``{"filtered", "severity"}``, detections (jailbreak, protected
    material) ``{"filtered", "detected"}`` — azure-openai-api.md §5–§6.
    """
    results: dict[str, Any] = {}
    for name in categories:
        detection = name in _DETECTION_CATEGORIES
        if name == hit:
            results[name] = (
                {"filtered": True, "detected": True}
                if detection
                else {"filtered": True, "severity": "high"}
            )
        else:
            results[name] = _NOT_DETECTED if detection else _SAFE
    return results


PROMPT_FILTER_RESULTS: list[dict[str, Any]] = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            "hate": _SAFE,
            "jailbreak": _NOT_DETECTED,
            "self_harm": _SAFE,
            "sexual": _SAFE,
            "violence": _SAFE,
        },
    }
]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the simulator decided to answer to one generation request."""

    operation: Operation
    response_id: str
    created: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    system_fingerprint: str
    #: Choices returned (``n``) and answers generated and billed (``best_of``, else ``n``);
    #: ``completion_tokens`` is the length of *each* answer.
    choices: int = 1
    generated: int = 1
    audio_tokens: int = 0
    #: The content-filter category that stopped the answer (``finish_reason`` content_filter).
    filtered: str | None = None

    @property
    def text(self) -> str:
        return completion_text(self.completion_tokens)

    @property
    def usage_completion_tokens(self) -> int:
        """Every generated answer's tokens (what ``usage.completion_tokens`` reports)."""
        return self.completion_tokens * self.generated

    @property
    def choice_filter(self) -> dict[str, Any]:
        """``content_filter_results`` of each choice (the hit category when filtered)."""
        if self.filtered is None:
            return COMPLETION_FILTER
        return filter_results(ANSWER_FILTER_CATEGORIES, self.filtered)


def chat_usage(prompt_tokens: int, completion_tokens: int, audio_tokens: int = 0) -> dict[str, Any]:
    return {
        "completion_tokens": completion_tokens,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "reasoning_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_details": {"audio_tokens": audio_tokens, "cached_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def answer_usage(answer: Answer) -> dict[str, Any]:
    """Chat usage of ``answer``: completion tokens summed over every generated answer."""
    return chat_usage(answer.prompt_tokens, answer.usage_completion_tokens, answer.audio_tokens)


def chat_body(answer: Answer) -> bytes:
    text = answer.text
    return orjson.dumps(
        {
            "choices": [
                {
                    "content_filter_results": answer.choice_filter,
                    "finish_reason": answer.finish_reason,
                    "index": index,
                    "logprobs": None,
                    "message": {
                        "annotations": [],
                        "content": text,
                        "refusal": None,
                        "role": "assistant",
                    },
                }
                for index in range(answer.choices)
            ],
            "created": answer.created,
            "id": answer.response_id,
            "model": answer.model,
            "object": "chat.completion",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
            "system_fingerprint": answer.system_fingerprint,
            "usage": answer_usage(answer),
        }
    )


def completions_body(answer: Answer) -> bytes:
    text = answer.text
    return orjson.dumps(
        {
            "choices": [
                {
                    "content_filter_results": answer.choice_filter,
                    "finish_reason": answer.finish_reason,
                    "index": index,
                    "logprobs": None,
                    "text": text,
                }
                for index in range(answer.choices)
            ],
            "created": answer.created,
            "id": answer.response_id,
            "model": answer.model,
            "object": "text_completion",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
            "system_fingerprint": answer.system_fingerprint,
            "usage": {
                "completion_tokens": answer.usage_completion_tokens,
                "prompt_tokens": answer.prompt_tokens,
                "total_tokens": answer.prompt_tokens + answer.usage_completion_tokens,
            },
        }
    )


def response_message_id(answer: Answer) -> str:
    return "msg_" + answer.response_id.removeprefix("resp_")


def response_object(
    answer: Answer,
    request: dict[str, Any],
    *,
    done: bool,
) -> dict[str, Any]:
    """A Responses API ``response`` object; ``done=False`` gives the in-progress form."""
    incomplete = done and answer.finish_reason != "stop"
    status = "in_progress" if not done else ("incomplete" if incomplete else "completed")
    # Responses reports why it stopped early: the output limit, or the content filter.
    reason = "content_filter" if answer.finish_reason == "content_filter" else "max_output_tokens"
    output: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    if done:
        output.append(
            {
                "type": "message",
                "id": response_message_id(answer),
                "status": status,
                "role": "assistant",
                "content": [
                    {
                        "type": "output_text",
                        "text": answer.text,
                        "annotations": [],
                        "logprobs": [],
                    }
                ],
            }
        )
        usage = {
            "input_tokens": answer.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": answer.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }
    return {
        "id": answer.response_id,
        "object": "response",
        "created_at": answer.created,
        "status": status,
        "background": request.get("background") is True,
        "error": None,
        "incomplete_details": {"reason": reason} if incomplete else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {},
        "model": answer.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": bool(request.get("store", True)),
        "temperature": request.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": request.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": request.get("user"),
    }


def responses_body(answer: Answer, request: dict[str, Any]) -> bytes:
    return orjson.dumps(response_object(answer, request, done=True))


def embeddings_body(
    model: str,
    inputs: list[Any],
    dimensions: int,
    prompt_tokens: int,
    encoding_format: str,
) -> bytes:
    """One deterministic vector per input (``encoding_format`` ``float`` or ``base64``)."""
    data = []
    for index, item in enumerate(inputs):
        key = item if isinstance(item, str) else orjson.dumps(item).decode()
        vector = embedding_vector(key, dimensions)
        embedding: Any = embedding_base64(vector) if encoding_format == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return orjson.dumps(
        {
            "data": data,
            "model": model,
            "object": "list",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def models_body(deployments: Iterable[SimDeployment], created: int) -> bytes:
    """``GET /openai/models``: one entry per deployment (``id`` is the deployment name)."""
    data = [
        {
            "id": d.name,
            "object": "model",
            "created": created,
            "created_at": created,
            "owned_by": "system",
            "model": d.model,
            "status": "succeeded",
            "capabilities": {
                "chat_completion": d.kind == "chat",
                "completion": d.kind == "chat",
                "embeddings": d.kind == "embeddings",
                "fine_tune": False,
                "inference": True,
            },
            "lifecycle_status": "generally-available",
        }
        for d in deployments
    ]
    return orjson.dumps({"data": data, "object": "list"})
