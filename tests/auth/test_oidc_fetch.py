"""The identity provider's documents are read whole, however they arrive, and no larger
than the cap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from sluicegate.auth.oidc import MAX_DOCUMENT_BYTES, FetchError, HttpFetcher

#: A key set as Entra publishes it: several keys, each with its certificate chain (~5 KB).
JWKS = orjson.dumps(
    {"keys": [{"kty": "RSA", "kid": f"k{i}", "n": "x" * 500, "e": "AQAB"} for i in range(8)]}
)

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def _serve(write_body: Writer, asked: list[bytes] | None = None) -> AsyncIterator[str]:
    """A server on loopback answering each request with ``write_body``; ``asked`` gets each
    request line. Yields a URL on it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\r\n")
            if asked is not None:
                asked.append(line.strip())
            await reader.readuntil(b"\r\n\r\n")
            await write_body(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/discovery/keys"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def fetcher() -> AsyncIterator[HttpFetcher]:
    f = HttpFetcher(5.0)
    await f.start()
    yield f
    await f.aclose()


async def test_a_document_arriving_in_pieces_is_read_whole(fetcher: HttpFetcher) -> None:
    """Over TLS a key set comes in several records: the fetcher waits for all of them."""

    async def in_pieces(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(JWKS), JWKS[:1000])
        )
        await writer.drain()
        for at in range(1000, len(JWKS), 1500):
            await asyncio.sleep(0.02)  # the next segment comes a moment later
            writer.write(JWKS[at : at + 1500])
            await writer.drain()

    async with _serve(in_pieces) as url:
        doc = await fetcher(url)
    assert [k["kid"] for k in doc["keys"]] == [f"k{i}" for i in range(8)]


async def test_a_document_past_the_cap_is_refused_in_pieces_too(fetcher: HttpFetcher) -> None:
    """The cap holds for a body that arrives in pieces and has no length (chunked)."""
    piece = b" " * 65536

    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for _ in range(MAX_DOCUMENT_BYTES // len(piece) + 4):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with _serve(endless) as url:
        with pytest.raises(FetchError, match="larger than"):
            await fetcher(url)


async def test_an_egress_proxy_named_in_the_environment_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway whose only way out is an egress proxy (``HTTPS_PROXY``/``HTTP_PROXY``, as
    for the other Azure clients) reaches its identity provider through it."""
    asked: list[bytes] = []

    async def proxy(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(JWKS), JWKS)
        )
        await writer.drain()

    async with _serve(proxy, asked) as url:
        monkeypatch.setenv("HTTP_PROXY", url.removesuffix("/discovery/keys"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        fetcher = HttpFetcher(5.0)
        await fetcher.start()
        try:
            doc = await fetcher("http://login.example.invalid/tenant/discovery/v2.0/keys")
        finally:
            await fetcher.aclose()
    assert len(doc["keys"]) == 8
    assert asked == [b"GET http://login.example.invalid/tenant/discovery/v2.0/keys HTTP/1.1"]
