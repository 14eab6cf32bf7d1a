"""Batching of the limit scripts: the calls of one event-loop turn go to Redis as one command.

Why: with redis-py, each command pays for a pool checkout, a socket write, a wake-up per
reply and the RESP parsing in Python: a hundred-odd microseconds of the gateway's CPU per
round trip, which made the cluster mode's limiter cost more than the rest of the request
path together. Requests arriving together (the normal case under load) now share one
round trip, and one command: a batch script (:func:`batch_script`) that holds the limit
scripts as Lua functions and runs the calls of the batch one after the other, in the order
submitted, each with its own keys and arguments, and answers a list with each call's own
reply. Each caller still awaits its own reply; a call that fails in the script (a bug: the
arguments are ours) gets its error and the others their replies. The batch runs atomically
as a whole, which is more than each call needs (each call is atomic on its own, as before).

redis-py has pipelines but no batching across callers, hence this small class. It also packs
the command itself (:func:`pack_evalsha`) and sends it without redis-py's ``Pipeline``: its
per-argument encoding in Python and its per-pipeline bookkeeping were a quarter of a
request's CPU in the cluster mode (22 µs of packing alone a request, py-spy). One command per
batch instead of one per call also spares a reply to parse per call, on both sides. The
script runs by EVALSHA; a ``NOSCRIPT`` reply (Redis restarted or flushed its scripts) loads it
and runs the batch once more. A batch that fails as a whole fails every call in it with the
``RedisError``: a timed-out batch is never repeated, since it may have run.

A resent batch runs once all the same. The connection's retry policy (redis-py's, as for
any command) reconnects and sends the batch again after a ``ConnectionError``; when the
connection dropped after Redis ran the batch but before its reply was read, every call used
to run twice: admissions charged twice and, worse, settles and releases (negative deltas)
refunded twice, so that usage was under-counted. So each batch has a key of its own, its first
key, ``{key_prefix}{the batcher's random token}:{serial}``. In the same atomic run, the script
answers the replies stored under it when it exists, running nothing, and otherwise runs the
calls and stores their replies there (MessagePack, for :func:`reply_ttl_ms`). The stored reply
is the first run's, byte for byte (integers, strings, nil, nested lists, a call's own error),
so each caller gets the reply of the one run. No extra round trip: a ``GET`` and a ``SET`` in
the script. The store gives ``{its prefix}batch:`` as ``key_prefix``: under the prefix, so
that an ACL that admits the prefix admits it, and in the slot of the calls' keys on a Redis
Cluster (the prefix's hash tag; ``limits/redis_store.py``).

The batcher keeps its own few connections (made like the client pool's: same address,
credentials, TLS, database, retry policy) instead of checking one out of the pool per batch.
At one request at a time, half of a batch's CPU went to the pool's checkout and release
(a lock, a readiness probe of the socket, the observability hooks of redis-py 8) and to the
``asyncio.wait_for`` task redis-py makes for every send when a socket timeout is set. The
batcher's connections have no socket timeout of their own: one deadline bounds each whole
exchange (send and reply) instead, with the same length. At most ``connections`` batches are
in flight; calls arriving while all are busy wait for the next free connection and go
together, so that batches grow under load rather than connections.

A connection that answers an error saying its server is not (or no longer) the primary to
write to (``READONLY``, ``MOVED``/``ASK``, ``LOADING``, ``MASTERDOWN``:
:func:`needs_reconnect`) is closed, like one that failed, and the next batch connects anew.
Behind an address that follows the primary after a failover (a Kubernetes Service, HAProxy,
a DNS name) only a new connection reaches the new primary: a kept one would keep asking the
demoted node, for ever. The script is loaded after a ``NOSCRIPT`` on the connection that
answered it, so on the server that runs the batch (a promoted replica has no scripts).

A batch that failed as a whole may have run or not. Its calls get a :class:`BatchFailed`
naming the batch's key and saying which: ``resend_by`` is ``None`` when no byte of it was
ever written to a connection (connecting failed: refused, unreachable, the deadline), so it
certainly did not run, and otherwise the latest time (``loop.time()``) at which a resend may
start and still find its key. :meth:`ScriptBatcher.resend` runs calls again under that key
later (the store replays failed settles so, ``limits/redis_store.py``): while the key lives
(:func:`reply_ttl_ms` from when Redis ran the batch, so at least that long from the first
send) a batch that did run answers its stored replies and runs nothing again; one that did
not run runs the calls given, once. After ``resend_by`` the key may be gone and a resend
could run a batch that had run: the caller must not resend it then.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sluicegate.loops import running_loop

#: (script name, keys, args, the caller's future)
_Call = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]


#: Error codes of a server that will not run writes for us on this connection (a replica, a
#: node of another slot, one loading its data or without its primary): reconnect.
_RECONNECT_CODES = frozenset({"READONLY", "MOVED", "ASK", "LOADING", "MASTERDOWN"})


def needs_reconnect(error: BaseException) -> bool:
    """Whether ``error`` means the connection must be closed so that the next command
    reaches the current primary: a connection-level error, or a reply whose code is one of
    ``READONLY``, ``MOVED``, ``ASK``, ``LOADING``, ``MASTERDOWN`` (also when a script
    relays it, the code then starting its text)."""
    if isinstance(
        error, RedisConnectionError | ReadOnlyError | AskError | MasterDownError | BusyLoadingError
    ):
        return True
    if not isinstance(error, ResponseError):
        return False
    code = getattr(error, "status_code", None) or str(error).split(" ", 1)[0]
    return code in _RECONNECT_CODES


class BatchFailed(RedisError):
    """A batch failed as a whole (``error``: why; the message is its message). ``batch_key``
    names it for :meth:`ScriptBatcher.resend`. ``resend_by``: ``None`` when it certainly did
    not run (never written to a connection); else it may have run (a timeout, a connection
    dropped after sending) and a resend under ``batch_key`` is exactly-once only if it starts
    before this ``loop.time()`` (its key may have expired after: module docstring)."""

    def __init__(self, error: RedisError, batch_key: str, resend_by: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.batch_key = batch_key
        self.resend_by = resend_by


def reply_ttl_ms(timeout: float | None) -> int:
    """How long a batch's replies stay stored for a resend (module docstring), for an
    exchange deadline of ``timeout`` seconds. Every resend happens within the deadline (it
    bounds the retry policy's attempts too), so ten times it, and at least 5 s, is ample and
    keeps Redis's memory small (~200 bytes a batch); a minute without a deadline."""
    if timeout is None:
        return 60_000
    return max(5_000, round(timeout * 10_000))


@dataclass(slots=True)
class BatchStats:
    pipelines: int = 0
    calls: int = 0
    script_reloads: int = 0
    #: Connections the batcher made (at most its ``connections``).
    connections: int = 0


class ScriptBatcher:
    """Runs named Lua scripts, the calls of one loop turn in one command (module docstring).

    ``scripts`` maps names to Lua sources: scripts as EVAL would run them, reading ``KEYS``
    and ``ARGV`` and ending with a ``return``. ``key_prefix`` starts the key that keeps each
    batch's replies for a resend: on a Redis Cluster it must hold the hash tag of the calls'
    keys. Use from one event loop. ``drain()`` waits for every call submitted so far (for
    shutdown).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        scripts: Mapping[str, str],
        *,
        key_prefix: str,
        connections: int = 4,
        timeout: float | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self._client = client
        # A batch's key: random per batcher (unique across instances and restarts, drawn
        # once) and a serial number per batch (no system call per batch).
        self._batch_key_head = f"{key_prefix}{secrets.token_hex(16)}:"
        self._batch_serial = 0
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        #: One deadline per exchange (None: none), by default the client's socket timeout.
        self._timeout: float | None = (
            timeout if timeout is not None else kwargs.get("socket_timeout")
        )
        kwargs["socket_timeout"] = None  # the exchange's deadline bounds the reads and writes
        ttl_ms = reply_ttl_ms(self._timeout)
        self._source, self._numbers = batch_script(scripts, ttl_ms)
        # How long after its first send a failed batch may be resent under its key: the key
        # lives ttl_ms from when Redis ran it (after that send), less the resend's own
        # deadline (it may run at the end of it; without a deadline, half the TTL).
        self._resend_window_s = ttl_ms / 1000 - (
            self._timeout if self._timeout is not None else ttl_ms / 2000
        )
        sha = hashlib.sha1(self._source.encode("utf-8"), usedforsecurity=False).hexdigest()
        self._head = evalsha_head(sha)
        self._connection_kwargs = kwargs
        self._connection_class = pool.connection_class
        self._max_connections = connections
        self._idle: list[AbstractConnection] = []
        self._made: list[AbstractConnection] = []
        self._busy = 0
        self._pending: list[_Call] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    def __repr__(self) -> str:
        return (
            f"ScriptBatcher(pending={len(self._pending)}, busy={self._busy}, "
            f"connections={len(self._made)})"
        )

    def call(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Submit a script call; the future gets its reply or its ``RedisError``."""
        loop = self._running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((name, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            # After the callbacks already queued: the other requests of this turn join in.
            loop.call_soon(self._flush)
        return future

    async def drain(self) -> None:
        """Wait until every call submitted so far has its answer."""
        while self._pending or self._running:
            if self._pending:
                self._flush()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def aclose(self) -> None:
        """Answer every call submitted so far, then close the batcher's connections."""
        await self.drain()
        made, self._made, self._idle = self._made, [], []
        for conn in made:
            await conn.disconnect()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = running_loop(self._loop)
        return self._loop

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._busy >= self._max_connections:
            return  # nothing to send, or a batch in flight takes these when it ends
        batch, self._pending = self._pending, []
        self._busy += 1
        task = self._running_loop().create_task(self._send(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _send(self, batch: list[_Call]) -> None:
        """Run ``batch`` on a connection of the batcher's, then whatever was submitted
        meanwhile, until nothing is pending."""
        conn = self._idle.pop() if self._idle else self._connect()
        try:
            while batch:
                await self._run(conn, batch)
                batch, self._pending = self._pending, []
        finally:
            self._busy -= 1
            self._idle.append(conn)

    async def resend(
        self, batch_key: str | None, calls: Sequence[tuple[str, list[str], list[Any]]]
    ) -> list[Any]:
        """Run ``calls`` as one batch under ``batch_key`` (a :class:`BatchFailed`'s) or, when
        ``None``, a new key, on a connection of the batcher's; their replies (a call's own
        error as its exception object), or ``None`` each when the key's batch had already
        run (with other calls: the replies stored are not theirs). Raises ``RedisError``
        (:class:`BatchFailed` when this batch may have run) if the batch fails as a whole.

        Exactly once: if the batch of that key ran (and its key has not expired), nothing
        runs; otherwise these calls run, and their key keeps them from running twice.
        """
        loop = self._running_loop()
        batch: list[_Call] = [
            (name, keys, args, loop.create_future()) for name, keys, args in calls
        ]
        if not batch:
            return []
        conn = self._idle.pop() if self._idle else self._connect()
        self._busy += 1
        try:
            await self._run(conn, batch, batch_key or self._batch_key(), stored_ok=True)
        finally:
            self._busy -= 1
            self._idle.append(conn)
            if self._pending and not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush)
        replies: list[Any] = []
        for call in batch:
            error = call[3].exception()
            if isinstance(error, RedisError) and not isinstance(error, ResponseError):
                raise error  # the batch as a whole (its calls all got it)
            replies.append(error if error is not None else call[3].result())
        return replies

    def _connect(self) -> AbstractConnection:
        conn = self._connection_class(**self._connection_kwargs)
        self._made.append(conn)
        self.stats.connections += 1
        return conn

    def _batch_key(self) -> str:
        self._batch_serial += 1
        return f"{self._batch_key_head}{self._batch_serial}"

    async def _run(
        self,
        conn: AbstractConnection,
        batch: list[_Call],
        batch_key: str | None = None,
        *,
        stored_ok: bool = False,
    ) -> None:
        self.stats.pipelines += 1
        self.stats.calls += len(batch)
        if batch_key is None:
            batch_key = self._batch_key()
        replies = await self._execute(conn, batch, batch_key, stored_ok=stored_ok)
        if replies is None:
            return
        retry: list[_Call] = []
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                retry.append(call)
            else:
                _answer(call[3], reply)
        if not retry:
            return
        self.stats.script_reloads += 1
        try:
            # On this connection: the server that answered NOSCRIPT is the one to run it (the
            # client's pool may still hold a connection to a former primary).
            await self._load_script(conn)
        except RedisError as exc:
            for call in retry:
                _answer(call[3], exc)
            return
        # The same batch again keeps its key: a first send that ran before the connection
        # dropped, then a resend answered NOSCRIPT (a failover to a replica or a restart,
        # which lose the script cache and may keep the data), still runs once.
        if len(retry) != len(batch):
            batch_key = self._batch_key()
        replies = await self._execute(conn, retry, batch_key, stored_ok=stored_ok)
        if replies is not None:
            for call, reply in zip(retry, replies, strict=True):
                _answer(call[3], reply)

    async def _load_script(self, conn: AbstractConnection) -> None:
        """``SCRIPT LOAD`` the batch script on ``conn``, within the exchange deadline; the
        connection is closed on any failure (a reply may be left unread on it)."""
        try:
            async with asyncio.timeout(self._timeout):
                await conn.send_command("SCRIPT", "LOAD", self._source)
                await conn.read_response()
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"Redis did not answer within {self._timeout} s") from None
            raise

    async def _execute(
        self,
        conn: AbstractConnection,
        batch: list[_Call],
        batch_key: str,
        *,
        stored_ok: bool = False,
    ) -> list[Any] | None:
        """The replies (an exception object for a call that failed on its own), or None
        when the whole batch failed (every call has been told, with :class:`BatchFailed`).
        ``stored_ok`` (a resend): a list of replies of another length is the stored one of
        the key's earlier batch, which ran: each call's reply is then ``None``."""
        numbers = self._numbers
        sent_at: list[float] = []  # when the batch was first written to a connection
        try:
            # ARGV: the number of calls, then (script, keys, arguments) counts per call, then
            # the arguments of all calls; KEYS: the batch's key, then the keys of all calls.
            header: list[Any] = [len(batch)]
            all_keys: list[str] = [batch_key]
            all_args: list[Any] = []
            for name, keys, args, _ in batch:
                header += (numbers[name], len(keys), len(args))
                all_keys += keys
                all_args += args
            packed = pack_evalsha(self._head, all_keys, header + all_args)
            try:
                async with asyncio.timeout(self._timeout):
                    # As redis-py's pipeline does: the connection's retry policy decides
                    # whether a dropped connection is reconnected and the batch sent again
                    # (the same bytes, so the same batch key: it runs at most once).
                    reply: Any = await conn.retry.call_with_retry(
                        lambda: _exchange(conn, packed, sent_at),
                        lambda _error: conn.disconnect(),
                    )
            except BaseException as exc:
                # A reply may be left unread on it: the next batch starts on a new socket.
                await conn.disconnect(nowait=True)
                if isinstance(exc, TimeoutError):  # the deadline, not a RedisError
                    raise RedisTimeoutError(
                        f"Redis did not answer within {self._timeout} s"
                    ) from None
                raise
        except RedisError as exc:
            resend_by = sent_at[0] + self._resend_window_s if sent_at else None
            failed = BatchFailed(exc, batch_key, resend_by)
            for call in batch:
                _answer(call[3], failed)
            return None
        except BaseException as exc:  # cancelled at shutdown, or a bug: nobody waits forever
            failure = RedisError(f"the Redis pipeline failed: {type(exc).__name__}")
            for call in batch:
                _answer(call[3], failure)
            raise
        if isinstance(reply, ResponseError) and needs_reconnect(reply):
            # A demoted primary (module docstring): the next batch connects anew.
            await conn.disconnect(nowait=True)
        elif isinstance(reply, list) and any(
            isinstance(item, ResponseError) and needs_reconnect(item) for item in reply
        ):
            await conn.disconnect(nowait=True)
        if isinstance(reply, list) and len(reply) == len(batch):
            return reply
        if isinstance(reply, list) and stored_ok:
            return [None] * len(batch)
        # An error for the batch as a whole (NOSCRIPT among them) is every call's.
        if not isinstance(reply, ResponseError):
            reply = ResponseError(f"the batch script answered {type(reply).__name__}")
        return [reply] * len(batch)


async def _exchange(conn: AbstractConnection, packed: bytes, sent_at: list[float]) -> Any:
    """Send one command and read its reply; an error reply is returned as its exception.
    The first time the command is written (connected), the loop's time is appended to
    ``sent_at``: from then on Redis may run it (a failure to connect sends nothing)."""
    if not conn.is_connected:
        # What send_packed_command would do first, done here to tell "not sent" apart.
        await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    if not sent_at:
        sent_at.append(asyncio.get_running_loop().time())
    await conn.send_packed_command(packed, check_health=False)
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


#: The batch script's own part; the limit scripts come before it as ``scripts[i]``, and
#: ``reply_ttl_ms``. KEYS[1] is the batch's key (module docstring).
_BATCH_LUA = """\
-- Sent again (the first reply was lost): answer the first run's replies, run nothing.
local stored = redis.call("GET", KEYS[1])
if stored then
  return cmsgpack.unpack(stored)
end
local calls = tonumber(ARGV[1])
local replies = {}
local key_at, arg_at = 2, 2 + 3 * calls
for c = 1, calls do
  local at = 2 + 3 * (c - 1)
  local script = scripts[tonumber(ARGV[at])]
  local nkeys, nargs = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local keys, args = {}, {}
  for i = 1, nkeys do keys[i] = KEYS[key_at + i - 1] end
  for i = 1, nargs do args[i] = ARGV[arg_at + i - 1] end
  key_at, arg_at = key_at + nkeys, arg_at + nargs
  local ok, reply = pcall(script, keys, args)
  if ok then
    replies[c] = reply
  elseif type(reply) == "table" and reply.err then
    replies[c] = reply
  else
    replies[c] = {err = "ERR " .. tostring(reply)}
  end
end
-- MessagePack, not JSON: cjson writes numbers with 14 digits (1e14 + 7 comes back as
-- 1.0000000000001e+14), while cmsgpack keeps integers as integers and the rest exactly
-- (strings as bytes, false for nil, an error or status as its table), so that the reply
-- made of the stored value is byte for byte this one.
redis.call("SET", KEYS[1], cmsgpack.pack(replies), "PX", reply_ttl_ms)
return replies
"""


def batch_script(scripts: Mapping[str, str], ttl_ms: int) -> tuple[str, dict[str, int]]:
    """One Lua script that runs any number of calls of ``scripts`` (name → source), and the
    number by which the batch names each script.

    Each source becomes a local function whose parameters ``KEYS`` and ``ARGV`` hide the
    globals, so a script reads its own call's keys and arguments, unchanged. A call that
    raises an error (``pcall``) gets it as its reply, an error reply inside the list. The
    batch's key (KEYS[1]) stores its replies for ``ttl_ms``, for a resend (module
    docstring)."""
    numbers: dict[str, int] = {}
    parts = [
        "-- sluicegate: several calls of the limit scripts in one command "
        "(sluicegate/limits/redis_batch.py).\n",
        f"local reply_ttl_ms = {int(ttl_ms)}\n",
        "local scripts = {}\n",
    ]
    for number, (name, source) in enumerate(scripts.items(), start=1):
        numbers[name] = number
        parts.append(f"-- {name}\nscripts[{number}] = function(KEYS, ARGV)\n{source}\nend\n")
    parts.append(_BATCH_LUA)
    return "".join(parts), numbers


def _bulk(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"$%d\r\n%b\r\n" % (len(data), data)


def evalsha_head(sha: str) -> bytes:
    """The part of an EVALSHA command before its keys: the name and the script's sha."""
    return b"$7\r\nEVALSHA\r\n" + _bulk(sha)


def pack_evalsha(head: bytes, keys: list[str], args: list[Any]) -> bytes:
    """The RESP encoding of ``EVALSHA <sha> <len(keys)> *keys *args`` (``head``: the
    command's name and script, from ``evalsha_head``), as redis-py would send it.

    ``args`` are ASCII strings and integers (what the limit scripts take); anything else
    raises TypeError (a bool or a float would be sent in a form the scripts do not parse) or
    UnicodeEncodeError. Keys may hold any text (their length is counted in UTF-8 bytes); the
    arguments are formatted as one string and encoded once."""
    for arg in args:
        if type(arg) is not int and type(arg) is not str:
            raise TypeError(f"a limit script takes strings and integers, not {type(arg).__name__}")
    parts = [b"*%d\r\n" % (3 + len(keys) + len(args)), head, _bulk(str(len(keys)))]
    parts += [_bulk(key) for key in keys]
    parts.append(
        "".join([f"${len(text)}\r\n{text}\r\n" for text in map(str, args)]).encode("ascii")
    )
    return b"".join(parts)


def _answer(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
