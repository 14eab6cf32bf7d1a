"""The spill file: where usage records wait, on disk, while the database cannot take them.

Format: JSON lines, one usage record per line (``rows.record_to_json``), appended and fsynced
per batch. A record may appear more than once (it can be both spilled and, later, written by a
batch that was in flight); that is harmless because the ledger insert ignores a record whose
(request_id, attempt) is already stored.

Concurrency: all methods are thread-safe (one lock per instance) and process-safe on POSIX:
appends and replays hold an exclusive ``flock`` on the file, and a holder whose file was
replaced or removed meanwhile reopens it, so two writers that share a spill path (two
processes, or an old and a new writer) never lose each other's lines.
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


class SpillFile:
    """An append-only JSON-lines file of usage records, replayed and then removed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: Lines that could not be parsed on replay are moved here, never silently dropped.
        self.corrupt_path = self.path.with_name(self.path.name + ".corrupt")
        self._lock = threading.Lock()

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
        payload = "".join(record_to_json(r) + "\n" for r in records).encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked("a+b") as f:
                assert f is not None  # "a+b" creates the file
                # A crash during an earlier append can leave a torn last line without its
                # newline; start on a fresh line so that the torn one does not swallow ours.
                if f.seek(0, io.SEEK_END) > 0:
                    f.seek(-1, io.SEEK_END)
                    if f.read(1) != b"\n":
                        payload = b"\n" + payload
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.path.parent)

    def replay(self, sink: Callable[[list[UsageRecord]], object], *, batch_size: int = 500) -> int:
        """Feed every record in the file to ``sink`` in batches, then remove the file.

        If ``sink`` raises, the file is kept whole (batches already fed will be fed again next
        time, which the idempotent insert absorbs) and the exception propagates. Lines that
        are not records are appended to ``corrupt_path`` and logged. Returns the number of
        records fed; 0 if there is no file.
        """
        with self._lock, self._locked("rb") as f:
            if f is None:
                return 0
            fed = 0
            corrupt: list[bytes] = []
            batch: list[UsageRecord] = []
            for record, bad in _parse(f):
                if bad is not None:
                    corrupt.append(bad)
                    continue
                assert record is not None
                batch.append(record)
                if len(batch) >= batch_size:
                    sink(batch)
                    fed += len(batch)
                    batch = []
            if batch:
                sink(batch)
                fed += len(batch)
            if corrupt:
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
            # Still holding the flock: nobody can append between the last read and the unlink.
            self.path.unlink()
            _fsync_dir(self.path.parent)
            return fed

    def read_all(self) -> list[UsageRecord]:
        """Every readable record in the file (for tests and diagnostics); [] if none."""
        with self._lock, self._locked("rb") as f:
            if f is None:
                return []
            return [rec for rec, _bad in _parse(f) if rec is not None]

    @contextlib.contextmanager
    def _locked(self, mode: str) -> Iterator[IO[bytes] | None]:
        """Open the file under an exclusive flock; None if it does not exist (read modes)."""
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
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and current.st_ino == os.fstat(f.fileno()).st_ino:
                    yield f
                    return
                # Replayed and removed (or replaced) while we waited for the lock: retry.
            finally:
                f.close()


def _parse(f: IO[bytes]) -> Iterator[tuple[UsageRecord | None, bytes | None]]:
    for raw in f:
        if not raw.strip():
            continue
        try:
            yield record_from_json(raw.decode("utf-8")), None
        except ValueError:  # includes JSON and Unicode decoding errors
            yield None, raw


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
