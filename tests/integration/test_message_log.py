"""Prompt and completion logging (APIM's LLM logs): the real ``openai`` SDK through a real
gateway in front of the simulator, entries read back from the JSON-lines file.

One gateway serves most of the module (a product logging with the defaults, one with small
limits, one without a message log); each test looks only at its own subscription's requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from sluicegate.accounting.records import UsageRecord
from sluicegate.messages.capture import CUT_KEPT_BYTES, MessageCapture
from sluicegate.messages.sink import MessageLog
from sluicegate.proxy import pipeline, relay
from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness, sim_config
from tests.integration.wire_backend import (
    Request,
    WireBackend,
    chunk,
    content_event,
    event,
    head,
    wait_for,
)
from tests.support.gateway import BACKEND_KEY, GatewayThread, gateway_config

PRODUCTS: list[dict[str, Any]] = [
    {"name": "logged", "message_log": {}},
    {"name": "small", "message_log": {"max_bytes": 4096, "chunk_bytes": 1024}},
    {"name": "answers-only", "message_log": {"prompts": False}},
    {"name": "limited", "message_log": {}, "limits": {"requests_per_minute": 1}},
    {"name": "plain"},
]
#: Long answers: up to 16 × 1000 tokens (4,000 make a stream of more than a MiB of events).
LONG = SimDeployment(
    name="gpt-4o-mini",
    model="gpt-4o-mini-2024-07-18",
    kind="chat",
    tpm=100_000_000,
    rpm=100_000,
    completion_cap_factor=1000,
)


class Logged:
    """The module's gateway, its message log file, and readers of both."""

    def __init__(self, harness: Harness, path: Path) -> None:
        self.harness = harness
        self.path = path

    def key(self, product: str) -> tuple[str, str]:
        """A new subscription of ``product``: (its id, its key)."""
        issued = self.harness.new_key(product=product)
        assert issued.primary_key is not None
        return issued.subscription.id, issued.primary_key

    def records(self, subscription_id: str, expect: int = 1) -> list[UsageRecord]:
        """The ledger's records of ``subscription_id``, once there are ``expect`` (each is
        written just after its answer)."""
        deadline = time.monotonic() + 5
        while True:
            found = [r for r in self.harness.records() if r.subscription_id == subscription_id]
            if len(found) >= expect or time.monotonic() > deadline:
                assert len(found) == expect
                return found
            time.sleep(0.02)

    def record(self, subscription_id: str) -> UsageRecord:
        """The one ledger record of ``subscription_id``."""
        (record,) = self.records(subscription_id)
        return record

    def entries(self, request_id: str) -> list[dict[str, Any]]:
        """The entries of ``request_id``, in order (written just after its record)."""
        return entries_in(self.path, request_id)


