"""Answers that are not streams are not buffered whole without bound: an unmetered one (a
file's content through the passthrough) is relayed as it arrives, a metered one is read whole
only up to ``WHOLE_ANSWER_LIMIT`` and past that relayed in parts, its usage found in its last
part. Each backend here holds the end of its answer until the client has its first bytes:
buffered whole, the client would get nothing at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from sluicegate.proxy.relay import WHOLE_ANSWER_LIMIT
from tests.integration.conftest import Harness, gateway_over
from tests.integration.wire_backend import Request, WireBackend, head, wait_for

_MIB = 1024 * 1024
_FILE_SIZE = 8 * _MIB
_EMBEDDING_PREFIX = b'{"data":[{"embedding":['
_FLOATS = b"0.0123456789," * (_MIB // 13)  # about a MiB of an embedding's numbers
_EMBEDDING_SUFFIX = (
    b'0.5],"index":0,"object":"embedding"}],"model":"text-embedding-3-small",'
    b'"object":"list","usage":{"prompt_tokens":7,"total_tokens":7}}'
)
#: Parts of numbers in the embeddings answer: just past what is read whole.
_FLOAT_PARTS = WHOLE_ANSWER_LIMIT // len(_FLOATS) + 2


def _file_part(i: int) -> bytes:
    return bytes([i % 251]) * _MIB


def _embedding_parts() -> Iterator[bytes]:
    yield _EMBEDDING_PREFIX
    for _ in range(_FLOAT_PARTS):
        yield _FLOATS
    yield _EMBEDDING_SUFFIX


async def _held(release: threading.Event) -> None:
    deadline = time.monotonic() + 30
    while not release.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _backend(release: threading.Event) -> WireBackend:
    """A file's content (8 MiB) and an embeddings answer past the limit, each written but for
    its last part, which waits for ``release``."""

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.target.endswith("/embeddings?api-version=2024-10-21"):
            parts = list(_embedding_parts())
            writer.write(head(length=sum(map(len, parts))))
        else:
            parts = [_file_part(i) for i in range(_FILE_SIZE // _MIB)]
            writer.write(head(content_type="application/octet-stream", length=_FILE_SIZE))
        for part in parts[:-1]:
            writer.write(part)
            await writer.drain()
        await _held(release)
        writer.write(parts[-1])
        await writer.drain()

    return WireBackend(answer)


def _read(
    url: str, key: str, release: threading.Event, json: dict[str, str] | None = None
) -> tuple[int, str, int]:
    """(status, sha-256, bytes) of an answer (to a POST of ``json``, else a GET) read as it
    comes; ``release`` is set once its first bytes are in (they must come within 10 s)."""
    digest = hashlib.sha256()
    size = 0
    method = "GET" if json is None else "POST"
    timeout = httpx.Timeout(10)
    with httpx.stream(method, url, headers={"api-key": key}, json=json, timeout=timeout) as resp:
        for part in resp.iter_raw():
            release.set()
            digest.update(part)
            size += len(part)
    return resp.status_code, digest.hexdigest(), size


def _expected(parts: Iterator[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for part in parts:
        digest.update(part)
        size += len(part)
    return digest.hexdigest(), size


@contextmanager
def _served(tmp_path: Path) -> Iterator[tuple[Harness, WireBackend, threading.Event, str]]:
    """A gateway over ``_backend``: the harness, the backend, the event that releases the
    backend's last parts, and a key."""
    release = threading.Event()
    backend = _backend(release)
    with backend.running(), gateway_over(tmp_path, backend.url) as harness:
        yield harness, backend, release, harness.new_key().primary_key or ""


def test_a_file_download_is_relayed_as_it_arrives(tmp_path: Path) -> None:
    with _served(tmp_path) as (harness, _, release, key):
        url = f"{harness.url}/openai/files/file-1/content?api-version=2024-10-21"
        status, digest, size = _read(url, key, release)
        (record,) = harness.records(expect=1)
    parts = (_file_part(i) for i in range(_FILE_SIZE // _MIB))
    assert (status, digest, size) == (200, *_expected(parts))
    assert (record.operation, record.outcome, record.total_tokens) == ("passthrough", "ok", 0)


def test_a_client_that_leaves_a_download_closes_the_backends_answer(tmp_path: Path) -> None:
    with _served(tmp_path) as (harness, backend, release, key):
        url = f"{harness.url}/openai/files/file-1/content?api-version=2024-10-21"
        with httpx.stream("GET", url, headers={"api-key": key}, timeout=10) as resp:
            assert next(resp.iter_raw())  # the first bytes, then the client hangs up
        (record,) = harness.records(expect=1)
        release.set()  # the backend writes its last part: to a closed connection
        wait_for(lambda: backend.hangups == 1, what="the backend's connection closed")
    assert (record.operation, record.outcome, record.status) == ("passthrough", "aborted", 200)


def test_a_metered_answer_past_the_limit_is_relayed_in_parts_with_its_usage(
    tmp_path: Path,
) -> None:
    with _served(tmp_path) as (harness, _, release, key):
        url = (
            f"{harness.url}/openai/deployments/text-embedding-3-small/embeddings"
            "?api-version=2024-10-21"
        )
        status, digest, size = _read(url, key, release, {"input": "hello"})
        (record,) = harness.records(expect=1)
    assert size > WHOLE_ANSWER_LIMIT
    assert (status, digest, size) == (200, *_expected(_embedding_parts()))
    assert (record.operation, record.outcome) == ("embeddings", "ok")
    assert (record.prompt_tokens, record.total_tokens, record.usage_estimated) == (7, 7, False)
    assert record.model == "text-embedding-3-small"
