"""Responses affinity keeps one subscription out of another's stored responses, learns in every
pool (one-member pools on ``passthrough_backend`` too) and only what can be continued; the
pieces (pinning, reach, stream ids) on their own.

Real simulators stand in for Azure resources; the real openai SDK talks to the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sluicegate.proxy.relay import created_response_id
from sluicegate.routing.affinity import ResponseAffinity, valid_id
from sluicegate.routing.pool import Member, Pool
from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, pool_config, start_sim

#: Two Azure resources: "public" is ``passthrough_backend``; only product "a" has a
#: deployment on "secret".
PRODUCTS = [
    {"name": "starter", "deployments": ["pub"], "passthrough": True},
    {"name": "a", "deployments": ["private"], "passthrough": True},
]
DEPLOYMENTS = [
    {"name": "pub", "backend": "public", "backend_deployment": "gpt-4o", "model": "gpt-4o"},
    {"name": "private", "backend": "secret", "backend_deployment": "gpt-4o", "model": "gpt-4o"},
]


def two_tenants(tmp_path: Path, started: list[Any]) -> tuple[Routed, str, str]:
    """The reviewer's setup: (gateway, key of product "a", key of another "a" subscription);
    ``routed.key`` is product "starter"'s (B: passthrough, deployments on "public" only)."""
    sims: dict[str, SimulatorThread] = {"public": start_sim(), "secret": start_sim()}
    started.extend(sims.values())
    config = pool_config(
        tmp_path, sims, [], deployments=DEPLOYMENTS, products=PRODUCTS,
        passthrough_backend="public",
    )  # fmt: skip
    routed = Routed(config, sims)
    started.insert(0, routed)
    keys = []
    for name in ("a1", "a2"):
        issued = routed.admin.create_subscription(product="a", owner="team-a", name=name)
        assert issued.primary_key is not None
        keys.append(issued.primary_key)
    routed.gw.gateway.refresher.refresh_now()
    return routed, keys[0], keys[1]


def client(routed: Routed, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{routed.url}/openai/v1", api_key=key, max_retries=0)


def calls(routed: Routed, sim: str) -> list[tuple[str, str]]:
    return [(e["method"], e["path"]) for e in routed.sim_log(sim)]


def test_another_subscription_gets_azures_unknown_id_answer_and_no_backend_is_asked(
    tmp_path: Path, started: list[Any]
) -> None:
    """Before: B's key with A's id got 200 on GET, input_items and DELETE, all sent to
    "secret", a resource B's product cannot otherwise reach."""
    routed, key_a, key_a2 = two_tenants(tmp_path, started)
    with client(routed, key_a) as a:
        created = a.responses.create(model="private", input="a secret")
    response_id = created.id
    secret_before, public_before = calls(routed, "secret"), calls(routed, "public")
    base = f"{routed.url}/openai/v1/responses/{response_id}"
    for key in (routed.key, key_a2):  # another product's, and another subscription of "a"
        for method, url in (("GET", base), ("GET", f"{base}/input_items"), ("DELETE", base)):
            answer = httpx.request(method, url, headers={"api-key": key}, timeout=10)
            assert answer.status_code == 404, (method, url, answer.text)
            assert answer.json() == {
                "error": {
                    "code": "not_found",
                    "message": f"Response with id '{response_id}' not found.",
                    "type": "invalid_request_error",
                    "param": None,
                }
            }
        with client(routed, key) as other, pytest.raises(openai.BadRequestError) as refused:
            other.responses.create(
                model="pub" if key == routed.key else "private",
                input="go on",
                previous_response_id=response_id,
            )
        assert refused.value.code == "previous_response_not_found"
        assert refused.value.param == "previous_response_id"
    # The deployment form of the path, by the other subscription of "a" (which may use
    # "private"): routed over the pool, refused the same way.
    dated = f"{routed.url}/openai/deployments/private/responses/{response_id}?api-version=preview"
    answer = httpx.get(dated, headers={"api-key": key_a2}, timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    # Nothing reached either resource.
    assert calls(routed, "secret") == secret_before
    assert calls(routed, "public") == public_before
    # The owner still retrieves, continues and deletes it.
    with client(routed, key_a) as a:
        assert a.responses.retrieve(response_id).id == response_id
        more = a.responses.create(model="private", input="more", previous_response_id=response_id)
        assert more.previous_response_id == response_id
        a.responses.delete(response_id)


def test_reach_is_the_passthrough_backend_and_the_allowed_deployments_backends() -> None:
    affinity = ResponseAffinity(
        10,
        pool_backends={"pub": frozenset({"public"}), "private": frozenset({"secret"})},
        passthrough="public",
    )
    assert affinity.reaches(frozenset({"pub"}), "public")
    assert not affinity.reaches(frozenset({"pub"}), "secret")
    assert affinity.reaches(frozenset({"private"}), "secret")
    assert affinity.reaches(frozenset(), "public")
    assert affinity.reaches(None, "secret") and not affinity.reaches(None, "elsewhere")


def test_a_one_member_pool_on_the_passthrough_backend_learns_and_isolates(
    tmp_path: Path, started: list[Any]
) -> None:
    """Before, no pool "needed" affinity with a single backend: nothing was learned, and any
    subscription with passthrough could read any other's responses on it."""
    sims = {"only": start_sim()}
    started.extend(sims.values())
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "only"}]), sims)
    started.insert(0, routed)
    other = routed.admin.create_subscription(product="starter", owner="team-b", name="b")
    assert other.primary_key is not None
    routed.gw.gateway.refresher.refresh_now()
    with client(routed, routed.key) as mine, client(routed, other.primary_key) as theirs:
        created = mine.responses.create(model="gpt-4o", input="hi")
        affinity = routed.gw.gateway.router.affinity
        assert affinity is not None and affinity.learned == 1
        with pytest.raises(openai.NotFoundError):
            theirs.responses.retrieve(created.id)
        assert mine.responses.retrieve(created.id).id == created.id