def entries_in(path: Path, request_id: str, wait: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait
    while True:
        found: list[dict[str, Any]] = []
        if path.exists():
            lines = path.read_bytes().splitlines()
            found = [e for e in map(orjson.loads, lines) if e["RequestId"] == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    tmp = tmp_path_factory.mktemp("message-log")
    path = tmp / "logs" / "messages.jsonl"
    sim = SimulatorThread(sim_config(deployments=[LONG])).start()
    config = gateway_config(
        tmp,
        {"sim": sim.url},
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        products=PRODUCTS,
        message_log={"path": str(path)},
    )
    gw = GatewayThread(config).start()
    try:
        yield Logged(Harness(gw, sim), path)
    finally:
        gw.stop()
        sim.stop()


def v1(logged: Logged, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{logged.harness.url}/openai/v1", api_key=key, max_retries=0)


def test_a_chat_completion_is_logged_with_the_ledgers_id_and_tokens(logged: Logged) -> None:
    sub, key = logged.key("logged")
    reply = logged.harness.sdk(key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You answer about waterworks."},
            {"role": "user", "content": "How does a sluice gate work?"},
        ],
        max_tokens=7,
        extra_headers={"x-ms-client-request-id": "client-corr-1"},
    )
    record = logged.record(sub)
    (entry,) = logged.entries(record.request_id)
    assert entry["RequestMessages"] == (
        "system: You answer about waterworks.\nuser: How does a sluice gate work?"
    )
    assert entry["ResponseMessages"] == reply.choices[0].message.content
    assert reply.usage is not None
    tokens = (entry["PromptTokens"], entry["CompletionTokens"], entry["TotalTokens"])
    assert tokens == (record.prompt_tokens, record.completion_tokens, record.total_tokens)
    assert tokens == (reply.usage.prompt_tokens, 7, reply.usage.total_tokens)
    assert entry["SubscriptionId"] == sub
    assert entry["CorrelationId"] == "client-corr-1"
    assert {k: entry[k] for k in FIXED} == {
        "Product": "logged",
        "DeploymentName": "gpt-4o-mini",
        "ModelName": record.model,
        "OperationName": "chat/completions",
        "ApiVersion": "2024-10-21",
        "IsStreamCompletion": False,
        "StatusCode": 200,
        "SequenceNumber": 0,
        "RequestTruncated": False,
        "ResponseTruncated": False,
    }
    assert entry["RequestOriginalBytes"] == len(entry["RequestMessages"].encode())
    assert entry["TimeGenerated"].endswith("Z")
    text = logged.path.read_text()
    assert key not in text and BACKEND_KEY not in text
    assert stat.S_IMODE(logged.path.stat().st_mode) == 0o600  # prompts: the owner's only


FIXED = (
    "Product",
    "DeploymentName",
    "ModelName",
    "OperationName",
    "ApiVersion",
    "IsStreamCompletion",
    "StatusCode",
    "SequenceNumber",
    "RequestTruncated",
    "ResponseTruncated",
)


def test_a_streams_answer_is_reassembled(logged: Logged) -> None:
    sub, key = logged.key("logged")
    stream = logged.harness.sdk(key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Tell me about locks"}],
        max_tokens=40,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    record = logged.record(sub)
    (entry,) = logged.entries(record.request_id)
    assert text and entry["ResponseMessages"] == text
    assert entry["IsStreamCompletion"] is True
    assert entry["CompletionTokens"] == record.completion_tokens == 40
    assert entry["PromptTokens"] == record.prompt_tokens > 0
    assert key not in logged.path.read_text()


def test_a_long_stream_is_handed_over_as_it_goes_and_logged_whole(logged: Logged) -> None:
    """More than a MiB of events: the request hands them to the log's thread on the way
    (``MessageLog.handoff_bytes``), which keeps their text only; the entry has all of it."""
    sub, key = logged.key("logged")
    stream = logged.harness.sdk(key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Tell me everything about dikes"}],
        max_tokens=4000,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    record = logged.record(sub)
    assert record.completion_tokens == 4000
    found = logged.entries(record.request_id)
    assert "".join(e["ResponseMessages"] for e in found) == text
    assert found[0]["ResponseOriginalBytes"] == len(text.encode())
    assert found[0]["ResponseTruncated"] is False
    assert len(found) == -(-len(text.encode()) // 32_768)  # in 32 KiB chunks


def test_a_responses_call_and_stream(logged: Logged) -> None:
    sub, key = logged.key("logged")
    client = v1(logged, key)
    answer = client.responses.create(
        model="gpt-4o-mini",
        instructions="Answer briefly.",
        input="What is a polder?",
        max_output_tokens=12,
    )
    record = logged.record(sub)
    (entry,) = logged.entries(record.request_id)
    assert entry["RequestMessages"] == "instructions: Answer briefly.\nWhat is a polder?"
    assert answer.output_text and entry["ResponseMessages"] == answer.output_text
    assert (entry["OperationName"], entry["ApiVersion"]) == ("responses", "v1")
    assert entry["CompletionTokens"] == record.completion_tokens == 12

    sub, key = logged.key("logged")
    deltas = [
        event.delta
        for event in v1(logged, key).responses.create(
            model="gpt-4o-mini", input="And a dike?", max_output_tokens=10, stream=True
        )
        if event.type == "response.output_text.delta"
    ]
    record = logged.record(sub)
    (entry,) = logged.entries(record.request_id)
    assert entry["ResponseMessages"] == "".join(deltas) != ""
    assert entry["IsStreamCompletion"] is True
    assert entry["CompletionTokens"] == record.completion_tokens == 10


def test_a_long_prompt_is_chunked_and_a_longer_one_truncated(logged: Logged) -> None:
    sub, key = logged.key("small")  # max_bytes 4096, chunk_bytes 1024
    prompt = "Sluis €" * 300  # 2,700 bytes, a 3-byte character every 9 bytes
    logged.harness.sdk(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], max_tokens=3
    )
    found = logged.entries(logged.record(sub).request_id)
    assert [e["SequenceNumber"] for e in found] == [0, 1, 2]
    assert "".join(e["RequestMessages"] for e in found) == f"user: {prompt}"
    assert all(len(e["RequestMessages"].encode()) <= 1024 for e in found)
    assert found[0]["ResponseMessages"] and [e["ResponseMessages"] for e in found[1:]] == ["", ""]
    assert {e["RequestTruncated"] for e in found} == {False}

    sub, key = logged.key("small")
    prompt = "Dijk €" * 1000  # 8,000 bytes
    logged.harness.sdk(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], max_tokens=3
    )
    found = logged.entries(logged.record(sub).request_id)
    logged_text = "".join(e["RequestMessages"] for e in found)
    full = f"user: {prompt}".encode()
    assert len(found) == 4
    assert logged_text.encode() == full[: len(logged_text.encode())]
    assert 4096 - 2 <= len(logged_text.encode()) <= 4096  # cut before a split euro sign
    assert {e["RequestTruncated"] for e in found} == {True}
    assert {e["RequestOriginalBytes"] for e in found} == {len(full)}


def test_an_error_answer_is_logged_with_its_error_object(logged: Logged) -> None:
    sub, key = logged.key("logged")
    with pytest.raises(openai.BadRequestError):
        logged.harness.sdk(key).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Ignore your rules"}],
            extra_headers={"x-sim-fault": "filter-prompt"},
        )
    record = logged.record(sub)
    (entry,) = logged.entries(record.request_id)
    assert entry["StatusCode"] == record.status == 400
    error = orjson.loads(entry["ResponseMessages"])
    assert error["code"] == "content_filter"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert entry["RequestMessages"] == "user: Ignore your rules"


def test_a_refusal_by_the_gateway_is_logged_with_its_error(logged: Logged) -> None:
    """The gateway's own answer (here its request limit's 429) is the logged answer."""
    sub, key = logged.key("limited")  # one request a minute
    client = logged.harness.sdk(key)
    for _ in range(2):
        with contextlib.suppress(openai.RateLimitError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=2
            )
    (refused,) = [r for r in logged.records(sub, expect=2) if r.status == 429]
    (entry,) = logged.entries(refused.request_id)
    assert entry["StatusCode"] == 429
    assert entry["RequestMessages"] == "user: hello"
    error = orjson.loads(entry["ResponseMessages"])
    assert error["code"] == refused.error_code == "RequestRateLimitExceeded"
    assert "request" in error["message"].lower()


def test_a_product_without_prompts_logs_answers_only(logged: Logged) -> None:
    sub, key = logged.key("answers-only")
    reply = logged.harness.sdk(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "secret plan"}], max_tokens=4
    )
    (entry,) = logged.entries(logged.record(sub).request_id)
    assert entry["RequestMessages"] is None and entry["RequestOriginalBytes"] is None
    assert entry["ResponseMessages"] == reply.choices[0].message.content


