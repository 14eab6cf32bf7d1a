"""The key index's refresher: each database outage is logged when it starts, and the end of
it too (revoked keys keep working meanwhile, so an operator must see it at once)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sluicegate.auth.index import IndexRefresher, SubscriptionIndex
from sluicegate.auth.keys import KeyHasher
from sluicegate.auth.subscriptions import Subscription


class _Database:
    """Stands in for the subscriptions table: the refresher's two loaders, up or down."""

    def __init__(self) -> None:
        self.up = True
        self.version = 0
        self.calls = 0

    def load_version(self) -> int:
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("the database is down")
        return self.version

    def load_all(self) -> list[Subscription]:
        return []


async def _ticks(db: _Database, n: int) -> None:
    """Wait until the refresher has polled ``n`` more times."""
    target = db.calls + n
    async with asyncio.timeout(5):
        while db.calls < target:
            await asyncio.sleep(0.001)


async def test_every_outage_is_logged_when_it_starts_and_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = _Database()
    index = SubscriptionIndex(KeyHasher(b"s" * 32))
    refresher = IndexRefresher(index, db.load_version, db.load_all, 0.001)
    caplog.set_level(logging.WARNING, logger="sluicegate")
    refresher.start()
    try:
        for outage in range(2):
            await _ticks(db, 2)
            caplog.clear()
            db.up = False
            await _ticks(db, 3)
            failed = [r.getMessage() for r in caplog.records]
            assert len(failed) == 1, (outage, failed)
            assert failed[0].startswith("subscription refresh failed")
            caplog.clear()
            db.up = True
            await _ticks(db, 2)
            (recovered,) = [r.getMessage() for r in caplog.records]
            assert recovered.startswith("subscription refresh works again after ")
            assert refresher.failures == 0
    finally:
        await refresher.stop()
