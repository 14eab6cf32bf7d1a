"""Circuit breaker rules per backend (``backends[].circuit_breaker``, merged over
``routing.circuit_breaker``): the config's merge and checks, the router's use of each
backend's rule, and end to end through real gateways (embedded and cluster mode) over the
simulator's injected 429s."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.clock import FakeClock
from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.routing.breaker import BreakerSettings, BreakerState
from sluicegate.routing.build import router_settings
from sluicegate.routing.pool import Member
from sluicegate.routing.redis_state import RedisStateStore
from sluicegate.routing.retry import Outcome
from sluicegate.routing.router import Router, RouterSettings
from sluicegate.routing.state import MemoryStateStore, SharedTrip
from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import REDIS_URL, Routed, body, start_sim
from tests.support.gateway import GatewayThread, gateway_config
from tests.support.pg import throwaway_database

PTU = Member("ptu", "gpt-4o", kind="ptu")
PAYG = Member("payg", "gpt-4o")
PLAIN = Member("plain", "gpt-4o")


def _config(tmp: Path, breakers: dict[str, dict[str, Any] | None], **extra: Any) -> dict[str, Any]:
    """A gateway.yaml dict with one backend per entry of ``breakers`` (its own rule, or
    None), all at one unreachable URL (nothing here is sent)."""
    data = gateway_config(tmp, dict.fromkeys(breakers, "http://127.0.0.1:9"), **extra)
    for backend in data["backends"]:
        rule = breakers[backend["name"]]
        if rule is not None:
            backend["circuit_breaker"] = rule
    return data


# --- configuration ---------------------------------------------------------------------------


def test_a_backend_rule_is_merged_over_the_global_one_field_by_field(tmp_path: Path) -> None:
    data = _config(
        tmp_path,
        {
            "ptu": {"throttles": 1, "trip_seconds": 30},
            "payg": {"enabled": False, "trip_seconds": None},  # null: the global one's
            "plain": None,
        },
        routing={
            "circuit_breaker": {
                "throttles": 3,
                "failures": 5,
                "trip_seconds": 15,
                "honour_retry_after": False,
            }
        },
    )
    config = parse_config(data)
    settings = router_settings(config.routing, config.backends)
    assert settings.breaker == BreakerSettings(
        failures=5, throttles=3, trip=15.0, max_trip=60.0, honour_retry_after=False
    )
    assert settings.breakers == {
        "ptu": BreakerSettings(
            failures=5, throttles=1, trip=30.0, max_trip=60.0, honour_retry_after=False
        ),
        "payg": BreakerSettings(
            enabled=False, failures=5, throttles=3, trip=15.0, honour_retry_after=False
        ),
    }


def test_apim_model_global_off_and_a_rule_on_some_backends(tmp_path: Path) -> None:
    data = _config(
        tmp_path,
        {"ptu": {"enabled": True, "throttles": 1}, "payg": None},
        routing={"circuit_breaker": {"enabled": False}},
    )
    config = parse_config(data)
    settings = router_settings(config.routing, config.backends)
    assert not settings.breaker.enabled
    assert settings.breakers["ptu"] == BreakerSettings(enabled=True, throttles=1)


def test_a_backend_max_trip_below_the_merged_trip_is_refused_naming_the_backend(
    tmp_path: Path,
) -> None:
    # The backend gives only max_trip_seconds; trip_seconds (20) is the global one's.
    data = _config(
        tmp_path,
        {"payg": None, "ptu": {"max_trip_seconds": 5}},
        routing={"circuit_breaker": {"trip_seconds": 20, "max_trip_seconds": 60}},
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.problems == [
        "backends[1].circuit_breaker: backend 'ptu': max_trip_seconds (5) must be at least "
        "trip_seconds (20) (its rule merged over routing.circuit_breaker)"
    ]
    # Lowering its trip_seconds as well makes it consistent.
    data["backends"][1]["circuit_breaker"]["trip_seconds"] = 2
    config = parse_config(data)
    merged = config.backends[1].breaker(config.routing.circuit_breaker)
    assert (merged.trip_seconds, merged.max_trip_seconds) == (2, 5)


def test_unknown_and_invalid_fields_of_a_backend_rule_are_errors(tmp_path: Path) -> None:
    data = _config(tmp_path, {"ptu": {"trip": 5, "throttles": 0}})
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    text = "\n".join(caught.value.problems)
    assert "backends[0].circuit_breaker.trip: Extra inputs are not permitted" in text
    assert "backends[0].circuit_breaker.throttles: Input should be greater than or equal to 1" in (
        text
    )


# --- the router ------------------------------------------------------------------------------


def _router(store: MemoryStateStore | None = None) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    settings = RouterSettings(
        breaker=BreakerSettings(throttles=2, failures=2, trip=20.0, max_trip=600.0),
        breakers={
            "ptu": BreakerSettings(throttles=1, trip=300.0, max_trip=600.0),
            "payg": BreakerSettings(throttles=3, failures=2, trip=20.0, max_trip=30.0),
        },
    )
    router = Router(settings, clock, store)
    for member in (PTU, PAYG, PLAIN):
        router.add_pool(member.backend, [member])
    return router, clock


def _throttled_until_open(router: Router, member: Member, limit: int = 5) -> int:
    """Answer 429s (no retry-after) from ``member`` until its breaker opens; how many."""
    target = router.targets[member.key]
    for n in range(1, limit + 1):
        router.failed(router.begin(target, 10), Outcome(429))
        if target.breaker.state(router.clock.now()) is BreakerState.OPEN:
            return n
    return 0


def test_each_backend_trips_on_its_own_threshold_for_its_own_trip() -> None:
    router, clock = _router()
    assert _throttled_until_open(router, PTU) == 1
    assert _throttled_until_open(router, PAYG) == 3
    assert _throttled_until_open(router, PLAIN) == 2  # the global rule
    now = clock.now()
    assert router.targets[PTU.key].breaker.open_until - now == 300.0
    assert router.targets[PAYG.key].breaker.open_until - now == 20.0
    assert router.targets[PLAIN.key].breaker.open_until - now == 20.0


def test_a_refusal_caps_each_member_wait_at_its_own_max_trip() -> None:
    router, _ = _router()
    day = Outcome(429, retry_after=86400.0)
    for member, cap in ((PAYG, 30.0), (PLAIN, 600.0)):
        pool = router.pools[member.backend]
        # One 429 opens neither (3 and 2 throttles): the refusal passes the capped wait on.
        router.failed(router.begin(router.targets[member.key], 10), day)
        assert router.refusal(pool, {member.key: day}).retry_after == cap


def test_a_backend_whose_breaker_is_off_never_trips_nor_takes_shared_trips() -> None:
    store = MemoryStateStore()
    clock = FakeClock()
    settings = RouterSettings(
        breaker=BreakerSettings(failures=1), breakers={"ptu": BreakerSettings(enabled=False)}
    )
    router = Router(settings, clock, store)
    router.add_pool("gpt-4o", [PTU, PAYG])
    ptu = router.targets[PTU.key]
    for outcome in (Outcome(500), Outcome(503, retry_after=30.0), Outcome(429)) * 3:
        router.failed(router.begin(ptu, 10), outcome)
    assert ptu.breaker.state(clock.now()) is BreakerState.CLOSED and ptu.breaker.trips == 0
    # Another instance (a different rule during a configuration change) tripped it.
    store.publish_trip(PTU.key, SharedTrip(clock.now() + 30, "500", False))
    assert ptu.breaker.state(clock.now()) is BreakerState.CLOSED
    # The other member keeps the global rule.
    router.failed(router.begin(router.targets[PAYG.key], 10), Outcome(500))
    assert router.targets[PAYG.key].breaker.state(clock.now()) is BreakerState.OPEN


async def test_a_trip_adopted_from_another_instance_is_capped_at_the_own_max_trip(
    redis_prefix: str,
) -> None:
    """Two routers sharing real Redis, the second with a shorter rule for ``ptu`` (a rolling
    configuration change): the first's 300-s trip reaches the second as at most its own
    ``max_trip`` (30 s) from when it arrived, not the first's end."""
    clock = FakeClock()
    stores = [RedisStateStore(REDIS_URL, f"{redis_prefix}:routing:", interval=0.05) for _ in "12"]
    rules = (
        BreakerSettings(throttles=1, trip=300.0, max_trip=600.0),
        BreakerSettings(throttles=1, trip=10.0, max_trip=30.0),
    )
    one, two = (
        Router(RouterSettings(breakers={"ptu": rule}), clock, store)
        for rule, store in zip(rules, stores, strict=True)
    )
    for router in (one, two):
        router.add_pool("gpt-4o", [PTU, PAYG])
    try:
        one.failed(one.begin(one.targets[PTU.key], 10), Outcome(429))
        ends = one.targets[PTU.key].breaker.open_until
        assert ends - clock.now() == 300.0
        clock.advance(5.0)  # the trip arrives 5 s after it was made
        for store in stores:
            await store.sync()
        adopted = two.targets[PTU.key].breaker
        assert adopted.state(clock.now()) is BreakerState.OPEN
        assert adopted.open_until - clock.now() == 30.0  # its own max_trip, not 295 s
        assert adopted.reason == "429" and adopted.throttled
        # Its own later trip may still be longer than what it adopted (never shortened);
        # the first keeps its own end (the second published nothing).
        clock.advance(30.0)
        assert adopted.state(clock.now()) is BreakerState.HALF_OPEN
        assert one.targets[PTU.key].breaker.open_until == ends
        # A peer's trip shorter than the own cap is adopted as it is.
        two.targets[PAYG.key].breaker.force_open(clock.now() + 4.0, "500", False, clock.now())
        assert two.targets[PAYG.key].breaker.open_until == clock.now() + 4.0
    finally:
        for store in stores:
            await store.aclose()


