"""The sliding-window limiter: exact remaining budget and exact waits (pure, no sockets)."""

from __future__ import annotations

import pytest

from sluicegate.simulator.window import (
    DeploymentLimiter,
    SlidingWindow,
    request_budget,
    retry_after_values,
)


def test_window_charges_and_expires_after_sixty_seconds() -> None:
    w = SlidingWindow(100)
    w.charge(30, 1000.0)
    w.charge(50, 1010.0)
    assert w.used(1010.0) == 80
    assert w.remaining(1010.0) == 20
    assert w.used(1059.999) == 80
    assert w.used(1060.0) == 50  # the first charge left the window exactly 60 s later
    assert w.used(1070.0) == 0


def test_wait_is_until_enough_of_the_window_has_expired() -> None:
    w = SlidingWindow(100)
    w.charge(30, 1000.0)
    w.charge(50, 1010.0)
    assert w.wait_for(20, 1020.0) == 0.0
    # 40 more needs 20 freed: the charge of 30 at t=1000 must expire, at t=1060.
    assert w.wait_for(40, 1020.0) == pytest.approx(40.0)
    # 90 more needs 70 freed: both charges, the later one expires at t=1070.
    assert w.wait_for(90, 1020.0) == pytest.approx(50.0)
    assert w.wait_for(40, 1060.0) == 0.0


def test_request_larger_than_the_limit_waits_for_an_empty_window() -> None:
    w = SlidingWindow(100)
    w.charge(10, 1000.0)
    assert w.wait_for(500, 1001.0) == pytest.approx(59.0)
    assert w.wait_for(500, 1060.0) == 0.0


def test_compaction_keeps_totals_and_waits_right() -> None:
    w = SlidingWindow(3000)
    for i in range(10_000):
        w.charge(1, 1000.0 + i * 0.02)  # 200 s of charges (charge itself never refuses)
    now = 1000.0 + 200.0
    used = w.used(now)  # the charges after t = 1140 are still in the window
    assert used == pytest.approx(3000, abs=2)
    assert len(w._times) < 10_000  # the expired head was dropped
    # Ten units more than the room: the ten oldest live charges must expire, the tenth of
    # them was made about 140.2 s after the start, so it leaves at ≈ 1200.2.
    assert w.wait_for(w.limit - used + 10, now) == pytest.approx(0.2, abs=0.03)
    w.charge(5, now)
    assert w.used(now) == used + 5


def test_deployment_limiter_refuses_without_charging() -> None:
    lim = DeploymentLimiter(tpm=100, rpm=12)  # requests: 2 per 10 s, 1 per second
    first = lim.admit(60, 1000.0)
    assert first.admitted
    assert (first.remaining_tokens, first.remaining_requests) == (40, 1)
    refused = lim.admit(60, 1005.0)
    assert not refused.admitted
    assert refused.exceeded == "tokens"
    assert refused.retry_after_s == pytest.approx(55.0)
    assert (refused.remaining_tokens, refused.remaining_requests) == (40, 1)
    assert lim.admit(10, 1006.0).admitted
    by_calls = lim.admit(1, 1007.0)
    assert not by_calls.admitted
    assert by_calls.exceeded == "requests"
    assert by_calls.retry_after_s == pytest.approx(3.0)  # the t=1000 request leaves at 1010
    assert by_calls.limit_requests == 12  # the header keeps the deployment's RPM


@pytest.mark.parametrize(
    ("rpm", "per_ten_seconds", "per_second"),
    [(600, 100, 10), (300, 50, 5), (2_700, 450, 45), (6, 1, 1), (10, 2, 1), (1, 1, 1)],
)
def test_request_budgets_are_rpm_over_six_and_sixty(
    rpm: int, per_ten_seconds: int, per_second: int
) -> None:
    assert (request_budget(rpm, 6), request_budget(rpm, 60)) == (per_ten_seconds, per_second)
    lim = DeploymentLimiter(tpm=None, rpm=rpm)
    assert [(w.window, w.limit) for w in lim.request_windows] == [
        (10.0, per_ten_seconds),
        (1.0, per_second),
    ]


def test_requests_are_limited_per_second_and_per_ten_seconds() -> None:
    lim = DeploymentLimiter(tpm=None, rpm=600)  # 100 per 10 s, 10 per second
    for i in range(10):
        a = lim.admit(0, 0.0)
        assert a.admitted
        assert a.remaining_requests == 99 - i  # the 10-s budget, not 600 - i
    burst = lim.admit(0, 0.5)
    assert not burst.admitted and burst.exceeded == "requests"
    assert burst.retry_after_s == pytest.approx(0.5)  # until the burst leaves the 1-s window
    assert burst.remaining_requests == 90
    for second in range(1, 10):  # 10 a second: the 10-s window fills at t=9
        for _ in range(10):
            assert lim.admit(0, float(second)).admitted
    full = lim.admit(0, 9.99)
    assert not full.admitted
    assert full.remaining_requests == 0
    assert full.retry_after_s == pytest.approx(0.01)  # the t=0 requests leave at t=10
    assert lim.admit(0, 10.0).admitted


def test_unlimited_dimensions_report_none() -> None:
    a = DeploymentLimiter(tpm=None, rpm=None).admit(10**9, 0.0)
    assert a.admitted
    assert a.limit_tokens is None
    assert a.remaining_requests is None


@pytest.mark.parametrize(
    ("wait", "expected"),
    [
        (0.0001, (1, 1)),
        (0.5, (1, 500)),
        (1.0, (1, 1000)),
        (1.0004, (2, 1001)),
        (59.9999, (60, 60000)),
    ],
)
def test_retry_after_values_round_up(wait: float, expected: tuple[int, int]) -> None:
    assert retry_after_values(wait) == expected


def test_waiting_the_advertised_milliseconds_is_enough() -> None:
    w = SlidingWindow(100)
    t0 = 1000.123456789
    w.charge(100, t0)
    now = t0 + 12.3456789
    _, ms = retry_after_values(w.wait_for(1, now))
    assert w.wait_for(1, now + ms / 1000.0 - 0.002) > 0.0  # (time only moves forward)
    assert w.wait_for(1, now + ms / 1000.0) == 0.0
