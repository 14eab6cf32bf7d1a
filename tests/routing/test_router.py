"""The router over pools, breakers and headroom, with a fake clock."""

from __future__ import annotations

from collections import Counter

from sluicegate.clock import FakeClock
from sluicegate.routing.breaker import BreakerSettings, BreakerState
from sluicegate.routing.headroom import Report
from sluicegate.routing.pool import Member, Pool
from sluicegate.routing.retry import Outcome
from sluicegate.routing.router import Router, RouterSettings, Target
from sluicegate.routing.state import MemoryStateStore, SharedHeadroom, SharedTrip, SharedUpdate

PTU = Member("ptu", "gpt-4o", priority=1, kind="ptu")
A = Member("paygo-a", "gpt-4o", priority=2, weight=3)
B = Member("paygo-b", "gpt-4o", priority=2, weight=1)


class Events:
    def __init__(self) -> None:
        self.spills: list[tuple[str, str, str, str]] = []
        self.trips: list[tuple[str, str, str]] = []

    def spilled(self, pool: str, from_backend: str, to_backend: str, reason: str) -> None:
        self.spills.append((pool, from_backend, to_backend, reason))

    def tripped(self, backend: str, deployment: str, reason: str) -> None:
        self.trips.append((backend, deployment, reason))


def _router(
    headroom: bool = True, **breaker: float | int
) -> tuple[Router, Pool, FakeClock, Events]:
    clock = FakeClock()
    events = Events()
    settings = RouterSettings(
        headroom=headroom,
        stale_after=10.0,
        breaker=BreakerSettings(**{"failures": 2, "trip": 5.0, **breaker}),  # type: ignore[arg-type]
    )
    router = Router(settings, clock, observer=events)
    pool = router.add_pool("gpt-4o", [PTU, A, B])
    return router, pool, clock, events


def _ok(router: Router, member: Member, estimate: int, remaining: int) -> None:
    ticket = router.begin(router.targets[member.key], estimate)
    router.report(
        ticket,
        [
            (b"x-ratelimit-remaining-tokens", str(remaining).encode()),
            (b"x-ratelimit-remaining-requests", b"100"),
        ],
    )
    router.succeeded(ticket, 200)


def test_ptu_first_until_its_headroom_runs_out_then_spill_by_weight() -> None:
    router, pool, _, events = _router()
    remaining = 1000
    served: list[str] = []
    for _ in range(40):
        choice = router.choose(pool, 100)
        assert choice is not None
        served.append(choice.member.backend)
        if choice.member is PTU:
            remaining -= 100
            _ok(router, PTU, 100, remaining)
        else:
            _ok(router, choice.member, 100, 10**6)
    assert served[:10] == ["ptu"] * 10
    assert "ptu" not in served[10:]
    # Smooth weighted round-robin: A A B A, seven times and a half.
    assert Counter(served[10:]) == {"paygo-a": 23, "paygo-b": 7}
    assert events.spills[0] == ("gpt-4o", "ptu", served[10], "headroom")


def test_headroom_off_stays_on_ptu() -> None:
    router, pool, _, events = _router(headroom=False)
    _ok(router, PTU, 100, 0)
    choice = router.choose(pool, 100)
    assert choice is not None and choice.member is PTU and choice.reason == "preferred"
    assert events.spills == []


def test_no_headroom_anywhere_falls_back_to_priority() -> None:
    router, pool, _, _ = _router()
    for m in (PTU, A, B):
        _ok(router, m, 1, 0)
    choice = router.choose(pool, 100)
    assert choice is not None and choice.member is PTU


def test_in_flight_requests_count_against_headroom() -> None:
    router, pool, _, _ = _router()
    _ok(router, PTU, 100, 250)
    t1 = router.begin(router.targets[PTU.key], 100)
    t2 = router.begin(router.targets[PTU.key], 100)
    choice = router.choose(pool, 100)
    assert choice is not None and choice.member is not PTU  # 250 - 200 in flight < 100
    router.abandoned(t1)
    router.abandoned(t2)
    assert router.targets[PTU.key].in_flight == 0


