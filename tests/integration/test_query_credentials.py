"""A subscription key in the query string (``api-key``, as APIM's AI-Gateway labs configure,
or APIM's default ``subscription-key``) authenticates like one in a header, and never reaches
the backend: a scripted backend records each request line, and no key parameter (in any
letter case, repeated or not, used or not) may appear in it, on a metered route or on the
passthrough. Two different keys, one in a header and one in the query, are refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import openai
import pytest

from tests.integration.conftest import Harness
from tests.integration.wire_backend import Request, WireBackend, head
from tests.support.gateway import GatewayThread, gateway_config

_VERSION = "2024-10-21"
_CHAT = f"/openai/deployments/gpt-4o-mini/chat/completions?api-version={_VERSION}"
_FILES = f"/openai/files?api-version={_VERSION}"
_BODY = {"messages": [{"role": "user", "content": "hi"}]}
_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


async def _answer(request: Request, writer: asyncio.StreamWriter) -> None:
    data = json.dumps(_COMPLETION if request.method == "POST" else {"data": []}).encode()
    writer.write(head(length=len(data)) + data)
    await writer.drain()


class _Setup:
    def __init__(self, backend: WireBackend, harness: Harness, key: str, other: str) -> None:
        self.backend = backend
        self.harness = harness
        self.key = key
        self.other = other

    def query_names(self) -> list[str]:
        """Every query parameter name of every request the backend received, in lower case."""
        return [
            name.lower()
            for request in self.backend.requests
            for name, _ in parse_qsl(urlsplit(request.target).query, keep_blank_values=True)
        ]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[_Setup]:
    backend = WireBackend(_answer)
    with backend.running():
        gw = GatewayThread(gateway_config(tmp_path, {"b": backend.url})).start()
        try:
            harness = Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
            key = harness.new_key().primary_key or ""
            other = harness.new_key().primary_key or ""
            yield _Setup(backend, harness, key, other)
        finally:
            gw.stop()


def test_api_key_query_parameter_alone_authenticates(setup: _Setup) -> None:
    with httpx.Client(base_url=setup.harness.url, timeout=10) as c:
        chat = c.post(f"{_CHAT}&api-key={setup.key}", json=_BODY)
        files = c.get(f"{_FILES}&API-Key={setup.key}")
    assert (chat.status_code, files.status_code) == (200, 200), (chat.text, files.text)
    assert chat.json()["choices"][0]["message"]["content"] == "hello"
    assert len(setup.backend.requests) == 2


def test_no_key_parameter_reaches_the_backend(setup: _Setup) -> None:
    key = setup.key
    queries = [
        f"api-key={key}",
        f"subscription-key={key}",
        f"Api-Key={key}&SUBSCRIPTION-KEY={key}&api-key={key}",
        f"api-ke%79={key}",
    ]
    with httpx.Client(base_url=setup.harness.url, timeout=10) as c:
        for path, method in ((_CHAT, "POST"), (_FILES, "GET")):
            for query in queries:
                url = f"{path}&{query}&x=1"
                alone = c.request(method, url, json=_BODY)
                assert alone.status_code == 200, (url, alone.text)
                both = c.request(method, url, json=_BODY, headers={"api-key": key})
                assert both.status_code == 200, (url, both.text)
            # an empty key parameter is no credential, but is not forwarded either
            empty = c.request(method, f"{path}&api-key=&x=1", json=_BODY, headers={"api-key": key})
            assert empty.status_code == 200, empty.text
    # the SDK with the key in its header and in its default query, as an APIM client might
    client = openai.AzureOpenAI(
        azure_endpoint=setup.harness.url,
        api_key=key,
        api_version=_VERSION,
        default_query={"api-key": key, "Subscription-Key": key},
        max_retries=0,
    )
    done = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert done.choices[0].message.content == "hello"
    targets = [request.target for request in setup.backend.requests]
    assert len(targets) == 2 * (2 * len(queries) + 1) + 1, targets
    assert all(t.endswith(f"?api-version={_VERSION}&x=1") for t in targets[:-1]), targets
    assert set(setup.query_names()) == {"api-version", "x"}, targets
    assert not [t for t in targets if key in t], targets


def test_different_keys_in_header_and_query_are_ambiguous(setup: _Setup) -> None:
    with httpx.Client(base_url=setup.harness.url, timeout=10) as c:
        answers = [
            c.post(f"{_CHAT}&api-key={setup.other}", json=_BODY, headers={"api-key": setup.key}),
            c.get(
                f"{_FILES}&subscription-key={setup.other}",
                headers={"ocp-apim-subscription-key": setup.key},
            ),
            c.post(f"{_CHAT}&api-key={setup.key}&subscription-key={setup.other}", json=_BODY),
        ]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "AmbiguousCredentials"
    assert setup.backend.requests == []
