"""The rollup job's pacing: it never takes more than about 1/PACING of its process's time."""

from __future__ import annotations

from sluicegate.accounting.job import PACING, next_wait


def test_the_configured_interval_is_the_floor() -> None:
    assert next_wait(10.0, None) == 10.0
    assert next_wait(10.0, 0.2) == 10.0


def test_a_long_run_makes_the_next_wait_longer() -> None:
    assert next_wait(10.0, 2.0) == PACING * 2.0
    assert next_wait(1.0, 0.5) / (next_wait(1.0, 0.5) + 0.5) > 0.97
