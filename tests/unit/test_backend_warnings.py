"""A backend that cannot be reached says why in the log, once per interval, not per request."""

from __future__ import annotations

import logging

import pytest

from sluicegate.clock import FakeClock
from sluicegate.config.model import BackendConfig
from sluicegate.upstream.backend import CONNECT_WARNING_INTERVAL_S, Backend


def test_connection_failures_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    backend = Backend(BackendConfig(name="east", url="https://east.example"), {}, clock)
    caplog.set_level(logging.WARNING, logger="sluicegate.upstream")
    for _ in range(5):
        backend.connect_failed(ConnectionRefusedError(111, "Connection refused"))
    clock.advance(CONNECT_WARNING_INTERVAL_S)
    backend.connect_failed(ConnectionRefusedError(111, "Connection refused"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("backend east: a request to https://east.example failed")
    assert "ConnectionRefusedError" in lines[0]
    assert lines[1].endswith("(4 more since the last warning)")
