"""Running the gateway under uvicorn (one worker; scale out with more processes)."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any, ClassVar, cast

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sluicegate.app import create_app
from sluicegate.config.model import GatewayConfig, SecurityConfig
from sluicegate.gateway import Gateway
from sluicegate.logs import configure_logging
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
#: The interpreter's thread switch interval while serving (see ``serve``).
SWITCH_INTERVAL_SECONDS = 0.0001


#: A first body write at least this long leaves with the head in a gathered write
#: (``writelines``: one ``writev``, no copy); a shorter one is joined to it. Measured on
#: uvloop: gathering saves ~0.7 µs on a 10 KB stream and costs ~0.2 µs on an 800-byte
#: JSON answer (its write context is dearer than the copy).
_GATHER_FROM = 4096

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


class _HeadRefused(Exception):
    """Raised from a parser callback when a head is past a limit; httptools turns it into
    a parser error, and ``send_400_response`` answers 431 instead."""


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering unparseable requests in Azure's error shape
    instead of uvicorn's plain-text 400 (clients parse ``{"error": …}``), and refusing
    request heads with more than ``max_header_count`` fields or more than
    ``max_header_bytes`` bytes (request line and headers) with 431, before the parser
    buffers them: httptools sets no limit of its own. A head must also arrive within
    ``head_timeout`` seconds (408; a connection that sends nothing is closed). ``protocol_for``
    makes a subclass with a configuration's limits."""

    max_header_count: ClassVar[int] = _DEFAULT_SECURITY.max_header_count
    max_header_bytes: ClassVar[int] = _DEFAULT_SECURITY.max_header_bytes
    head_timeout: ClassVar[float] = _DEFAULT_SECURITY.head_read_timeout_seconds

    _head_done = False
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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn sets no timer until a first response is complete: a connection that sends
        # nothing, or a head a byte at a time, would be held for ever (slowloris).
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._refused:
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
        self._head_done, self._header_count = False, 0
        self._uncounted = not self._read_starts_head
        self._between = self._read_starts_head = False
        super().on_message_begin()
        # The request's disconnect hook (proxy.asgi.DisconnectHook): relays register a
        # callback here instead of keeping a task blocked in receive().
        # (ASGI extension values are dicts.)
        self.scope["extensions"] = {DISCONNECT_HOOK: {"hook": DisconnectHook()}}

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next bytes are the next request's head: ``data_received`` counts them again.
        self._head_done, self._head_bytes, self._head_tail = False, 0, b""
        self._between = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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
        if cycle is not None:
            # Duck-typed: it passes everything but write() through to the real transport.
            cycle.transport = cast(
                asyncio.Transport, _HeadHoldingTransport(cycle.transport, self.loop)
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
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
        content = [
            b"HTTP/1.1 " + status + b"\r\n",
            b"content-type: application/json; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        self.transport.close()


def protocol_for(security: SecurityConfig) -> type[GatewayHttpProtocol]:
    """The HTTP protocol class with ``security``'s header limits."""
    return type(
        "GatewayHttpProtocol",
        (GatewayHttpProtocol,),
        {
            "max_header_count": security.max_header_count,
            "max_header_bytes": security.max_header_bytes,
            "head_timeout": security.head_read_timeout_seconds,
        },
    )


def uvicorn_config(
    app: Any,
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    loop: str = "uvloop",
) -> uvicorn.Config:
    """uvicorn's settings for serving ``app`` as ``config`` says: header limits, TLS when
    ``listen.tls_cert``/``tls_key`` are set, no proxy headers (``X-Forwarded-For`` is
    believed only from configured proxies, in ``proxy.network``)."""
    listen = config.listen
    return uvicorn.Config(
        app,
        host=host or listen.host,
        port=listen.port if port is None else port,
        loop=loop,
        http=protocol_for(config.security),
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
    return uvicorn.Server(uvicorn_config(app, config, host=host, port=port))


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
