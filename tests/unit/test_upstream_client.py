"""The request path's HTTP/1.1 client (upstream/client.py) against scripted loopback servers:
keep-alive reuse, the framings of RFC 9112 (length, chunked, connection close, HEAD, 1xx),
broken and invalid answers, the connection limit, idle expiry, cancellation, decoding, TLS.

Each server is a real asyncio server on 127.0.0.1 whose per-connection script reads the
request head and writes exactly the bytes the test names."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sluicegate.upstream.client import UpstreamError, UpstreamPool, UpstreamResponse
from tests.support.keyvault import self_signed_certificate

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Script = Callable[[Reader, Writer], Awaitable[None]]
JSON = b'{"ok":true}'


class Server:
    """Counts connections and keeps every request head it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request: its head (kept) and body (returned)."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return await reader.readexactly(length) if length else b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the test's loop is closing with this connection still open
        finally:
            writer.close()


@asynccontextmanager
async def serving(
    make_script: Callable[[Server], Script], tls: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    server = Server(lambda r, w: asyncio.sleep(0))
    server.script = make_script(server)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


def per_connection(
    run: Callable[[Server, Reader, Writer], Awaitable[None]],
) -> Callable[[Server], Script]:
    """A script from a coroutine that also gets the server (for ``read_request``)."""
    return lambda server: lambda reader, writer: run(server, reader, writer)


def answer(body: bytes = JSON, extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


def keep_answering(server: Server, reply: bytes = b"") -> Script:
    """Answer every request on the connection with ``reply`` (default: ``answer()``)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(reply or answer())
            await writer.drain()

    return script


def pool_for(server: Server, scheme: str = "http", **kw: object) -> UpstreamPool:
    options: dict[str, object] = {"max_connections": 8, "connect_timeout": 5.0, **kw}
    return UpstreamPool(f"{scheme}://127.0.0.1:{server.port}", **options)  # type: ignore[arg-type]


async def read_all(pool: UpstreamPool, url: str, method: str = "POST") -> tuple[int, bytes]:
    response = await pool.request(method, url, [("content-type", "application/json")], b"{}")
    parts = []
    while chunk := await response.readany():
        parts.append(chunk)
    response.release()
    return response.status, b"".join(parts)


async def read_rest(response: UpstreamResponse) -> None:
    while await response.readany():
        pass


async def test_requests_share_one_kept_alive_connection_and_the_head_is_exact() -> None:
    async with serving(keep_answering) as server:
        pool = pool_for(server)
        base = f"http://127.0.0.1:{server.port}"
        for _ in range(3):
            assert await read_all(pool, base + "/openai/x?api-version=1") == (200, JSON)
        await pool.close()
    assert server.connections == 1
    assert server.heads[0] == (
        b"POST /openai/x?api-version=1 HTTP/1.1\r\n"
        + f"host: 127.0.0.1:{server.port}\r\n".encode()
        + b"content-type: application/json\r\ncontent-length: 2\r\n\r\n"
    )


async def test_a_chunked_stream_arrives_as_it_is_written_and_the_connection_is_reused() -> None:
    step = asyncio.Event()

    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        while True:
            await server.read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                b"9\r\ndata: 1\n\n\r\n"
            )
            await writer.drain()
            await step.wait()
            step.clear()
            writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
            await writer.drain()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        url = f"http://127.0.0.1:{server.port}/s"
        for _ in range(2):
            response = await pool.request("POST", url, [], b"{}")
            assert response.content_type == "text/event-stream"
            assert await response.readany() == b"data: 1\n\n"
            assert not response.at_eof()
            step.set()
            assert await response.readany() == b"data: 2\n\n"
            await asyncio.sleep(0.02)  # the terminating chunk, if it came apart
            assert response.at_eof()
            assert await response.readany() == b""
            response.release()
        await pool.close()
    assert server.connections == 1


async def test_interim_answers_are_skipped() -> None:
    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        # Apart, so that the client sees the interim answers before the final one.
        for part in (
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
            answer(extra=b"x-final: yes\r\n"),
        ):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        response = await pool.request("POST", f"http://127.0.0.1:{server.port}/", [], b"{}")
        assert response.status == 200
        assert (b"x-final", b"yes") in response.raw_headers
        assert all(name != b"link" for name, _ in response.raw_headers)
        assert await response.readany() == JSON
        response.release()
        await pool.close()


async def test_a_body_delimited_by_the_connection_closing_is_whole_and_not_reused() -> None:
    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        url = f"http://127.0.0.1:{server.port}/"
        assert await read_all(pool, url) == (200, b"all of it")
        assert await read_all(pool, url) == (200, b"all of it")
        await pool.close()
    assert server.connections == 2


async def test_a_body_delimited_by_the_connection_closing_is_cut_short_by_a_reset() -> None:
    """Only a clean close ends such a body: a reset (here an abortive close, RST) after part
    of it is an error, not a whole answer."""

    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart of i")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        response = await pool.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        assert await response.readany() == b"part of i"
        with pytest.raises(UpstreamError):
            await read_rest(response)
        response.close()
        await pool.close()


async def test_the_answer_to_head_has_no_body_whatever_its_length_says() -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
    async with serving(lambda server: keep_answering(server, reply)) as server:
        pool = pool_for(server)
        response = await pool.request("HEAD", f"http://127.0.0.1:{server.port}/", [], b"")
        assert response.status == 200
        assert await asyncio.wait_for(response.readany(), 5) == b""
        response.release()
        await pool.close()
    assert server.heads[0].startswith(b"HEAD / HTTP/1.1\r\n")
    assert b"content-length" not in server.heads[0]


@pytest.mark.parametrize(
    ("reply", "when"),
    [
        (b"", "head"),  # closes without a word
        (b"SMTP ready\r\n\r\n", "head"),  # not HTTP
        (answer(body=b"x" * 100)[:-90], "body"),  # a body cut short
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", "body"),
    ],
)
async def test_broken_or_invalid_answers_raise_upstream_errors(reply: bytes, when: str) -> None:
    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        url = f"http://127.0.0.1:{server.port}/"
        if when == "head":
            with pytest.raises(UpstreamError):
                await pool.request("POST", url, [], b"{}")
        else:
            response = await pool.request("POST", url, [], b"{}")
            with pytest.raises(UpstreamError):
                await read_rest(response)
        await pool.close()
        assert isinstance(UpstreamError("x"), OSError)  # the relay's except clauses rely on it


async def test_the_connection_limit_queues_requests_until_one_is_released() -> None:
    async with serving(keep_answering) as server:
        pool = pool_for(server, max_connections=1)
        url = f"http://127.0.0.1:{server.port}/"
        first = await pool.request("POST", url, [], b"{}")
        second = asyncio.create_task(read_all(pool, url))
        await asyncio.sleep(0.05)
        assert not second.done()  # waiting for the only connection
        assert await first.readany() == JSON
        first.release()
        assert await asyncio.wait_for(second, 5) == (200, JSON)
        await pool.close()
    assert server.connections == 1


async def test_a_closed_answer_wakes_its_reader_and_frees_the_slot() -> None:
    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)  # never finishes the body

    async with serving(per_connection(run)) as server:
        pool = pool_for(server, max_connections=1)
        url = f"http://127.0.0.1:{server.port}/"
        response = await pool.request("POST", url, [], b"{}")
        reading = asyncio.create_task(response.readany())
        await asyncio.sleep(0.05)
        response.close()
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(reading, 5)
        # The slot is free again: a second request gets a connection of its own.
        again = await asyncio.wait_for(pool.request("POST", url, [], b"{}"), 5)
        again.close()
        await pool.close()
    assert server.connections == 2


async def test_a_request_cancelled_while_waiting_for_the_head_closes_its_connection() -> None:
    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        await asyncio.sleep(30)

    async with serving(per_connection(run)) as server:
        pool = pool_for(server, max_connections=1)
        url = f"http://127.0.0.1:{server.port}/"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.request("POST", url, [], b"{}"), 0.1)
        # The only slot came back: this request opens a new connection instead of waiting.
        task = asyncio.create_task(pool.request("POST", url, [], b"{}"))
        await asyncio.sleep(0.1)
        assert server.connections == 2
        task.cancel()
        await pool.close()


async def test_idle_connections_expire_after_the_keepalive_time() -> None:
    async with serving(keep_answering) as server:
        pool = pool_for(server, keepalive_seconds=0.05)
        url = f"http://127.0.0.1:{server.port}/"
        await read_all(pool, url)
        await read_all(pool, url)
        assert server.connections == 1
        await asyncio.sleep(0.1)
        await read_all(pool, url)
        await pool.close()
    assert server.connections == 2


async def test_a_compressed_answer_is_decoded_and_an_unknown_coding_refused() -> None:
    packed = gzip.compress(JSON * 50)
    async with serving(
        lambda server: keep_answering(server, answer(packed, b"content-encoding: gzip\r\n"))
    ) as server:
        pool = pool_for(server)
        assert await read_all(pool, f"http://127.0.0.1:{server.port}/") == (200, JSON * 50)
        await pool.close()
    async with serving(
        lambda server: keep_answering(server, answer(b"zz", b"content-encoding: br\r\n"))
    ) as server:
        pool = pool_for(server)
        with pytest.raises(UpstreamError, match="br-encoded"):
            await pool.request("POST", f"http://127.0.0.1:{server.port}/", [], b"{}")
        await pool.close()


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


GZIP_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


async def test_a_compressed_read_that_decodes_to_nothing_is_not_the_end_of_the_body() -> None:
    """The first chunk is the 10-byte gzip header alone, which decodes to nothing: reading
    goes on to the bytes that do, instead of ending the body there (empty)."""
    packed = gzip.compress(JSON * 50)
    assert len(packed) > 10

    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(GZIP_HEAD + chunk(packed[:10]))
        await writer.drain()
        await asyncio.sleep(0.05)  # the header arrives in a read of its own
        writer.write(chunk(packed[10:]) + b"0\r\n\r\n")
        await writer.drain()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        assert await read_all(pool, f"http://127.0.0.1:{server.port}/") == (200, JSON * 50)
        await pool.close()


@pytest.mark.parametrize("cut", ["mid-stream", "trailer"])
async def test_a_compressed_answer_cut_short_is_an_error_not_a_whole_body(cut: str) -> None:
    """The HTTP framing is whole (a terminating chunk) but the gzip stream is not: cut in
    its compressed data, or without its 8-byte trailer (CRC and length)."""
    packed = gzip.compress(JSON * 50)
    sent = packed[: len(packed) // 2] if cut == "mid-stream" else packed[:-8]

    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(GZIP_HEAD + chunk(sent) + b"0\r\n\r\n")
        await writer.drain()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        response = await pool.request("POST", f"http://127.0.0.1:{server.port}/", [], b"{}")
        with pytest.raises(UpstreamError, match="ended before it was complete"):
            await read_rest(response)
        response.close()
        await pool.close()


async def test_an_empty_body_with_a_content_coding_is_empty_not_cut_short() -> None:
    """No compressed bytes at all (a 204, an empty answer): nothing was cut."""
    async with serving(
        lambda server: keep_answering(server, answer(b"", b"content-encoding: gzip\r\n"))
    ) as server:
        pool = pool_for(server)
        assert await read_all(pool, f"http://127.0.0.1:{server.port}/") == (200, b"")
        await pool.close()


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async with serving(keep_answering) as server:
        pool = pool_for(server)
        url = f"http://127.0.0.1:{server.port}/"
        for name, value in [("x-a", "1\r\nx-injected: 1"), ("x-a\nb", "1")]:
            with pytest.raises(ValueError, match="line break"):
                await pool.request("POST", url, [(name, value)], b"{}")
        with pytest.raises(ValueError, match="whitespace"):
            await pool.request("POST", url + "a b", [], b"{}")
        await pool.close()
    assert server.connections == 0


async def test_https_backends_are_verified_against_the_trust_store(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, ["127.0.0.1"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    async with serving(keep_answering, tls=tls) as server:
        trusting = pool_for(server, "https", ssl_context=ssl.create_default_context(cafile=cert))
        assert await read_all(trusting, f"https://127.0.0.1:{server.port}/") == (200, JSON)
        await trusting.close()
        strict = pool_for(server, "https")  # the system's trust store: the test CA is not in it
        with pytest.raises(ssl.SSLCertVerificationError):
            await strict.request("POST", f"https://127.0.0.1:{server.port}/", [], b"{}")
        await strict.close()


async def test_only_the_first_release_or_close_of_a_response_counts() -> None:
    async with serving(keep_answering) as server:
        pool = pool_for(server)
        url = f"http://127.0.0.1:{server.port}/"
        for _ in range(2):
            response = await pool.request("POST", url, [], b"{}")
            assert await response.readany() == JSON
            assert await response.readany() == b""
            response.release()
            response.close()  # the relay's cleanup after a release: the connection stays pooled
        await pool.close()
    assert server.connections == 1


async def test_a_second_answer_to_one_request_retires_the_connection() -> None:
    async with serving(lambda server: keep_answering(server, answer() + answer())) as server:
        pool = pool_for(server)
        url = f"http://127.0.0.1:{server.port}/"
        assert await read_all(pool, url) == (200, JSON)  # the first answer is the request's
        assert await read_all(pool, url) == (200, JSON)
        await pool.close()
    assert server.connections == 2


async def test_an_unread_body_stops_the_connection_reading_until_the_reader_catches_up() -> None:
    chunk = b"x" * 65536
    total = 512  # chunks: 32 MiB, far more than the socket buffers and the client's limit
    sent = 0

    async def run(server: Server, reader: Reader, writer: Writer) -> None:
        nonlocal sent
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        framed = b"10000\r\n" + chunk + b"\r\n"
        for _ in range(total):
            writer.write(framed)
            await writer.drain()
            sent += 1
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serving(per_connection(run)) as server:
        pool = pool_for(server)
        response = await pool.request("GET", f"http://127.0.0.1:{server.port}/big", [], b"")
        await asyncio.sleep(0.5)  # not reading: the backend must be held back
        assert sent * len(chunk) < 16 * 1024 * 1024
        received = 0
        while data := await response.readany():
            received += len(data)
        assert received == total * len(chunk)
        response.release()
        await pool.close()
