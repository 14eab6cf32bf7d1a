"""What the request path keeps of one request for the message log: references to bytes it
holds anyway, nothing parsed, nothing copied.

The pipeline makes a ``MessageCapture`` for a request whose product has ``message_log``
(once its deployment is known), the relay wraps its ``send`` with ``tee`` to keep the answer's
body as it goes out, and the pipeline's ``finish`` hands everything to the message log with the
request's usage record. All parsing, flattening and writing happen in the log's thread
(``sink.MessageLog``).

A JSON answer's body parts are kept up to ``ANSWER_KEPT_FACTOR × max_bytes`` (past that
it cannot be parsed anyway, and its beginning is logged raw: a copy of at most ``max_bytes``
when the answer's first part is already past the limit). A successful embeddings answer is not
kept at all: its vectors are not text, and parsing tens of MB of them in the log's thread
would hold the GIL, and so the event loop, for tens of ms. A stream's events are handed to
the log's thread every ``STREAM_HANDOFF_BYTES`` as they go out: that thread flattens them
at once and keeps only their text (up to ``max_bytes``), so a long stream holds at most
that many bytes of events in the request, never its whole answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sluicegate.messages.config import MessageLogPolicy
from sluicegate.proxy.asgi import Message, Send

if TYPE_CHECKING:
    from sluicegate.accounting.records import UsageRecord
    from sluicegate.messages.flatten import StreamText
    from sluicegate.messages.sink import MessageLog

#: A whole answer is kept (by reference) up to this many times ``max_bytes`` of raw body.
ANSWER_KEPT_FACTOR = 4
#: A stream's events go to the log's thread in batches of about this many bytes.
STREAM_HANDOFF_BYTES = 1024 * 1024


class MessageCapture:
    """One request's share of the message log. Used from the event loop's thread, except
    ``text``, which only the log's thread touches (a stream's text so far)."""

    __slots__ = (
        "answer_limit",
        "error",
        "finished",
        "lost",
        "model",
        "operation",
        "overflow",
        "parts",
        "path",
        "policy",
        "query",
        "sink",
        "size",
        "stream",
        "text",
    )

    def __init__(
        self,
        policy: MessageLogPolicy,
        sink: MessageLog,
        path: str,
        query: bytes,
        model: str | None,
        operation: str = "",
    ) -> None:
        """``path`` and ``query``: the request's (for the API version); ``model``: the
        deployment's configured model, for an entry whose answer named none; ``operation``:
        the route's (``embeddings``: a successful answer is not kept)."""
        self.policy = policy
        self.operation = operation
        self.sink = sink
        self.path = path
        self.query = query
        self.model = model
        self.answer_limit = ANSWER_KEPT_FACTOR * policy.max_bytes
        #: The answer's body parts kept (a stream's since the last hand-over).
        self.parts: list[bytes] = []
        self.size = 0
        #: Bytes of a whole answer beyond ``answer_limit``, not kept.
        self.overflow = 0
        #: The answer is an event stream.
        self.stream = False
        #: Events of the stream could not be handed over (the log's queue was full).
        self.lost = False
        #: The gateway's own refusal (status, code, message) when it answered for itself.
        self.error: tuple[int, str, str] | None = None
        #: The stream's text so far: the log's thread's.
        self.text: StreamText | None = None
        #: Handed to the log (``finish``).
        self.finished = False

    def tee(self, send: Send, stream: bool, status: int) -> Send:
        """``send``, keeping the answer's body as it goes out (nothing when the product
        does not log completions, nor of a successful embeddings answer). ``stream``: the
        answer is an event stream; ``status``: its status."""
        if not self.policy.completions or (status < 300 and self.operation == "embeddings"):
            return send
        self.stream = stream
        keep = self._keep_events if stream else self._keep_answer

        async def teed(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body")
                if body:
                    keep(body)
            await send(message)

        return teed

    def _keep_answer(self, body: bytes) -> None:
        if self.overflow or self.size + len(body) > self.answer_limit:
            # Only the beginning is logged (raw): a part past the limit that finds less than
            # that kept (a whole answer comes in one part) leaves a copy of what is missing.
            head = max(self.policy.max_bytes - self.size, 0)
            if head:
                self.parts.append(body[:head])
                self.size += head
            self.overflow += len(body) - head
            return
        self.parts.append(body)
        self.size += len(body)

    def _keep_events(self, body: bytes) -> None:
        self.parts.append(body)
        self.size += len(body)
        if self.size >= STREAM_HANDOFF_BYTES:
            if not self.sink.hand_over(self, self.parts, self.size):
                self.lost = True
            self.parts = []
            self.size = 0

    def refused(self, status: int, code: str, message: str) -> None:
        """The gateway answered the request itself (a limit, a backend it could not reach):
        its error is the logged answer."""
        self.error = (status, code, message)

    def finish(
        self,
        record: UsageRecord,
        parsed: dict[str, Any] | None,
        body: bytes,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> None:
        """Hand the request to the log with its final ``record``: its ``body`` (``parsed``
        already, unless None), ``headers`` its headers (only the client's correlation id is
        read from them). Never blocks: a full log drops it (and counts it). Once: a later
        call does nothing."""
        if self.finished:
            return
        self.finished = True
        if not self.policy.prompts:
            self.sink.submit(record, self, None, 0, headers)
        else:
            self.sink.submit(record, self, body if parsed is None else parsed, len(body), headers)
