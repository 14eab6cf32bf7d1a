"""From a request body to what the simulator will charge and answer (pure).

Charging follows Azure: at arrival, the estimate is prompt tokens + the requested maximum
(``max_completion_tokens``, else ``max_tokens``, Responses ``max_output_tokens``) or, when
none is given, the deployment's default ``completion_tokens``, times the number of answers
generated — ``n`` (chat, legacy completions) or ``best_of`` (legacy completions, which
generate ``best_of`` candidates and return the ``n`` best) — azure-openai-api.md §8,
apim-policies.md §5. Embeddings charge their input.

Several answers: ``n`` choices (index 0 … n-1), each as long as a single answer would be;
``usage.completion_tokens`` covers every generated one (``n``, or ``best_of`` candidates,
which are billed although only ``n`` come back). ``best_of`` must be at least ``n`` and
cannot be streamed (OpenAI's API rules for legacy completions).

Answer length: without a requested maximum the answer has the deployment's
``completion_tokens`` and finishes with ``stop``. With a maximum *m* the model "would have
written" ``completion_cap`` tokens (``completion_tokens × completion_cap_factor``): it writes
``min(m, cap)`` tokens and finishes with ``length`` when *m* < cap (cut by the client's
limit), ``stop`` otherwise. So a client controls the length through ``max_tokens`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.errors import Operation
from sluicegate.simulator.payloads import FinishReason
from sluicegate.simulator.tokens import (
    PromptCount,
    chat_prompt_count,
    input_tokens,
    responses_input_count,
)

#: Most answers one request may ask for (OpenAI's limits: ``n`` ≤ 128, ``best_of`` ≤ 20).
MAX_N = 128
MAX_BEST_OF = 20


class BadRequest(Exception):
    """The body is not acceptable; answered as an OpenAI-style 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestPlan:
    prompt_tokens: int
    #: Tokens of *each* answer (choice); ``usage_completion_tokens`` is the billed total.
    completion_tokens: int
    finish_reason: FinishReason
    estimate: int
    stream: bool
    include_usage: bool
    stream_options: Any
    #: Choices returned (``n``) and answers generated (``best_of`` if given, else ``n``).
    choices: int = 1
    generated: int = 1
    #: Prompt tokens that are audio (``prompt_tokens_details.audio_tokens``).
    audio_tokens: int = 0
    #: Embeddings only: the inputs (one vector each), vector length and encoding.
    inputs: list[Any] = field(default_factory=list)
    dimensions: int = 0
    encoding_format: str = "float"

    @property
    def usage_completion_tokens(self) -> int:
        """``usage.completion_tokens``: every generated answer's tokens."""
        return self.completion_tokens * self.generated


def _positive_int(body: dict[str, Any], name: str, most: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid value for '{name}': expected an integer of at least 1.", name)
    if most is not None and value > most:
        raise BadRequest(f"Invalid value for '{name}': must be at most {most}.", name)
    return value


def _answers(operation: Operation, body: dict[str, Any], stream: bool) -> tuple[int, int]:
    """(choices returned, answers generated) from ``n`` and ``best_of``."""
    if operation == "responses":  # the Responses API has neither
        return 1, 1
    n = _positive_int(body, "n", MAX_N) or 1
    if operation != "completions":  # best_of exists only on legacy completions
        return n, n
    best_of = _positive_int(body, "best_of", MAX_BEST_OF)
    if best_of is None:
        return n, n
    if best_of < n:
        raise BadRequest("'best_of' must be greater than or equal to 'n'.", "best_of")
    if stream and best_of > 1:
        raise BadRequest("Cannot stream results when 'best_of' is greater than 1.", "best_of")
    return n, best_of


def _stream_flags(body: dict[str, Any], streamable: bool) -> tuple[bool, bool, Any]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("Invalid type for 'stream': expected a boolean.", "stream")
    if stream and not streamable:
        raise BadRequest("Streaming is not supported for this operation.", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        if not isinstance(options, dict):
            raise BadRequest(
                "Invalid type for 'stream_options': expected an object.", "stream_options"
            )
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage, options


def _length(requested: int | None, deployment: SimDeployment) -> tuple[int, FinishReason, int]:
    """(completion tokens, finish reason, completion part of the estimate)."""
    if requested is None:
        return deployment.completion_tokens, "stop", deployment.completion_tokens
    cap = deployment.completion_cap
    if requested < cap:
        return requested, "length", requested
    return cap, "stop", requested


def plan_request(
    operation: Operation, body: dict[str, Any], deployment: SimDeployment
) -> RequestPlan:
    """Validate ``body`` for ``operation`` and decide tokens, length and streaming.

    Raises ``BadRequest`` for a body the real service would refuse with a 400.
    """
    if operation == "embeddings":
        return _plan_embeddings(body, deployment)
    if operation == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "'messages' is a required property and must be a non-empty array.", "messages"
            )
        count = chat_prompt_count(messages)
        requested = _positive_int(body, "max_completion_tokens")
        if requested is None:
            requested = _positive_int(body, "max_tokens")
    elif operation == "completions":
        if "prompt" not in body:
            raise BadRequest("'prompt' is a required property.", "prompt")
        count = PromptCount(input_tokens(body["prompt"]))
        requested = _positive_int(body, "max_tokens")
    else:  # responses
        if "input" not in body:
            raise BadRequest("'input' is a required property.", "input")
        count = responses_input_count(body)
        requested = _positive_int(body, "max_output_tokens")
    stream, include_usage, options = _stream_flags(body, streamable=True)
    choices, generated = _answers(operation, body, stream)
    completion, finish, charged = _length(requested, deployment)
    return RequestPlan(
        prompt_tokens=count.total,
        completion_tokens=completion,
        finish_reason=finish,
        # Azure's arrival estimate: the maximum of every generated answer (§8).
        estimate=count.total + charged * generated,
        stream=stream,
        include_usage=include_usage,
        stream_options=options,
        choices=choices,
        generated=generated,
        audio_tokens=count.audio,
    )


def _plan_embeddings(body: dict[str, Any], deployment: SimDeployment) -> RequestPlan:
    raw = body.get("input")
    if raw is None or raw == "" or raw == []:
        raise BadRequest("'input' is a required property and must not be empty.", "input")
    if isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(v, int) for v in raw)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and all(isinstance(v, str | list) for v in raw):
        inputs = list(raw)
    else:
        raise BadRequest("Invalid type for 'input': expected a string or an array.", "input")
    dimensions = _positive_int(body, "dimensions") or deployment.dimensions
    if dimensions > deployment.dimensions:
        raise BadRequest(
            f"This model does not support more than {deployment.dimensions} dimensions.",
            "dimensions",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    stream, include_usage, options = _stream_flags(body, streamable=False)
    prompt = input_tokens(raw)
    return RequestPlan(
        prompt_tokens=prompt,
        completion_tokens=0,
        finish_reason="stop",
        estimate=prompt,
        stream=stream,
        include_usage=include_usage,
        stream_options=options,
        inputs=inputs,
        dimensions=dimensions,
        encoding_format=encoding,
    )
