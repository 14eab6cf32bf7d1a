"""Fixtures for the token and hardening tests: a test identity provider and a simulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import sim_config
from tests.support.idp import TestIdentityProvider


@pytest.fixture
def idp() -> Iterator[TestIdentityProvider]:
    with TestIdentityProvider() as provider:
        yield provider


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(sim_config())
    sim.start()
    yield sim
    sim.stop()