# --- end to end ------------------------------------------------------------------------------

#: Global rule: two 429s, 20 s, retry-after not honoured (so that trip_seconds decides).
ROUTING: dict[str, Any] = {
    "retry": {"statuses": [500, 502, 503, 504]},  # 429s reach the client (and the breaker)
    "circuit_breaker": {
        "throttles": 2,
        "trip_seconds": 20,
        "max_trip_seconds": 600,
        "honour_retry_after": False,
    },
    "sync_seconds": 0.1,
}
#: PTU parks on its first 429 for 5 minutes; pay-as-you-go tolerates three; plain: global.
RULES: dict[str, dict[str, Any] | None] = {
    "ptu": {"throttles": 1, "trip_seconds": 300},
    "payg": {"throttles": 3},
    "plain": None,
}


@contextlib.contextmanager
def _gateways(
    tmp: Path, sim: SimulatorThread, mode: str, redis_prefix: str
) -> Iterator[tuple[Routed, GatewayThread | None]]:
    """A gateway (and in cluster mode a second one sharing Redis and PostgreSQL) with one
    deployment per backend of ``RULES``, each a one-member pool over ``sim``."""
    deployments = [
        {"name": f"d-{name}", "backend": name, "backend_deployment": "gpt-4o", "model": "gpt-4o"}
        for name in RULES
    ]
    started: list[Routed | GatewayThread] = []
    with contextlib.ExitStack() as stack:
        extra: dict[str, Any] = {}
        if mode == "cluster":
            extra = {
                "mode": "cluster",
                "storage_url": stack.enter_context(throwaway_database()),
                "redis": {"url": REDIS_URL, "prefix": redis_prefix},
            }
        data = gateway_config(
            tmp, dict.fromkeys(RULES, sim.url), deployments=deployments, routing=ROUTING, **extra
        )
        for backend in data["backends"]:
            rule = RULES[backend["name"]]
            if rule is not None:
                backend["circuit_breaker"] = rule
        try:
            one = Routed(data, {})
            started.append(one)
            two = None
            if mode == "cluster":
                two = GatewayThread(data).start()
                started.append(two)
            yield one, two
        finally:
            for gateway in started:
                gateway.stop()


