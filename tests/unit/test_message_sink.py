"""The message log's writer (``messages/sink.py``) on its own: standard output, rotation,
and a destination that cannot be written."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.messages.capture import CUT_KEPT_BYTES, RESERVE_BYTES, MessageCapture
from sluicegate.messages.config import MessageLogPolicy, MessageLogSink
from sluicegate.messages.sink import MessageLog, MessageLogInUse, MessageLogUnlockable, lock_path
from sluicegate.proxy.asgi import Message

SECRET_PROMPT = "the launch code is 0000"


def _record(request_id: str = "req") -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        ts=1_765_130_000.25,
        subscription_id="sub-1",
        owner="team-a",
        product="logged",
        deployment="gpt-4o-mini",
        backend="sim",
        operation="chat/completions",
        status=200,
        outcome=Outcome.OK,
        prompt_tokens=5,
        completion_tokens=2,
        total_tokens=7,
    )


def _submit(log: MessageLog, n: int, prompt: str = SECRET_PROMPT) -> None:
    record = _record(f"req-{n}")
    capture = MessageCapture(MessageLogPolicy(), log, "/openai/deployments/x", b"", None)
    body = orjson.dumps({"messages": [{"role": "user", "content": prompt}]})
    assert log.submit(record, capture, None, 0, [])  # a body of None: prompts not logged
    capture = MessageCapture(MessageLogPolicy(), log, "/openai/v1/chat/completions", b"", "m")
    record = dataclasses.replace(record, request_id=f"req-{n}-b")
    assert log.submit(record, capture, body, len(body), [(b"x-ms-client-request-id", b"c-1")])


def test_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    log = MessageLog(MessageLogSink(path="-"))
    log.start()
    _submit(log, 1)
    log.close()
    first, second = map(orjson.loads, capsys.readouterr().out.splitlines())
    assert first["RequestId"] == "req-1" and first["RequestMessages"] is None
    assert first["ApiVersion"] is None and first["ModelName"] is None
    assert first["TimeGenerated"] == "2025-12-07T17:53:20.250Z"
    assert second["RequestMessages"] == f"user: {SECRET_PROMPT}"
    assert (second["ApiVersion"], second["ModelName"], second["CorrelationId"]) == (
        "v1",
        "m",
        "c-1",
    )
    assert second["ResponseMessages"] == ""  # nothing was sent: no answer to log
    assert log.stats().requests == 2 and log.stats().entries == 2


def test_the_file_rotates_and_keeps_backup_count_files(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "messages.jsonl"
    log = MessageLog(MessageLogSink(path=str(path), max_file_bytes=2000, backup_count=2))
    log.start()
    for n in range(12):
        _submit(log, n, "x" * 300)
    log.close()
    files = sorted(p.name for p in path.parent.glob("messages.jsonl*"))  # a shipper's pattern
    assert files == ["messages.jsonl", "messages.jsonl.1", "messages.jsonl.2"]
    for name in files:
        data = (path.parent / name).read_bytes()
        assert 0 < len(data) <= 2000
        assert all(orjson.loads(line) for line in data.splitlines())  # whole lines only
    assert log.stats().requests == 24 and log.stats().write_failures == 0


def test_a_failed_write_is_counted_and_never_logs_the_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    log = MessageLog(MessageLogSink(path=str(tmp_path)))  # a directory: cannot be opened
    log.start()
    with caplog.at_level(logging.WARNING, logger="sluicegate.messages"):
        _submit(log, 1)
        log.close()
    stats = log.stats()
    assert (stats.write_failures, stats.requests, stats.entries) == (2, 0, 0)
    assert "writing" in caplog.text and str(tmp_path) in caplog.text
    assert SECRET_PROMPT not in caplog.text + capsys.readouterr().err  # not even on stderr


def test_a_file_another_live_process_writes_is_refused(tmp_path: Path) -> None:
    """Two processes writing one file would rename it under each other when they rotate it:
    the second to start is refused while the first lives, and starts once it has gone."""
    path = tmp_path / "messages.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from sluicegate.messages.config import MessageLogSink\n"
            "from sluicegate.messages.sink import MessageLog\n"
            f"log = MessageLog(MessageLogSink(path={str(path)!r}))\n"
            "log.start()\n"
            "print('started', flush=True)\n"
            "sys.stdin.read()\n"
            "log.close()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"started\n"
        second = MessageLog(MessageLogSink(path=str(path)))
        with pytest.raises(MessageLogInUse) as refused:
            second.start()
        assert f"pid {holder.pid}" in str(refused.value) and str(path) in str(refused.value)
        assert lock_path(str(path)) == tmp_path / ".messages.jsonl.lock"
    finally:
        holder.communicate(timeout=10)  # its stdin closed: it closes its log and exits
    assert holder.returncode == 0
    second = MessageLog(MessageLogSink(path=str(path)))
    second.start()
    _submit(second, 1)
    second.close()
    assert second.stats().requests == 2
    # Its lock goes with it: a third instance in this process may start after it closed.
    third = MessageLog(MessageLogSink(path=str(path)))
    third.start()
    third.close()


def test_a_killed_instance_leaves_no_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from sluicegate.messages.config import MessageLogSink\n"
            "from sluicegate.messages.sink import MessageLog\n"
            f"MessageLog(MessageLogSink(path={str(path)!r})).start()\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"started\n"
    holder.kill()
    holder.wait(timeout=10)
    holder.stdout.close()
    log = MessageLog(MessageLogSink(path=str(path)))
    log.start()  # the lock died with its process
    log.close()


EVENTS = 4000


def test_a_long_stream_under_a_small_budget_is_handed_over_and_gives_everything_back(
    tmp_path: Path,
) -> None:
    """3 MiB of events through a log of 1 MiB: handed to the thread in eighths of the budget,
    the stream's events in hand and its text kept stay charged to the budget (never past
    it), its entry is whole, and once written the log holds nothing."""
    path = tmp_path / "messages.jsonl"
    log = MessageLog(MessageLogSink(path=str(path), max_pending_bytes=1024 * 1024))
    assert log.handoff_bytes == 128 * 1024
    log.start()
    policy = MessageLogPolicy(max_bytes=256 * 1024)
    capture = MessageCapture(policy, log, "/openai/v1/chat/completions", b"", "m")
    sent: list[bytes] = []
    highest = 0

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))

    async def relay() -> None:
        nonlocal highest
        teed = capture.tee(send, True, 200)
        for n in range(EVENTS):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"{n:04d}" * 200}}]}
            body = b"data: " + orjson.dumps(chunk) + b"\n\n"
            await teed({"type": "http.response.body", "body": body, "more_body": True})
            highest = max(highest, log.stats().pending_bytes)
            if n % 50 == 0:
                await asyncio.sleep(0.005)  # the thread gets its turn, as between reads

    asyncio.run(relay())
    assert sum(map(len, sent)) > 3 * 1024 * 1024
    record = dataclasses.replace(_record("long"), streamed=True)
    capture.finish(record, None, b"{}", [])
    log.close()
    assert 0 < highest <= 1024 * 1024
    stats = log.stats()
    assert (stats.requests, stats.streams_cut, stats.pending_bytes) == (1, 0, 0)
    found = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    text = "".join(e["ResponseMessages"] for e in found)
    assert text == "".join(f"{n:04d}" * 200 for n in range(EVENTS))[: 256 * 1024]
    assert found[0]["ResponseTruncated"] is True  # past max_bytes: cut there, not lost


#: A log file whose name is as long as a file name may be: its lock file's (``.NAME.lock``)
#: cannot be created (ENAMETOOLONG), whoever runs the tests (root passes permission checks).
LONGEST_NAME = "m" * 249 + ".jsonl"


def test_a_log_that_never_rotates_runs_without_a_lock_file_it_cannot_create(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pre-created, writable log file whose lock file cannot be created (a read-only
    directory, a name too long for the lock's) and ``max_file_bytes: 0``: as before the
    lock existed, the log starts, with one warning, and writes; nothing rotates, which is
    all the lock protects."""
    path = tmp_path / LONGEST_NAME
    path.touch(mode=0o600)
    log = MessageLog(MessageLogSink(path=str(path), max_file_bytes=0))
    with caplog.at_level(logging.WARNING, logger="sluicegate.messages"):
        log.start()
        _submit(log, 1)
        log.close()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "running without it" in warning.getMessage()
    assert "File name too long" in warning.getMessage()
    assert log.stats().requests == 2
    assert len(path.read_bytes().splitlines()) == 2