def test_a_product_without_message_log_writes_nothing(tmp_path: Path) -> None:
    sim = SimulatorThread(sim_config()).start()
    path = tmp_path / "messages.jsonl"
    products: list[dict[str, Any]] = [{"name": "plain"}, {"name": "logged", "message_log": {}}]
    config = gateway_config(tmp_path, {"sim": sim.url}, products=products)
    config["message_log"] = {"path": str(path)}
    try:
        with GatewayThread(config) as gw:
            harness = Harness(gw, sim)
            key = harness.new_key(product="plain").primary_key
            assert key is not None
            harness.sdk(key).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            (record,) = harness.records(expect=1)
            assert record.status == 200
            assert gw.gateway.messages is not None
            assert gw.gateway.messages.stats().requests == 0
        assert not path.exists()  # nothing written, so never even opened
        config["products"] = [{"name": "plain"}]
        with GatewayThread(config) as gw:
            assert gw.gateway.messages is None  # no product logs: no log at all
    finally:
        sim.stop()


@contextlib.contextmanager
def fifo_reader(path: Path) -> Iterator[list[bytes]]:
    """Open the read end of the FIFO at ``path`` (which lets its writer's open return) and
    collect the lines written to it until the block ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    lines: list[bytes] = []
    buffer = b""

    def read() -> None:
        nonlocal buffer
        with contextlib.suppress(BlockingIOError):
            while data := os.read(fd, 1 << 16):
                buffer += data
        *whole, buffer = buffer.split(b"\n")
        lines.extend(whole)

    try:
        yield lines
    finally:
        read()
        os.close(fd)


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    """The log's file is a FIFO nobody reads yet: the writer's thread blocks opening it, one
    request waits in the queue (``max_pending: 1``), and the others are dropped and counted
    while every request is answered at once. A reader then gets the ones kept."""
    fifo = tmp_path / "messages.fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    sim = SimulatorThread(sim_config()).start()
    config = gateway_config(
        tmp_path,
        {"sim": sim.url},
        products=[{"name": "logged", "message_log": {}}],
        message_log={"path": str(fifo), "max_file_bytes": 0, "max_pending": 1},
    )
    try:
        with GatewayThread(config) as gw:
            harness = Harness(gw, sim)
            key = harness.new_key(product="logged").primary_key
            assert key is not None
            client = harness.sdk(key)
            started = time.monotonic()
            for n in range(6):
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"request {n}"}],
                    max_tokens=2,
                )
            assert time.monotonic() - started < 5  # answered, not held by the log
            records = harness.records(expect=6)
            log = gw.gateway.messages
            assert log is not None
            deadline = time.monotonic() + 5
            while log.stats().dropped + log.stats().pending + 1 < 6:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            stats = log.stats()
            assert stats.dropped >= 4 and stats.requests == 0  # 1 in the thread, <= 1 queued
            scraped = httpx.get(f"{gw.url}/metrics").text
            assert f"sluicegate_message_log_dropped_total {float(stats.dropped)}" in scraped
            with fifo_reader(fifo) as lines:
                deadline = time.monotonic() + 5
                while log.stats().requests < 6 - stats.dropped:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            kept = {orjson.loads(line)["RequestId"] for line in lines}
            assert len(kept) == 6 - stats.dropped
            assert kept < {r.request_id for r in records}
            scraped = httpx.get(f"{gw.url}/metrics").text
            assert f"sluicegate_message_log_entries_total {float(len(kept))}" in scraped
    finally:
        sim.stop()


#: What the scripted backend answers: a chat answer of 7,000 characters, embeddings of about
#: 2 MB, and speech (binary audio).
CHAT_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Polder " * 1000},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1000, "total_tokens": 1004},
    }
)
EMBEDDINGS_ANSWER = orjson.dumps(
    {
        "object": "list",
        "model": "text-embedding-3-small",
        "data": [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(bytes(6144)).decode()}
            for i in range(256)
        ],
        "usage": {"prompt_tokens": 256, "total_tokens": 256},
    }
)
SPEECH = bytes(range(256)) * 64


@contextlib.contextmanager
def _logged_gateway(
    tmp_path: Path, url: str, path: Path, budget: int
) -> Iterator[tuple[Harness, str, MessageLog]]:
    """A gateway in front of the backend at ``url`` whose product ``logged`` writes its
    message log to ``path`` within ``budget`` bytes held; with a key of that product."""
    config = gateway_config(
        tmp_path,
        {"wire": url},
        products=[{"name": "logged", "message_log": {}}],
        message_log={"path": str(path), "max_pending_bytes": budget},
    )
    with GatewayThread(config) as gw:
        harness = Harness(gw, None)  # type: ignore[arg-type]
        key = harness.new_key(product="logged").primary_key
        assert key is not None
        log = gw.gateway.messages
        assert log is not None
        yield harness, key, log


def _tool_chunk(call: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"tool_calls": [call]} if call else {}
    return {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1750697159,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


#: A chat stream whose answer is two parallel tool calls, as Azure streams them: the name
#: first (empty arguments), then the arguments in fragments, each naming its call's index.
TOOL_STREAM = [
    {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1750697159,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": None, "refusal": None},
                "finish_reason": None,
                "logprobs": None,
            }
        ],
    },
    _tool_chunk(
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "water_level", "arguments": ""},
        }
    ),
    _tool_chunk({"index": 0, "function": {"arguments": '{"lock": '}}),
    _tool_chunk(
        {
            "index": 1,
            "id": "call_b",
            "type": "function",
            "function": {"name": "open_gate", "arguments": ""},
        }
    ),
    _tool_chunk({"index": 0, "function": {"arguments": '"Kornwerderzand"}'}}),
    _tool_chunk({"index": 1, "function": {"arguments": '{"gate": 3}'}}),
    _tool_chunk({}, finish="tool_calls"),
    {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1750697159,
        "model": "gpt-4o-2024-08-06",
        "choices": [],
        "usage": {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50},
    },
]


async def _scripted(request: Request, writer: asyncio.StreamWriter) -> bool:
    if request.method == "POST" and request.json().get("stream"):
        for n, data in enumerate(TOOL_STREAM):  # in several writes: relayed event by event
            if n == 0:
                writer.write(head(content_type="text/event-stream"))
            writer.write(chunk(event(data)))
            await writer.drain()
        writer.write(chunk(b"data: [DONE]\n\n") + chunk(b""))
    elif request.target.split("?")[0].endswith("/audio/speech"):
        writer.write(head(content_type="audio/mpeg", length=len(SPEECH)) + SPEECH)
    elif request.target.split("?")[0].endswith("/embeddings"):
        writer.write(head(length=len(EMBEDDINGS_ANSWER)) + EMBEDDINGS_ANSWER)
    else:
        writer.write(head(length=len(CHAT_ANSWER)) + CHAT_ANSWER)
    await writer.drain()
    return True


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """A gateway in front of ``_scripted`` whose products log at most 1 KiB of each side
    (``tiny``) or APIM's 2 MiB (``logged``), with 1 MiB of bodies waiting for the writer at
    most."""
    tmp = tmp_path_factory.mktemp("message-log-scripted")
    path = tmp / "messages.jsonl"
    with WireBackend(_scripted).running() as backend:
        config = gateway_config(
            tmp,
            {"wire": backend.url},
            products=[
                {"name": "tiny", "message_log": {"max_bytes": 1024}},
                {"name": "logged", "message_log": {}},
            ],
            message_log={"path": str(path), "max_pending_bytes": 1024 * 1024},
        )
        with GatewayThread(config) as gw:
            yield Logged(Harness(gw, None), path)  # type: ignore[arg-type]


def test_an_answer_past_what_is_kept_is_logged_from_its_beginning(scripted: Logged) -> None:
    """A whole answer larger than 4 × ``max_bytes`` comes in one part: its beginning, not
    nothing, is the logged (raw) answer."""
    sub, key = scripted.key("tiny")
    scripted.harness.sdk(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say polder"}]
    )
    assert len(CHAT_ANSWER) > 4 * 1024
    (entry,) = scripted.entries(scripted.record(sub).request_id)
    assert entry["ResponseMessages"] == CHAT_ANSWER[:1024].decode()
    assert (entry["ResponseTruncated"], entry["ResponseOriginalBytes"]) == (True, len(CHAT_ANSWER))


def test_an_embeddings_answers_vectors_are_never_held_for_the_log(scripted: Logged) -> None:
    """A 2 MB embeddings answer is not kept for the log (its vectors are no text, and parsing
    them would hold the GIL): the request is logged although ``max_pending_bytes`` (1 MiB)
    could not hold the answer."""
    sub, key = scripted.key("logged")
    scripted.harness.sdk(key).embeddings.create(model="gpt-4o", input=["a dike", "a dam"])
    assert len(EMBEDDINGS_ANSWER) > 2 * 1024 * 1024
    (entry,) = scripted.entries(scripted.record(sub).request_id)
    assert entry["RequestMessages"] == "a dike\na dam"
    assert (entry["ResponseMessages"], entry["ResponseOriginalBytes"]) == ("", 0)


def test_a_deployments_other_operations_are_not_logged(scripted: Logged) -> None:
    """Speech (and images, transcriptions: a deployment's unmetered operations) have no
    messages: their binary bodies never reach the log."""
    sub, key = scripted.key("tiny")
    client = scripted.harness.sdk(key)
    speech = client.audio.speech.create(model="gpt-4o", voice="alloy", input="Hello")
    assert speech.content == SPEECH
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    speech_record, chat_record = sorted(scripted.records(sub, expect=2), key=lambda r: r.ts)
    assert speech_record.operation == "audio/speech"
    assert scripted.entries(chat_record.request_id)  # written after the speech's would be
    assert entries_in(scripted.path, speech_record.request_id, wait=0) == []


def test_requests_cut_at_shutdown_are_logged_with_the_answer_they_got(tmp_path: Path) -> None:
    """The shutdown's grace period ends while one request waits for its backend's answer and
    another waits to retry (the backend asked for 5 s): both clients get Azure's 503 for a
    service going away, and both requests are logged with it (the second's record was
    written by failover, which the message log must not miss)."""
    path = tmp_path / "messages.jsonl"
    sim = SimulatorThread(sim_config()).start()
    config = gateway_config(
        tmp_path,
        {"sim": sim.url},
        listen={"host": "127.0.0.1", "port": 0, "graceful_shutdown_seconds": 1},
        products=[{"name": "logged", "message_log": {}}],
        message_log={"path": str(path)},
    )
    gw = GatewayThread(config).start()
    try:
        harness = Harness(gw, sim)
        key = harness.new_key(product="logged").primary_key
        assert key is not None

        def call(fault: str) -> None:
            with contextlib.suppress(openai.APIStatusError):
                harness.sdk(key).chat.completions.create(
                    # Two deployments: the 429 keeps its own out of routing, not the other.
                    model="gpt-4o" if fault == "hang" else "gpt-4o-mini",
                    messages=[{"role": "user", "content": fault}],
                    max_tokens=3,
                    extra_headers={"x-sim-fault": fault},
                    timeout=30,
                )

        callers = [threading.Thread(target=call, args=(fault,)) for fault in ("hang", "429:5")]
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 10
        while not harness.sim_log():  # the 429's (a hanging request is logged at its end)
            assert time.monotonic() < deadline, "the request did not reach the backend"
            time.sleep(0.02)
        time.sleep(0.2)  # the 429 is in: the gateway waits to retry
        gw.stop()
        for caller in callers:
            caller.join(timeout=10)
    finally:
        gw.stop()
        sim.stop()
    found = {}
    for line in path.read_bytes().splitlines():
        entry = orjson.loads(line)
        found[entry["RequestMessages"]] = entry
    assert set(found) == {"user: hang", "user: 429:5"}
    for entry in found.values():
        assert entry["StatusCode"] == 503
        assert orjson.loads(entry["ResponseMessages"])["code"] == "ServiceUnavailable"


def test_a_streams_tool_calls_are_logged_as_a_whole_answers(scripted: Logged) -> None:
    """A streamed answer of tool calls (no content) logs each call as a whole answer does,
    assembled from its name and argument fragments by index."""
    sub, key = scripted.key("logged")
    stream = scripted.harness.sdk(key).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "How high is the water at the lock?"}],
        tools=[{"type": "function", "function": {"name": "water_level", "parameters": {}}}],
        stream=True,
    )
    calls: dict[int, list[str]] = {}
    for part in stream:
        for choice in part.choices:
            for call in choice.delta.tool_calls or ():
                fn = call.function
                calls.setdefault(call.index, []).append((fn and (fn.name or fn.arguments)) or "")
    assert calls == {
        0: ["water_level", '{"lock": ', '"Kornwerderzand"}'],
        1: ["open_gate", '{"gate": 3}'],
    }
    (entry,) = scripted.entries(scripted.record(sub).request_id)
    assert entry["ResponseMessages"] == (
        '[tool call water_level] {"lock": "Kornwerderzand"}\n[tool call open_gate] {"gate": 3}'
    )
    assert entry["IsStreamCompletion"] is True and entry["ResponseTruncated"] is False
    assert entry["CompletionTokens"] == 30


def _failing(monkeypatch: pytest.MonkeyPatch, name: str, subject: Any) -> None:
    """Make ``subject`` (a callable of ``sluicegate.proxy.relay``) raise: a bug of the
    gateway's, after the request's capture began and before anything was sent."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(subject, name, broken)


@pytest.mark.parametrize("streamed", [False, True])
def test_an_unexpected_failure_is_logged_with_the_500_the_client_got(
    scripted: Logged, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    """A bug in the request path after the answer came (a whole answer before it is sent;
    a stream before its first event): the client gets the gateway's 500, and the entry
    logs that error, not an empty answer."""
    if streamed:
        _failing(monkeypatch, "client_response_headers", relay)  # before its head
    else:
        _failing(monkeypatch, "_send_whole", relay)
    sub, key = scripted.key("logged")
    with pytest.raises(openai.InternalServerError) as failed:
        scripted.harness.sdk(key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Say polder"}], stream=streamed
        )
    record = scripted.record(sub)
    (entry,) = scripted.entries(record.request_id)
    assert entry["StatusCode"] == record.status == failed.value.status_code == 500
    logged = orjson.loads(entry["ResponseMessages"])
    assert isinstance(failed.value.body, dict)
    assert logged == failed.value.body  # what the client got: the SDK's error body
    assert logged["code"] == "InternalServerError" and record.request_id in logged["message"]
    assert entry["RequestMessages"] == "user: Say polder"


#: Streams running at once, each holding this much text before its backend goes on: together
#: twice the log's smallest ``max_pending_bytes`` (1 MiB), each under its hand-over size.
STREAMS = 24
HELD_EVENTS = 90
EVENT_TEXT = "Sluis " * 170  # 1,020 bytes: an event of about 1.1 KB


def test_many_streams_in_flight_hold_no_more_than_the_logs_budget(tmp_path: Path) -> None:
    """Streams that have sent part of their answer and wait for the rest hold their events
    for the log. What they hold counts against ``max_pending_bytes``: past it, a stream's
    events are not kept (its entry says ``ResponseTruncated``, counted as a stream cut, as
    when the queue is full) and the rest are logged whole; once all are written nothing is
    held any more."""
    gate = threading.Event()

    async def held_streams(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(head(content_type="text/event-stream"))
        for _ in range(HELD_EVENTS):
            writer.write(chunk(content_event(EVENT_TEXT)))
            await writer.drain()
        while not gate.is_set():
            await asyncio.sleep(0.01)
        writer.write(chunk(content_event("Dam.")) + chunk(b"data: [DONE]\n\n") + chunk(b""))
        await writer.drain()
        return True

    path = tmp_path / "messages.jsonl"
    budget = 1024 * 1024
    with (
        WireBackend(held_streams).running() as backend,
        _logged_gateway(tmp_path, backend.url, path, budget) as (harness, key, log),
    ):
        received: list[str] = []
        halfway = threading.Semaphore(0)

        def call() -> None:
            stream = harness.sdk(key).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "dams"}], stream=True
            )
            text = []
            for n, part in enumerate(stream, 1):
                text.append(part.choices[0].delta.content or "")
                if n == HELD_EVENTS:
                    halfway.release()
            received.append("".join(text))

        callers = [threading.Thread(target=call) for _ in range(STREAMS)]
        for caller in callers:
            caller.start()
        try:
            for _ in range(STREAMS):  # every stream has sent what it holds
                assert halfway.acquire(timeout=30)
            held = log.stats().pending_bytes
            assert STREAMS * HELD_EVENTS * len(EVENT_TEXT) > 2 * budget
            assert budget // 2 < held <= budget  # counted, and within the budget
        finally:
            gate.set()
            for caller in callers:
                caller.join(timeout=30)
        assert len(received) == STREAMS
        assert set(received) == {EVENT_TEXT * HELD_EVENTS + "Dam."}
        records = harness.records(expect=STREAMS)
        deadline = time.monotonic() + 10
        while log.stats().requests < STREAMS:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stats = log.stats()
        assert (stats.pending, stats.pending_bytes) == (0, 0)  # all given back
    entries = [entries_in(path, r.request_id, wait=0) for r in records]
    assert all(entries)
    cut = [e for e in entries if e[0]["ResponseTruncated"]]
    whole = [e for e in entries if not e[0]["ResponseTruncated"]]
    assert len(cut) == stats.streams_cut >= STREAMS // 3  # about half did not fit
    assert whole and {"".join(x["ResponseMessages"] for x in e) for e in whole} == set(received)
    for e in cut:
        assert len("".join(x["ResponseMessages"] for x in e)) < len(received[0])


