"""The message log's charge for whole answers relayed in parts (``MessageCapture``) is given
back when such an answer ends early (found sound by review; guards): the backend breaking
off mid-answer, the client leaving mid-answer."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from sluicegate.proxy import relay
from tests.integration.conftest import Harness
from tests.integration.test_message_log import LARGE_ANSWER, entries_in
from tests.integration.wire_backend import Request, WireBackend, head, wait_for
from tests.support.gateway import GatewayThread, gateway_config

HALF = 1_000_000


@pytest.mark.parametrize("ending", ["backend breaks off", "client leaves"])
def test_an_answer_in_parts_gives_back_its_charge_however_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    monkeypatch.setattr(relay, "WHOLE_ANSWER_LIMIT", 65_536)
    sent_half = threading.Event()
    go_on = threading.Event()

    async def answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(head(length=len(LARGE_ANSWER)))
        for start in range(0, len(LARGE_ANSWER), 65_536):
            if start >= HALF and not sent_half.is_set():
                sent_half.set()
                while not go_on.is_set():
                    await asyncio.sleep(0.01)
                if ending == "backend breaks off":
                    return False  # the connection closes, the answer cut short
            writer.write(LARGE_ANSWER[start : start + 65_536])
            try:
                await writer.drain()
            except ConnectionError:
                return False
        return True

    path = tmp_path / "messages.jsonl"
    with WireBackend(answer).running() as backend:
        config = gateway_config(
            tmp_path,
            {"wire": backend.url},
            products=[{"name": "logged", "message_log": {}}],
            message_log={"path": str(path)},
        )
        with GatewayThread(config) as gw:
            harness = Harness(gw, None)  # type: ignore[arg-type]
            key = harness.new_key(product="logged").primary_key
            assert key is not None
            log = gw.gateway.messages
            assert log is not None
            body = b'{"messages":[{"role":"user","content":"sluices"}]}'
            host, port = gw.url.removeprefix("http://").split(":")
            client = socket.create_connection((host, int(port)))
            client.sendall(
                b"POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 "
                b"HTTP/1.1\r\nhost: x\r\napi-key: " + key.encode() + b"\r\n"
                b"content-type: application/json\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body
            )  # fmt: skip
            got = b""
            while len(got) < HALF // 2:
                got += client.recv(1 << 20)
            wait_for(sent_half.is_set)
            wait_for(lambda: log.stats().pending_bytes > 0, what="the answer charged")
            if ending == "client leaves":
                client.close()
            go_on.set()
            if ending != "client leaves":
                while data := client.recv(1 << 20):
                    got += data
                client.close()
            (record,) = harness.records(expect=1)
            wait_for(lambda: log.stats().requests == 1, within=10, what="the entry written")
            stats = log.stats()
            assert (stats.pending, stats.pending_bytes, stats.dropped) == (0, 0, 0)
        entries = entries_in(path, record.request_id, wait=0)
        assert entries and entries[0]["StatusCode"] == record.status
        text = "".join(e["ResponseMessages"] for e in entries)
        # What the client got, raw (a JSON answer cut short cannot be flattened), whole: the
        # log kept all of it (it fits the budget), so the log did not cut it.
        assert entries[0]["ResponseTruncated"] is False
        assert text and LARGE_ANSWER.decode().startswith(text)
        assert len(text) == entries[0]["ResponseOriginalBytes"] >= HALF // 2
