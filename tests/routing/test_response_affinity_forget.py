"""Responses affinity: what it forgets and what it does with ids it does not know.

* A 2xx ``DELETE responses/{id}`` forgets the id (here and in Redis); any other answer does
  not.
* An id the gateway does not know goes to ``passthrough_backend`` alone: it is not searched
  for across the pools' backends (docs/routing.md says why).
* An answer too large to be read whole (``WHOLE_ANSWER_LIMIT``) is still learned, from its
  first bytes, when its ``id`` comes first (as Azure writes it).

Real simulators stand in for Azure resources where they can; a scripted backend where the
answer must be larger than the simulator writes, or on a path it does not serve. The real
openai SDK talks to the gateway."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from sluicegate.proxy.relay import WHOLE_ANSWER_LIMIT, leading_response_id
from sluicegate.routing.affinity import ResponseAffinity
from tests.integration.wire_backend import Request, WireBackend, head
from tests.routing.harness import cluster_pair, one_member_gateway, start_sim
from tests.routing.test_response_affinity import holder, served, two_regions, v1


def _affinity(gateway: Any) -> ResponseAffinity:
    affinity = gateway.router.affinity
    assert isinstance(affinity, ResponseAffinity)
    return affinity


# --- a deleted response is forgotten ---------------------------------------------------------


def test_a_deleted_response_is_forgotten_and_a_failed_delete_is_not(
    tmp_path: Path, started: list[Any]
) -> None:
    routed = two_regions(tmp_path, started)
    affinity = _affinity(routed.gw.gateway)
    with v1(routed) as client:
        kept, deleted = (client.responses.create(model="gpt-4o", input=q).id for q in "ab")
        assert affinity.holder(deleted) is not None
        client.responses.delete(deleted)
        assert affinity.holder(deleted) is None, "forgotten once its holder deleted it"
        assert affinity.holder(kept) is not None
        # A DELETE its holder refuses (404: deleted already, around the gateway) forgets
        # nothing: only a 2xx says the response is gone.
        home = holder(routed, kept)
        sim = openai.OpenAI(
            base_url=f"{routed.sims[home].url}/openai/v1",
            api_key="backend-secret-key-0123456789abcdef",
        )
        with sim:
            sim.responses.delete(kept)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(kept)
        assert affinity.holder(kept) is not None
        # The other calls on a stored response keep it.
        fresh = client.responses.create(model="gpt-4o", input="c").id
        client.responses.retrieve(fresh)
        list(client.responses.input_items.list(fresh))
        assert affinity.holder(fresh) is not None


def test_a_delete_forgets_the_id_in_redis_for_every_instance(
    tmp_path: Path, redis_prefix: str, redis_store: redis.Redis
) -> None:
    sims = {"east": start_sim(), "west": start_sim()}
    pool = [{"backend": "east"}, {"backend": "west"}]
    with cluster_pair(tmp_path, sims, pool, redis_prefix) as (one, two, _):
        with v1(one) as client:
            response_id = client.responses.create(model="gpt-4o", input="hi").id
            key = f"{redis_prefix}:routing:resp:{response_id}"
            _wait(lambda: redis_store.exists(key) == 1, "the id written to Redis")
            client.responses.delete(response_id)
            _wait(lambda: redis_store.exists(key) == 0, "the id deleted from Redis")
        assert _affinity(one.gw.gateway).holder(response_id) is None
        # The second instance never learned it: with the key gone, its lookup finds nothing,
        # and a request naming the deleted id there is routed as an unknown one.
        assert _affinity(two.gateway).holder(response_id) is None


def _wait(condition: Any, what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.02)


# --- ids the gateway does not know -----------------------------------------------------------


def test_an_unknown_id_goes_to_the_passthrough_backend_alone(
    tmp_path: Path, started: list[Any]
) -> None:
    """An id created around the gateway on ``west`` is unknown to it: the request goes to
    ``passthrough_backend`` (east, the first backend), whose 404 the client gets; ``west`` is
    not tried. Searching every backend for it would let a tenant reach, on any resource its
    product can reach, the stored responses of another tenant whose id the gateway forgot
    (LRU, Redis expiry), and would cost each guess a request per backend."""
    routed = two_regions(tmp_path, started)
    direct = openai.OpenAI(
        base_url=f"{routed.sims['west'].url}/openai/v1",
        api_key="backend-secret-key-0123456789abcdef",
    )
    with direct:
        around = direct.responses.create(model="gpt-4o", input="made around the gateway").id
    with v1(routed) as client:
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(around)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(around)
    assert [e["method"] for e in routed.sim_log("east") if around in e["path"]] == [
        "GET",
        "DELETE",
    ]
    assert served(routed, "west", "GET", around) == []
    assert served(routed, "west", "DELETE", around) == []


# --- a scripted backend: answers past the limit, deployment paths ----------------------------

_SMALL_ID = "resp_small0001"
_BIG_ID = "resp_big0001"
#: Text of the big answer's output: just past what is read whole.
_BIG_TEXT = "x" * (WHOLE_ANSWER_LIMIT + 1024)


def _response(response_id: str, text: str) -> bytes:
    """A Responses object as Azure writes it: ``id`` first, indented."""
    obj = {
        "id": response_id,
        "object": "response",
        "created_at": 1_700_000_000,
        "status": "completed",
        "model": "gpt-4o",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
    }
    return json.dumps(obj, indent=2).encode()


#: Set by the client once the answer's head is in: the big answer's last part waits for it,
#: so that the gateway cannot have read it whole (it relays in parts past the limit).
_RELEASE = threading.Event()


async def _answer(request: Request, writer: asyncio.StreamWriter) -> None:
    if request.method == "POST" and request.target.startswith("/openai/v1/responses"):
        big = request.json().get("input") == "big"
        body = _response(_BIG_ID, _BIG_TEXT) if big else _response(_SMALL_ID, "hi")
        writer.write(head(length=len(body)))
        step = 1024 * 1024
        for at in range(0, len(body), step):  # in parts: more than one read
            if big and at + step >= len(body):
                deadline = time.monotonic() + 10
                while not _RELEASE.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            writer.write(body[at : at + step])
            await writer.drain()
        return
    if request.method == "DELETE" and "/responses/" in request.target:
        response_id = request.target.split("?", 1)[0].rsplit("/", 1)[1]
        body = json.dumps({"id": response_id, "object": "response", "deleted": True}).encode()
        writer.write(head(length=len(body)) + body)
        await writer.drain()
        return
    body = json.dumps({"error": {"code": "not_found", "message": "Not found."}}).encode()
    writer.write(head(404, length=len(body)) + body)
    await writer.drain()


def test_an_answer_past_the_limit_is_learned_from_its_first_bytes(
    tmp_path: Path, started: list[Any]
) -> None:
    backend = WireBackend(_answer)
    with backend.running():
        routed = one_member_gateway(tmp_path, backend.url, {}, started)
        affinity = _affinity(routed.gw.gateway)
        _RELEASE.clear()
        hooks = {"response": [lambda response: _RELEASE.set()]}  # at the head, before the body
        with (
            httpx.Client(event_hooks=hooks, timeout=60) as http,
            # openai annotates http_client as httpx2.Client only, but accepts (and checks at
            # run time, is_legacy_httpx_sync_client) an httpx.Client, as test_hardening's.
            openai.OpenAI(
                base_url=f"{routed.url}/openai/v1",
                api_key=routed.key,
                http_client=http,  # type: ignore[arg-type]
            ) as client,
        ):
            answer = client.responses.create(model="gpt-4o", input="big")
        assert _RELEASE.is_set()
        assert answer.id == _BIG_ID and len(answer.output_text) == len(_BIG_TEXT)
        (record,) = [r for r in routed.records(1) if r.operation == "responses"]
        assert (record.total_tokens, record.usage_estimated) == (12, False)
        assert affinity.holder(_BIG_ID) == ("only", record.subscription_id)
        # Learned, so owned: another subscription naming it gets Azure's unknown-id answer
        # and the backend is not asked.
        other = routed.admin.create_subscription(product="starter", owner="other", name="o")
        routed.gw.gateway.refresher.refresh_now()
        assert other.primary_key is not None
        asked = len(backend.requests)
        r = httpx.get(
            f"{routed.url}/openai/v1/responses/{_BIG_ID}",
            headers={"api-key": other.primary_key},
            timeout=10,
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert len(backend.requests) == asked


def test_a_delete_on_the_deployment_path_forgets_the_id(tmp_path: Path, started: list[Any]) -> None:
    backend = WireBackend(_answer)
    with backend.running():
        routed = one_member_gateway(tmp_path, backend.url, {}, started)
        affinity = _affinity(routed.gw.gateway)
        with v1(routed) as client:
            assert client.responses.create(model="gpt-4o", input="small").id == _SMALL_ID
        assert affinity.holder(_SMALL_ID) is not None
        url = f"{routed.url}/openai/deployments/gpt-4o/responses/{_SMALL_ID}?api-version=preview"
        r = httpx.delete(url, headers={"api-key": routed.key}, timeout=10)
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert backend.requests[-1].method == "DELETE"
        assert affinity.holder(_SMALL_ID) is None


@pytest.mark.parametrize(
    ("start", "found"),
    [
        (b'{"id":"resp_abc","object":"response"', "resp_abc"),
        (b'{\n  "id": "resp_abc",\n  "object": "response"', "resp_abc"),
        (b' \r\n{ "id" : "resp_a-b_c"', "resp_a-b_c"),
        (b'{"object":"response","id":"resp_abc"', None),  # not first: not looked for
        (b'{"output":[{"id":"msg_1"}],"id":"resp_abc"', None),  # an item's id is not it
        (b'{"id":"resp_a\\u0062c"', None),  # escaped: not read
        (b'{"id":"resp_' + b"a" * 200 + b'"', None),  # too long to be Azure's
        (b"[1,2,3]", None),
    ],
)
def test_the_leading_id_is_the_objects_first_member_only(start: bytes, found: str | None) -> None:
    assert leading_response_id([start + b", ...rest"]) == found
    # Split over reads as the backend's parts come.
    assert leading_response_id([start[:3], start[3:9], start[9:] + b", ...rest"]) == found
