"""Estimate a request's tokens before it is forwarded, for admission against token limits.

The estimate is ``prompt_tokens`` (counted from the request body with the model's real
tokenizer) plus ``completion_tokens`` (the most the request may generate). Rules:

* **Chat completions** follow OpenAI's published counting rule for current chat models
  (the "How to count tokens with tiktoken" cookbook): every message costs
  :data:`TOKENS_PER_MESSAGE` plus the tokens of each of its values, a ``name`` costs
  :data:`TOKENS_PER_NAME` more, and every reply is primed with :data:`REPLY_PRIMING_TOKENS`.
  Content parts: text is counted; each image costs :data:`IMAGE_TOKENS` (APIM's per-image
  maximum, since the real count depends on the pixel size we do not decode) or
  :data:`IMAGE_LOW_DETAIL_TOKENS` with ``detail: "low"``; audio and file parts cost the
  fixed :data:`AUDIO_PART_TOKENS` / :data:`FILE_PART_TOKENS` (rough). Tool definitions are
  counted roughly after the cookbook's ``num_tokens_for_tools`` (nested schemas as JSON), as
  are ``response_format`` JSON schemas. Completion: ``max_completion_tokens`` or
  ``max_tokens`` (else ``default_completion_tokens``) times ``n``.
* **Responses API**: ``instructions`` and ``input`` (a string or a list of items, counted like
  chat messages) plus tools; completion ``max_output_tokens``. Items of other kinds (a
  computer call's output, an earlier image generation, …) are counted as their JSON, except
  the images, audio and files inside them, which cost the fixed amounts above (a screenshot
  is an image, not 200 KB of base64 text). Conversation state held by
  the server (``previous_response_id``, ``conversation``) cannot be seen and is not counted:
  the settle step corrects it with the reported usage.
* **Embeddings**: the inputs (strings or token arrays), no completion.
* **Completions** (legacy): the prompt(s); completion ``max_tokens`` × ``max(n, best_of)`` ×
  number of prompts.
* Any other operation: the text found in the body, no completion.

For a model whose tokenizer is unknown the same structure is counted, but text costs
``ceil(characters / 4)`` and ``exact_tokenizer`` is ``False``. Everything here is synchronous
and pure; tokenising costs 0.1-0.3 µs per character of prose and code, up to ~2 µs per byte
of text without breaks (bounded: ``tokens/bpe.py``), so the callers run large bodies in a
thread (``proxy/admission.py``, and ``proxy/relay.py`` for an answer without usage).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sluicegate.tokens.bpe import BpeEncoding
from sluicegate.tokens.counting import CHARS_PER_TOKEN, encoding_for

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 1200
IMAGE_LOW_DETAIL_TOKENS = 85
AUDIO_PART_TOKENS = 1200
FILE_PART_TOKENS = 1200
TOOL_CALL_TOKENS = 3

CHAT = "chat.completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"

_OPERATION_ALIASES = {
    "chat.completions": CHAT,
    "chatcompletions": CHAT,
    "chat": CHAT,
    "completions": COMPLETIONS,
    "embeddings": EMBEDDINGS,
    "responses": RESPONSES,
}


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class TokenEstimate:
    """A request's estimated tokens; ``method`` says how (``tiktoken:o200k_base``, ``chars/4``)."""

    prompt_tokens: int
    completion_tokens: int
    exact_tokenizer: bool
    method: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_normalised: dict[str, str] = {}


def normalise_operation(operation: str) -> str:
    """Map spellings such as ``ChatCompletions_Create`` or ``chat/completions`` to a constant."""
    known = _normalised.get(operation)
    if known is not None:
        return known
    key = operation.strip().lower().replace("/", ".").replace("_", ".").replace(" ", ".")
    key = key.removesuffix(".create")
    result = _OPERATION_ALIASES.get(key, key)
    if len(_normalised) < 1024:  # the gateway's own operation names: a handful
        _normalised[operation] = result
    return result


#: Texts up to this many characters have their token count cached (per encoding). Roles,
#: names, system prompts and the earlier turns of a conversation come back in request after
#: request; counting them again is the bulk of an estimate. Counting is deterministic, so the
#: cache changes no result; it holds at most ``_COUNT_CACHE_SIZE`` entries (a few MiB).
_COUNT_CACHE_MAX_CHARS = 512
_COUNT_CACHE_SIZE = 8192
_counts: dict[str, dict[str, int]] = {}