#: Whole answers running at once, of about 1.9 MB of text each, relayed in parts: each has
#: sent ``ANSWER_HELD`` bytes when its backend waits. Together more than three times the log's
#: budget (4 MiB).
ANSWERS = 8
ANSWER_HELD = 1_500_000
LARGE_TEXT = "Sluis " * 320_000
LARGE_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-3",
        "object": "chat.completion",
        "created": 1750697159,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": LARGE_TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 320_000, "total_tokens": 320_009},
    }
)


def test_large_answers_in_flight_hold_no_more_than_the_logs_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers relayed in parts (a metered answer past ``WHOLE_ANSWER_LIMIT``, here lowered
    to 64 KiB so that 2 MB answers are such answers) keep their parts for the log until the
    request ends. What they keep counts against ``max_pending_bytes`` from the moment it is
    kept, as a stream's events do: many such answers in flight at once (their backends, or
    their clients, slow) hold at most the budget between them. An answer whose part finds the
    budget spent keeps the beginning that fits, logged raw with ``ResponseTruncated`` (counted
    as an answer cut) and gives back the rest, so that those that fit are logged whole; none
    is dropped, and once all are written nothing is held."""
    captures: list[MessageCapture] = []

    class Recorded(MessageCapture):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            captures.append(self)

    monkeypatch.setattr(pipeline, "MessageCapture", Recorded)
    monkeypatch.setattr(relay, "WHOLE_ANSWER_LIMIT", 65_536)
    gate = threading.Event()

    async def large(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(head(length=len(LARGE_ANSWER)))
        for start in range(0, len(LARGE_ANSWER), 65_536):
            if start >= ANSWER_HELD:
                while not gate.is_set():
                    await asyncio.sleep(0.01)
            writer.write(LARGE_ANSWER[start : start + 65_536])
            await writer.drain()
        return True

    path = tmp_path / "messages.jsonl"
    budget = 4 * 1024 * 1024
    assert 2 * budget < ANSWERS * ANSWER_HELD
    with (
        WireBackend(large).running() as backend,
        _logged_gateway(tmp_path, backend.url, path, budget) as (harness, key, log),
    ):
        received: list[str | None] = []

        def call() -> None:
            answer = harness.sdk(key).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "sluices"}]
            )
            received.append(answer.choices[0].message.content)

        callers = [threading.Thread(target=call) for _ in range(ANSWERS)]
        for caller in callers:
            caller.start()
        try:
            wait_for(
                lambda: (
                    len(captures) == ANSWERS
                    and all(c.size + c.overflow >= ANSWER_HELD for c in captures)
                ),
                what="every answer relayed as far as its backend has sent it",
            )
            held = sum(c.size for c in captures)
            assert not any(c.finished for c in captures)  # all in flight
            assert captures[0].policy.max_bytes > len(LARGE_TEXT)  # each fits max_bytes
            assert 0 < held <= log.stats().pending_bytes <= budget  # counted, within it
        finally:
            gate.set()
            for caller in callers:
                caller.join(timeout=30)
        assert received == [LARGE_TEXT] * ANSWERS  # the clients got everything
        records = harness.records(expect=ANSWERS)
        wait_for(lambda: log.stats().requests == ANSWERS, within=10)
        stats = log.stats()
        assert (stats.pending, stats.pending_bytes, stats.dropped) == (0, 0, 0)
    entries = [entries_in(path, r.request_id, wait=0) for r in records]
    assert all(entries)
    whole = [e for e in entries if not e[0]["ResponseTruncated"]]
    cut = [e for e in entries if e[0]["ResponseTruncated"]]
    assert whole and len(cut) == stats.answers_cut >= ANSWERS // 2
    for e in whole:
        assert "".join(x["ResponseMessages"] for x in e) == LARGE_TEXT
    for e in cut:  # the beginning that fitted, raw (perhaps nothing), unparsed
        assert e[0]["ResponseOriginalBytes"] == len(LARGE_ANSWER)
        text = "".join(x["ResponseMessages"] for x in e)
        assert LARGE_ANSWER.decode().startswith(text)
        assert len(text) <= CUT_KEPT_BYTES


def test_a_gateway_whose_log_file_cannot_be_locked_starts_when_it_never_rotates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pre-created log file beside which the lock file cannot be created (here its name
    would be too long; a read-only directory does the same for any user but root), with
    ``max_file_bytes: 0``: the gateway starts, warns once, and logs as it did before the
    lock existed (the same file set to rotate is refused: ``tests/unit/test_message_sink``)."""
    path = tmp_path / ("m" * 249 + ".jsonl")  # a name as long as may be; the lock's is longer
    path.touch(mode=0o600)
    sim = SimulatorThread(sim_config()).start()
    config = gateway_config(
        tmp_path,
        {"sim": sim.url},
        products=[{"name": "logged", "message_log": {}}],
        message_log={"path": str(path), "max_file_bytes": 0},
    )
    try:
        with caplog.at_level(logging.WARNING, logger="sluicegate"), GatewayThread(config) as gw:
            harness = Harness(gw, sim)
            key = harness.new_key(product="logged").primary_key
            assert key is not None
            harness.sdk(key).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Say dike"}], max_tokens=2
            )
            (record,) = harness.records(expect=1)
            (entry,) = entries_in(path, record.request_id)
            assert entry["RequestMessages"] == "user: Say dike"
    finally:
        sim.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluicegate.messages"]
    assert len(warnings) == 1 and "running without it" in warnings[0]
