"""The spill file: where usage records wait, on disk, while the database cannot take them.

Format: JSON lines, one usage record per line (``rows.record_to_json``), appended and fsynced
per batch. A record may appear more than once (it can be both spilled and, later, written by a
batch that was in flight); that is harmless because the ledger insert ignores a record whose
(request_id, attempt) is already stored.

Replay: whole (``replay``), or in parts (``replay_part``) that a writer interleaves with its
other work; a part resumes where the last one stopped, in the same file, and appends made
between parts (or during one) are read by later batches. The file is removed once read to
its end.

Concurrency: all methods are thread-safe and process-safe on POSIX: file I/O holds the
instance's lock and an exclusive ``flock`` on the file, and a holder whose file was replaced
or removed meanwhile reopens it, so two writers that share a spill path (two processes, or an
old and a new writer) never lose each other's lines. A replay holds neither lock while its
sink runs: the sink writes to a database, which can hang (a table locked by another session,
a stuck server), and an append must never wait for it. That is what lets a writer's
``close()`` spill what it holds while its own replay is stuck. The price: two replays of one
file (two processes, or two instances) may feed the same lines, which the idempotent insert
absorbs; replays through one instance still run one at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from sluicegate.accounting.records import UsageRecord
from sluicegate.storage.rows import record_from_json, record_to_json

log = logging.getLogger(__name__)

_APPEND_SLICE = 256  # records encoded at a time by ``append``


class SpillFile:
    """An append-only JSON-lines file of usage records, replayed and then removed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: Lines that could not be parsed on replay are moved here, never silently dropped.
        self.corrupt_path = self.path.with_name(self.path.name + ".corrupt")
        # Guards the file's I/O and the two fields below; never held while a sink runs.
        self._lock = threading.Lock()
        # One replay at a time through this instance; held while its sink runs (so only
        # another replay ever waits on it).
        self._replay_lock = threading.Lock()
        # A replay's position, kept between batches and parts: the file it reads, held open,
        # and where the next batch starts in it.
        self._part: IO[bytes] | None = None
        self._offset = 0

    def __repr__(self) -> str:
        return f"SpillFile({str(self.path)!r}, exists={self.exists()})"

    def exists(self) -> bool:
        """Whether the file is there (it is removed once fully replayed)."""
        return self.path.exists()

    def append(self, records: Sequence[UsageRecord]) -> None:
        """Append ``records`` and fsync before returning: once this returns they survive a crash.

        Creates the file and its directory if needed. Raises ``OSError`` (disk full, ...).
        """
        if not records:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked("a+b") as f:
                assert f is not None  # "a+b" creates the file
                # A crash during an earlier append can leave a torn last line without its
                # newline; start on a fresh line so that the torn one does not swallow ours.
                if f.seek(0, io.SEEK_END) > 0:
                    f.seek(-1, io.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                # Encoded and written a slice at a time: a group shed during an outage holds
                # thousands of records, and one payload for all of them was megabytes of
                # short-lived text (twice: the str and its bytes) that the allocator kept.
                for start in range(0, len(records), _APPEND_SLICE):
                    part = records[start : start + _APPEND_SLICE]
                    f.write("".join(record_to_json(r) + "\n" for r in part).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.path.parent)

    def replay(self, sink: Callable[[list[UsageRecord]], object], *, batch_size: int = 500) -> int:
        """Feed every record in the file to ``sink`` in batches, then remove the file.

        If ``sink`` raises, the file is kept whole (batches already fed will be fed again next
        time, which the idempotent insert absorbs) and the exception propagates. Lines that
        are not records are appended to ``corrupt_path`` and logged. Returns the number of
        records fed; 0 if there is no file. Records appended meanwhile are fed too.
        """
        with self._replay_lock:
            with self._lock:
                self._forget_part()  # from the start, whatever a part had reached
            try:
                fed, _finished = self._replay(sink, batch_size, None)
            except BaseException:
                with self._lock:
                    self._forget_part()  # next time from the start again
                raise
            return fed

    def replay_part(
        self, sink: Callable[[list[UsageRecord]], object], *, batch_size: int, limit: int
    ) -> tuple[int, bool]:
        """Feed the next records of the file to ``sink``: whole batches, until at least
        ``limit`` records were fed or the file ends; at its end, remove the file.

        Returns (records fed, whether the file was read to its end and removed). Appends made
        between parts are read by later parts. The position reached is kept in memory with
        the file open (so that it cannot name another file): if ``sink`` raises, the next
        part starts at the batch that failed; if another process replayed and removed the
        file meanwhile, at the start of whatever file the path names now; after a crash, or
        after ``close()`` while ``sink`` ran, at the start (records fed twice are absorbed by
        the idempotent insert).
        """
        if limit < 1:
            raise ValueError("limit >= 1 needed")
        with self._replay_lock:
            return self._replay(sink, batch_size, limit)

    def _replay(
        self, sink: Callable[[list[UsageRecord]], object], batch_size: int, limit: int | None
    ) -> tuple[int, bool]:
        """Feed records from where the last part stopped (``limit`` None: up to the end).
        Call with ``self._replay_lock``.

        Batch by batch: read it (under the locks), feed it (under neither: see the module's
        docstring), then record the new position (under ``self._lock`` again, and only if the
        part was not let go of meanwhile). The file is removed under its ``flock``, after a
        check that nothing was appended since the last read.
        """
        fed = 0
        while True:
            with self._lock:
                read = self._read_batch(batch_size)
            if read is None:
                return fed, True  # no file
            part, records, end, corrupt, eof = read
            if part is None:
                return fed, False  # the path changed under us; the next part starts again
            if records:
                sink(records)
                fed += len(records)
            with self._lock:
                if self._part is not part:
                    return fed, False  # close() let go of it while the sink ran
                # The unreadable lines among those just fed are set aside first, then the
                # position moves past them (a failure in between feeds the batch again,
                # which the idempotent insert absorbs, rather than losing the lines).
                self._keep_corrupt(corrupt)
                self._offset = end
                if eof or (limit is not None and fed >= limit):
                    removed = self._remove_if_read()
                    if removed or limit is not None:
                        return fed, removed
                    # A whole replay goes on: the file grew while the sink ran.

    def _read_batch(
        self, batch_size: int
    ) -> tuple[IO[bytes] | None, list[UsageRecord], int, list[bytes], bool] | None:
        """Read the next batch: (the part's handle, its records, the offset after them, the
        unreadable lines among them, whether the file ended). None if there is no file; a
        None handle if the file could not be held open. Call with ``self._lock``."""
        with self._locked("rb", resume=self._part) as f:
            if f is None:
                self._forget_part()
                return None
            if f is self._part:
                f.seek(self._offset)
            else:
                self._forget_part()
                self._part = _reopen(self.path, f)
                if self._part is None:
                    return None, [], 0, [], False
            records: list[UsageRecord] = []
            corrupt: list[bytes] = []
            eof = False
            while len(records) < batch_size:
                raw = f.readline()
                if not raw:
                    eof = True
                    break
                record, bad = _parse_line(raw)
                if bad is not None:
                    corrupt.append(bad)
                elif record is not None:
                    records.append(record)
            return self._part, records, f.tell(), corrupt, eof

    def _remove_if_read(self) -> bool:
        """Remove the file if the part has read it to its end; whether there is none left
        to read (removed here, or by another process). Call with ``self._lock``."""
        part = self._part
        assert part is not None
        with self._locked("rb", resume=part) as f:
            if f is part:
                if self._offset < os.fstat(f.fileno()).st_size:
                    return False  # appended to meanwhile
                # Still holding the flock: nobody can append between the check and the unlink.
                self.path.unlink()
                _fsync_dir(self.path.parent)
                gone = True
            else:
                # Replayed and removed by another process (who read it to its end too), and
                # perhaps a new file begun since: that one is read from its start.
                gone = f is None
        self._forget_part()
        return gone

    def close(self) -> None:
        """Let go of the file a replay in parts holds open; a later part starts again at the
        beginning of the file. Appends and replays still work afterwards."""
        with self._lock:
            self._forget_part()

    def _forget_part(self) -> None:
        part, self._part, self._offset = self._part, None, 0
        if part is not None:
            part.close()

    def _keep_corrupt(self, corrupt: list[bytes]) -> None:
        if not corrupt:
            return
        log.error(
            "spill file %s: %d unreadable line(s) moved to %s",
            self.path,
            len(corrupt),
            self.corrupt_path,
        )
        with self.corrupt_path.open("ab") as out:
            out.write(b"".join(line.rstrip(b"\n") + b"\n" for line in corrupt))
            out.flush()
            os.fsync(out.fileno())

    def read_all(self) -> list[UsageRecord]:
        """Every readable record in the file (for tests and diagnostics); [] if none."""
        with self._lock, self._locked("rb") as f:
            if f is None:
                return []
            return [rec for rec, _bad in _parse(f) if rec is not None]

    @contextlib.contextmanager
    def _locked(self, mode: str, resume: IO[bytes] | None = None) -> Iterator[IO[bytes] | None]:
        """Open the file under an exclusive flock; None if it does not exist (read modes).

        ``resume``: a handle a replay keeps open between batches and parts; it is used
        instead (locked, and left open afterwards) if the path still names its file."""
        if resume is not None:
            fcntl.flock(resume.fileno(), fcntl.LOCK_EX)
            try:
                if _names(self.path, resume):
                    yield resume
                    return
            finally:
                fcntl.flock(resume.fileno(), fcntl.LOCK_UN)
        while True:
            try:
                f = self.path.open(mode)
            except FileNotFoundError:
                if "a" in mode:
                    raise
                yield None
                return
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                if _names(self.path, f):
                    yield f
                    return
                # Replayed and removed (or replaced) while we waited for the lock: retry.
            finally:
                f.close()


def _names(path: Path, f: IO[bytes]) -> bool:
    """Whether ``path`` is (still) the file open as ``f``."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(current, os.fstat(f.fileno()))


def _reopen(path: Path, f: IO[bytes]) -> IO[bytes] | None:
    """A second handle on the file open as ``f`` (locked by the caller, so ``path`` names
    it): held open, it keeps a replay's position from ever applying to another file."""
    again = path.open("rb")
    if os.path.samestat(os.fstat(f.fileno()), os.fstat(again.fileno())):
        return again
    again.close()
    return None


def _parse_line(raw: bytes) -> tuple[UsageRecord | None, bytes | None]:
    """(record, None), (None, the line) if it is not a record, or (None, None) if blank."""
    if not raw.strip():
        return None, None
    try:
        return record_from_json(raw.decode("utf-8")), None
    except ValueError:  # includes JSON and Unicode decoding errors
        return None, raw


def _parse(f: IO[bytes]) -> Iterator[tuple[UsageRecord | None, bytes | None]]:
    for raw in f:
        record, bad = _parse_line(raw)
        if record is not None or bad is not None:
            yield record, bad


def _fsync_dir(directory: Path) -> None:
    """Make a file's creation or removal itself durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
