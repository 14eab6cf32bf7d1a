"""Reading the token usage a backend reports, from JSON bodies and from SSE streams.

Pure code: no I/O. The stream scanner sees the bytes as they pass through the relay, splits
them into events, forwards each event unchanged (or drops the usage-only chunk the gateway
asked for on the client's behalf), and picks the usage out of the final chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# Model names, one string object per name: every usage record waiting for the ledger holds
# one, and a backend reports a handful of names, so sharing them saves ~70 bytes a record
# (~1.4 MiB at the ledger's default ``max_pending``, more while it spills). Bounded, because
# the names come from the backend; ``sys.intern`` is not used for that reason (interned
# strings are immortal on some CPython versions).
_MODELS: dict[str, str] = {}
_MAX_MODELS = 256


def model_name(value: Any) -> str | None:
    """``value`` if it is a non-empty string, as the one shared object for that name."""
    if not isinstance(value, str) or not value:
        return None
    shared = _MODELS.get(value)
    if shared is not None:
        return shared
    if len(_MODELS) < _MAX_MODELS and len(value) <= 200:
        _MODELS[value] = value
    return value


def usage_from_object(usage: Any) -> Usage | None:
    """Chat/completions/embeddings (`prompt_tokens`…) and Responses (`input_tokens`…) shapes."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        prompt = _int(usage.get("input_tokens"))
        completion = _int(usage.get("output_tokens"))
        in_details = usage.get("input_tokens_details") or {}
        out_details = usage.get("output_tokens_details") or {}
    else:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        in_details = usage.get("prompt_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or {}
    total = _int(usage.get("total_tokens")) or prompt + completion
    cached = _int(in_details.get("cached_tokens")) if isinstance(in_details, dict) else 0
    reasoning = _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
    return Usage(prompt, completion, total, cached, reasoning)


def usage_from_body(body: bytes) -> tuple[Usage | None, str | None]:
    """Usage and model from a whole JSON response body; (None, None) when there is none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    return usage_from_object(obj.get("usage")), model_name(obj.get("model"))


def answer_text(body: bytes) -> str:
    """The generated text of a whole JSON answer (chat and completions choices, Responses
    output), for an estimate when the backend reported no usage; "" when there is none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(obj, dict):
        return ""
    parts: list[str] = []
    # A backend's answer is untrusted: a member of the wrong type is no text, never a 500.
    choices, output = obj.get("choices"), obj.get("output")
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
    for item in output if isinstance(output, list) else ():  # Responses: output_text parts
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
    return "".join(parts)


_USAGE_KEY = b'"usage":'
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_DONE_EVENT = b"data: [DONE]"
_DONE_TAIL = b"data: [DONE]\n\n"
#: The events that end a Responses stream (it sends no ``[DONE]``): the answer is whole,
#: cut at ``max_output_tokens`` (``incomplete``) or given up by the backend (``failed``).
#: Each carries the final ``response`` object, whose ``usage`` is the backend's count.
_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")
#: Their first line, as Azure and OpenAI send them: the event's name.
_RESPONSE_END_LINES = tuple(b"event: %s\n" % name.encode() for name in _RESPONSE_ENDS)
_FAILED_LINE = _RESPONSE_END_LINES[2]
_E = ord("e")  # how a block of named events (``event: …``) starts; chat blocks start "data:"


def _find_usage(data: bytes, start: int) -> int:
    """Where the next usage object (``"usage":{`` or ``"usage": {``) starts at or after
    ``start``; -1: none. One scan for the key, whatever follows it (``null`` is skipped)."""
    while True:
        at = data.find(_USAGE_KEY, start)
        if at < 0:
            return -1
        after = data[at + 8 : at + 10]
        if after[:1] == b"{" or after == b" {":
            return at
        start = at + 8


#: The relayed bytes a ``StreamScanner`` keeps for an estimate: enough for any usual answer
#: (~16,000 tokens of chat deltas take ~6 MB of events), bounded so that long streams do not
#: hold their whole answer in memory for a case that rarely happens (no usage came back).
RELAYED_KEPT_BYTES = 256 * 1024


class StreamScanner:
    """Splits an SSE byte stream into events and extracts usage on the way.

    ``feed(chunk)`` returns the bytes to forward now (whole events only; a partial event waits
    for the rest). When ``strip_usage_chunk`` is set, the usage-only chunk (``choices: []`` with
    ``usage``) is removed: the gateway asked for it on behalf of a client that did not.
    The events forwarded are kept (by reference, no copies), up to ``RELAYED_KEPT_BYTES``, so
    that the completion can be estimated if the stream ends without usage
    (``relayed_text``, ``relayed_share``). Events separated by CRLF (SSE allows CR LF, as
    some OpenAI-compatible servers send them; Azure sends LF) are forwarded with LF line ends.
    Not thread-safe: one per stream.
    """

    __slots__ = (
        "_beyond",
        "_carry",
        "_crlf",
        "_kept",
        "_pending",
        "done",
        "failed",
        "model",
        "relayed",
        "strip_usage_chunk",
        "usage",
    )

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self._pending = b""
        self.usage: Usage | None = None
        self.model: str | None = None
        self.done = False
        #: The stream ended in ``response.failed``: whole, but the backend gave up on it.
        self.failed = False
        self.relayed: list[bytes] = []
        self._kept = 0  # bytes in ``relayed``
        self._beyond = 0  # bytes relayed past ``RELAYED_KEPT_BYTES``, counted only
        self._crlf = False  # the backend ends its lines with CR LF
        self._carry = b""  # in CRLF mode: a CR at a chunk's end, which may start a CR LF

    def feed(self, chunk: bytes) -> bytes:
        if self._crlf:
            chunk = self._to_lf(chunk)
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            if not self._crlf and b"\r\n\r\n" in data:
                # Not one LF-separated event, but a CRLF-separated one: the backend's lines
                # end in CR LF. Found on the first event, and only looked for while no event
                # has been seen, so LF streams never pay for it.
                self._crlf = True
                self._pending = b""
                return self.feed(data)
            self._pending = data
            return b""
        if end == len(data):  # the usual case: whole events only, nothing to copy
            complete, self._pending = data, b""
        else:
            complete, self._pending = data[:end], data[end:]
        # A stream's last chunk ends with its [DONE]: checked first, it spares a scan. A
        # Responses stream sends none: its end is found with its usage (``_last_usage``).
        if not self.done and (complete.endswith(_DONE_TAIL) or _DONE_EVENT in complete):
            self.done = True
        # Nearly every chunk holds no usage object (``"usage":null`` does not count) and is
        # forwarded as it came. Otherwise only the events holding one are looked at: under
        # load one read often brings dozens of events, and splitting them all is wasted work.
        kept = self._kept < RELAYED_KEPT_BYTES
        if kept:
            self.relayed.append(complete)
            self._kept += len(complete)
        else:
            self._beyond += len(complete)
        if not self.strip_usage_chunk:
            self._last_usage(complete)
            return complete
        at = _find_usage(complete, 0)
        if at < 0:
            return complete
        parts: list[bytes] = []
        copied = 0  # complete[:copied] is settled (in ``parts`` or dropped)
        while at >= 0:
            first = complete.rfind(b"\n\n", 0, at)
            first = 0 if first < 0 else first + 2
            last = complete.find(b"\n\n", at)  # found: ``complete`` ends with a blank line
            if self._inspect(complete[first:last]):
                parts.append(complete[copied:first])
                copied = last + 2
            at = _find_usage(complete, last + 2)
        if copied == 0:
            return complete
        parts.append(complete[copied:])
        forwarded = b"".join(parts)
        if kept:
            self.relayed[-1] = forwarded
        return forwarded

    def _last_usage(self, complete: bytes) -> None:
        """Read the last usage object of ``complete`` (whole events), searching from its end;
        note the end of a Responses stream on the way.

        Why backwards: the usage a stream reports is its last one (the final chunk of a chat
        stream, the event that ends a Responses stream), and it comes right before the end,
        so the search reads a few hundred bytes instead of the whole chunk; a forward search
        for the key was a third of the cost of relaying a 33-event stream. An event that
        holds the key but no readable usage is passed over for the one before it.

        The event that ends a Responses stream is the last of its chunk and always holds
        the key (in its ``response``), but may hold ``"usage":null`` (``response.failed``).
        So the last key of a chunk of named events, when it is a null one, is where the
        end of such a stream is looked for: chunks without the key (nearly all of them)
        and chat chunks (they start with ``data:``) pay nothing for it."""
        size = end = len(complete)
        while (at := complete.rfind(_USAGE_KEY, 0, end)) >= 0:
            after = complete[at + 8 : at + 10]
            if after[:1] != b"{" and after != b" {":  # ``null``: not a usage object
                if end == size and complete[0] == _E and not self.done:
                    self._null_usage_end(complete, at)
                end = at
                continue
            first = complete.rfind(b"\n\n", 0, at)
            first = 0 if first < 0 else first + 2
            last = complete.find(b"\n\n", at)  # found: ``complete`` ends with a blank line
            before = self.usage
            # The key found is a usage object's: no need for ``_inspect``'s checks.
            self._read_usage(complete[first:last])
            if self.usage is not before:
                return
            end = first

    def _null_usage_end(self, complete: bytes, at: int) -> None:
        """The chunk's last usage key, at ``at``, is a null one: if its event ends a Responses
        stream (``response.failed`` without usage), the stream has ended.

        What the record gets then: the stream ended (the client has the backend's own
        account of the failure, so no ``StreamInterrupted`` may follow it), and no usage is
        made up here: a zero would pass for the backend's exact count and settle the limiter
        at nothing. ``usage`` stays None, as for any stream that ends without usage (the
        relay estimates it then), and ``failed`` is set."""
        first = complete.rfind(b"\n\n", 0, at)
        first = 0 if first < 0 else first + 2
        if complete.startswith(_RESPONSE_END_LINES, first):
            self.done = True
            self.failed = complete.startswith(_FAILED_LINE, first)

    def flush(self) -> bytes:
        """Whatever partial event is left at the end of the stream."""
        rest, self._pending = self._pending + self._carry, b""
        self._carry = b""
        return rest

    def _to_lf(self, chunk: bytes) -> bytes:
        """``chunk`` with CR LF as LF; a CR at its end waits for the next chunk."""
        if self._carry:
            chunk, self._carry = self._carry + chunk, b""
        if chunk.endswith(b"\r"):
            chunk, self._carry = chunk[:-1], b"\r"
        return chunk.replace(b"\r\n", b"\n")

    @property
    def relayed_bytes(self) -> int:
        """The bytes of events ``relayed`` holds: a bound of the UTF-8 bytes of
        ``relayed_text``, known without extracting it (whether an estimate from it is
        counted inline or in the counting thread, ``tokens/offload.py``)."""
        return self._kept

    @property
    def relayed_share(self) -> float:
        """The share of the bytes relayed that ``relayed`` holds (1.0 unless the stream went
        past ``RELAYED_KEPT_BYTES``): an estimate from ``relayed_text`` is scaled by its
        inverse."""
        total = self._kept + self._beyond
        return self._kept / total if total else 1.0

    def _inspect(self, event: bytes) -> bool:
        """Look at one event; True when it must be dropped."""
        if event.endswith(b"[DONE]"):
            self.done = True
            return False
        if _USAGE_MARKERS[0] not in event and _USAGE_MARKERS[1] not in event:
            return False
        return self._read_usage(event)

    def _read_usage(self, event: bytes) -> bool:
        """Parse an event that holds a usage object's key; True when it must be dropped."""
        payload = _event_data(event)
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        # The type, not a search of the event's bytes: the final event of a Responses
        # stream holds the whole answer, and its text may name any event.
        kind = obj.get("type")
        if kind in _RESPONSE_ENDS and isinstance(obj.get("response"), dict):
            obj = obj["response"]
            self.done = True
            self.failed = kind == "response.failed"
        usage = usage_from_object(obj.get("usage"))
        if usage is None:
            return False
        self.usage = usage
        model = model_name(obj.get("model"))
        if model is not None:
            self.model = model
        return self.strip_usage_chunk and obj.get("choices") == []

    def relayed_text(self) -> str:
        """The generated text that reached the client (for estimates after an abort)."""
        parts: list[str] = []
        for block in self.relayed:
            for event in block.split(b"\n\n"):
                if not event or event.endswith(b"[DONE]"):
                    continue
                try:
                    obj = orjson.loads(_event_data(event))
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                choices = obj.get("choices")  # untrusted: a non-list holds no text
                for choice in choices if isinstance(choices, list) else ():
                    if isinstance(choice, dict):
                        delta = choice.get("delta") or {}
                        text = delta.get("content") if isinstance(delta, dict) else None
                        if isinstance(text, str):
                            parts.append(text)
                        elif isinstance(choice.get("text"), str):
                            parts.append(choice["text"])
                if isinstance(obj.get("delta"), str):  # Responses API text deltas
                    parts.append(obj["delta"])
        return "".join(parts)


def _event_data(event: bytes) -> bytes:
    """The concatenated ``data:`` lines of one SSE event."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)
