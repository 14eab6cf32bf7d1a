"""The message log's writer: a bounded queue, one thread, a rotating JSON-lines file.

The request path calls ``submit`` (a finished request) and ``hand_over`` (a long stream's
events so far); both take a lock for a few counters and put a reference on a queue, and
never wait: when ``max_pending`` requests or ``max_pending_bytes`` of bodies are held
already, the item is dropped and counted (``stats``). A stream or a whole answer in flight
``reserve``s what it holds against the same ``max_pending_bytes``
(``capture.MessageCapture``), so the bytes the log holds, queued or in requests still running,
stay within it. The thread flattens, cuts and
chunks (``flatten``) and writes each request's entries as one write, so a request's chunks stay
together in one file. This log is not the ledger: usage records are never lost, message
logs may be (a full queue, a full disk, a crash before the thread wrote them).

One file per instance: ``start`` takes an advisory lock (``flock``, Linux and other POSIX
systems) on a lock file beside the log file and refuses to start when another live process
holds it, since processes sharing a file rename it under each other when they rotate it.

No key or token reaches an entry: entries hold the subscription's id, the request's and the
answer's text, and the client's ``x-ms-client-request-id`` (as CorrelationId), nothing else
of the request's headers. A write that fails is counted and logged without the entry's text.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

from sluicegate.messages.config import MessageLogSink
from sluicegate.messages.flatten import (
    Clipped,
    StreamText,
    answer_text,
    clip,
    entries,
    request_text,
)
from sluicegate.threads import LEDGER_NICENESS, lower_priority

if TYPE_CHECKING:
    from sluicegate.accounting.records import UsageRecord
    from sluicegate.messages.capture import MessageCapture

#: A stream's events go to the log's thread in batches of about this many bytes.
STREAM_HANDOFF_BYTES = 1024 * 1024

log = logging.getLogger("sluicegate.messages")

#: The client's correlation id (Azure's), sent on to the backend as it came.
_CLIENT_REQUEST_ID = b"x-ms-client-request-id"
_MAX_CORRELATION_CHARS = 128
#: Seconds between two warnings about failed writes.
_WARN_EVERY = 60.0


@dataclass(slots=True)
class _Events:
    """A long stream's events so far (``MessageLog.handoff_bytes``); ``weight``: the
    part of their reservation released once they are flattened."""

    capture: MessageCapture
    parts: list[bytes]
    weight: int


@dataclass(slots=True)
class _Finished:
    record: UsageRecord
    capture: MessageCapture
    body: dict[str, Any] | bytes | None
    headers: Sequence[tuple[bytes, bytes]]
    weight: int


@dataclass(frozen=True, slots=True)
class MessageLogStats:
    """Counts since start: requests logged, entries (lines) written, requests dropped (the
    queue was full or the log closed), streams logged without some of their events (the
    queue or ``max_pending_bytes`` was full when they came), failed writes; and what waits
    now: requests queued, and bytes held (queued bodies, and streams' events and text and
    whole answers' parts reserved while they run); then whole answers logged without some
    of their body (``max_pending_bytes`` was spent when it came: only the beginning that
    fitted is logged, raw)."""

    requests: int
    entries: int
    dropped: int
    streams_cut: int
    write_failures: int
    pending: int
    pending_bytes: int
    answers_cut: int = 0


class MessageLogInUse(RuntimeError):
    """Another live process writes the same message log file (``MessageLog.start``)."""


class MessageLogUnlockable(RuntimeError):
    """The lock file of a message log that rotates cannot be created or locked
    (``MessageLog.start``)."""


def lock_path(path: str) -> Path:
    """The lock file of the message log file ``path``: hidden beside it (``.NAME.lock``),
    so that a shipper's ``messages.jsonl*`` pattern does not take it for a log file."""
    file = Path(path)
    return file.with_name(f".{file.name}.lock")


def _lock(path: str, rotates: bool) -> int | None:
    """Hold the lock of the log file ``path`` for this process (its descriptor, to keep
    open until the log closes); None for a path that is not a regular file (a FIFO, a
    device: nothing is rotated there). Raises ``MessageLogInUse`` when another process holds
    it. ``flock`` locks die with their process: a crashed instance leaves no stale lock.

    A lock file that cannot be created or locked (a read-only directory holding a writable
    log file, a name too long for the lock's, a symbolic link in its place, a file system
    without ``flock``): the lock only keeps instances from rotating one file under each
    other, so a log that never ``rotates`` runs without it (None, after one warning); one
    that rotates is refused (``MessageLogUnlockable``, saying what to change)."""
    file = Path(path)
    if file.exists() and not file.is_file():
        return None
    where = lock_path(path)
    try:
        # Never through a symbolic link: the lock file is truncated below, and a link planted
        # in its place would have the gateway truncate whatever it points to.
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        _unlocked(path, where, rotates, exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise MessageLogInUse(
            f"message log {path} is written by another process (pid {holder or 'unknown'}, "
            f"holding {where}): give each instance its own message_log.path"
        ) from None
    except OSError as exc:  # no flock here (some network file systems)
        os.close(fd)
        _unlocked(path, where, rotates, exc)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _unlocked(path: str, where: Path, rotates: bool, exc: OSError) -> None:
    """No lock for the log file ``path`` (``where`` failed with ``exc``): refused when the
    file rotates, else a warning."""
    reason = exc.strerror or type(exc).__name__
    if rotates:
        raise MessageLogUnlockable(
            f"message log {path}: its lock file {where} cannot be used ({reason}); the lock "
            "keeps two instances from rotating one file under each other. Let the gateway "
            "create that file (a writable directory), or set message_log.max_file_bytes: 0 "
            "to leave rotation to logrotate (copytruncate) and run without the lock"
        ) from None
    log.warning(
        "message log %s: its lock file %s cannot be used (%s); running without it, which "
        "is safe as the file never rotates (max_file_bytes or backup_count 0), but nothing "
        "keeps another instance from writing the same file",
        path,
        where,
        reason,
    )


class MessageLog:
    """Writes prompt and completion entries (``docs/message-log.md``). ``start()`` once,
    ``close()`` at shutdown (writes what waits, within its timeout). ``submit`` and
    ``hand_over`` are for the event loop's thread; ``stats`` for any thread."""

    def __init__(self, config: MessageLogSink) -> None:
        self.config = config
        #: A stream hands its events to the thread in batches of this many bytes: at most an
        #: eighth of the budget, so that under a small one a long stream's events in hand
        #: do not take it all before the thread can take them over.
        self.handoff_bytes = min(STREAM_HANDOFF_BYTES, config.max_pending_bytes // 8)
        self._queue: queue.SimpleQueue[_Events | _Finished | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0
        self._closed = False
        self._requests = self._entries = self._dropped = self._cut = self._failures = 0
        self._answers_cut = 0
        self._last_warning = 0.0
        self._thread: threading.Thread | None = None
        self._handler: logging.Handler | None = None
        self._lock_fd: int | None = None
        self._line = logging.makeLogRecord({"msg": ""})  # reused: one writer thread

    def start(self) -> None:
        """Open the destination (the file's directory is created) and start the thread.
        Raises ``MessageLogInUse`` when another live process writes the same file, and
        ``MessageLogUnlockable`` when a file that rotates cannot be locked (``_lock``)."""
        path = self.config.path
        if path == "-":
            self._handler = _StreamHandler(sys.stdout, self._write_failed)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            config = self.config
            rotates = config.max_file_bytes > 0 and config.backup_count > 0
            self._lock_fd = _lock(path, rotates)
            self._handler = _FileHandler(
                path,
                maxBytes=self.config.max_file_bytes,
                backupCount=self.config.backup_count,
                encoding="utf-8",
                delay=True,  # opened by the thread, at the first entry
                on_error=self._write_failed,
            )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._thread = threading.Thread(target=self._run, name="sluicegate-messages", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------------

    def submit(
        self,
        record: UsageRecord,
        capture: MessageCapture,
        body: dict[str, Any] | bytes | None,
        body_bytes: int,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> bool:
        """Queue a finished request (its ``record``, what ``capture`` kept, the request's
        ``body`` of ``body_bytes`` when prompts are logged); False when dropped. What
        ``capture`` reserved already (a stream's events and text, a whole answer's parts) goes
        with it (released once written, or now when dropped); the rest (the request's body)
        must fit in what is left."""
        charged = capture.held + capture.text_charge
        fresh = body_bytes + max(capture.size - capture.held, 0)
        item = _Finished(record, capture, body, headers, charged + fresh)
        if self._admit(fresh):
            self._queue.put(item)
            return True
        with self._lock:
            self._dropped += 1
            self._pending_bytes -= charged
        return False

    def hand_over(
        self, capture: MessageCapture, parts: list[bytes], size: int, release: int
    ) -> bool:
        """Queue a stream's events so far (``size`` bytes, reserved already), to be
        flattened now; ``release``: what of their reservation to release then. False when
        dropped (the reservation is then the caller's to release)."""
        with self._lock:
            if self._closed or self._pending >= self.config.max_pending:
                return False
            self._pending += 1
        self._queue.put(_Events(capture, parts, release))
        return True

    def reserve(self, size: int, spare: int = 0) -> bool:
        """Charge ``size`` bytes a stream or an answer holds for the log to
        ``max_pending_bytes``, if they fit with ``spare`` bytes of it left free; False
        (nothing charged) when they do not."""
        with self._lock:
            limit = self.config.max_pending_bytes - spare
            if self._closed or self._pending_bytes + size > limit:
                return False
            self._pending_bytes += size
        return True

    def reserve_some(self, size: int, spare: int = 0) -> int:
        """Charge at most ``size`` bytes a whole answer keeps to ``max_pending_bytes``: as
        many as fit with ``spare`` bytes of it left free (0 when none do); returns the number
        charged."""
        with self._lock:
            if self._closed:
                return 0
            free = self.config.max_pending_bytes - self._pending_bytes - spare
            room = min(size, free)
            if room <= 0:
                return 0
            self._pending_bytes += room
        return room

    def release(self, size: int) -> None:
        """Give back ``size`` bytes of ``reserve``."""
        with self._lock:
            self._pending_bytes -= size

    def _admit(self, weight: int) -> bool:
        """Count one more request queued holding ``weight`` more bytes, if they fit."""
        config = self.config
        with self._lock:
            if (
                self._closed
                or self._pending >= config.max_pending
                or self._pending_bytes + weight > config.max_pending_bytes
            ):
                return False
            self._pending += 1
            self._pending_bytes += weight
        return True

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        lower_priority(LEDGER_NICENESS)  # background work: requests first
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if isinstance(item, _Events):
                    self._feed(item)
                else:
                    self._write(item)
            except Exception:  # a bug must not stop the log; the text stays out of the log
                log.error("message log: an entry could not be written (%s)", _request_of(item))
                with self._lock:
                    self._failures += 1
            finally:
                with self._lock:
                    self._pending -= 1
                    self._pending_bytes -= item.weight

    def _feed(self, item: _Events) -> None:
        capture = item.capture
        if capture.text is None:
            capture.text = StreamText(capture.policy.max_bytes)
        for part in item.parts:
            capture.text.feed(part)

    def _write(self, item: _Finished) -> None:
        record, capture = item.record, item.capture
        policy = capture.policy
        request = None
        if item.body is not None:
            request = clip(request_text(item.body), policy.max_bytes)
        response = None
        if policy.completions:
            response, cut = _response(capture, record.operation)
            if cut or capture.cut:
                with self._lock:
                    if cut:
                        self._cut += 1
                    else:
                        self._answers_cut += 1
        meta = {
            "TimeGenerated": _iso(record.ts),
            "RequestId": record.request_id,
            "CorrelationId": _correlation_id(item.headers) or record.request_id,
            "SubscriptionId": record.subscription_id,
            "Product": record.product,
            "DeploymentName": record.deployment,
            "ModelName": record.model or capture.model,
            "OperationName": record.operation,
            "ApiVersion": _api_version(capture.path, capture.query),
            "IsStreamCompletion": record.streamed,
            "StatusCode": record.status,
            "PromptTokens": record.prompt_tokens,
            "CompletionTokens": record.completion_tokens,
            "TotalTokens": record.total_tokens,
        }
        found = entries(meta, request, response, policy.chunk_bytes)
        lines = b"\n".join(orjson.dumps(e) for e in found).decode("utf-8")
        handler = self._handler
        assert handler is not None
        failures = self._failures
        self._line.msg = lines
        handler.emit(self._line)  # a failure calls ``_write_failed`` (the handler's)
        if self._failures == failures:  # else counted as a failure (``_write_failed``)
            with self._lock:
                self._requests += 1
                self._entries += len(found)

    def _write_failed(self) -> None:
        """A write failed (the handler's ``handleError``): count it, warn now and then,
        never with the entry's text (it would put prompts into the gateway's own log)."""
        exc = sys.exc_info()[1]
        with self._lock:
            self._failures += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning(
                "message log: writing %s failed (%s); entries are dropped until it works",
                self.config.path,
                exc if isinstance(exc, OSError) else type(exc).__name__,
            )

    # -- lifecycle and state ---------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking entries, write those that wait (for at most ``timeout`` seconds),
        close the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "message log: %d requests not written at shutdown (%s is slow)",
                    self._pending,
                    self.config.path,
                )
                return  # the thread still uses the handler; the process exit ends it
        if self._handler is not None:
            self._handler.close()
        if self._lock_fd is not None:  # after the last write: the next instance may start
            os.close(self._lock_fd)
            self._lock_fd = None

    def stats(self) -> MessageLogStats:
        with self._lock:
            return MessageLogStats(
                self._requests,
                self._entries,
                self._dropped,
                self._cut,
                self._failures,
                self._pending,
                self._pending_bytes,
                self._answers_cut,
            )


def _response(capture: MessageCapture, operation: str) -> tuple[Clipped, bool]:
    """The logged answer: a stream's text, a whole answer's, the gateway's own error (also
    when its relay had begun but sent nothing), or nothing (no answer reached the client);
    and whether events of a stream are missing."""
    limit = capture.policy.max_bytes
    if capture.stream and (capture.parts or capture.text is not None or capture.lost):
        text = capture.text or StreamText(limit)
        for part in capture.parts:
            text.feed(part)
        clipped = clip(text.text(), limit, text.original_bytes)
        if capture.lost:  # events are missing: the text is not whole
            return Clipped(clipped.data, clipped.original_bytes, True), True
        return clipped, False
    if capture.parts or capture.overflow:
        body = capture.parts[0] if len(capture.parts) == 1 else b"".join(capture.parts)
        if capture.overflow:  # too large to parse, or cut for the budget: its beginning, raw
            raw = body.decode("utf-8", "replace")
            return clip(raw, limit, len(body) + capture.overflow), False
        return clip(answer_text(body, operation), limit), False
    if capture.error is not None:
        _, code, message = capture.error
        error = orjson.dumps({"code": code, "message": message}).decode("utf-8")
        return clip(error, limit), False
    return clip("", limit), False


def _request_of(item: _Events | _Finished) -> str:
    return item.record.request_id if isinstance(item, _Finished) else "a stream's events"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _correlation_id(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == _CLIENT_REQUEST_ID:
            return value.decode("latin-1")[:_MAX_CORRELATION_CHARS]
    return None


def _api_version(path: str, query: bytes) -> str | None:
    """The request's ``api-version``; ``v1`` on the v1 API (which takes none)."""
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"api-version":
            return unquote(value.decode("latin-1"))[:64]
    return "v1" if path.startswith("/openai/v1/") else None


class _QuietErrors:
    """A handler whose failures are counted, never printed: logging's default prints the
    record, which here is prompt and completion text, to standard error."""

    on_error: Callable[[], None]

    def handleError(self, record: logging.LogRecord) -> None:
        self.on_error()


class _FileHandler(_QuietErrors, RotatingFileHandler):
    def __init__(self, *args: Any, on_error: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_error = on_error

    def _open(self) -> Any:
        # Prompts are the most sensitive data the gateway handles: a file it creates is
        # readable by its own user only, whatever the umask (rotation creates new ones).
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


class _StreamHandler(_QuietErrors, logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: Any, on_error: Callable[[], None]) -> None:
        super().__init__(stream)
        self.on_error = on_error
