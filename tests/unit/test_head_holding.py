"""The response transport that sends a response's head and first body write together."""

from __future__ import annotations

import asyncio
from typing import Any

from sluicegate.server import _HeadHoldingTransport


class RecordingTransport:
    """Stands in for the socket transport: records each write (one write = one send)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.gathered: list[tuple[bytes, ...]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.gathered.append(parts)
        self.writes.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1234) if name == "peername" else None


def test_head_and_body_go_out_in_one_write() -> None:
    async def run() -> list[bytes]:
        raw = RecordingTransport()
        transport = _HeadHoldingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: at once
        assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert len(raw.writes) == 1  # the head waits for the body
        transport.write(b"body")
        transport.write(b"more")
        await asyncio.sleep(0)  # the release callback finds nothing held
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)
        return raw.writes

    writes = asyncio.run(run())
    assert writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


def test_a_head_without_body_leaves_at_the_next_turn() -> None:
    async def run() -> None:
        raw = RecordingTransport()
        transport = _HeadHoldingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        assert raw.writes == []
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
        transport.write(b"5\r\nhello\r\n")
        assert raw.writes[-1] == b"5\r\nhello\r\n"

    asyncio.run(run())


def test_close_sends_a_held_head_first() -> None:
    async def run() -> None:
        raw = RecordingTransport()
        transport = _HeadHoldingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.close()
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\n"] and raw.closed
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]  # not sent twice

    asyncio.run(run())


def test_a_long_first_body_leaves_with_the_head_in_one_gathered_write() -> None:
    async def run() -> RecordingTransport:
        raw = RecordingTransport()
        transport = _HeadHoldingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        body = b"x" * 10_000
        transport.write(body)
        assert raw.gathered == [(b"HTTP/1.1 200 OK\r\n\r\n", body)]
        assert raw.gathered[0][1] is body  # handed on, not copied
        transport.write(b"y" * 10_000)  # later writes are plain writes
        await asyncio.sleep(0)
        return raw

    raw = asyncio.run(run())
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10_000, b"y" * 10_000]
    assert len(raw.gathered) == 1


class ClosedTransport(RecordingTransport):
    """A closed uvloop transport: its ``write`` raises (asyncio's would drop the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = True

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")


def test_writes_to_a_closing_connection_are_dropped() -> None:
    async def run() -> list[bytes]:
        raw = ClosedTransport()
        transport = _HeadHoldingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"body")
        await asyncio.sleep(0)
        return raw.writes

    assert asyncio.run(run()) == []
