"""Running the simulator: blocking (CLI), on the caller's loop (async tests, demo), or on a
thread of its own (sync tests, benchmarks).

All three serve ``create_simulator_app`` with aiohttp's runner, no access log (it sits under
load tests), handler cancellation on client disconnect, and a short shutdown grace so that a
hung request never holds up ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from sluicegate.clock import Clock
from sluicegate.simulator.app import create_simulator_app
from sluicegate.simulator.config import SimConfig
from sluicegate.simulator.state import SimulatorState, simulator_state

_SHUTDOWN_GRACE_S = 2.0
_START_TIMEOUT_S = 30.0


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class SimulatorHandle:
    """A simulator listening on the current event loop. ``close()`` stops it (idempotent)."""

    def __init__(self, app: web.Application, runner: web.AppRunner, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = _url(host, port)
        self._runner = runner
        self._closed = False

    @property
    def state(self) -> SimulatorState:
        """The live state (truth log, limiters); touch it only from the simulator's loop."""
        return simulator_state(self.app)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._runner.cleanup()

    async def __aenter__(self) -> SimulatorHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"SimulatorHandle(url={self.url!r}, closed={self._closed})"


async def start_simulator(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock | None = None,
) -> SimulatorHandle:
    """Start listening on ``host:port`` (0 = a free port) on the running loop and return."""
    app = create_simulator_app(config, clock)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return SimulatorHandle(app, runner, host, bound_port)


def run_simulator(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 8071,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly. ``on_ready(url)`` is called once
    the socket listens. Blocks; must be called from the main thread (signal handlers)."""

    async def main() -> None:
        handle = await start_simulator(config, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            if on_ready is not None:
                on_ready(handle.url)
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await handle.close()

    asyncio.run(main())


class SimulatorThread:
    """A simulator on its own thread and event loop, for synchronous code.

    ``start()`` returns once the socket listens (or raises what startup raised); ``stop()``
    shuts it down and joins the thread. Usable as a context manager. The app's state lives
    on the simulator thread: reading ``state.truth`` from elsewhere is fine for inspection,
    but prefer ``GET /_sim/log``.
    """

    def __init__(
        self,
        config: SimConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self._requested_port = port
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._handle: SimulatorHandle | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self._started().url

    @property
    def port(self) -> int:
        return self._started().port

    @property
    def state(self) -> SimulatorState:
        return self._started().state

    def _started(self) -> SimulatorHandle:
        if self._handle is None:
            raise RuntimeError("the simulator thread is not running; call start() first")
        return self._handle

    def start(self) -> SimulatorThread:
        if self._thread is not None:
            raise RuntimeError("SimulatorThread.start() called twice")
        self._thread = threading.Thread(target=self._run, name="sluicegate-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("the simulator did not start listening in time")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self._handle = await start_simulator(
                    self.config, self.host, self._requested_port, self._clock
                )
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self._handle.close()

        asyncio.run(main())

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=_SHUTDOWN_GRACE_S + 10.0)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self._handle.url if self._handle is not None else "not started"
        return f"SimulatorThread({where})"
