"""Request ids: 32 hex digits, unique, increasing with time (see proxy.context)."""

from __future__ import annotations

import time

from sluicegate.proxy.context import new_request_id


def test_ids_are_hex_unique_and_ordered_by_time() -> None:
    first = [new_request_id() for _ in range(1000)]
    time.sleep(0.002)
    later = new_request_id()
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in first)
    assert len(set(first)) == len(first)
    assert max(i[:12] for i in first) < later[:12]
    assert abs(int(later[:12], 16) / 1000 - time.time()) < 5
