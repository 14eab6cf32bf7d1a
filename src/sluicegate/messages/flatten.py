"""Request and answer bodies as text, cut and chunked: the pure part of the message log.

Flattening follows the APIM seed's prompt/response capture (``messages`` as ``role: content``
lines, ``input``, ``prompt``; ``choices[].message.content``, ``choices[].text``,
``output_text``, ``output[].content[].text``, or the ``error`` object), and falls back to the
raw body text where a body has none of those shapes. Images, audio and files in messages are
named (``[image]``), never copied: their data is not text. Streams are flattened event by
event (``StreamText``): chat ``delta.content`` (and ``text`` of completions),
``delta.tool_calls`` and the deprecated ``delta.function_call`` per choice, Responses
``response.output_text.delta`` and tool calls (function calls, custom tools' input, MCP calls'
arguments, the code interpreter's code: ``_CALL_ITEMS``) per output item, and any error an
event carries; tool calls are assembled from their fragments and written as a whole answer's
are (``[tool call name] arguments``).

Sizes are UTF-8 bytes; cuts never split a character. Everything here runs in the message
log's thread, never on the request path. Pure and thread-safe (no shared state).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

#: Placeholders for message parts that are not text.
_PART_NAMES = {
    "image_url": "[image]",
    "input_image": "[image]",
    "input_audio": "[audio]",
    "audio": "[audio]",
    "input_file": "[file]",
    "file": "[file]",
}
#: The answer shapes whose text is known; a JSON answer with none of them is logged raw.
_ANSWER_KEYS = ("choices", "output", "output_text")
#: Responses stream events that carry answer text in ``delta``.
_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta"})
#: Responses stream events that carry a whole output item (a function call's name, and once
#: done its arguments).
_CALL_ITEM_EVENTS = frozenset({"response.output_item.added", "response.output_item.done"})
#: The Responses API's tool call items: the key of what the model wrote for the tool (its
#: arguments, a custom tool's input, the code interpreter's code), and the name logged for a
#: kind whose items carry none.
_CALL_ITEMS: dict[str, tuple[str, str | None]] = {
    "function_call": ("arguments", None),
    "custom_tool_call": ("input", None),
    "mcp_call": ("arguments", None),
    "code_interpreter_call": ("code", "code_interpreter"),
}
#: Responses stream events carrying a fragment (``delta``) of a tool call item's arguments.
_CALL_DELTAS = frozenset(
    {
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
        "response.code_interpreter_call_code.delta",
    }
)
#: Responses stream events carrying a tool call item's whole arguments once done: the key.
_CALL_DONE = {
    "response.function_call_arguments.done": "arguments",
    "response.custom_tool_call_input.done": "input",
    "response.mcp_call_arguments.done": "arguments",
    "response.code_interpreter_call_code.done": "code",
}


@dataclass(frozen=True, slots=True)
class Clipped:
    """A text cut to a size: ``data`` (UTF-8, at most the limit), the size before the cut,
    and whether it was cut."""

    data: bytes
    original_bytes: int
    truncated: bool


def _raw(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def _content(content: Any) -> str:
    """A message's ``content``: a string, or parts (text parts' text; others named)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            elif isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            elif (name := _PART_NAMES.get(str(part.get("type")))) is not None:
                texts.append(name)
    return "\n".join(texts)


def _list(value: Any) -> list[Any] | tuple[()]:
    """``value`` when it is a list, else nothing to walk (a backend's ``choices: 1``)."""
    return value if isinstance(value, list) else ()


