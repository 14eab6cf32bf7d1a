"""Backend answers of unusual shape, on the wire: hop-by-hop headers stop at the gateway in
both directions, answers without content carry no length of their own, and an answer
without usage is counted as an estimate."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from tests.integration.conftest import Harness
from tests.integration.wire_backend import LoopbackServer
from tests.support.gateway import GatewayThread, gateway_config

_CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
_ANSWER = orjson.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
)


class _RecordingUpstream(LoopbackServer):
    """A backend that keeps every request head it gets and answers by method: POST with a
    chat completion whose ``Connection`` header names a header of its own, DELETE with 204,
    HEAD with the length a GET would have."""

    def __init__(self, answer: bytes = _ANSWER) -> None:
        super().__init__()
        self.answer = answer
        self.heads: list[dict[str, str]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                fields = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.strip()
                self.heads.append(fields)
                await reader.readexactly(int(fields.get("content-length", "0")))
                method = lines[0].split(" ")[0]
                if method == "DELETE":
                    writer.write(b"HTTP/1.1 204 No Content\r\nx-backend-kept: yes\r\n\r\n")
                elif method == "HEAD":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: 1234\r\n\r\n"
                    )
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"x-backend-hop: internal\r\nx-backend-kept: yes\r\n"
                        b"x-ratelimit-remaining-tokens: 123456\r\n"
                        b"x-ratelimit-remaining-requests: 99\r\n"
                        b"connection: keep-alive, X-Backend-Hop\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(self.answer), self.answer)
                    )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextmanager
def _gateway(
    tmp_path: Path, answer: bytes = _ANSWER
) -> Iterator[tuple[Harness, _RecordingUpstream]]:
    upstream = _RecordingUpstream(answer)
    with upstream.serving() as url:
        gw = GatewayThread(
            gateway_config(
                tmp_path,
                {"scripted": url},
                deployments=[
                    {"name": "gpt-4o-mini", "backend": "scripted", "model": "gpt-4o-mini"}
                ],
            )
        ).start()
        try:
            yield Harness(gw, None), upstream  # type: ignore[arg-type]  # no simulator here
        finally:
            gw.stop()


def test_headers_a_connection_header_names_stop_at_the_gateway(tmp_path: Path) -> None:
    """RFC 9110 §7.6.1: the headers a ``Connection`` header lists belong to that one
    connection. The client's stay away from the backend, the backend's from the client;
    the others go through."""
    with _gateway(tmp_path) as (harness, upstream):
        key = harness.new_key().primary_key or ""
        r = httpx.post(
            harness.url + _CHAT,
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={
                "api-key": key,
                "connection": "keep-alive, X-Client-Hop",
                "x-client-hop": "for the gateway only",
                "x-client-kept": "1",
            },
            timeout=10,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == 10
        assert r.headers["x-backend-kept"] == "yes"
        assert "x-backend-hop" not in r.headers
        # The shared deployment's own figures are not the client's (another team's use shows
        # in them, and the gateway balances over several deployments).
        assert not [name for name in r.headers if name.startswith("x-ratelimit-")]
        (sent,) = upstream.heads
        assert sent["x-client-kept"] == "1"
        assert "x-client-hop" not in sent
        assert "connection" not in sent or "x-client-hop" not in sent["connection"].lower()
        (record,) = harness.records(expect=1)
        assert record.total_tokens == 10


def test_headers_answers_without_content_get_no_length_of_their_own(tmp_path: Path) -> None:
    """A 204 carries no ``Content-Length`` (RFC 9110 §8.6); a HEAD answer carries the
    backend's, the length the GET would have, not the empty body's."""
    with _gateway(tmp_path) as (harness, _):
        key = harness.new_key().primary_key or ""
        with httpx.Client(timeout=10, headers={"api-key": key}) as client:
            deleted = client.delete(harness.url + "/openai/v1/files/file-1")
            assert deleted.status_code == 204
            assert deleted.headers["x-backend-kept"] == "yes"
            assert "content-length" not in deleted.headers
            head = client.head(harness.url + "/openai/v1/files/file-1")
            assert head.status_code == 200
            assert head.headers["content-length"] == "1234"
            assert head.content == b""


def test_an_answer_without_usage_is_counted_as_an_estimate(tmp_path: Path) -> None:
    """A backend that reports no usage (some OpenAI-compatible servers): the record gets an
    estimate of the prompt and of the answer's text, marked as one, never a zero that would
    pass for the backend's count."""
    answer = orjson.loads(_ANSWER)
    del answer["usage"]
    answer["choices"][0]["message"]["content"] = "four words right here"
    with _gateway(tmp_path, orjson.dumps(answer)) as (harness, _):
        key = harness.new_key().primary_key or ""
        r = httpx.post(
            harness.url + _CHAT,
            json={"messages": [{"role": "user", "content": "hello there, how are you?"}]},
            headers={"api-key": key},
            timeout=10,
        )
        assert r.status_code == 200
        assert "usage" not in r.json()  # relayed as the backend sent it
        (record,) = harness.records(expect=1)
    assert (record.outcome, record.usage_estimated) == ("ok", True)
    assert record.prompt_tokens > 5
    assert 3 <= record.completion_tokens <= 6
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens
