"""The request path's HTTP/1.1 client: keep-alive connections to one backend, each request
written in one ``write``, answers parsed by httptools (llhttp, the parser uvicorn uses for
the client side of the gateway).

Why not aiohttp here (it stays for everything else: token, key-vault and OIDC requests):
the gateway's relay needs only a small part of a general client (no cookies, redirects,
proxies, multipart or tracing), and that part was the largest single cost of a proxied
request. Measured (docs/architecture.md, bench/analysis.md): aiohttp's client was about
30 % of the gateway's CPU per JSON request, and parsing one 33-event stream cost it 90 µs
against 22 µs for a JSON answer, three Python calls per HTTP chunk; a bare proxy served
about 1.5 times as many JSON requests per core with this client as with aiohttp. The
parsing itself is still a library's (httptools, pinned); what is here is the connection
handling: a pool with a connection limit, idle expiry, TLS by the standard library, and the
framing rules of RFC 9112 that llhttp leaves to its caller (interim 1xx answers, answers to
HEAD, bodies delimited by the connection closing).

Contract: ``request()`` returns once the status line and headers are in (or raises
``UpstreamError``/``OSError`` for a connection that failed, ``TimeoutError`` when connecting
took longer than the connect timeout). The body is read with ``readany()``. Every response
must end with ``release()`` (read to its end: the connection goes back to the pool) or
``close()``; a cancelled ``request()`` closes its connection itself. A caller that must tell
a wait for a free connection from a wait for the backend checks ``full`` and waits with
``wait_for_room()`` before it calls ``request()``. Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import zlib
from collections import deque
from collections.abc import Iterable
from urllib.parse import urlsplit

import httptools

from sluicegate.loops import running_loop

#: Bytes of body held unread before the connection stops reading (backpressure).
_HIGH_WATER = 256 * 1024
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The system's trust store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` apply), HTTP/1.1 by ALPN;
    built once: loading the certificates is blocking file I/O."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamError(ConnectionError):
    """The backend's connection broke, or its answer was not valid HTTP/1.1."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the answer being read on it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        # A list, not a deque: ``readany`` takes all of it at once, and ``bytes.join`` reads a
        # list in place where it would first copy a deque into one (a third of the join's cost
        # for a 33-event stream).
        self._chunks: list[bytes] = []
        # The parser calls ``on_body`` once per HTTP chunk: 33 times for a 33-event stream.
        # Bound straight to the list's append, each call stays in C (a Python method here
        # was a quarter of the cost of relaying such a stream); the bookkeeping a chunk
        # needs (backpressure, waking the reader) is done once per ``data_received``.
        self.on_body = self._chunks.append
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        # The answer in progress.
        self._head: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._interim = False
        self._framed = False  # content-length or chunked: the end is known without EOF
        self._no_body = False  # the answer to a HEAD request
        self._buffered = 0  # bytes received since the reader last took the body's chunks
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self._keep_alive = False
        self._error: BaseException | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            # Bytes while no request is waiting: a broken backend. Never reuse the connection.
            self._fail(UpstreamError("the backend sent data nobody asked for"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # raised by a callback of ours
            self._fail(exc.__context__ or UpstreamError(str(exc)))
            return
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the backend switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the backend's answer is not valid HTTP/1.1 ({exc})"))
            return
        if self._chunks:
            # Counted in received bytes (framing included): close enough for backpressure.
            self._buffered += len(data)
            if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:  # we closed it (``close``): readers were told then
            return
        self.closed = True
        self._pool._forget(self)
        head = self._head
        if head is not None and not self.complete:
            if head.done() and (self._no_body or (not self._framed and exc is None)):
                # Neither a length nor chunked: the body ends where the connection does, if
                # it closes cleanly (a reset, ``exc``, cuts it short).
                self.complete = True
                self._wake()
            else:
                detail = f": {exc}" if exc is not None else ""
                self._fail(UpstreamError(f"the backend closed the connection{detail}"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: the connection cannot be trusted any more.
            raise UpstreamError("the backend sent an answer nobody asked for")
        self._headers = []
        self._framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()  # once here: every reader of the headers wants lower case
        self._headers.append((lowered, value))
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        # 1xx answers (100 Continue, 103 Early Hints) come before the real one: skip them.
        self._interim = 100 <= status < 200
        if self._interim:
            return
        self._status = status
        if status in (204, 304):
            self._framed = True
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        # Read now: once the message is over, llhttp answers False for the next one.
        self._keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- used by the pool and the response ------------------------------------------------------

    def start(self, head: bytes, no_body: bool) -> asyncio.Future[None]:
        """Send one request (``head`` holds the body too); the future resolves at the
        answer's headers."""
        loop = self._pool.loop
        self._head = loop.create_future()
        self._no_body = no_body
        self._status = 0
        self.complete = self._keep_alive = False
        assert self.transport is not None
        self.transport.write(head)
        return self._head

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readany(self) -> bytes:
        while not self._chunks:
            if self.complete or self._no_body:
                return b""
            if self._error is not None:
                raise UpstreamError(str(self._error))
            self._waiter = self._pool.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and not self._no_body
            and not self._chunks
            and self._error is None
            and self._keep_alive
        )

    def finish(self) -> None:
        """The response is done with: back to the pool if the connection can carry another."""
        self._head = None
        if self.reusable():
            self._pool._idle_again(self)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection; a reader waiting for the rest of an answer gets an error."""
        if not self.complete and self._error is None:
            self._error = UpstreamError("the connection to the backend was closed")
        self._wake()
        if self.transport is not None:
            self.transport.close()
        if not self.closed:
            self.closed = True
            self._pool._forget(self)

    @property
    def status(self) -> int:
        return self._status

    @property
    def buffered(self) -> bool:
        """Body bytes have arrived that ``readany`` has not returned yet."""
        return bool(self._chunks)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers


class UpstreamResponse:
    """An answer whose status line and headers are in; the body is read with ``readany``."""

    __slots__ = ("_conn", "_decoded", "_decoder", "_done", "content_type", "raw_headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._done = False
        self.status = conn.status
        #: The answer's headers as received, names in lower case.
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = tuple(conn.headers)
        content_type = b""
        encoding = b""
        for name, value in self.raw_headers:
            if name == b"content-type":
                content_type = value
            elif name == b"content-encoding":
                encoding = value.strip().lower()
        #: The media type, lower case, without parameters (like aiohttp's ``content_type``).
        self.content_type = (
            content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
            or "application/octet-stream"
        )
        # The gateway asks for ``identity``; a backend that compresses anyway is decoded here,
        # since the client gets the body without the backend's content-encoding header.
        self._decoder: zlib._Decompress | None = None
        self._decoded = False  # the decoder has been given compressed bytes
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header
        elif encoding not in (b"", b"identity"):
            conn.close()
            raise UpstreamError(
                f"the backend's answer is {encoding.decode('latin-1')}-encoded, "
                "which the gateway cannot decode"
            )

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some if none did);
        ``b""`` at the end, and only there. Raises ``UpstreamError`` if the connection broke
        first, or if a compressed body is corrupt or ends before its compressed stream does
        (a truncated answer must not pass as whole)."""
        data = await self._conn.readany()
        decoder = self._decoder
        if decoder is None:
            return data
        try:
            # A read can hold compressed bytes that decode to nothing yet (the 10-byte gzip
            # header alone, a block still incomplete): every caller takes ``b""`` for the
            # end of the body, so read on until there is output or the body has ended.
            while data:
                self._decoded = True
                if out := decoder.decompress(data):
                    return out
                data = await self._conn.readany()
            out = decoder.flush()
        except zlib.error as exc:
            raise UpstreamError(f"the backend's compressed answer is corrupt ({exc})") from None
        # An empty body is whole (a HEAD answer, a 204); one that stopped short is not.
        if self._decoded and not decoder.eof:
            raise UpstreamError("the backend's compressed answer ended before it was complete")
        return out

    def at_eof(self) -> bool:
        """True when ``readany`` has returned the whole body (the next call gives ``b""``
        at once): the answer is complete and nothing of it is left unread."""
        conn = self._conn
        return self._decoder is None and conn.complete and not conn.buffered

    def release(self) -> None:
        """Done: the connection is reused if the body was read to its end, else closed.
        Only the first ``release`` or ``close`` of a response counts."""
        if not self._done:
            self._done = True
            self._conn.finish()

    def close(self) -> None:
        """Done without reading to the end: the connection is closed (a ``readany`` waiting
        meanwhile raises ``UpstreamError``)."""
        if not self._done:
            self._done = True
            self._conn.close()


class UpstreamPool:
    """Keep-alive connections to one origin (``scheme://host:port``), at most
    ``max_connections`` at a time; a request beyond that waits for one to be free."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout: float | None,
        keepalive_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        netloc = parts.netloc.rpartition("@")[2]
        if not netloc.isascii():
            netloc = self._host.encode("idna").decode("ascii") + (
                f":{parts.port}" if parts.port else ""
            )
        self._host_header = netloc
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else _default_tls()
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_seconds
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        self._loop = running_loop(self._loop)
        return self._loop

    async def request(
        self, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send ``method url`` (``url`` on this pool's origin) with ``headers`` (lower-case
        names, no ``host`` or ``content-length``) and ``body``; return at the answer's head."""
        if not url.startswith(self.origin):
            raise ValueError(f"{url!r} is not on {self.origin}")
        target = url[len(self.origin) :] or "/"
        head = self._head(method, target, headers, body)
        conn = await self._acquire()
        try:
            await conn.start(head, no_body=method == "HEAD")
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(conn)

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        """The request line, headers and body, as one buffer. Raises ``ValueError`` for a
        line break or space where one would change the message's framing."""
        if " " in target or "\r" in target or "\n" in target:
            raise ValueError("the request target has whitespace in it")
        lines = [f"{method} {target} HTTP/1.1\r\nhost: {self._host_header}\r\n"]
        for name, value in headers:
            # Values come from the client (already parsed by uvicorn) and from the gateway's
            # own configuration; a line break in either would start a header of its own.
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} has a line break in it")
            lines.append(f"{name}: {value}\r\n")
        if body or method in _METHODS_WITH_BODY:
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1") + body

    @property
    def full(self) -> bool:
        """Every connection the pool may open is open and busy: a ``request()`` now would wait
        for one (``wait_for_room``). Read without an ``await`` before ``request()``, False
        means that ``request()`` takes a connection (or a slot to open one) at once."""
        return not self._idle and self._open >= self._max and not self._closing

    async def wait_for_room(self) -> None:
        """Wait until a connection is released or closed (the pool may then have room). The
        room is not reserved: a request that came meanwhile may have taken it, so callers
        check ``full`` again. A waiter cancelled after it was woken passes the wake-up on.
        Raises ``UpstreamError`` when the pool is closed meanwhile.

        Why callers may wait here rather than in ``request()``: a request that waits for a
        free connection has not reached the backend yet, and when that wait runs out it says
        nothing about the backend's health (its connections are busy with other answers, or
        held by clients that read slowly); the relay tells the two apart this way."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, then cancelled: pass the free slot on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def _acquire(self) -> _Connection:
        loop = self.loop
        while True:
            if self._closing:
                raise UpstreamError("the backend's connection pool is closed")
            now = loop.time()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and now - conn.idle_since < self._keepalive:
                    return conn
                conn.close()
            if self._open < self._max:
                return await self._connect()
            await self.wait_for_room()

    async def _connect(self) -> _Connection:
        self._open += 1
        created: list[_Connection] = []

        def factory() -> _Connection:
            created.append(_Connection(self))
            return created[0]

        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.loop.create_connection(
                    factory,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except BaseException:
            if created:
                created[0].close()  # frees the slot (once, whatever asyncio did already)
            else:
                self._open -= 1
                self._wake_one()
            raise
        return created[0]

    def _idle_again(self, conn: _Connection) -> None:
        if self._closing:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        # Close the longest-idle connection once it is past the keep-alive time, so that a
        # pool shrinks again after a burst.
        oldest = self._idle[0]
        if conn.idle_since - oldest.idle_since >= self._keepalive:
            oldest.close()
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        """A connection closed: its slot is free."""
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every idle connection and refuse new requests (answers being read finish)."""
        self._closing = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("the backend's connection pool is closed"))
        self._waiters.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks
