"""The spill file on its own: durable appends, torn lines, replay-then-remove."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sluicegate.accounting.records import UsageRecord
from sluicegate.storage.spill import SpillFile
from tests.storage.conftest import build_record

T = TypeVar("T")


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


def test_lines_that_are_json_but_no_record_are_moved_aside_not_retried(tmp_path: Path) -> None:
    # Valid JSON whose values cannot be a record's: a number out of range for an integer
    # column (int(1e400) raises OverflowError) and nesting too deep to decode (RecursionError).
    # Raised out of the replay they were taken for a database failure, retried for ever, and
    # the records around them never written.
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(1)])
    good = spill.path.read_bytes().strip()
    huge = good.replace(b'"status":200', b'"status":1e400')
    assert huge != good
    nested = b'{"request_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with spill.path.open("ab") as f:
        f.write(huge + b"\n" + nested + b"\n")
    spill.append([build_record(2)])
    replayed: list[UsageRecord] = []
    assert spill.replay(replayed.extend) == 2
    assert [r.request_id for r in replayed] == ["req-000001", "req-000002"]
    assert spill.corrupt_path.read_bytes().splitlines() == [huge, nested]


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


def test_a_replay_in_parts_feeds_whole_batches_and_reads_appends_made_between_parts(
    tmp_path: Path,
) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(i) for i in range(10)])
    batches: list[list[UsageRecord]] = []
    assert spill.replay_part(batches.append, batch_size=3, limit=5) == (6, False)
    assert [len(b) for b in batches] == [3, 3]
    spill.append([build_record(i) for i in range(10, 12)])  # shed while the replay goes on
    assert spill.replay_part(batches.append, batch_size=3, limit=5) == (6, True)  # the end
    assert [r.request_id for b in batches for r in b] == [
        build_record(i).request_id for i in range(12)
    ]
    assert not spill.exists()
    assert spill.replay_part(batches.append, batch_size=3, limit=5) == (0, True)


def test_a_part_whose_sink_fails_is_resumed_at_the_batch_that_failed(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(i) for i in range(8)])
    fed: list[str] = []
    calls = 0

    def flaky(batch: list[UsageRecord]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("database went away")
        fed.extend(r.request_id for r in batch)

    with pytest.raises(ConnectionError):
        spill.replay_part(flaky, batch_size=2, limit=6)
    assert fed == ["req-000000", "req-000001"]
    assert spill.replay_part(flaky, batch_size=2, limit=100) == (6, True)
    assert fed == [build_record(i).request_id for i in range(8)]  # each once, in order


def test_a_part_after_another_writer_replayed_the_file_reads_the_new_one_from_its_start(
    tmp_path: Path,
) -> None:
    """Two writers sharing a spill path (two processes): the position one part reached
    must never be applied to the file the path names later."""
    ours, theirs = SpillFile(tmp_path / "spill.jsonl"), SpillFile(tmp_path / "spill.jsonl")
    ours.append([build_record(i) for i in range(6)])
    fed: list[str] = []

    def sink(batch: list[UsageRecord]) -> None:
        fed.extend(r.request_id for r in batch)

    assert ours.replay_part(sink, batch_size=2, limit=4) == (4, False)
    assert theirs.replay(sink) == 6  # the whole file, then removed
    theirs.append([build_record(i) for i in range(100, 103)])  # a new file, shorter
    assert ours.replay_part(sink, batch_size=2, limit=10) == (3, True)
    assert fed[-3:] == [build_record(i).request_id for i in range(100, 103)]
    assert not ours.exists()


def test_unreadable_lines_are_moved_once_by_a_replay_in_parts(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(1)])
    with spill.path.open("ab") as f:
        f.write(b"not json\n")
    spill.append([build_record(2), build_record(3)])
    fed: list[UsageRecord] = []
    fail = [True]

    def sink(batch: list[UsageRecord]) -> None:
        if batch[0].request_id == "req-000002" and fail[0]:
            fail[0] = False
            raise ConnectionError("database went away")
        fed.extend(batch)

    assert spill.replay_part(sink, batch_size=1, limit=1) == (1, False)
    with pytest.raises(ConnectionError):  # the bad line, then record 2 fails: read again
        spill.replay_part(sink, batch_size=1, limit=3)
    assert spill.replay_part(sink, batch_size=1, limit=3) == (2, True)
    assert [r.request_id for r in fed] == ["req-000001", "req-000002", "req-000003"]
    assert spill.corrupt_path.read_bytes() == b"not json\n"


def test_close_lets_go_of_a_part_and_the_next_part_starts_again_at_the_beginning(
    tmp_path: Path,
) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(i) for i in range(6)])
    assert spill.replay_part(lambda batch: None, batch_size=2, limit=2) == (2, False)
    spill.close()  # a writer closing mid-replay (the database went away again)
    spill.close()
    assert spill.replay_part(lambda batch: None, batch_size=2, limit=100) == (6, True)


def bounded(call: Callable[[], T], timeout: float = 10.0) -> T:
    """``call()`` in a daemon thread joined with a timeout: a replay whose sink runs under the
    spill file's lock deadlocks when the sink uses the file, and must fail the test rather
    than hang the suite."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "deadlocked: the sink ran under the spill file's lock"
    assert results, "raised (see the thread's exception above)"
    return results[0]


def test_appends_do_not_wait_for_a_replay_whose_sink_hangs(tmp_path: Path) -> None:
    """A replay's sink writes to a database, which may hang (a locked table): appends, from
    this instance or another on the same path (the flock), go ahead meanwhile, and the
    replay does not remove the lines they add."""
    spill = SpillFile(tmp_path / "spill.jsonl")
    other = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(i) for i in range(5)])
    fed: list[str] = []
    in_sink, release = threading.Event(), threading.Event()

    def hanging(batch: list[UsageRecord]) -> None:
        in_sink.set()
        assert release.wait(30)
        fed.extend(r.request_id for r in batch)

    results: list[tuple[int, bool]] = []
    replayer = threading.Thread(
        target=lambda: results.append(spill.replay_part(hanging, batch_size=5, limit=5))
    )
    replayer.start()
    try:
        assert in_sink.wait(10)

        def append_to_both() -> None:
            spill.append([build_record(5)])
            other.append([build_record(6)])

        appender = threading.Thread(target=append_to_both, daemon=True)
        appender.start()
        appender.join(5)
        assert not appender.is_alive(), "an append waited for the replay's sink"
        assert len(other.read_all()) == 7
    finally:
        release.set()
        replayer.join(30)
    assert results == [(5, False)]  # the file grew while the sink ran: kept
    assert spill.replay_part(lambda batch: fed.extend(r.request_id for r in batch),
                             batch_size=5, limit=5) == (2, True)  # fmt: skip
    assert fed == [build_record(i).request_id for i in range(7)]  # each once, in order
    assert not spill.exists()


def test_a_part_let_go_of_while_its_sink_runs_starts_again_at_the_beginning(
    tmp_path: Path,
) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(i) for i in range(4)])
    fed: list[str] = []

    def closing(batch: list[UsageRecord]) -> None:
        fed.extend(r.request_id for r in batch)
        if len(fed) == 2:
            spill.close()  # a writer's close() while its replay is in the database

    assert bounded(lambda: spill.replay_part(closing, batch_size=2, limit=4)) == (2, False)
    assert spill.replay_part(closing, batch_size=2, limit=100) == (4, True)
    assert fed == [build_record(i).request_id for i in [0, 1, 0, 1, 2, 3]]
    assert not spill.exists()


def test_a_whole_replay_also_feeds_what_was_appended_while_its_sink_ran(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([build_record(i) for i in range(3)])
    fed: list[str] = []

    def appending(batch: list[UsageRecord]) -> None:
        if not fed:
            spill.append([build_record(3)])  # the writer shedding overflow meanwhile
        fed.extend(r.request_id for r in batch)

    assert bounded(lambda: spill.replay(appending, batch_size=5)) == 4
    assert fed == [build_record(i).request_id for i in range(4)]
    assert not spill.exists()