def _json_text(value: Any) -> str:
    """A value from a parsed body as text: a string as it is, anything else as its JSON;
    "" for null and for a value nested past what ``orjson.dumps`` writes (254 levels,
    where ``orjson.loads`` reads 1024): never Python's repr, which a deep value makes
    raise (``RecursionError``) in the log's thread, costing the request its entry."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return orjson.dumps(value).decode("utf-8")
    except orjson.JSONEncodeError:
        return ""


def _tool_call_line(name: Any, arguments: Any) -> str:
    """A tool call as a line of text, in a request, a whole answer or a stream."""
    return f"[tool call {_json_text(name)}] {_json_text(arguments)}"


def _tool_calls(calls: Any) -> Iterable[str]:
    for call in _list(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield _tool_call_line(function.get("name"), function.get("arguments") or "")


def _call_item_line(item: dict[str, Any]) -> str | None:
    """A Responses tool call item (``_CALL_ITEMS``) as a line; None for another item."""
    kind = _CALL_ITEMS.get(str(item.get("type")))
    if kind is None:
        return None
    key, name = kind
    return _tool_call_line(name or item.get("name"), item.get(key) or "")


def _message_text(message: dict[str, Any]) -> str:
    """A chat message's content, then its (deprecated) function call and its tool calls, a
    line each."""
    texts = [_content(message.get("content")) or message.get("refusal") or ""]
    function_call = message.get("function_call")
    if isinstance(function_call, dict):
        texts.extend(_tool_calls([{"function": function_call}]))
    texts.extend(_tool_calls(message.get("tool_calls")))
    return "\n".join(t for t in texts if isinstance(t, str) and t)


def _message_line(message: dict[str, Any]) -> str:
    role = _json_text(message.get("role") or message.get("type")) or "message"
    return f"{role}: {_message_text(message)}"


def _input_lines(value: Any, lines: list[str]) -> None:
    """``input`` of the Responses API (a string or items) or of embeddings (strings, or
    token arrays)."""
    if isinstance(value, str):
        lines.append(value)
        return
    if not isinstance(value, list):
        return
    if value and all(isinstance(v, int) for v in value):
        lines.append(f"[{len(value)} tokens]")
        return
    for item in value:
        if isinstance(item, str):
            lines.append(item)
        elif isinstance(item, list):
            lines.append(f"[{len(item)} tokens]")
        elif isinstance(item, dict):
            kind = item.get("type")
            if "role" in item:
                lines.append(_message_line(item))
            elif (call := _call_item_line(item)) is not None:
                lines.append(call)
            elif kind in ("function_call_output", "custom_tool_call_output"):
                output = item.get("output")
                lines.append(f"[tool output] {output if isinstance(output, str) else ''}")


#: Request keys left out of a body logged raw: On Your Data's ``data_sources`` (the search
#: or Cosmos DB service's key, token or connection string) and ``tools`` (a Responses MCP
#: tool's ``headers`` and ``authorization``, the MCP server's token).
_CREDENTIALS = frozenset({"data_sources", "tools"})


def request_text(body: dict[str, Any] | bytes) -> str:
    """The prompt of a request body (parsed, or the raw bytes): ``instructions`` and
    ``messages`` as ``role: content`` lines, else ``input``, else ``prompt``; the raw body
    when it has none of them (or is not JSON), without the keys that hold credentials."""
    if isinstance(body, bytes):
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _raw(body)
        if not isinstance(parsed, dict):
            return _raw(body)
        body = parsed
    lines: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        lines.append(f"instructions: {instructions}")
    messages = body.get("messages")
    if isinstance(messages, list):
        lines.extend(_message_line(m) for m in messages if isinstance(m, dict))
    elif "input" in body:
        _input_lines(body["input"], lines)
    elif "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            lines.append(prompt)
        else:
            _input_lines(prompt, lines)
    elif not lines:
        if not _CREDENTIALS.isdisjoint(body):  # not messages, and they hold credentials
            body = {k: v for k, v in body.items() if k not in _CREDENTIALS}
        return _json_text(body)
    return "\n".join(lines)


def _error_text(error: Any) -> str:
    return _json_text(error)


def answer_text(body: bytes, operation: str) -> str:
    """The text of a whole (not streamed) answer: its ``error`` object (as JSON) if it has
    one, else the choices' and output items' text; the raw body when it is not JSON or has
    none of those shapes. An embeddings answer has no text (its vectors are not logged)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _raw(body)
    if not isinstance(obj, dict):
        return _raw(body)
    error = obj.get("error")
    if error:
        return _error_text(error) or _raw(body)  # nested too deep for JSON: as it came
    if operation == "embeddings":
        return ""
    if not any(key in obj for key in _ANSWER_KEYS):
        return _raw(body)
    texts: list[str] = []
    for choice in _list(obj.get("choices")):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            texts.append(_message_text(message))
        elif isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    output_text = obj.get("output_text")
    if isinstance(output_text, str):
        texts.append(output_text)
    else:
        for item in _list(obj.get("output")):
            if not isinstance(item, dict):
                continue
            if (call := _call_item_line(item)) is not None:
                texts.append(call)
            elif isinstance(item.get("content"), list):
                texts.append(_content(item["content"]))
    return "\n".join(texts)


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class _Call:
    """One tool call of a stream: its name and its arguments' fragments (in order)."""

    __slots__ = ("arguments", "name", "seen")

    def __init__(self) -> None:
        self.name: str | None = None
        self.arguments: list[str] = []
        #: Argument fragments arrived (kept or not): a ``…arguments.done`` adds nothing.
        self.seen = False


