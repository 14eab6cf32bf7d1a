"""The circuit breaker's state machine, driven by a fake clock (no sleeping)."""

from __future__ import annotations

from typing import Any

from sluicegate.clock import FakeClock
from sluicegate.routing.breaker import BreakerSettings, BreakerState, CircuitBreaker


def _breaker(**kw: Any) -> tuple[CircuitBreaker, FakeClock]:
    base: dict[str, Any] = {"failures": 3, "throttles": 1, "interval": 10.0, "trip": 5.0}
    settings = BreakerSettings(**{**base, "max_trip": 60.0, **kw})
    return CircuitBreaker(settings), FakeClock()


def test_open_half_open_closed() -> None:
    b, clock = _breaker()
    now = clock.now
    assert b.state(now()) is BreakerState.CLOSED
    assert not b.failure(now(), "500", throttle=False, retry_after=None, probe=False)
    assert not b.failure(now(), "500", throttle=False, retry_after=None, probe=False)
    assert b.failure(now(), "timeout", throttle=False, retry_after=None, probe=False)
    assert b.state(now()) is BreakerState.OPEN
    assert not b.available(now())
    assert b.reason == "timeout" and not b.throttled
    clock.advance(4.9)
    assert b.state(now()) is BreakerState.OPEN
    clock.advance(0.2)
    assert b.state(now()) is BreakerState.HALF_OPEN
    assert b.available(now())
    probe = b.begin(now())
    assert probe
    assert not b.available(now()), "one probe at a time"
    assert not b.begin(now())
    assert b.success(now(), probe=True)
    assert b.state(now()) is BreakerState.CLOSED
    assert b.available(now())
    assert repr(b).startswith("CircuitBreaker(")


def test_failures_outside_the_interval_do_not_add_up() -> None:
    b, clock = _breaker()
    for _ in range(5):
        assert not b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
        assert not b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
        clock.advance(10.5)
    assert b.state(clock.now()) is BreakerState.CLOSED


def test_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    b, clock = _breaker(failures=1, trip=5.0, max_trip=12.0)
    b.failure(clock.now(), "connection", throttle=False, retry_after=None, probe=False)
    assert b.open_until - clock.now() == 5.0
    clock.advance(5.0)
    probe = b.begin(clock.now())
    assert b.failure(clock.now(), "connection", throttle=False, retry_after=None, probe=probe)
    assert b.open_until - clock.now() == 10.0
    clock.advance(10.0)
    probe = b.begin(clock.now())
    assert b.failure(clock.now(), "connection", throttle=False, retry_after=None, probe=probe)
    assert b.open_until - clock.now() == 12.0  # capped
    clock.advance(12.0)
    probe = b.begin(clock.now())
    assert b.success(clock.now(), probe)
    b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
    assert b.open_until - clock.now() == 5.0  # back to the base duration after a close


def test_a_429_trips_for_its_retry_after_capped() -> None:
    b, clock = _breaker(max_trip=60.0)
    assert b.failure(clock.now(), "429", throttle=True, retry_after=2.5, probe=False)
    assert b.throttled
    assert b.open_until - clock.now() == 2.5
    clock.advance(2.5)
    assert b.state(clock.now()) is BreakerState.HALF_OPEN
    probe = b.begin(clock.now())
    assert b.failure(clock.now(), "429", throttle=True, retry_after=86400.0, probe=probe)
    assert b.open_until - clock.now() == 60.0  # "retry after a day" is capped


def test_retry_after_ignored_when_not_honoured() -> None:
    b, clock = _breaker(honour_retry_after=False, trip=7.0)
    b.failure(clock.now(), "429", throttle=True, retry_after=1.0, probe=False)
    assert b.open_until - clock.now() == 7.0


def test_throttles_have_their_own_threshold() -> None:
    b, clock = _breaker(throttles=2, failures=5)
    assert not b.failure(clock.now(), "429", throttle=True, retry_after=1, probe=False)
    assert not b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
    assert b.failure(clock.now(), "429", throttle=True, retry_after=3, probe=False)
    assert b.open_until - clock.now() == 3


def test_late_429_extends_but_never_shortens_an_open_breaker() -> None:
    b, clock = _breaker()
    b.failure(clock.now(), "429", throttle=True, retry_after=10, probe=False)
    end = b.open_until
    b.failure(clock.now(), "429", throttle=True, retry_after=4, probe=False)
    assert b.open_until == end
    b.failure(clock.now(), "429", throttle=True, retry_after=20, probe=False)
    assert b.open_until == end + 10


def test_answers_sent_before_the_trip_do_not_close_it() -> None:
    b, clock = _breaker(failures=1)
    b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
    assert not b.success(clock.now(), probe=False)
    assert b.state(clock.now()) is BreakerState.OPEN


def test_a_half_open_breaker_takes_verdicts_only_from_its_probe_or_later_requests() -> None:
    b, clock = _breaker(failures=3, trip=5.0)
    early = clock.now()  # a long request sent while all was well
    for _ in range(3):
        b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False, begun=early)
    clock.advance(5.0)
    sent = clock.now()
    assert b.begin(sent), "the probe"
    # The early request ends while the probe is out: neither its success nor its failure
    # says anything about the backend now.
    assert not b.success(clock.now(), False, early)
    assert not b.failure(
        clock.now(), "500", throttle=False, retry_after=None, probe=False, begun=early
    )
    assert b.state(clock.now()) is BreakerState.HALF_OPEN and not b.available(clock.now())
    # The probe's failure opens it again (twice as long), not "one failure of three".
    assert b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=True, begun=sent)
    assert b.open_until - clock.now() == 10.0
    clock.advance(10.0)
    assert b.begin(clock.now())
    later = clock.now()
    assert not b.begin(later), "one probe at a time"
    # A request begun after the trip's end (not the probe) may close it.
    assert b.success(clock.now(), False, later)
    assert b.state(clock.now()) is BreakerState.CLOSED


def test_out_for() -> None:
    b, clock = _breaker(failures=1, trip=5.0)
    assert b.out_for(clock.now()) == 0.0
    b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
    clock.advance(1.5)
    assert b.out_for(clock.now()) == 3.5
    clock.advance(3.5)
    assert b.out_for(clock.now()) == 0.0  # half-open


def test_abandoned_probe_frees_the_slot() -> None:
    b, clock = _breaker(failures=1)
    b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
    clock.advance(5)
    probe = b.begin(clock.now())
    assert not b.available(clock.now())
    b.abandon(probe)
    assert b.available(clock.now())


def test_a_peer_trip_is_capped_at_the_own_max_trip() -> None:
    b, clock = _breaker(trip=5.0, max_trip=60.0)
    now = clock.now()
    # A peer's rule gave 600 s: adopted as 60 s from now, the longest this rule allows.
    assert b.force_open(now + 600, "429", True, now)
    assert b.open_until == now + 60.0
    # Not capped at the own trip (5 s): a peer's retry-after or doubled trip stands.
    b2, _ = _breaker(trip=5.0, max_trip=60.0)
    assert b2.force_open(now + 40, "503", False, now) and b2.open_until == now + 40


def test_force_open_from_another_instance() -> None:
    b, clock = _breaker()
    assert b.force_open(clock.now() + 30, "429", True, clock.now())
    assert b.state(clock.now()) is BreakerState.OPEN and b.throttled
    assert not b.force_open(clock.now() + 10, "500", False, clock.now()), "never shortened"
    clock.advance(30)
    assert b.state(clock.now()) is BreakerState.HALF_OPEN
