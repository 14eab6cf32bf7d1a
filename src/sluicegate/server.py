"""Running the gateway under uvicorn (one worker; scale out with more processes)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from sluicegate.app import create_app
from sluicegate.config.model import GatewayConfig, ListenConfig, SecurityConfig, TimeoutsConfig
from sluicegate.gateway import Gateway
from sluicegate.logs import configure_logging
from sluicegate.metrics.registry import GatewayMetrics
from sluicegate.openfiles import raise_open_file_limit
from sluicegate.proxy.asgi import DISCONNECT_HOOK, DisconnectHook, disconnect_hook

_BAD_REQUEST = orjson.dumps(
    {
        "error": {
            "code": "InvalidRequest",
            "message": "The HTTP request is malformed (for example a header value with CR or "
            "LF characters, or an invalid request line). Fix the request and send it again.",
        }
    }
)


_DEFAULT_SECURITY = SecurityConfig()
_DEFAULT_LISTEN = ListenConfig()

log = logging.getLogger("sluicegate.server")

#: Seconds a connection refused for ``listen.max_connections`` is kept after its answer,
#: half-closed, so that the rest of its request does not reset the connection (a reset can
#: discard the answer before the client read it).
_LINGER_SECONDS = 2.0

#: Descriptors kept for everything but client and backend connections (listening sockets,
#: the ledger, Redis, logs, token and key-vault requests).
_RESERVED_FILES = 256
#: The interpreter's thread switch interval while serving (see ``serve``).
SWITCH_INTERVAL_SECONDS = 0.0001


#: A first body write at least this long leaves with the head in a gathered write
#: (``writelines``: one ``writev``, no copy); a shorter one is joined to it. Measured on
#: uvloop: gathering saves ~0.7 µs on a 10 KB stream and costs ~0.2 µs on an 800-byte
#: JSON answer (its write context is dearer than the copy).
_GATHER_FROM = 4096

#: Linux's ``struct tcp_info`` (``include/uapi/linux/tcp.h``) as far as ``tcpi_bytes_acked``
#: (kernel 4.1 on): eight one-byte fields (bytes 0–8), 24 ``__u32`` (8–104), then the
#: ``__u64`` pacing rates (104–112, 112–120) and ``tcpi_bytes_acked`` at byte 120, in the
#: machine's byte order. The bytes of the connection's data its peer acknowledged: it only
#: grows, new answer bytes leave it alone, and it moves as soon as the client's kernel takes
#: data, where the transport's buffer moves only when the kernel wakes its writer (after half
#: of a send buffer of up to ``tcp_wmem``'s 4 MB was freed).
_TCP_INFO_LENGTH = 128
_TCP_INFO_BYTES_ACKED = 120
_U64 = struct.Struct("=Q")
#: Elsewhere (macOS, the BSDs) ``TCP_INFO`` is missing or laid out otherwise.
_HAS_TCP_INFO = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")


def _bytes_acked(transport: asyncio.BaseTransport) -> int:
    """The bytes of ``transport``'s connection that its peer acknowledged (one
    ``getsockopt(TCP_INFO)``), or -1 where the kernel does not tell: not Linux, not TCP (a
    Unix socket), a kernel before 4.1 (a shorter ``tcp_info``), a socket already closed."""
    if not _HAS_TCP_INFO:
        return -1
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
    except (OSError, ValueError):  # not TCP, or its descriptor already closed
        return -1
    if len(info) < _TCP_INFO_LENGTH:
        return -1
    acked: int = _U64.unpack_from(info, _TCP_INFO_BYTES_ACKED)[0]
    return acked


#: The interim response uvicorn writes when a request says ``Expect: 100-continue``.
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _HeadHoldingTransport:
    """A response's transport that holds the status line and headers until the first body
    write, so that a response goes out in one ``write`` (one system call) instead of two.

    Why: uvicorn writes the head as soon as the app sends ``http.response.start`` and the
    body at ``http.response.body``; the gateway sends both in the same step, and a system
    call per response was ~3 % of its CPU. A head is never held past the current turn of the
    event loop (a callback sends it then), so an app that starts a response and then waits
    still shows its headers at once. Everything but ``write`` passes through.
    """

    __slots__ = ("_held", "_loop", "_transport", "_wrote_head")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        # No reference to the request cycle (it holds this object): a cycle of references
        # would keep every request's objects alive until the garbage collector runs.
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._wrote_head = False

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            # The connection is gone (or going): dropped, as asyncio's own transports drop
            # writes after a lost connection; uvloop's raise instead.
            return
        if self._held is not None:
            held, self._held = self._held, None
            if len(data) >= _GATHER_FROM:
                # One system call still (a gathered write), without copying the body.
                self._transport.writelines((held, data))
            else:
                self._transport.write(held + data)
        elif not self._wrote_head and data != _CONTINUE:
            # The first write is the head, unless it is the interim "100 Continue" that
            # uvicorn writes before the response starts (that one goes out at once).
            self._wrote_head = True
            self._held = data
            self._loop.call_soon(self._release)
        else:
            self._transport.write(data)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ExpectingCycle(RequestResponseCycle):
    """The cycle of a request that said ``Expect: 100-continue`` (``GatewayHttpProtocol``
    gives it this class). uvicorn sends ``100 Continue`` only when the app first reads the
    body; answered before that (401, 404, 413 from the head), the client may never send the
    body (RFC 9110 §10.1.1), and waiting for it would hold the connection for
    ``body_timeout``. Such an answer says ``connection: close``, and the protocol closes the
    connection after it (``on_response_complete``: half-close, then close)."""

    #: Answered before ``100 Continue`` with the body not all in: close after the answer.
    close_after = False

    async def send(self, message: Any) -> None:
        if not self.response_started and self.waiting_for_100_continue and self.more_body:
            self.close_after = True
            keep_alive, self.keep_alive = self.keep_alive, False  # the head says close
            try:
                await super().send(message)
            finally:
                # The protocol closes, half-closing first (``_linger``): uvicorn's plain
                # close would reset a connection whose client sends its body after all, and
                # a reset can discard the answer before the client read it.
                self.keep_alive = keep_alive
            return
        await super().send(message)


class _ConnectionHook(DisconnectHook):
    """A request's disconnect hook on a ``GatewayHttpProtocol`` connection: ``abort`` also
    tells the requests in flight at once (``GatewayHttpProtocol._aborted``)."""

    __slots__ = ()

    def abort(self) -> None:
        transport = self.transport
        if transport is None:
            return
        # Looked up when needed rather than held: the hook is in the scope the protocol
        # holds, and a reference back would make a cycle of every request's objects.
        protocol = transport.get_protocol()
        super().abort()
        if isinstance(protocol, GatewayHttpProtocol):
            protocol._aborted()


@dataclass(slots=True)
class ConnectionCounts:
    """One server's client connections: open now, and refused since start for
    ``listen.max_connections`` (read by the metrics at each scrape)."""

    open: int = 0
    refused: int = 0


class _HeadRefused(Exception):
    """Raised from a parser callback when a head is past a limit; httptools turns it into
    a parser error, and ``send_400_response`` answers 431 instead."""


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering unparseable requests in Azure's error shape
    instead of uvicorn's plain-text 400 (clients parse ``{"error": …}``), and refusing
    request heads with more than ``max_header_count`` fields or more than
    ``max_header_bytes`` bytes (request line and headers) with 431, before the parser
    buffers them: httptools sets no limit of its own. A head must also arrive within
    ``head_timeout`` seconds (408; a connection that sends nothing is closed). A request
    answered before its body was all in (401, 404, 413, …) has ``body_timeout`` seconds from
    the answer for the rest of its body, which is dropped; past that the connection is
    half-closed and closed (``on_response_complete``); one that said ``Expect: 100-continue``
    and was answered before ``100 Continue`` went out (its client may never send the body)
    has none: the answer says ``connection: close`` and the connection is half-closed and
    closed at once (``_ExpectingCycle``). A client that takes nothing of an answer (any
    answer, the gateway's own included) for ``write_timeout`` seconds loses its connection
    (``_watch_writes``). ``protocol_for`` makes a subclass with a configuration's limits.

    A connection opened while ``max_connections`` others are open is refused: its first
    request's head is read (not parsed) and answered 503 ``TooManyConnections`` with
    ``Retry-After: 1``, and the connection is closed; the request never reaches the app.
    """

    max_connections: ClassVar[int] = _DEFAULT_LISTEN.max_connections
    counts: ClassVar[ConnectionCounts] = ConnectionCounts()
    max_header_count: ClassVar[int] = _DEFAULT_SECURITY.max_header_count
    max_header_bytes: ClassVar[int] = _DEFAULT_SECURITY.max_header_bytes
    head_timeout: ClassVar[float] = _DEFAULT_SECURITY.head_read_timeout_seconds
    body_timeout: ClassVar[float] = _DEFAULT_SECURITY.body_read_timeout_seconds
    write_timeout: ClassVar[float] = TimeoutsConfig().client_write

    _head_done = False
    #: Its bytes are only read, never parsed: opened past ``max_connections`` (its head is
    #: read for the 503, ``_busy_read``), or lingering before the close (``_linger``).
    _busy = False
    _head_bytes = 0
    _head_tail = b""
    _header_count = 0
    _refused = False
    #: No message begun since the last one ended: the next read starts with a head.
    _between = True
    #: A message that begins in the current read begins at its start (its head is counted).
    _read_starts_head = False
    #: The current head began inside a read, after an earlier message: not counted raw.
    _uncounted = False
    #: Fires ``head_timeout`` after a connection opens, or after a head's first read when
    #: the head did not come whole; cancelled when the head is complete.
    _head_timer: asyncio.TimerHandle | None = None
    #: Cycles of earlier requests on this connection still being answered while a pipelined
    #: one waits (None: none so far; see ``on_headers_complete``).
    _earlier: list[Any] | None = None
    #: Fires ``body_timeout`` after a request was answered before its body was all in,
    #: unless the rest of the body came (``on_response_complete``).
    _drain_timer: asyncio.TimerHandle | None = None
    #: Fires ``write_timeout`` after answer bytes were left unsent (``_watch_writes``).
    _write_timer: asyncio.TimerHandle | None = None
    #: Bytes in the transport's buffer at the write watch's last look (raised when a later
    #: answer adds some before the next), whether the buffer went below its low-water mark
    #: since (``resume_writing``), and the bytes the client acknowledged then
    #: (``_bytes_acked``, -1: unknown): each tells the client took some.
    _write_left = 0
    _write_resumed = False
    _write_acked = -1
    #: The write watch's looks in a row that found a response in progress (its sender's own
    #: bound goes first: ``_write_check``).
    _write_waits = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        counts = self.counts
        counts.open += 1
        if counts.open > self.max_connections:
            counts.refused += 1
            self._busy = self._refused = True
        # uvicorn sets no timer until a first response is complete: a connection that sends
        # nothing, or a head a byte at a time, would be held for ever (slowloris).
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self._busy:
                self._busy_read(data)
            return  # the answer is sent and the connection is closing
        self._read_starts_head = self._between
        if not self._head_done:
            # The head is counted before the parser sees it: httptools would otherwise
            # gather an endless header field. Only the head (up to the blank line), not a
            # body in the same read; the blank line is looked for only when the count would
            # pass the limit, since a read below it cannot.
            size = self._head_bytes + len(data)
            if size > self.max_header_bytes:
                tail = self._head_tail
                end = (tail + data if tail else data).find(b"\r\n\r\n")
                if end < 0 or self._head_bytes + max(0, end + 4 - len(tail)) > (
                    self.max_header_bytes
                ):
                    self._refuse_head()
                    return
            self._head_bytes = size
        super().data_received(data)
        if not self._head_done and not self._between:
            self._head_tail = data[-3:]  # a head goes on in the next read
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def on_message_begin(self) -> None:
        if self.timeout_keep_alive_task is not None:
            # Set by ``on_message_complete`` after a dropped body, in this same read: the
            # connection is no longer idle.
            self._unset_keepalive_if_required()
        self._head_done, self._header_count = False, 0
        self._uncounted = not self._read_starts_head
        self._between = self._read_starts_head = False
        super().on_message_begin()
        # The request's disconnect hook (proxy.asgi.DisconnectHook): relays register a
        # callback here instead of keeping a task blocked in receive().
        # (ASGI extension values are dicts.) It holds the transport (for ``abort``), not
        # this protocol, which holds the scope: no reference cycle per request.
        self.scope["extensions"] = {DISCONNECT_HOOK: {"hook": _ConnectionHook(self.transport)}}

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next bytes are the next request's head: ``data_received`` counts them again.
        self._head_done, self._head_bytes, self._head_tail = False, 0, b""
        self._between = True
        if not self.pipeline:
            # uvicorn pauses reading while more than 64 KiB of body waits for the app and
            # resumes only at the app's next read: after the last part of a large body it
            # stayed paused, and a client hanging up mid-stream was not heard until a write
            # failed (the backend generating for nobody meanwhile). Nothing of this message
            # is left to hold back; a pipelined request pauses reading again (uvicorn's
            # on_headers_complete), hence only with none queued.
            self.flow.resume_reading()
        if self._drain_timer is not None:
            # An early-answered request's body came in time (and was dropped): the
            # connection is idle now, under uvicorn's keep-alive timer as after any answer
            # (its data_received stopped the one the answer set).
            self._drain_timer.cancel()
            self._drain_timer = None
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        left = self.transport.get_write_buffer_size()
        if left:
            if self._write_timer is None:
                # The answer is not all sent: uvicorn's close (keep-alive timeout,
                # ``connection: close``) would wait for it without limit.
                self._watch_writes()
            elif left > self._write_left:
                # A later answer's bytes (keep-alive) are not the client's stalling.
                self._write_left = left
        if self._head_done and self.cycle.response_complete and not self.transport.is_closing():
            # Answered before its body was all in (401/403 at authentication, 404 for a
            # refused path, 413 from content-length). uvicorn keeps the connection and drops
            # the rest of the body, but its keep-alive timer stops at the next read and
            # nothing sets one again: a body byte now and then would hold the connection
            # (and a slot of max_connections) for ever. The rest of the body has
            # ``body_timeout`` from the answer, as a body the app reads has; then the
            # connection lingers and closes. Not ``connection: close`` on every early answer:
            # a client that sends its whole body at once (the SDKs) keeps its connection,
            # and a request pipelined behind the body is still served (nginx discards such
            # a body too, within lingering_time).
            self._unset_keepalive_if_required()
            if isinstance(self.cycle, _ExpectingCycle) and self.cycle.close_after:
                # Answered before "100 Continue", with ``connection: close``: the client
                # need not send the body, so none is waited for.
                self._linger()
                return
            self._drain_timer = self.loop.call_later(self.body_timeout, self._drain_timed_out)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._watch_writes()
        else:
            left = self.transport.get_write_buffer_size()
            if left > self._write_left:
                self._write_left = left  # as in ``on_response_complete``

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_resumed = True

    def _watch_writes(self, acked: int | None = None) -> None:
        """Watch a connection with answer bytes unsent: dropped (``_write_check``) once the
        client has taken nothing for ``write_timeout`` seconds. Every answer is covered, the
        gateway's own (the admin API's and the dashboard's, ``/metrics``) and relayed ones
        alike: uvicorn's ``send`` waits for a full buffer without limit, and its close waits
        for the unsent bytes to be written, so a client that stops reading would otherwise
        hold its connection, and a slot of ``max_connections``, for ever.

        "Taken" is measured in the kernel where it tells (Linux: the bytes the client
        acknowledged, ``_bytes_acked``; ``acked`` when the caller just read them), else only
        by the transport's buffer going down. The buffer alone misses slow readers: the
        kernel's send buffer grows to megabytes and wakes the writer only once half of it is
        free, so a client taking 200 KB/s can leave the buffer unmoved for seconds. One
        ``getsockopt`` when a watch starts and one per look, nothing per request."""
        self._write_left = self.transport.get_write_buffer_size()
        self._write_resumed = False
        self._write_acked = _bytes_acked(self.transport) if acked is None else acked
        self._write_timer = self.loop.call_later(self.write_timeout, self._write_check)

    def _write_check(self) -> None:
        self._write_timer = None
        transport = self.transport
        left = transport.get_write_buffer_size()
        if left == 0:
            self._write_waits = 0
            return  # all sent
        acked = _bytes_acked(transport)
        if left < self._write_left or self._write_resumed or acked > self._write_acked:
            self._write_waits = 0
            self._watch_writes(acked)  # the client takes something: slow, not gone
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and self._write_waits == 0:
            # A response in progress: its sender's own bound goes first (the relay's
            # ``client_write``, which records the request as ``ClientWriteTimeout``); this
            # one acts one period later, for senders without one.
            self._write_waits = 1
            self._watch_writes(acked)
            return
        log.info(
            "a client took nothing of its answer for %g s (%d bytes unsent): connection dropped",
            self.write_timeout * (1 + self._write_waits),
            left,
        )
        self._write_waits = 0
        transport.abort()
        self._aborted()

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing():
            self._linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self.counts.open -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        cycles = [*(self._earlier or ()), self.cycle]
        super().connection_lost(exc)  # tells ``self.cycle`` only
        for cycle in cycles:
            if cycle is None:
                continue
            if not cycle.response_complete and not cycle.disconnected:
                cycle.disconnected = True
                cycle.message_event.set()
            if cycle.disconnected:
                hook = disconnect_hook(cycle.scope)
                if hook is not None:
                    hook.fire()

    def _aborted(self) -> None:
        """The connection was aborted (``_ConnectionHook.abort``): every request still in
        flight hears it now, not when ``connection_lost`` comes (a turn of the loop later, or
        more over TLS). Otherwise uvicorn, finding the response unfinished when the app
        returns, logs an error for it and, if it had not started, begins a 500 for nobody.
        ``connection_lost`` still runs the disconnect hooks."""
        for cycle in (*(self._earlier or ()), self.cycle):
            if cycle is not None and not cycle.response_complete and not cycle.disconnected:
                cycle.disconnected = True
                cycle.message_event.set()
        self.flow.resume_writing()  # a send waiting for the buffer to drain returns

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_header_count:
            self._refused = True
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._uncounted:
            # A pipelined head that began in the read that ended the message before it:
            # ``data_received`` did not see where it started. Counted now, as parsed (that
            # read is all in memory already; later reads of it were counted raw).
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self.max_header_bytes:
                self._refused = True
                raise _HeadRefused
        self._head_done, self._head_tail = True, b""
        earlier = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if earlier is not None and cycle is not earlier and not earlier.response_complete:
            # A pipelined request: uvicorn queues it behind the one being answered, but its
            # ``self.cycle`` is now the queued one's, and only that cycle hears of a lost
            # connection. The one being answered would go on writing to a closed transport
            # (a 500 recorded as the backend's error, a stream relayed to nobody).
            self._earlier = [c for c in self._earlier or () if not c.response_complete]
            self._earlier.append(earlier)
        elif self._earlier:
            # No longer pipelining: let the answered requests' objects go.
            self._earlier = [c for c in self._earlier if not c.response_complete] or None
        if cycle is not None and self.expect_100_continue:
            # Rare (curl, for large bodies), hence a class of its own, not a check per send.
            cycle.__class__ = _ExpectingCycle
        if cycle is not None:
            # Duck-typed: it passes everything but write() through to the real transport.
            cycle.transport = cast(
                asyncio.Transport, _HeadHoldingTransport(cycle.transport, self.loop)
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._busy:  # refused: answered and lingering, or silent; either way, done
            self.transport.close()
            return
        if self._head_done or self._refused or self.transport.is_closing():
            return
        self._refused = True
        if self._between:  # not a byte of a request yet: nothing to answer
            self.transport.close()
            return
        message = (
            f"The request's head did not arrive within {self.head_timeout:g} seconds. Send "
            "the request line and headers promptly."
        )
        body = orjson.dumps({"error": {"code": "RequestTimeout", "message": message}})
        self._write_and_close(b"408 Request Timeout", body)

    def _busy_read(self, data: bytes) -> None:
        """A refused connection's bytes: once its head is in (or past the head limit),
        answer 503 and half-close; whatever comes after is dropped."""
        if self._head_done:  # answered: lingering until the client closes
            return
        window = self._head_tail + data
        self._head_bytes += len(data)
        if b"\r\n\r\n" not in window and self._head_bytes <= self.max_header_bytes:
            self._head_tail = window[-3:]
            return
        message = (
            f"The gateway holds its limit of {self.max_connections} client connections. "
            "Retry shortly, and reuse connections (keep-alive) rather than opening new ones."
        )
        body = orjson.dumps({"error": {"code": "TooManyConnections", "message": message}})
        self.transport.write(_answer(b"503 Service Unavailable", body, b"retry-after: 1\r\n"))
        self._linger()

    def _linger(self) -> None:
        """Half-close, then read and drop whatever the client still sends until it closes,
        for at most ``_LINGER_SECONDS``; then close. (Closed with unread bytes, the
        connection would be reset, and a reset can discard an answer the client has not
        read yet.)"""
        self._refused = self._busy = self._head_done = True
        transport = self.transport
        if self._head_timer is not None:
            self._head_timer.cancel()
        if transport.can_write_eof():
            transport.write_eof()
            self._head_timer = self.loop.call_later(_LINGER_SECONDS, self._head_timed_out)
        else:  # TLS cannot half-close
            self._head_timer = None
            transport.close()

    def _refuse_head(self) -> None:
        self._refused = True
        message = (
            f"The request has more than {self.max_header_count} header fields or a head "
            f"longer than {self.max_header_bytes} bytes. Send fewer or smaller headers."
        )
        body = orjson.dumps({"error": {"code": "RequestHeaderFieldsTooLarge", "message": message}})
        self._write_and_close(b"431 Request Header Fields Too Large", body)

    def send_400_response(self, msg: str) -> None:
        if self._refused:  # a callback refused the head (past a limit)
            self._refuse_head()
            return
        self._write_and_close(b"400 Bad Request", _BAD_REQUEST)

    def _write_and_close(self, status: bytes, body: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's head is refused while an earlier response is still being
            # written: an answer now would interleave with it. Just hang up.
            self.transport.close()
            return
        self.transport.write(_answer(status, body))
        self.transport.close()


def _answer(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole ``connection: close`` answer with a JSON ``body``; ``extra``: header lines."""
    return b"".join(
        (
            b"HTTP/1.1 " + status + b"\r\n",
            b"content-type: application/json; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            extra,
            b"connection: close\r\n\r\n",
            body,
        )
    )


def protocol_for(
    security: SecurityConfig,
    listen: ListenConfig = _DEFAULT_LISTEN,
    write_timeout: float = GatewayHttpProtocol.write_timeout,
) -> type[GatewayHttpProtocol]:
    """The HTTP protocol class with ``security``'s header limits, ``listen``'s connection
    limit and ``write_timeout`` (seconds a client may take nothing of an answer), counting
    its connections in a ``ConnectionCounts`` of its own (``counts``)."""
    return type(
        "GatewayHttpProtocol",
        (GatewayHttpProtocol,),
        {
            "max_connections": listen.max_connections,
            "counts": ConnectionCounts(),
            "max_header_count": security.max_header_count,
            "max_header_bytes": security.max_header_bytes,
            "head_timeout": security.head_read_timeout_seconds,
            "body_timeout": security.body_read_timeout_seconds,
            "write_timeout": write_timeout,
        },
    )


def write_timeout_for(config: GatewayConfig) -> float:
    """How long a client may take nothing of any answer before its connection is dropped:
    the longest of the backends' ``timeouts.client_write`` (so that a relay's own, shorter
    bound always acts first on its answers), the default where there are no backends."""
    return max(
        (backend.timeouts.client_write for backend in config.backends),
        default=TimeoutsConfig().client_write,
    )


def uvicorn_config(
    app: Any,
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    loop: str = "uvloop",
    metrics: GatewayMetrics | None = None,
) -> uvicorn.Config:
    """uvicorn's settings for serving ``app`` as ``config`` says: header and connection
    limits, TLS when ``listen.tls_cert``/``tls_key`` are set, no proxy headers
    (``X-Forwarded-For`` is believed only from configured proxies, in ``proxy.network``).
    ``metrics`` (when given) exports the connection counts."""
    listen = config.listen
    protocol = protocol_for(config.security, listen, write_timeout_for(config))
    if metrics is not None:
        metrics.watch_connections(protocol.counts)
    return uvicorn.Config(
        app,
        host=host or listen.host,
        port=listen.port if port is None else port,
        loop=loop,
        http=protocol,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is trusted only from configured proxies
        date_header=False,
        timeout_graceful_shutdown=int(listen.graceful_shutdown_seconds),
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=config.security.max_header_bytes,
        ssl_certfile=listen.tls_cert,
        ssl_keyfile=listen.tls_key,
    )


def build_server(
    config: GatewayConfig, *, host: str | None = None, port: int | None = None
) -> uvicorn.Server:
    gateway = Gateway(config)
    app = create_app(gateway)
    return uvicorn.Server(
        uvicorn_config(app, config, host=host, port=port, metrics=gateway.metrics)
    )


def _open_file_budget(config: GatewayConfig) -> None:
    """Raise the open-file limit to what ``config`` may need (one descriptor per client and
    backend connection), or warn when the hard limit does not allow it: past the limit,
    accepting and connecting fail for every request, not only for the newest."""
    needed = (
        config.listen.max_connections
        + sum(backend.max_connections for backend in config.backends)
        + _RESERVED_FILES
    )
    limit = raise_open_file_limit(needed)
    if limit is not None and limit < needed:
        log.warning(
            "the open-file limit is %d, below the %d that listen.max_connections (%d) and "
            "the backends' max_connections may need: raise the hard limit (ulimit -n, "
            "systemd LimitNOFILE=) or lower listen.max_connections",
            limit,
            needed,
            config.listen.max_connections,
        )


def serve(config: GatewayConfig, *, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGINT/SIGTERM: then stop accepting, let in-flight requests finish within the
    grace period, flush the ledger and exit 0."""
    configure_logging(config.logging.level)
    # The ledger writer and the rollup job are threads; when one of them holds the GIL the
    # event loop waits up to the switch interval (5 ms by default) to get it back, and a
    # request waits once per wake-up of the loop (its body, the backend's answer, …). At one
    # connection the writer's batches then set the 99th percentile: 0.1 ms instead of 0.5 ms
    # took it from ~1.3 to ~0.9 ms on the benchmark host, with no measurable cost at 64
    # connections (bench/analysis.md). (The writer's CPU use on a shared core is
    # sluicegate.threads' business; this only caps the GIL hand-off.)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    _open_file_budget(config)
    server = build_server(config, host=host, port=port)

    # uvicorn handles SIGINT/SIGTERM itself while it runs and, once it has shut down
    # gracefully, re-raises the signal to the handler that was there before. Make that handler
    # a clean exit, so that a graceful stop ends with status 0 (and a signal that arrives
    # before uvicorn is listening still stops the process).
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(0 if server.started else 1)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    server.run()
    return 0 if server.started else 1