def _sim_requests(sim: SimulatorThread) -> int:
    """How many requests the simulator has logged."""
    resp = httpx.get(f"{sim.url}/_sim/log", timeout=10)
    resp.raise_for_status()
    data = resp.json()
    return len(data["entries"] if isinstance(data, dict) else data)


def _states(gateway: GatewayThread) -> dict[str, dict[str, Any]]:
    return {s["backend"]: s for s in gateway.gateway.backend_states()}


@pytest.mark.parametrize("mode", ["embedded", "cluster"])
def test_two_backends_trip_on_their_own_rules_through_a_gateway(
    tmp_path: Path, redis_prefix: str, mode: str
) -> None:
    sim = start_sim()
    try:
        with (
            _gateways(tmp_path, sim, mode, redis_prefix) as (one, two),
            httpx.Client(timeout=30) as client,
        ):
            headers = {"api-key": one.key, "x-sim-fault": "429"}
            seen: dict[str, list[str]] = {}
            for name, count in (("ptu", 1), ("payg", 3), ("plain", 2)):
                for _ in range(count):
                    r = client.post(one.chat_url(f"d-{name}"), json=body(5), headers=headers)
                    assert r.status_code == 429, r.text
                    seen.setdefault(name, []).append(one.states()[name]["state"])
            assert seen == {
                "ptu": ["open"],  # its own rule: the first 429
                "payg": ["closed", "closed", "open"],  # its own rule: the third
                "plain": ["closed", "open"],  # the global rule: the second
            }
            now = time.time()
            states = one.states()
            ends = {name: states[name]["open_until"] for name in RULES}
            assert 299 <= ends["ptu"] - now <= 300  # its own trip_seconds
            assert 19 <= ends["payg"] - now <= 20  # trip_seconds inherited
            assert 19 <= ends["plain"] - now <= 20
            # Parked: the next request is refused without reaching the backend.
            before = _sim_requests(sim)
            r = client.post(one.chat_url("d-ptu"), json=body(5), headers={"api-key": one.key})
            assert r.status_code == 429 and r.json()["error"]["code"] == "429"
            assert 299 <= float(r.headers["retry-after"]) <= 300
            assert _sim_requests(sim) == before
            if two is not None:
                # Each trip, with the end its own rule gave it, reaches the other instance.
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    shared = _states(two)
                    if all(shared[name]["open_until"] == ends[name] for name in RULES):
                        break
                    time.sleep(0.05)
                assert {name: _states(two)[name]["open_until"] for name in RULES} == ends
    finally:
        sim.stop()
