"""A client that hangs up after a large upload is heard at once, like after a small one.

uvicorn pauses reading a connection while more than 64 KiB of request body waits for the
app, and resumes it only when the app next reads. The app's last read of a large body left
the connection paused: with a stream under way, a client that hung up was not heard until a
write failed, and the backend went on generating for nobody (the record said the backend
broke off, at the between-chunks timeout)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Harness, generating_at


@pytest.fixture
def glacial(tmp_path: Path) -> Iterator[Harness]:
    """A simulator whose first token comes at once and every later one 20 s after."""
    with generating_at(tmp_path, ttft_ms=20, tokens_per_second=0.05) as harness:
        yield harness


@pytest.mark.parametrize("prompt_bytes", [1_000, 400_000, 1_500_000])
def test_a_client_hanging_up_mid_stream_is_heard_whatever_it_uploaded(
    glacial: Harness, prompt_bytes: int
) -> None:
    key = glacial.new_key().primary_key
    prompt = ("lorem ipsum " * (prompt_bytes // 12 + 1))[:prompt_bytes]
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 50, "stream": True}
    url = f"{glacial.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    with httpx.stream("POST", url, json=body, headers={"api-key": key or ""}, timeout=30) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if '"content"' in line:
                break  # the first token; the next is 20 s away
    # Heard when the connection closed (records() waits 5 s), not when a later write
    # failed: the next token is 20 s away.
    records = glacial.records(expect=1)
    assert len(records) == 1
    r = records[0]
    assert (r.outcome, r.usage_estimated) == ("aborted", True)
    assert r.prompt_tokens > prompt_bytes // 12  # a word or more per "lorem ipsum "
    # The gateway closed the backend's stream at once: it did not go on for nobody.
    deadline = time.monotonic() + 5
    while not (entries := [e for e in glacial.sim_log() if e.get("streamed")]):
        assert time.monotonic() < deadline, "the backend's stream was not closed"
        time.sleep(0.05)
    assert len(entries) == 1
    assert entries[0]["client_gone"] is True
