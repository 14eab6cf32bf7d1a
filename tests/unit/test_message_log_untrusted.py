"""The message log against answers it cannot trust (found by review): a backend's JSON of
unexpected shapes never costs a request its entry, and a stream of many tiny choices, output
items, tool calls or errors holds no more memory than its text's limit allows."""

from __future__ import annotations

import asyncio
import dataclasses
import tracemalloc
from pathlib import Path

import orjson
import pytest

from sluicegate.messages.capture import MessageCapture
from sluicegate.messages.config import MessageLogPolicy, MessageLogSink
from sluicegate.messages.flatten import StreamText, answer_text, request_text
from sluicegate.messages.sink import MessageLog, MessageLogUnlockable, lock_path
from sluicegate.proxy.asgi import Message
from tests.unit.test_message_sink import _record

_DEEP = b"[" * 300 + b"]" * 300  # within orjson.loads' 1024 levels, past orjson.dumps' 254
_DEEPER = b"[" * 1000 + b"]" * 1000  # past Python's recursion limit for repr


#: Answers a backend (or something posing as one) may send: JSON, but not in the shapes the
#: API documents.
ODD_ANSWERS = {
    "choices not a list": b'{"choices": 1}',
    "output not a list": b'{"output": true}',
    "an error nested past orjson.dumps' limit": b'{"error": ' + _DEEP + b"}",
    "tool call arguments nested past repr's limit": (
        b'{"choices":[{"message":{"tool_calls":[{"function":{"name":"f","arguments":'
        + _DEEPER
        + b"}}]}}]}"
    ),
    "an MCP call's arguments nested past repr's limit": (
        b'{"output":[{"type":"mcp_call","name":"m","arguments":' + _DEEPER + b"}]}"
    ),
}


@pytest.mark.parametrize("answer", ODD_ANSWERS.values(), ids=ODD_ANSWERS.keys())
def test_an_answer_of_unexpected_shape_is_flattened_without_raising(answer: bytes) -> None:
    assert isinstance(answer_text(answer, "chat/completions"), str)
    if answer.startswith(b'{"error"'):  # its text, as it came
        assert answer_text(answer, "chat/completions") == answer.decode()
    stream = StreamText(4096)
    stream.feed(b"data: " + answer + b"\n\n")
    assert isinstance(stream.text(), str)


def test_a_tool_calls_arguments_that_are_not_a_string_are_logged_as_json() -> None:
    """Not Python's repr (``{'a': 1}``): the entry shows what the client was sent."""
    answer = b'{"output":[{"type":"mcp_call","name":"m","arguments":{"a":[1,null]}}]}'
    assert answer_text(answer, "responses") == '[tool call m] {"a":[1,null]}'


REQUESTS = {
    "a role nested past repr's limit": (
        b'{"messages":[{"role":' + _DEEPER + b',"content":"the prompt"}]}'
    ),
    "a body without messages nested past orjson.dumps' limit": b'{"x": ' + _DEEP + b"}",
}


@pytest.mark.parametrize("body", REQUESTS.values(), ids=REQUESTS.keys())
def test_a_request_of_unexpected_shape_is_flattened_without_raising(body: bytes) -> None:
    assert isinstance(request_text(body), str)


def test_an_odd_answer_still_gets_its_entry(tmp_path: Path) -> None:
    """Through the log's thread: every request is logged, none counted as a failed write."""
    path = tmp_path / "messages.jsonl"
    log = MessageLog(MessageLogSink(path=str(path)))
    log.start()

    async def send(message: Message) -> None:
        pass

    async def relay(capture: MessageCapture, answer: bytes) -> None:
        teed = capture.tee(send, False, 200)
        await teed({"type": "http.response.body", "body": answer, "more_body": False})

    for n, answer in enumerate(ODD_ANSWERS.values()):
        capture = MessageCapture(MessageLogPolicy(), log, "/openai/v1/chat/completions", b"", "m")
        asyncio.run(relay(capture, answer))
        capture.finish(dataclasses.replace(_record(f"req-{n}")), None, b"{}", [])
    log.close()
    stats = log.stats()
    assert (stats.requests, stats.write_failures, stats.pending_bytes) == (len(ODD_ANSWERS), 0, 0)
    logged = {orjson.loads(line)["RequestId"] for line in path.read_bytes().splitlines()}
    assert logged == {f"req-{n}" for n in range(len(ODD_ANSWERS))}