def test_failover_trip_half_open_and_back() -> None:
    router, pool, clock, events = _router()
    ptu = router.targets[PTU.key]
    for _ in range(2):
        ticket = router.begin(ptu, 10)
        router.failed(ticket, Outcome(None, "connection"))
        choice = router.choose(pool, 10, tried=[PTU.key])
        assert choice is not None and choice.reason == "failover"
    assert events.trips == [("ptu", "gpt-4o", "connection")]
    assert choice is not None
    assert events.spills[0][:3] == ("gpt-4o", "ptu", choice.member.backend)
    choice = router.choose(pool, 10)
    assert choice is not None and choice.member is not PTU and choice.reason == "unavailable"
    assert router.views()[0].state == "open"
    clock.advance(5.0)
    probe_choice = router.choose(pool, 10)
    assert probe_choice is not None and probe_choice.member is PTU
    probe = router.begin(ptu, 10)
    assert probe.probe
    other = router.choose(pool, 10)
    assert other is not None and other.member is not PTU  # only one probe at a time
    router.succeeded(probe, 200)
    assert router.views()[0].state == "closed"
    again = router.choose(pool, 10)
    assert again is not None and again.member is PTU


def _trip_ptu(router: Router, clock: FakeClock) -> Target:
    """Two connection errors open the PTU's breaker (failures=2); return it half-open."""
    ptu = router.targets[PTU.key]
    for _ in range(2):
        router.failed(router.begin(ptu, 10), Outcome(None, "connection"))
    clock.advance(5.0)
    assert ptu.breaker.state(clock.now()) is BreakerState.HALF_OPEN
    return ptu


def test_a_probe_stream_gives_its_verdict_with_its_first_event_and_its_break_reopens() -> None:
    router, pool, clock, _ = _router()
    ptu = _trip_ptu(router, clock)
    probe = router.begin(ptu, 10)
    assert probe.probe
    router.probe_head(probe, 200)  # a 200 head: no verdict until the body says
    assert probe.probe and ptu.breaker.state(clock.now()) is BreakerState.HALF_OPEN
    router.probe_streaming(probe, 200)  # its first event: it will be relayed for a while
    assert not probe.probe and ptu.breaker.state(clock.now()) is BreakerState.CLOSED
    choice = router.choose(pool, 10)
    assert choice is not None and choice.member is PTU, "taken back during the relay"
    assert ptu.in_flight == 1
    router.failed(probe, Outcome(None, "broken"))  # the stream broke off later: it failed
    assert ptu.in_flight == 0
    assert ptu.breaker.describe(clock.now()) == "open for 10.0s (broken)"


def test_a_probe_head_that_is_a_failure_opens_it_again_for_the_wait_asked() -> None:
    router, _pool, clock, events = _router()
    ptu = _trip_ptu(router, clock)
    probe = router.begin(ptu, 10)
    router.report(probe, [(b"retry-after", b"7")])
    router.probe_head(probe, 429)  # relayed (429 not retried here)
    assert ptu.breaker.open_until - clock.now() == 7.0
    assert events.trips[-1] == ("ptu", "gpt-4o", "429")
    router.relayed_failure(probe, 429)  # the end of that relay: no second verdict
    assert ptu.breaker.open_until - clock.now() == 7.0 and ptu.breaker.trips == 2
    assert ptu.in_flight == 0
    router.probe_head(router.begin(router.targets[A.key], 1), 200)  # not a probe: no-op


def test_a_relayed_failure_takes_its_wait_from_its_headers() -> None:
    router, _pool, clock, _ = _router()
    a = router.targets[A.key]
    ticket = router.begin(a, 10)
    router.report(ticket, [(b"Retry-After-Ms", b"7500"), (b"retry-after", b"8")])
    router.relayed_failure(ticket, 429)
    assert a.breaker.open_until - clock.now() == 7.5  # not trip_seconds (5)
    ticket = router.begin(router.targets[B.key], 10)
    router.relayed_failure(ticket, 429)  # no headers: the trip's own length
    assert router.targets[B.key].breaker.open_until - clock.now() == 5.0


def test_retry_same_goes_through_the_breaker() -> None:
    router, pool, clock, _ = _router()
    choice = router.choose(pool, 10)
    assert choice is not None and choice.member is PTU
    assert router.retry_same(choice) is choice
    for _ in range(2):
        router.failed(router.begin(choice.target, 10), Outcome(500))
    assert router.retry_same(choice) is None and router.out_for(choice.target) == 5.0
    clock.advance(5.0)
    assert router.retry_same(choice) is choice and router.out_for(choice.target) == 0.0
    assert router.begin(choice.target, 10).probe
    assert router.retry_same(choice) is None, "the probe slot is taken"


