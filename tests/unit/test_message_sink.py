"""The message log's writer (``messages/sink.py``) on its own: standard output, rotation,
and a destination that cannot be written."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import orjson
import pytest

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.messages.capture import MessageCapture
from sluicegate.messages.config import MessageLogPolicy, MessageLogSink
from sluicegate.messages.sink import MessageLog

SECRET_PROMPT = "the launch code is 0000"


def _submit(log: MessageLog, n: int, prompt: str = SECRET_PROMPT) -> None:
    record = UsageRecord(
        request_id=f"req-{n}",
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
    files = sorted(p.name for p in path.parent.iterdir())
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
