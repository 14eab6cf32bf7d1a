"""Responses affinity: stateful Responses API calls reach the backend that holds the response.

Two simulators stand in for two Azure regions in one pool with equal weights; each stores
the responses it served (``simulator/stored.py``) and refuses another's id, as Azure does. The
real openai SDK talks to the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from sluicegate.proxy.routes import RouteKind, match_route
from sluicegate.routing.affinity import ResponseAffinity
from sluicegate.routing.pool import Member, Pool
from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, pool_config, start_sim

EQUAL_POOL = [{"backend": "east", "weight": 1}, {"backend": "west", "weight": 1}]


def two_regions(
    tmp_path: Path, started: list[Any], routing: dict[str, Any] | None = None
) -> Routed:
    sims: dict[str, SimulatorThread] = {"east": start_sim(), "west": start_sim()}
    started.extend(sims.values())
    routed = Routed(pool_config(tmp_path, sims, EQUAL_POOL, routing=routing), sims)
    started.insert(0, routed)
    return routed


def v1(routed: Routed) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{routed.url}/openai/v1", api_key=routed.key, max_retries=0)


def served(routed: Routed, sim: str, method: str = "POST", path: str = "") -> list[str]:
    """The paths of the requests ``sim`` answered 2xx (with ``method``, containing ``path``)."""
    return [
        e["path"]
        for e in routed.sim_log(sim)
        if e["method"] == method and path in e["path"] and 200 <= e["status"] < 300
    ]


def posts(routed: Routed, sim: str) -> list[dict[str, Any]]:
    """Every POST ``sim`` received, whatever its answer."""
    return [e for e in routed.sim_log(sim) if e["method"] == "POST"]


def holder(routed: Routed, response_id: str) -> str:
    """Which simulator stored ``response_id`` (asked directly, not through the gateway)."""
    found = []
    for name, sim in routed.sims.items():
        client = openai.OpenAI(
            base_url=f"{sim.url}/openai/v1", api_key="backend-secret-key-0123456789abcdef"
        )
        try:
            client.responses.retrieve(response_id)
            found.append(name)
        except openai.NotFoundError:
            pass
        finally:
            client.close()
    assert len(found) == 1, found
    return found[0]


def test_continuations_across_a_two_member_pool_all_succeed(
    tmp_path: Path, started: list[Any]
) -> None:
    """Without affinity the pool's round-robin sends about every other continuation to the
    region that does not hold the previous response: 400 previous_response_not_found."""
    routed = two_regions(tmp_path, started)
    with v1(routed) as client:
        continued = 0
        for conversation in range(10):
            first = client.responses.create(model="gpt-4o", input=f"hello {conversation}")
            previous = first.id
            for turn in range(2):
                answer = client.responses.create(
                    model="gpt-4o", input=f"and then {turn}", previous_response_id=previous
                )
                assert answer.previous_response_id == previous
                assert holder(routed, answer.id) == holder(routed, first.id)
                previous = answer.id
                continued += 1
    assert continued == 20
    # Both regions served conversations: the pool still balances what it is free to.
    assert len(served(routed, "east")) >= 3 and len(served(routed, "west")) >= 3
    records = routed.records(30)
    assert sum(1 for r in records if r.extra.get("route") == "affinity") == 20


def test_retrieve_and_the_other_calls_by_id_go_to_the_member_that_holds_it(
    tmp_path: Path, started: list[Any]
) -> None:
    """``GET/DELETE responses/{id}``, ``input_items`` and the dated form go to the holder,
    not to ``passthrough_backend`` (east, the first backend), which knows only its own."""
    routed = two_regions(tmp_path, started)
    azure = openai.AzureOpenAI(
        azure_endpoint=routed.url, api_key=routed.key, api_version="preview", max_retries=0
    )
    with v1(routed) as client, azure:
        ids = [client.responses.create(model="gpt-4o", input=f"q{i}").id for i in range(4)]
        holders = {i: holder(routed, i) for i in ids}
        assert set(holders.values()) == {"east", "west"}
        for response_id in ids:
            assert client.responses.retrieve(response_id).id == response_id
            assert azure.responses.retrieve(response_id).id == response_id  # /openai/responses/…
            items = client.responses.input_items.list(response_id)
            assert [item.type for item in items.data] == ["message"]
        for response_id in ids:
            client.responses.delete(response_id)
            with pytest.raises(openai.NotFoundError):  # now the holder's own 404
                client.responses.retrieve(response_id)
    for name in ("east", "west"):
        mine = [i for i, h in holders.items() if h == name]
        assert sorted(p.rsplit("/", 1)[1] for p in served(routed, name, "DELETE")) == sorted(mine)


def test_a_streams_created_id_is_learned(tmp_path: Path, started: list[Any]) -> None:
    """The id in a stream's ``response.created`` is learned: continuing it, retrieving it
    and resuming it as a stream (``GET responses/{id}?stream=true``) reach its holder."""
    routed = two_regions(tmp_path, started)
    with v1(routed) as client:
        ids = []
        for i in range(4):
            with client.responses.create(model="gpt-4o", input=f"s{i}", stream=True) as stream:
                events = list(stream)
            assert events[0].type == "response.created"
            ids.append(events[0].response.id)
        assert {holder(routed, i) for i in ids} == {"east", "west"}
        for response_id in ids:
            answer = client.responses.create(
                model="gpt-4o", input="more", previous_response_id=response_id
            )
            assert answer.previous_response_id == response_id
            resumed = list(client.responses.retrieve(response_id, stream=True))
            assert [e.type for e in resumed] == ["response.created", "response.completed"]
    assert routed.gw.gateway.router.affinity is not None
    assert routed.gw.gateway.router.affinity.learned == 8  # 4 streams + 4 continuations


def test_the_holders_refusal_not_another_members_404(tmp_path: Path, started: list[Any]) -> None:
    """A continuation whose holder is throttled (its breaker open) gets the holder's refusal,
    429 with a wait, and is never sent to the other member (which would answer 400
    previous_response_not_found)."""
    routing = {
        "retry": {"wait_same": False},
        "circuit_breaker": {"throttles": 1, "trip_seconds": 30, "max_trip_seconds": 60},
    }
    routed = two_regions(tmp_path, started, routing)
    with v1(routed) as client:
        first = client.responses.create(model="gpt-4o", input="hi")
        home = holder(routed, first.id)
        other = "west" if home == "east" else "east"
        posts_before = len(posts(routed, other))
        with pytest.raises(openai.RateLimitError) as throttled:
            client.responses.create(
                model="gpt-4o",
                input="again",
                previous_response_id=first.id,
                extra_headers={"x-sim-fault": "429:20"},  # the holder answers 429
            )
        assert throttled.value.response.headers["retry-after"]
        assert routed.states()[home]["state"] == "open"
        # Its breaker is open now: refused at once, with the wait it asked for.
        with pytest.raises(openai.RateLimitError) as refused:
            client.responses.create(model="gpt-4o", input="again", previous_response_id=first.id)
        assert 15 <= float(refused.value.response.headers["retry-after"]) <= 20
        assert isinstance(refused.value.body, dict)
        assert f"names stored response {first.id!r}" in refused.value.body["message"]
        # New conversations still go to the other member.
        fresh = client.responses.create(model="gpt-4o", input="new")
        assert holder(routed, fresh.id) == other
    assert len(posts(routed, other)) == posts_before + 1  # the new conversation only


def test_the_local_map_is_bounded_and_forgets_the_least_recently_used() -> None:
    pool = Pool("gpt-4o", [Member("east", "gpt-4o"), Member("west", "gpt-4o")])
    affinity = ResponseAffinity(3)
    for i in range(3):
        affinity.learn(f"resp_{i}", "east", "sub-a")
    assert affinity.holder("resp_0") == ("east", "sub-a")  # used: now the most recent
    affinity.learn("resp_3", "west", "sub-b")
    assert len(affinity) == 3
    assert affinity.holder("resp_1") is None
    assert affinity.holder("resp_0") == ("east", "sub-a")
    assert affinity.holder("resp_3") == ("west", "sub-b")
    pinned = affinity.pinned(pool, "west")
    assert pinned is not None and [m.key for m in pinned.members] == ["west/gpt-4o"]
    assert affinity.pinned(pool, "north") is None


@pytest.mark.parametrize(
    ("method", "path", "kind", "response_id"),
    [
        ("GET", "/openai/v1/responses/resp_1", RouteKind.PASSTHROUGH, "resp_1"),
        ("DELETE", "/openai/v1/responses/resp_1", RouteKind.PASSTHROUGH, "resp_1"),
        ("POST", "/openai/v1/responses/resp_1/cancel", RouteKind.PASSTHROUGH, "resp_1"),
        ("GET", "/openai/v1/responses/resp_1/input_items", RouteKind.PASSTHROUGH, "resp_1"),
        ("GET", "/openai/responses/resp_1", RouteKind.PASSTHROUGH, "resp_1"),
        ("GET", "/openai/deployments/d/responses/resp_1", RouteKind.DEPLOYMENT, "resp_1"),
        ("POST", "/openai/v1/responses", RouteKind.V1, None),
        ("GET", "/openai/v1/files/file_1", RouteKind.PASSTHROUGH, None),
    ],
)
def test_paths_that_name_a_stored_response(
    method: str, path: str, kind: RouteKind, response_id: str | None
) -> None:
    route = match_route(method, path)
    assert route.kind is kind
    assert route.response_id == response_id