class _Slot:
    """A chat choice (by ``index``) or a Responses output item (by ``output_index``): its
    text's deltas, then its tool calls by their index."""

    __slots__ = ("calls", "part", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, _Call] = {}
        #: The Responses content part the last text delta belonged to.
        self.part: Any = None

    def render(self) -> str:
        """The content, then the tool calls, a line each (``_message_text``'s order)."""
        lines = ["".join(self.text)] if self.text else []
        for n in sorted(self.calls):
            call = self.calls[n]
            lines.append(_tool_call_line(call.name, "".join(call.arguments)))
        return "\n".join(line for line in lines if line)


#: The key of a chat choice's ``delta.function_call`` among its calls: before its tool calls
#: (numbered from 0), and never taken for one of them.
_FUNCTION_CALL = -1

#: What a new choice or output item (``_Slot``) and a new tool call (``_Call``) count against
#: a stream's limit besides their text, past the first ``_FREE_OBJECTS`` (the answers of real
#: models): about the memory their objects take. A stream of many one-character choices (or
#: empty tool calls) would otherwise hold hundreds of bytes per byte kept, while the log
#: charges a stream's text as at most ``max_bytes``.
_OBJECT_BYTES = 320
_FREE_OBJECTS = 16

#: A list of deltas longer than this is joined into one string after a ``feed``: a stream
#: of 2 MiB in deltas of a few characters would otherwise hold ~700,000 string objects
#: (~40 MB), twenty times the text they hold.
_COMPACT_AT = 64