def _cache_of(encoding: BpeEncoding) -> dict[str, int]:
    cache = _counts.get(encoding.name)
    if cache is None:
        cache = _counts.setdefault(encoding.name, {})
    return cache


def _count(encoding: BpeEncoding, text: str) -> int:
    if len(text) > _COUNT_CACHE_MAX_CHARS:
        return encoding.count(text)
    cache = _cache_of(encoding)
    count = cache.get(text)
    if count is None:
        count = encoding.count(text)
        if len(cache) >= _COUNT_CACHE_SIZE:
            cache.clear()  # simpler than LRU, and a full cache only costs one re-count each
        cache[text] = count
    return count


class _Meter:
    """Adds up tokens: exactly with an encoding, else by characters (rounded up once)."""

    __slots__ = ("chars", "counts", "encoding", "tokens")

    def __init__(self, encoding: BpeEncoding | None) -> None:
        self.encoding = encoding
        #: The encoding's cache of counts, looked into here first: most texts of a request
        #: (roles, system prompts, earlier turns) are in it.
        self.counts: dict[str, int] = _cache_of(encoding) if encoding is not None else {}
        self.tokens = 0
        self.chars = 0

    def text(self, value: object) -> None:
        if value is None:
            return
        self.string(value if isinstance(value, str) else str(value))

    def string(self, text: str) -> None:
        """Count ``text`` (a ``str``: the caller checked)."""
        if not text:
            return
        encoding = self.encoding
        if encoding is None:
            self.chars += len(text)
            return
        count = self.counts.get(text)
        self.tokens += _count(encoding, text) if count is None else count

    def json(self, value: object) -> None:
        if isinstance(value, str):
            self.text(value)
        elif value is not None:
            try:
                text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
            except (RecursionError, ValueError):
                # Nested deeper than the encoder goes (orjson parses 1,024 levels, json.dumps
                # stops near 1,000), or an integer too long to print: count what it holds.
                _every_string(value, self)
                return
            self.text(text)

    def fixed(self, tokens: int) -> None:
        self.tokens += tokens

    def total(self) -> int:
        if not self.chars:
            return max(0, self.tokens)
        return max(0, self.tokens + math.ceil(self.chars / CHARS_PER_TOKEN))