#: Streams whose every event opens something new: a choice, an output item, a tool call, or
#: adds an error, with one character (or none) of text each.
TINY_EVENTS = {
    "a choice per event": lambda i: {"choices": [{"index": i, "delta": {"content": "a"}}]},
    "an output item per event": lambda i: {
        "type": "response.output_text.delta",
        "output_index": i,
        "delta": "a",
    },
    "a tool call per event": lambda i: {
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, "function": {}}]}}]
    },
    "an error per event": lambda i: {"error": "e"},
}


@pytest.mark.parametrize("event", TINY_EVENTS.values(), ids=TINY_EVENTS.keys())
def test_a_stream_of_tiny_events_holds_about_its_limit(event: object) -> None:
    """``StreamText`` holds at most its limit of text: the log charges a stream's text as
    at most ``max_bytes`` against ``max_pending_bytes``. Objects made per choice, output item,
    tool call or error count too, or a stream of 100,000 one-character choices would hold
    ~35 MB for 100 KB of text."""
    limit = 64 * 1024
    stream = StreamText(limit)
    make = event  # a lambda from TINY_EVENTS
    assert callable(make)
    events = [b"data: " + orjson.dumps(make(i)) + b"\n\n" for i in range(100_000)]
    tracemalloc.start()
    try:
        for start in range(0, len(events), 10_000):  # as handed over, in parts
            stream.feed(b"".join(events[start : start + 10_000]))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 4 * limit, held
    assert stream.original_bytes > limit  # the rest was counted: the entry reads as cut


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """The lock file is truncated and rewritten (the holder's pid) at start: a symbolic link
    planted in its place (by anyone who may write the log's directory) must not make the
    gateway truncate the file it points to. It is refused as a lock that cannot be used."""
    path = tmp_path / "messages.jsonl"
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    lock_path(str(path)).symlink_to(victim)
    with pytest.raises(MessageLogUnlockable):
        MessageLog(MessageLogSink(path=str(path))).start()
    log = MessageLog(MessageLogSink(path=str(path), max_file_bytes=0))
    log.start()  # never rotates: runs without the lock, after a warning
    log.close()
    assert victim.read_text() == "precious\n"


def test_an_answer_whose_room_came_free_meanwhile_is_not_counted_as_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that finds the budget spent asks again for what fits (``reserve_some``); if
    the log's thread gave back enough in between (it releases under the same lock, from its
    own thread), the part is kept whole, nothing is lost, and the entry is the whole answer:
    it is not counted as an answer cut (the metric would count answers logged whole)."""
    path = tmp_path / "messages.jsonl"
    budget = 1024 * 1024
    log = MessageLog(MessageLogSink(path=str(path), max_pending_bytes=budget))
    log.start()
    others = budget - 1000
    assert log.reserve(others)  # what a request queued meanwhile holds
    real_reserve = log.reserve

    def reserve(size: int, spare: int = 0) -> bool:
        refused = real_reserve(size, spare)
        log.release(others)  # the log's thread wrote that request, just after the refusal
        monkeypatch.setattr(log, "reserve", real_reserve)
        return refused

    monkeypatch.setattr(log, "reserve", reserve)
    answer = orjson.dumps({"choices": [{"index": 0, "message": {"content": "Sluis " * 1000}}]})

    async def send(message: Message) -> None:
        pass

    async def relay(capture: MessageCapture) -> None:
        teed = capture.tee(send, False, 200)
        await teed({"type": "http.response.body", "body": answer, "more_body": False})

    capture = MessageCapture(MessageLogPolicy(), log, "/openai/v1/chat/completions", b"", "m")
    asyncio.run(relay(capture))
    capture.finish(_record("whole"), None, b"{}", [])
    log.close()
    (entry,) = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert entry["ResponseTruncated"] is False
    assert entry["ResponseMessages"] == "Sluis " * 1000
    stats = log.stats()
    assert (stats.answers_cut, stats.pending_bytes) == (0, 0)