class StreamText:
    """The text of a stream, fed its events as the relay sent them (whole SSE events, LF
    line ends; in several parts for a long stream): per choice (chat) or output item
    (Responses), its text deltas, then its tool calls assembled from their name and argument
    fragments by index, written as a whole answer's are (``[tool call name] arguments``).
    Holds at most ``limit`` bytes of text, names and errors (a delta that crosses it is cut
    between characters) and counts the rest, so a long stream holds no more than the log
    keeps. Not thread-safe: fed by the message log's thread only."""

    __slots__ = ("_errors", "_kept", "_objects", "_slots", "limit", "original_bytes")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[int, _Slot] = {}
        self._errors: list[str] = []
        self._kept = 0
        #: Slots and calls made (``_OBJECT_BYTES``).
        self._objects = 0
        #: UTF-8 bytes of all the text seen (kept or not).
        self.original_bytes = 0

    @property
    def kept_bytes(self) -> int:
        """UTF-8 bytes of text, names and errors held, and what choices and tool calls past
        the first few count (``_OBJECT_BYTES``): at most ``limit``."""
        return self._kept

    def feed(self, events: bytes) -> None:
        for event in events.split(b"\n\n"):
            data = _event_data(event)
            if not data or data == b"[DONE]":
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                self._event(obj)
        self._compact()

    def _event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if isinstance(kind, str):  # the Responses API's named events
            self._responses_event(kind, obj)
            return
        error = obj.get("error")
        if error:  # an error event (the backend's, or the gateway's StreamInterrupted)
            self._error(error)
            return
        for choice in _list(obj.get("choices")):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            index = index if isinstance(index, int) else 0
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if not isinstance(text, str):
                    text = delta.get("refusal")
                if isinstance(text, str) and text:
                    self._text(index, text)
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, dict):
                        self._chat_call(index, call)
                function_call = delta.get("function_call")
                if isinstance(function_call, dict):
                    self._function_call(index, function_call)
            elif isinstance(choice.get("text"), str):
                self._text(index, choice["text"])

    def _chat_call(self, index: int, call: dict[str, Any]) -> None:
        """A ``delta.tool_calls`` item: the first of a call has its name (and often empty
        arguments), the next ones its arguments' fragments, all with the call's ``index``.
        Without one (some servers leave it out): an item with an ``id`` starts a call, one
        without continues the last."""
        n = call.get("index")
        function = call.get("function")
        if not isinstance(function, dict):
            return
        if not isinstance(n, int):
            slot = self._slots.get(index)
            numbers = [k for k in slot.calls if k >= 0] if slot is not None else []
            last = max(numbers) if numbers else None
            if last is None:
                n = 0
            else:
                n = last + 1 if isinstance(call.get("id"), str) and call["id"] else last
        name, arguments = function.get("name"), function.get("arguments")
        self._call(
            index,
            n,
            name if isinstance(name, str) else None,
            arguments if isinstance(arguments, str) else None,
        )

    def _function_call(self, index: int, function: dict[str, Any]) -> None:
        """A ``delta.function_call`` (the deprecated ``functions``): one call per choice, its
        name first, then its arguments' fragments; before the choice's tool calls, as
        ``_message_text`` writes a whole answer's."""
        name, arguments = function.get("name"), function.get("arguments")
        self._call(
            index,
            _FUNCTION_CALL,
            name if isinstance(name, str) else None,
            arguments if isinstance(arguments, str) else None,
        )

    def _responses_event(self, kind: str, obj: dict[str, Any]) -> None:
        index = obj.get("output_index")
        index = index if isinstance(index, int) else 0
        if kind in _TEXT_DELTAS and isinstance(obj.get("delta"), str):
            slot = self._slots.get(index)
            part = obj.get("content_index")
            if slot is not None and slot.text and slot.part != part:
                self._text(index, "\n")  # another content part: a line of its own
            self._text(index, obj["delta"])
            if (slot := self._slots.get(index)) is not None:
                slot.part = part
        elif kind in _CALL_DELTAS:
            delta = obj.get("delta")
            if isinstance(delta, str):
                self._call(index, 0, None, delta)
        elif kind in _CALL_ITEM_EVENTS:
            item = obj.get("item")
            call = _CALL_ITEMS.get(str(item.get("type"))) if isinstance(item, dict) else None
            if isinstance(item, dict) and call is not None:
                key, name = call
                self._call_whole(index, name or item.get("name"), item.get(key))
        elif (done := _CALL_DONE.get(kind)) is not None:
            self._call_whole(index, obj.get("name"), obj.get(done))
        elif kind == "error":
            self._error({k: v for k, v in obj.items() if k not in ("type", "sequence_number")})
        elif kind == "response.failed":
            response = obj.get("response")
            if isinstance(response, dict) and response.get("error"):
                self._error(response["error"])

    def _call_whole(self, index: int, name: Any, arguments: Any) -> None:
        """A Responses tool call item as announced (``output_item.added``: its name, empty
        arguments) or finished (``…done``: whole arguments, input or code): what the deltas
        did not already bring."""
        slot = self._slots.get(index)
        call = slot.calls.get(0) if slot is not None else None
        seen = call is not None and call.seen
        self._call(
            index,
            0,
            name if isinstance(name, str) else None,
            arguments if isinstance(arguments, str) and not seen else None,
        )

    def _call(self, index: int, n: int, name: str | None, arguments: str | None) -> None:
        slot = self._slot(index)
        call = slot.calls.get(n) if slot is not None else None
        if call is None:
            if slot is None or not self._new_object():  # nothing kept
                self.original_bytes += _size(_tool_call_line(name or "", arguments or ""))
                return
            call = slot.calls[n] = _Call()
            # Its prefix; not the line breaks between calls: an uncut text's size must not
            # exceed what it is, or it would read as cut (``clip``).
            self.original_bytes += _size(_tool_call_line("", ""))
        if name and call.name is None:
            call.name = self._keep(name) or None
        if arguments:
            call.seen = True
            kept = self._keep(arguments)
            if kept:
                call.arguments.append(kept)

    def _slot(self, index: int) -> _Slot | None:
        """The choice's or output item's slot; None when a new one would pass the limit
        (``_OBJECT_BYTES``)."""
        slot = self._slots.get(index)
        if slot is None:
            if not self._new_object():
                return None
            slot = self._slots[index] = _Slot()
        return slot

    def _new_object(self) -> bool:
        """Count a new slot or call against the limit (past ``_FREE_OBJECTS``); False when
        it does not fit (nothing counted), or nothing more is kept."""
        if self._kept >= self.limit:  # it would hold nothing: only counted
            return False
        if self._objects >= _FREE_OBJECTS:
            if self._kept + _OBJECT_BYTES > self.limit:
                return False
            self._kept += _OBJECT_BYTES
        self._objects += 1
        return True

    def _text(self, index: int, text: str) -> None:
        slot = self._slot(index) if text else None
        if slot is None:
            self.original_bytes += _size(text)  # counted, not kept
            return
        kept = self._keep(text)
        if kept:
            slot.text.append(kept)

    def _keep(self, text: str) -> str:
        """Count ``text``; what of it fits in the limit (cut between characters), or ""."""
        size = _size(text)
        self.original_bytes += size
        room = self.limit - self._kept
        if room <= 0:
            return ""
        if size > room:
            data = text.encode("utf-8")
            text = data[: _boundary(data, room)].decode("utf-8")
            size = _size(text)
        self._kept += size
        return text

    def _error(self, error: Any) -> None:
        text = self._keep(_error_text(error))
        self.original_bytes += 1  # its line
        if text:
            self._errors.append(text)

    def _compact(self) -> None:
        if len(self._errors) > _COMPACT_AT:  # as ``text`` writes them: a line each
            self._errors[:] = ["\n".join(self._errors)]
        for slot in self._slots.values():
            if len(slot.text) > _COMPACT_AT:
                slot.text[:] = ["".join(slot.text)]
            for call in slot.calls.values():
                if len(call.arguments) > _COMPACT_AT:
                    call.arguments[:] = ["".join(call.arguments)]

    def text(self) -> str:
        """The choices' (or output items') texts in their order, one line apart, each with
        its tool calls a line each; then the errors."""
        texts = [self._slots[i].render() for i in sorted(self._slots)]
        return "\n".join([t for t in texts if t] + self._errors)