def _int_field(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


#: Content part types that are images: chat's and the Responses API's, and the screenshot a
#: computer call's output holds.
_IMAGE_PARTS = frozenset({"image_url", "input_image", "computer_screenshot"})
_AUDIO_PARTS = frozenset({"input_audio"})
_FILE_PARTS = frozenset({"file", "input_file"})


def _media_tokens(part: Mapping[str, Any]) -> int | None:
    """The fixed cost of an image, audio or file part, or ``None`` for any other part."""
    kind = part.get("type")
    if type(kind) is not str:
        return None  # (a list or an object cannot be looked up in a set: TypeError)
    if kind in _IMAGE_PARTS:
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
        return IMAGE_LOW_DETAIL_TOKENS if detail == "low" else IMAGE_TOKENS
    if kind in _AUDIO_PARTS:
        return AUDIO_PART_TOKENS
    if kind in _FILE_PARTS:
        return FILE_PART_TOKENS
    return None


def _part(part: object, meter: _Meter) -> None:
    if isinstance(part, str):
        meter.text(part)
        return
    if not isinstance(part, Mapping):
        return
    media = _media_tokens(part)
    if media is not None:
        meter.fixed(media)
    elif part.get("type") == "refusal":
        meter.text(part.get("refusal"))
    else:
        meter.text(part.get("text"))


def _content(content: object, meter: _Meter) -> None:
    if isinstance(content, list):
        for part in content:
            _part(part, meter)
    else:
        meter.json(content)


def _call(call: object, meter: _Meter) -> None:
    """A tool call the assistant made earlier: its name and arguments."""
    if not isinstance(call, Mapping):
        return
    function = call.get("function", call)
    if isinstance(function, Mapping):
        meter.fixed(TOOL_CALL_TOKENS)
        meter.text(function.get("name"))
        meter.text(function.get("arguments"))


def _message(message: Mapping[str, Any], meter: _Meter) -> None:
    meter.fixed(TOKENS_PER_MESSAGE)
    for key, value in message.items():
        if type(value) is str and key != "type":
            # The common case, taken first: a role, a text content, a name, a tool call id.
            # Every path below counts a string value of these keys as its text.
            if key == "name":
                meter.fixed(TOKENS_PER_NAME)
            meter.string(value)
            continue
        if key == "name":
            meter.fixed(TOKENS_PER_NAME)
        if key == "content":
            _content(value, meter)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                _call(call, meter)
        elif key == "function_call":
            _call(value, meter)
        elif key != "type":
            meter.json(value)


def _tools(tools: object, meter: _Meter, function_overhead: int) -> None:
    """Roughly the cookbook's ``num_tokens_for_tools``; nested schemas counted as JSON."""
    if not isinstance(tools, list) or not tools:
        return
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            meter.json(tool)  # built-in tools (web_search, file_search, …)
            continue
        meter.fixed(function_overhead)
        description = str(function.get("description") or "").removesuffix(".")
        meter.text(f"{function['name']}:{description}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if not isinstance(properties, Mapping) or not properties:
            continue
        meter.fixed(3)
        for key, prop in properties.items():
            meter.fixed(3)
            if not isinstance(prop, Mapping):
                meter.text(key)
                continue
            enum = prop.get("enum")
            if isinstance(enum, list):
                meter.fixed(-3)
                for item in enum:
                    meter.fixed(3)
                    meter.text(item)
            description = str(prop.get("description") or "").removesuffix(".")
            meter.text(f"{key}:{prop.get('type', '')}:{description}")
            for nested in ("properties", "items", "anyOf", "oneOf"):
                if nested in prop:
                    meter.json(prop[nested])
    meter.fixed(12)


def _chat(body: Mapping[str, Any], meter: _Meter) -> None:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                _message(message, meter)
    meter.fixed(REPLY_PRIMING_TOKENS)
    tools = body.get("tools") or body.get("functions")
    if tools:
        _tools(tools, meter, _function_overhead(meter))
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and "json_schema" in response_format:
        meter.json(response_format["json_schema"])


def _function_overhead(meter: _Meter) -> int:
    # The cookbook measured 10 tokens per function for cl100k models and 7 for o200k ones.
    return 10 if meter.encoding is not None and meter.encoding.name == "cl100k_base" else 7


def _responses(body: Mapping[str, Any], meter: _Meter) -> None:
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        meter.fixed(TOKENS_PER_MESSAGE)
        meter.text(instructions)
    items = body.get("input")
    if isinstance(items, str):
        meter.fixed(TOKENS_PER_MESSAGE)
        meter.text(items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, Mapping):
                continue
            kind = item.get("type", "message")
            if kind == "message" or "role" in item:
                _message(item, meter)
            elif kind == "function_call":
                _call(item, meter)
            elif kind == "function_call_output":
                meter.fixed(TOOL_CALL_TOKENS)
                _content(item.get("output"), meter)
            elif kind == "reasoning":
                summaries = item.get("summary")
                if isinstance(summaries, list):
                    for summary in summaries:
                        _part(summary, meter)
            elif kind != "item_reference":
                _other_item(item, meter)
    meter.fixed(REPLY_PRIMING_TOKENS)
    _tools(body.get("tools"), meter, _function_overhead(meter))
    text = body.get("text")
    if isinstance(text, Mapping) and isinstance(text.get("format"), Mapping):
        meter.json(text["format"].get("schema"))


#: How deep :func:`_without_media` looks for media parts inside an item (real items nest a
#: few levels); deeper values are counted as JSON, whatever they hold.
_MEDIA_DEPTH = 16


def _other_item(item: Mapping[str, Any], meter: _Meter) -> None:
    """A Responses input item of a kind without a rule of its own (a computer call's output,
    an earlier image generation call, a shell call, …): its JSON, but every image, audio or
    file part in it costs its fixed amount instead of the tokens of its base64 text."""
    meter.json(_without_media(item, meter, 0))


def _without_media(value: object, meter: _Meter, depth: int) -> object:
    """``value`` with its media parts charged to ``meter`` and left out (a copy where needed:
    the body is never changed)."""
    if depth > _MEDIA_DEPTH:
        return value
    if isinstance(value, Mapping):
        media = _media_tokens(value)
        if media is not None:
            meter.fixed(media)
            return {"type": value.get("type")}
        out: dict[object, object] = {}
        generated = value.get("type") == "image_generation_call"
        for key, item in value.items():
            if generated and key == "result" and isinstance(item, str):
                # An image generated earlier, sent back as context: base64 of the image.
                if item:
                    meter.fixed(IMAGE_TOKENS)
                continue
            out[key] = _without_media(item, meter, depth + 1)
        return out
    if isinstance(value, list):
        return [_without_media(item, meter, depth + 1) for item in value]
    if isinstance(value, str) and value.startswith("data:image/"):
        meter.fixed(IMAGE_TOKENS)  # an image as a data URL where no part type says so
        return ""
    return value


def _every_string(value: object, meter: _Meter) -> None:
    """Count every string and number in ``value`` as text, however deep (iteratively: no
    recursion limit), for values the JSON encoder cannot print."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            meter.text(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, float) or (isinstance(item, int) and item.bit_length() <= 64):
            meter.text(repr(item))  # (an integer too long to print is not counted)


def _inputs(value: object, meter: _Meter) -> int:
    """Count a prompt/input that may be text, a token array, or a list of either."""
    if isinstance(value, str):
        meter.text(value)
        return 1
    if not isinstance(value, list) or not value:
        return 0
    if all(isinstance(item, int) for item in value):
        meter.fixed(len(value))
        return 1
    count = 0
    for item in value:
        if isinstance(item, list):
            meter.fixed(len(item))
            count += 1
        elif isinstance(item, str):
            meter.text(item)
            count += 1
    return count


def _walk_text(value: object, meter: _Meter, depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(value, str):
        meter.text(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _walk_text(item, meter, depth + 1)
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for item in value:
            _walk_text(item, meter, depth + 1)


def estimate_request_tokens(
    body: Mapping[str, Any],
    operation: str,
    model: str | None,
    default_completion_tokens: int,
    *,
    count_prompt: bool = True,
    approximate: bool = False,
) -> TokenEstimate:
    """Estimate prompt and completion tokens of one request body (see the module docstring).

    ``operation`` is one of :data:`CHAT`, :data:`COMPLETIONS`, :data:`EMBEDDINGS`,
    :data:`RESPONSES` (other spellings go through :func:`normalise_operation`); ``model`` is
    the model name if known (the body's ``model`` is used when it is ``None``). With
    ``count_prompt=False`` the prompt is not tokenised (``prompt_tokens`` is 0, ``method``
    ``"not-counted"``): for policies that do not estimate prompts. Malformed bodies never
    raise: what cannot be read is not counted. With ``approximate=True`` text costs
    ``ceil(characters / 4)`` whatever the model, as for an unknown one: no tokenizer runs, so
    a long text costs the walk of the body, not ~1 µs a byte (for an estimate that can
    neither wait for the counting thread nor hold the event loop).
    """
    if model is None and isinstance(body.get("model"), str):
        model = body["model"]
    encoding = encoding_for(model) if count_prompt and not approximate else None
    meter = _Meter(encoding)
    op = normalise_operation(operation)
    completion = 0
    if op == CHAT:
        _chat(body, meter)
        n = _int_field(body, "n") or 1
        budget = _int_field(body, "max_completion_tokens", "max_tokens")
        completion = (default_completion_tokens if budget is None else budget) * n
    elif op == RESPONSES:
        _responses(body, meter)
        budget = _int_field(body, "max_output_tokens")
        completion = default_completion_tokens if budget is None else budget
    elif op == EMBEDDINGS:
        _inputs(body.get("input"), meter)
    elif op == COMPLETIONS:
        prompts = max(1, _inputs(body.get("prompt"), meter))
        meter.text(body.get("suffix"))
        choices = max(_int_field(body, "n") or 1, _int_field(body, "best_of") or 1)
        budget = _int_field(body, "max_tokens")
        completion = (default_completion_tokens if budget is None else budget) * choices * prompts
    else:
        _walk_text(body, meter)
    if not count_prompt:
        return TokenEstimate(0, completion, False, "not-counted")
    method = f"tiktoken:{encoding.name}" if encoding is not None else f"chars/{CHARS_PER_TOKEN}"
    return TokenEstimate(
        prompt_tokens=meter.total(),
        completion_tokens=completion,
        exact_tokenizer=encoding is not None,
        method=method,
    )