def test_store_false_is_not_learned(tmp_path: Path, started: list[Any]) -> None:
    sims = {"east": start_sim(), "west": start_sim()}
    started.extend(sims.values())
    pool = [{"backend": "east"}, {"backend": "west"}]
    routed = Routed(pool_config(tmp_path, sims, pool), sims)
    started.insert(0, routed)
    with client(routed, routed.key) as mine:
        mine.responses.create(model="gpt-4o", input="forget me", store=False)
        with mine.responses.create(model="gpt-4o", input="me too", store=False, stream=True) as s:
            types = [e.type for e in s]
        assert types[0] == "response.created"
        kept = mine.responses.create(model="gpt-4o", input="keep me")
    affinity = routed.gw.gateway.router.affinity
    assert affinity is not None
    assert affinity.learned == 1 and affinity.holder(kept.id) is not None


def test_pinned_to_every_member_on_the_holders_resource() -> None:
    """Two deployments on one resource both see its stored responses: the request may fail
    over between them (before: pinned to the first alone)."""
    pool = Pool(
        "gpt-4o",
        [Member("east", "gpt-4o"), Member("west", "gpt-4o"), Member("east", "gpt-4o-b")],
    )
    affinity = ResponseAffinity(10)
    pinned = affinity.pinned(pool, "east")
    assert pinned is not None
    assert [m.key for m in pinned.members] == ["east/gpt-4o", "east/gpt-4o-b"]


CREATED = (
    b'{"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_abc","status":"in_progress"}}'
)
IN_PROGRESS = b'{"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_abc"}}'


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (b"event: response.created\ndata: " + CREATED + b"\n\n", "resp_abc"),
        # No ``event:`` lines (before: the data line after "response.created" was looked for).
        (b"data: " + CREATED + b"\n\n", "resp_abc"),
        (b"data: " + CREATED + b"\n\ndata: " + IN_PROGRESS + b"\n\n", "resp_abc"),
        (b": keep-alive\n\ndata: " + CREATED + b"\n\n", "resp_abc"),
        (b"data: " + IN_PROGRESS + b"\n\n", None),
        (b"event: response.in_progress\ndata: " + IN_PROGRESS + b"\n\n", None),
        (b"data: [DONE]\n\n", None),
        (b"", None),
    ],
)
def test_the_created_id_of_streams_with_and_without_event_lines(
    events: bytes, expected: str | None
) -> None:
    assert created_response_id(events) == expected


@pytest.mark.parametrize(
    ("response_id", "valid"),
    [
        ("resp_67cb32528d6881909eb2859a55e18a85", True),
        ("resp_a-b_C", True),
        ("resp_" + "a" * 128, True),
        ("resp_" + "a" * 129, False),
        ("resp_", False),
        ("msg_123", False),
        ("resp_a/b", False),
        ("resp_a b", False),
        ("x" * 4_000_000, False),
    ],
)
def test_only_ids_shaped_like_azures_are_valid(response_id: str, valid: bool) -> None:
    assert valid_id(response_id) is valid