def _event_data(event: bytes) -> bytes:
    """The concatenated ``data:`` lines of one SSE event."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    return b"\n".join(
        line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    )


def _boundary(data: bytes, at: int) -> int:
    """The largest position <= ``at`` that does not split a UTF-8 character of ``data``."""
    if at >= len(data):
        return len(data)
    while at > 0 and data[at] & 0xC0 == 0x80:  # a continuation byte: inside a character
        at -= 1
    return at


def clip(text: str, limit: int, original_bytes: int | None = None) -> Clipped:
    """``text`` as UTF-8 cut to at most ``limit`` bytes. ``original_bytes``: the size of the
    whole text when ``text`` is already only its beginning (a long stream's)."""
    data = text.encode("utf-8")
    size = len(data) if original_bytes is None else max(original_bytes, len(data))
    if len(data) > limit:
        data = data[: _boundary(data, limit)]
    return Clipped(data, size, len(data) < size)


def chunks(data: bytes, chunk_bytes: int) -> list[str]:
    """``data`` (UTF-8) in pieces of at most ``chunk_bytes``, cut between characters; one
    empty piece for no data."""
    if len(data) <= chunk_bytes:
        return [data.decode("utf-8", "replace")]
    out: list[str] = []
    start = 0
    while start < len(data):
        end = _boundary(data, start + chunk_bytes)
        if end <= start:  # a chunk smaller than a character: never, chunk_bytes >= 1024
            end = start + chunk_bytes
        out.append(data[start:end].decode("utf-8", "replace"))
        start = end
    return out


def entries(
    meta: dict[str, Any],
    request: Clipped | None,
    response: Clipped | None,
    chunk_bytes: int,
) -> list[dict[str, Any]]:
    """The entries of one request: ``meta`` (the fields every entry repeats) with the
    request's and the answer's text in chunks of ``chunk_bytes``, entry ``SequenceNumber``
    n holding chunk n of each (APIM's split: as many entries as the longer side needs).
    A side that is not logged (None) is null in every entry."""
    request_chunks = chunks(request.data, chunk_bytes) if request is not None else []
    response_chunks = chunks(response.data, chunk_bytes) if response is not None else []
    out: list[dict[str, Any]] = []
    for n in range(max(len(request_chunks), len(response_chunks), 1)):
        entry = dict(meta)
        entry["SequenceNumber"] = n
        entry["RequestMessages"] = _piece(request_chunks, n, request)
        entry["ResponseMessages"] = _piece(response_chunks, n, response)
        _sizes(entry, "Request", request)
        _sizes(entry, "Response", response)
        out.append(entry)
    return out


def _piece(pieces: list[str], n: int, side: Clipped | None) -> str | None:
    if side is None:
        return None
    return pieces[n] if n < len(pieces) else ""


def _sizes(entry: dict[str, Any], name: str, side: Clipped | None) -> None:
    entry[f"{name}Truncated"] = side.truncated if side is not None else None
    entry[f"{name}OriginalBytes"] = side.original_bytes if side is not None else None