def test_a_log_that_rotates_without_a_lock_is_refused_saying_what_to_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / LONGEST_NAME
    path.touch(mode=0o600)
    for sink in (
        MessageLogSink(path=str(path)),
        MessageLogSink(path=str(path), max_file_bytes=1000, backup_count=1),
    ):
        with pytest.raises(MessageLogUnlockable) as refused:
            MessageLog(sink).start()
        message = str(refused.value)
        assert str(path) in message and "File name too long" in message
        assert "message_log.max_file_bytes: 0" in message
    # backup_count 0 never renames the file either: no lock needed.
    log = MessageLog(MessageLogSink(path=str(path), backup_count=0))
    log.start()
    log.close()


@pytest.mark.parametrize("failing", ["open", "flock"])
def test_a_lock_file_that_cannot_be_opened_or_locked(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failing: str,
) -> None:
    """The lock file's directory refuses it (EACCES, as a read-only directory does for a
    user other than root), or its file system has no ``flock`` (ENOLCK): the log runs
    without the lock when it never rotates, and is refused when it does. The log file itself
    is opened as usual."""
    path = tmp_path / "messages.jsonl"
    where = str(lock_path(str(path)))
    real_open, real_flock = os.open, fcntl.flock

    def open_(file: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if str(file) == where:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), where)
        return real_open(file, flags, mode, **kwargs)

    def flock(fd: int, operation: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == where:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        real_flock(fd, operation)

    if failing == "open":
        monkeypatch.setattr(os, "open", open_)
    else:
        monkeypatch.setattr(fcntl, "flock", flock)
    reason = os.strerror(errno.EACCES if failing == "open" else errno.ENOLCK)
    with pytest.raises(MessageLogUnlockable, match=reason):
        MessageLog(MessageLogSink(path=str(path))).start()
    log = MessageLog(MessageLogSink(path=str(path), max_file_bytes=0))
    with caplog.at_level(logging.WARNING, logger="sluicegate.messages"):
        log.start()
        _submit(log, 1)
        log.close()
    assert reason in caplog.text
    assert log.stats().requests == 2 and len(path.read_bytes().splitlines()) == 2


def test_a_whole_answer_is_charged_while_kept_and_cut_when_the_budget_is_spent(
    tmp_path: Path,
) -> None:
    """A whole answer's body is charged to ``max_pending_bytes`` as the relay sends it, not
    only once queued, and given back once written. One that finds the budget (nearly) spent
    keeps the beginning that fits, at most ``CUT_KEPT_BYTES`` and a block left free for the
    requests finishing meanwhile: its entry is that beginning, raw, ``ResponseTruncated``,
    counted as an answer cut."""
    path = tmp_path / "messages.jsonl"
    budget = 1024 * 1024
    log = MessageLog(MessageLogSink(path=str(path), max_pending_bytes=budget))
    log.start()
    text = "Sluis " * 50_000
    answer = orjson.dumps({"choices": [{"index": 0, "message": {"content": text}}]})

    async def send(message: Message) -> None:
        pass

    def relay(capture: MessageCapture) -> None:
        async def sent() -> None:
            teed = capture.tee(send, False, 200)
            await teed({"type": "http.response.body", "body": answer, "more_body": False})

        asyncio.run(sent())

    whole = MessageCapture(MessageLogPolicy(), log, "/openai/v1/chat/completions", b"", "m")
    relay(whole)
    assert log.stats().pending_bytes == len(answer)  # charged while the request runs
    others = budget - len(answer) - 50_000
    assert log.reserve(others)  # what other requests hold meanwhile
    cut = MessageCapture(MessageLogPolicy(), log, "/openai/v1/chat/completions", b"", "m")
    relay(cut)
    head = 50_000 - RESERVE_BYTES  # less than CUT_KEPT_BYTES: all that fits, a block left
    assert log.stats().pending_bytes == budget - RESERVE_BYTES
    whole.finish(_record("whole"), None, b"{}", [])
    cut.finish(_record("cut"), None, b"{}", [])
    log.close()
    stats = log.stats()
    assert (stats.requests, stats.dropped, stats.answers_cut) == (2, 0, 1)
    assert stats.pending_bytes == others  # the answers' charges all given back
    found = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    first = [e for e in found if e["RequestId"] == "whole"]
    second = [e for e in found if e["RequestId"] == "cut"]
    assert first[0]["ResponseTruncated"] is False
    assert "".join(e["ResponseMessages"] for e in first) == text
    assert second[0]["ResponseTruncated"] is True
    assert second[0]["ResponseOriginalBytes"] == len(answer)
    assert "".join(e["ResponseMessages"] for e in second) == answer[:head].decode()
    assert head < CUT_KEPT_BYTES
