"""The spill file on its own: durable appends, torn lines, replay-then-remove."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sluicegate.accounting.records import UsageRecord
from sluicegate.storage.spill import SpillFile
from tests.storage.conftest import build_record


def test_append_then_read_round_trips_records(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "sub" / "dir" / "spill.jsonl")
    assert not spill.exists()
    assert spill.read_all() == []
    records = [build_record(i) for i in range(3)]
    records.append(build_record(3, ttfb_ms=None, model=None, extra={}, usage_estimated=True))
    spill.append(records[:2])
    spill.append(records[2:])
    assert spill.exists()
    assert spill.read_all() == records
    assert len(spill.path.read_text().splitlines()) == 4


def test_replay_feeds_batches_then_removes_the_file(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    records = [build_record(i) for i in range(7)]
    spill.append(records)
    batches: list[list[UsageRecord]] = []
    assert spill.replay(batches.append, batch_size=3) == 7
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [r for b in batches for r in b] == records
    assert not spill.exists()
    assert spill.replay(batches.append) == 0


def test_a_failing_sink_keeps_the_whole_file(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    records = [build_record(i) for i in range(5)]
    spill.append(records)
    seen: list[UsageRecord] = []

    def flaky(batch: list[UsageRecord]) -> None:
        if seen:
            raise ConnectionError("database went away")
        seen.extend(batch)

    with pytest.raises(ConnectionError):
        spill.replay(flaky, batch_size=2)
    assert spill.read_all() == records  # the batch already fed will simply be fed again


def test_a_torn_last_line_neither_swallows_later_records_nor_blocks_replay(
    tmp_path: Path,
) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(1)])
    with spill.path.open("ab") as f:  # what a crash in the middle of an append leaves
        f.write(b'{"request_id": "req-torn", "ts": 17')
    spill.append([build_record(2)])
    with spill.path.open("ab") as f:
        f.write(b"\xff\xfe not json at all\n[1, 2]\n")
    replayed: list[UsageRecord] = []
    assert spill.replay(replayed.extend) == 2
    assert [r.request_id for r in replayed] == ["req-000001", "req-000002"]
    assert not spill.exists()
    corrupt = spill.corrupt_path.read_bytes().splitlines()
    assert corrupt == [
        b'{"request_id": "req-torn", "ts": 17',
        b"\xff\xfe not json at all",
        b"[1, 2]",
    ]


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    barrier = threading.Barrier(4)

    def append_some(offset: int) -> None:
        barrier.wait()
        for i in range(25):
            spill.append([build_record(offset + i)])

    threads = [threading.Thread(target=append_some, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = sorted(r.request_id for r in spill.read_all())
    assert ids == sorted(build_record(k * 1000 + i).request_id for k in range(4) for i in range(25))


def test_an_append_after_a_replay_starts_a_new_file(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(1)])
    held = spill.path.open("rb")  # an old handle must not receive new lines
    try:
        spill.replay(lambda batch: None)
        spill.append([build_record(2)])
        assert [r.request_id for r in spill.read_all()] == ["req-000002"]
    finally:
        held.close()
