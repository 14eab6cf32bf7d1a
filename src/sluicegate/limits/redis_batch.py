"""Auto-pipelining of the limit scripts: the calls of one event-loop turn go to Redis together.

Why: with redis-py, each command pays for a pool checkout, a socket write, a wake-up per
reply and the RESP parsing in Python: a hundred-odd microseconds of the gateway's CPU per
round trip, which made the cluster mode's limiter cost more than the rest of the request
path together. Requests arriving together (the normal case under load) now share one
pipeline (``transaction=False``): each script still runs atomically on its own, in the order
submitted, and each caller still awaits its own reply, so a request makes one round trip
(shared) and the costs per round trip are paid once per batch.

redis-py has pipelines but no automatic batching across callers, hence this small class.
Scripts are run by EVALSHA; a ``NOSCRIPT`` reply (Redis restarted or flushed its scripts)
loads the script and runs the affected calls once more. A failed pipeline fails every call
in it with the ``RedisError``: as before, a timed-out script is never repeated, since it may
have run.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from sluicegate.loops import running_loop

#: (script name, keys, args, the caller's future)
_Call = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]


@dataclass(slots=True)
class BatchStats:
    pipelines: int = 0
    calls: int = 0
    script_reloads: int = 0


class ScriptBatcher:
    """Runs named Lua scripts, batching the calls of one loop turn into one pipeline.

    ``scripts`` maps names to Lua sources. Use from one event loop. ``drain()`` waits for
    every call submitted so far (for shutdown).
    """

    def __init__(self, client: aioredis.Redis, scripts: Mapping[str, str]) -> None:
        self._client = client
        self._sources = dict(scripts)
        self._shas = {
            name: hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
            for name, source in scripts.items()
        }
        self._pending: list[_Call] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    def __repr__(self) -> str:
        return f"ScriptBatcher(pending={len(self._pending)}, running={len(self._running)})"

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

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = running_loop(self._loop)
        return self._loop

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = self._running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Call]) -> None:
        self.stats.pipelines += 1
        self.stats.calls += len(batch)
        replies = await self._execute(batch)
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
            for name in {call[0] for call in retry}:
                await self._client.script_load(self._sources[name])
        except RedisError as exc:
            for call in retry:
                _answer(call[3], exc)
            return
        replies = await self._execute(retry)
        if replies is not None:
            for call, reply in zip(retry, replies, strict=True):
                _answer(call[3], reply)

    async def _execute(self, batch: list[_Call]) -> list[Any] | None:
        """The replies (an exception object for a call that failed on its own), or None
        when the whole pipeline failed (every call has been told)."""
        pipe = self._client.pipeline(transaction=False)
        for name, keys, args, _ in batch:
            pipe.execute_command("EVALSHA", self._shas[name], len(keys), *keys, *args)
        try:
            return list(await pipe.execute(raise_on_error=False))
        except RedisError as exc:
            for call in batch:
                _answer(call[3], exc)
            return None
        except BaseException as exc:  # cancelled at shutdown, or a bug: nobody waits forever
            failure = RedisError(f"the Redis pipeline failed: {type(exc).__name__}")
            for call in batch:
                _answer(call[3], failure)
            raise


def _answer(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