def test_client_errors_do_not_count_against_the_backend() -> None:
    router, _pool, _, events = _router(failures=1)
    ticket = router.begin(router.targets[PTU.key], 10)
    router.failed(ticket, Outcome(400))
    assert events.trips == []
    assert router.targets[PTU.key].last_status == 400
    router.failed(ticket, Outcome(500))  # a second end of one ticket is ignored
    assert events.trips == []


def test_refusal_429_with_the_shortest_wait_when_all_are_throttled() -> None:
    router, pool, clock, _ = _router()
    outcomes = {}
    for member, wait in ((PTU, 30.0), (A, 4.5), (B, 12.0)):
        outcome = Outcome(429, retry_after=wait)
        router.failed(router.begin(router.targets[member.key], 10), outcome)
        outcomes[member.key] = outcome
    assert router.choose(pool, 10) is None
    refusal = router.refusal(pool, outcomes)
    assert (refusal.status, refusal.retry_after) == (429, 4.5)
    clock.advance(1.5)
    assert router.refusal(pool, {}).retry_after == 3.0


def test_refusal_never_passes_on_more_than_the_longest_trip() -> None:
    router, pool, _clock, _ = _router(throttles=2, max_trip=60.0)
    outcomes = {}
    for member in (PTU, A, B):  # one 429 each: throttled, but no breaker open
        outcome = Outcome(429, retry_after=86400.0)
        router.failed(router.begin(router.targets[member.key], 10), outcome)
        outcomes[member.key] = outcome
    refusal = router.refusal(pool, outcomes)
    assert (refusal.status, refusal.retry_after) == (429, 60.0)
    assert "Retry after 60 seconds" in refusal.message


def test_refusal_503_when_some_are_down() -> None:
    router, pool, _, _ = _router(failures=1, trip=8.0)
    router.failed(router.begin(router.targets[PTU.key], 1), Outcome(429, retry_after=20))
    router.failed(router.begin(router.targets[A.key], 1), Outcome(None, "connection"))
    router.failed(router.begin(router.targets[B.key], 1), Outcome(503))
    refusal = router.refusal(pool, {})
    assert refusal.status == 503 and refusal.retry_after == 8.0
    assert "Retry after 8 seconds" in refusal.message


def test_remote_trips_and_reports_are_applied() -> None:
    clock = FakeClock()
    store = MemoryStateStore()
    one = Router(RouterSettings(), clock, store)
    two = Router(RouterSettings(), clock, store)
    p1 = one.add_pool("gpt-4o", [PTU, A])
    p2 = two.add_pool("gpt-4o", [PTU, A])
    one.failed(one.begin(one.targets[PTU.key], 1), Outcome(429, retry_after=9))
    choice = two.choose(p2, 1)
    assert choice is not None and choice.member is A
    assert two.views()[0].open_reason == "429"
    # A report one instance got reaches the other.
    _ok(one, A, 5, 5)
    view = {v.key: v for v in two.views()}[A.key]
    assert view.headroom_tokens == 5
    # Old trips and unknown targets are ignored.
    two.apply(SharedUpdate("nobody/x", trip=SharedTrip(clock.now() + 5, "500", False)))
    two.apply(SharedUpdate(A.key, trip=SharedTrip(clock.now() - 1, "500", False)))
    assert two.choose(p2, 1) is not None
    clock.advance(9)
    assert one.choose(p1, 1) is not None
    two.apply(SharedUpdate(A.key, headroom=SharedHeadroom(Report(7, 7), clock.now())))
    assert {v.key: v for v in two.views()}[A.key].headroom_tokens == 7


def test_views_and_reprs_show_state() -> None:
    router, _pool, clock, _ = _router(failures=1)
    router.failed(router.begin(router.targets[A.key], 1), Outcome(502))
    views = {v.key: v for v in router.views()}
    assert views[A.key].state == "open" and views[A.key].last_error == "502"
    assert views[A.key].open_until == clock.now() + 5.0
    assert views[PTU.key].as_dict()["kind"] == "ptu"
    assert router.backend_state("paygo-a") == ("open", None)
    assert router.backend_state("nobody") == (None, None)
    assert "paygo-a/gpt-4o: open for 5.0s (502)" in repr(router)
    assert "Target('ptu/gpt-4o'" in repr(router.targets[PTU.key])
