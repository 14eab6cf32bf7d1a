"""Fixtures for the routing tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Things to stop at the end (gateways first, then their backends)."""
    things: list[Any] = []
    yield things
    for thing in things:
        thing.stop()
