"""What the request path keeps of one request for the message log: references to bytes it
holds anyway, nothing parsed, nothing copied.

The pipeline makes a ``MessageCapture`` for a request whose product has ``message_log``
(once its deployment is known), the relay wraps its ``send`` with ``tee`` to keep the answer's
body as it goes out, and the pipeline's ``finish`` hands everything to the message log with the
request's usage record. All parsing, flattening and writing happen in the log's thread
(``sink.MessageLog``).

A JSON answer's body parts are kept up to ``ANSWER_KEPT_FACTOR × max_bytes`` (past that
it cannot be parsed anyway, and its beginning is logged raw: a copy of at most ``max_bytes``
when the answer's first part is already past the limit). What an answer keeps is reserved
against the log's ``max_pending_bytes`` before it is kept, as a stream's events are (but
leaving a block of ``RESERVE_BYTES`` free for the bodies of requests finishing meanwhile), and
stays charged until its entry is written: many large answers to slow clients at once cannot grow
the log's memory (nor keep the relay's parts alive) past its budget. An answer whose parts
find the budget spent keeps the beginning that fits (at most ``CUT_KEPT_BYTES``, logged raw, its
entry ``ResponseTruncated``; counted as an answer cut) and gives back the rest, so that
the answers that fit are logged whole. A successful embeddings answer is not
kept at all: its vectors are not text, and parsing tens of MB of them in the log's thread
would hold the GIL, and so the event loop, for tens of ms. A stream's events are handed to
the log's thread every MiB as they go out (less under a small ``max_pending_bytes``:
``MessageLog.handoff_bytes``): that thread flattens them at once and keeps only
their text (up to ``max_bytes``), so a long stream holds at most that many bytes of events in
the request, never its whole answer.

What a stream holds for the log counts against the log's ``max_pending_bytes`` while the
stream runs, not only once it is queued: its events in hand are reserved in blocks of
``RESERVE_BYTES`` before they are kept, and the text the log's thread keeps for it is charged
as its events are handed over (at most ``max_bytes``: the text of events is never longer than
they are), until its entry is written. A stream whose events find the budget spent gives up the
events it holds and keeps no more (its entry has the text handed over before, if any, and says
``ResponseTruncated``; counted as a stream cut), so many concurrent streams cannot grow the
log's memory past its budget, and those that fit are logged whole.
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
#: A stream's events in hand are reserved against ``max_pending_bytes`` in blocks of this
#: many bytes: one lock per block, not per event (most streams need one).
RESERVE_BYTES = 16 * 1024
#: A whole answer whose part finds the budget spent keeps at most this much of its beginning
#: (logged raw) and gives back the rest of what it held, so that the answers that fit can be
#: logged whole rather than every large answer in flight ending cut.
CUT_KEPT_BYTES = 64 * 1024


class MessageCapture:
    """One request's share of the message log. Used from the event loop's thread, except
    ``text``, which only the log's thread touches (a stream's text so far)."""

    __slots__ = (
        "answer_limit",
        "cut",
        "error",
        "finished",
        "handed",
        "held",
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
        "text_charge",
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
        #: Bytes of a whole answer not kept (past ``answer_limit``, or the budget was spent).
        self.overflow = 0
        #: A whole answer's: some of it was not kept because ``max_pending_bytes`` was spent.
        self.cut = False
        #: The answer is an event stream.
        self.stream = False
        #: Events of the stream could not be kept (``max_pending_bytes`` was spent) or handed
        #: over (the log's queue was full): the rest of it is not kept either.
        self.lost = False
        #: The gateway's own refusal (status, code, message) when it answered for itself.
        self.error: tuple[int, str, str] | None = None
        #: The stream's text so far: the log's thread's.
        self.text: StreamText | None = None
        #: Handed to the log (``finish``).
        self.finished = False
        #: Bytes reserved for what ``parts`` holds (at least ``size``): a stream's events in
        #: hand, a whole answer's parts.
        self.held = 0
        #: A stream's: bytes of events handed to the log's thread so far.
        self.handed = 0
        #: A stream's: bytes charged for the text the log's thread keeps of those events.
        self.text_charge = 0

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
        if self.finished:  # handed to the log already: nothing more is logged
            return
        if self.overflow:  # only the beginning is logged: the rest is counted, not kept
            self.overflow += len(body)
            return
        size = self.size + len(body)
        if size <= self.answer_limit and self._reserve(size - self.held):
            self.parts.append(body)
            self.size = size
            return
        # Past the limit, or past the budget: only the beginning is logged (raw), at most
        # ``max_bytes`` of it (``CUT_KEPT_BYTES`` when the budget is spent).
        self.cut = size <= self.answer_limit
        head = min(self.policy.max_bytes, CUT_KEPT_BYTES) if self.cut else self.policy.max_bytes
        self._trim(head)
        want = min(head - self.size, len(body))
        # A block is left free: requests finishing meanwhile need room for their bodies, or
        # their entries would be dropped whole for the sake of this one's answer.
        room = self.sink.reserve_some(want, RESERVE_BYTES) if want > 0 else 0
        if room:
            # A copy of the beginning that fits: the part itself may be much larger.
            self.parts.append(body[:room])
            self.size += room
            self.held += room
        self.overflow += len(body) - room
        # Cut for the budget only if something was lost: the log's thread may have given back
        # enough between the refused reservation and this one, and then the part is whole.
        self.cut = (self.cut or room < want) and self.overflow > 0

    def _reserve(self, more: int) -> bool:
        """Charge ``more`` bytes a whole answer keeps to the log's budget, leaving a block of
        it free for the requests finishing meanwhile (their bodies); False when they do not
        fit (nothing charged)."""
        if more <= 0:
            return True
        if not self.sink.reserve(more, RESERVE_BYTES):
            return False
        self.held += more
        return True

    def _trim(self, limit: int) -> None:
        """Keep at most ``limit`` bytes of the answer's parts (its beginning), giving back
        the reservation of the rest."""
        if self.size <= limit:
            return
        kept: list[bytes] = []
        size = 0
        for part in self.parts:
            if size + len(part) > limit:
                part = part[: limit - size]
            if part:
                kept.append(part)
                size += len(part)
            if size >= limit:
                break
        self.parts = kept
        self.overflow += self.size - size
        self.sink.release(self.held - size)
        self.size = self.held = size

    def _keep_events(self, body: bytes) -> None:
        if self.lost or self.finished:  # its text is not whole, or nothing more is logged
            return
        size = self.size + len(body)
        if size > self.held:
            more = max(size - self.held, RESERVE_BYTES)
            if not self.sink.reserve(more):
                # The budget is spent: this stream gives up what it holds and keeps nothing
                # more, so that the others can finish whole (keeping on, every stream would
                # lose some of its text).
                self.lost = True
                self.sink.release(self.held)
                self.parts = []
                self.size = 0
                self.held = 0
                return
            self.held += more
        self.parts.append(body)
        self.size = size
        if size >= self.sink.handoff_bytes:
            self._hand_over()

    def _hand_over(self) -> None:
        """Queue the events in hand for the log's thread. Their reservation stays charged
        until that thread has flattened them; then only what their text may add to what it
        keeps stays charged (``text_charge``, at most ``max_bytes`` for the whole stream)."""
        cap = self.policy.max_bytes
        text = min(self.handed + self.size, cap) - min(self.handed, cap)
        if self.sink.hand_over(self, self.parts, self.size, self.held - text):
            self.handed += self.size
            self.text_charge += text
        else:
            self.lost = True
            self.sink.release(self.held)
        self.parts = []
        self.size = 0
        self.held = 0

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
