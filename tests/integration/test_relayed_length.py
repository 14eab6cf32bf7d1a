"""An answer relayed in parts (a file download: not read whole) keeps the backend's
``Content-Length`` when its body reaches the client byte for byte, so the client can tell a
whole download from one cut short (and show progress); a compressed one, which the upstream
client decodes, is chunked (the backend's length is the compressed size)."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from pathlib import Path

import httpx

from tests.integration.conftest import Harness
from tests.integration.wire_backend import Request, WireBackend, head
from tests.support.gateway import GatewayThread, gateway_config

_MIB = 1024 * 1024
_PARTS = [bytes([i]) * _MIB for i in range(3)]
_BODY = b"".join(_PARTS)
_URL = "/openai/files/file-1/content?api-version=2024-10-21"


def _backend(release: threading.Event, compressed: bool) -> WireBackend:
    """A file's content with its ``Content-Length`` (gzip-encoded with ``compressed``), all
    but its last part at once; the last part waits for ``release``."""
    data = gzip.compress(_BODY, compresslevel=1, mtime=0) if compressed else _BODY
    first, last = data[: len(data) - 1000], data[len(data) - 1000 :]

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        encoding = b"content-encoding: gzip\r\n" if compressed else b""
        status_and_headers = head(content_type="application/octet-stream", length=len(data))
        writer.write(status_and_headers[:-2] + encoding + b"\r\n" + first)
        await writer.drain()
        deadline = time.monotonic() + 10
        while not release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        writer.write(last)
        await writer.drain()

    return WireBackend(answer)


def _download(tmp_path: Path, compressed: bool) -> tuple[httpx.Headers, bytes, str]:
    """(the client's response headers, the body, the record's outcome) of a download."""
    release = threading.Event()
    backend = _backend(release, compressed)
    with backend.running():
        gw = GatewayThread(gateway_config(tmp_path, {"b": backend.url})).start()
        try:
            harness = Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
            key = harness.new_key().primary_key or ""
            parts: list[bytes] = []
            with httpx.stream("GET", gw.url + _URL, headers={"api-key": key}, timeout=10) as resp:
                for part in resp.iter_raw():
                    release.set()  # relayed as it came: the backend may end its answer
                    parts.append(part)
            (record,) = harness.records(expect=1)
        finally:
            gw.stop()
    assert resp.status_code == 200
    return resp.headers, b"".join(parts), record.outcome


def test_a_download_relayed_in_parts_keeps_its_content_length(tmp_path: Path) -> None:
    headers, body, outcome = _download(tmp_path, compressed=False)
    assert headers.get("content-length") == str(len(_BODY))
    assert "transfer-encoding" not in headers
    assert (body == _BODY, outcome) == (True, "ok")


def test_a_compressed_download_is_decoded_and_chunked(tmp_path: Path) -> None:
    headers, body, outcome = _download(tmp_path, compressed=True)
    assert "content-length" not in headers and "content-encoding" not in headers
    assert headers.get("transfer-encoding") == "chunked"
    assert (body == _BODY, outcome) == (True, "ok")
