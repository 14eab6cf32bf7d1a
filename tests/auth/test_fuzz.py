"""Fuzzing the client endpoints of a live gateway (token authentication on) with hypothesis:
random methods, paths, headers, bodies, keys and tokens, including tokens signed with the
IdP's real key over random claims. No response is a 500 or carries a stack trace, every
error has Azure's shape, and the request path never logged an unexpected error."""

from __future__ import annotations

import json
import logging
import string
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluicegate.simulator.server import SimulatorThread
from tests.auth.harness import EntraHarness, entra_gateway
from tests.integration.conftest import sim_config
from tests.support.idp import TestIdentityProvider

APP = str(uuid.uuid4())
GROUP = str(uuid.uuid4())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EntraHarness, list[str]]]:
    sim = SimulatorThread(sim_config())
    sim.start()
    try:
        with TestIdentityProvider() as idp:
            products = [
                {"name": "starter", "deployments": ["*"]},
                {
                    "name": "limited",
                    "deployments": ["gpt-4o-mini"],
                    "limits": {"tokens_per_minute": 5000, "max_tokens_ceiling": 64},
                },
            ]
            with entra_gateway(
                tmp_path_factory.mktemp("fuzz"),
                sim,
                idp,
                subscriptions={"a": "starter", "b": "limited"},
                rules=lambda ids: [
                    {"app_ids": [APP], "subscription": ids["a"]},
                    {"groups": [GROUP], "subscription": ids["b"]},
                ],
                products=products,
                security={"trusted_proxies": ["127.0.0.1"]},
            ) as h:
                tokens = [
                    idp.issue(azp=APP),
                    idp.issue(azp=str(uuid.uuid4()), groups=[GROUP]),
                    idp.issue(azp=str(uuid.uuid4())),  # valid, no rule
                    idp.issue(azp=APP, exp=1),
                    idp.issue(azp=APP, aud="other"),
                    idp.issue(azp=APP, key=idp.unpublished_key()),
                    idp.forge_none(),
                    idp.forge_hmac(),
                ]
                yield h, tokens
    finally:
        sim.stop()


_segment = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;= ", max_size=12
)
_deployment = (
    st.sampled_from(["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "nope"]) | _segment
)
_operation = st.sampled_from(
    ["chat/completions", "completions", "embeddings", "responses", "models", "images/generations",
     "audio/transcriptions", "files", "batches"]
) | _segment  # fmt: skip


@st.composite
def _paths(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        path = f"/openai/deployments/{draw(_deployment)}/{draw(_operation)}"
    elif kind == 1:
        path = f"/openai/v1/{draw(_operation)}"
    elif kind == 2:
        path = f"/deployments/{draw(_deployment)}/{draw(_operation)}"
    elif kind == 3:
        path = "/openai/" + "/".join(draw(st.lists(_segment, max_size=4)))
    else:
        path = "/" + "/".join(draw(st.lists(_segment, max_size=4)))
    query = draw(
        st.sampled_from(["", "api-version=2024-10-21", "api-version=x&subscription-key=sg-x"])
        | st.text(alphabet=string.ascii_letters + "=&-", max_size=20)
    )
    path = quote(path, safe="/")
    return f"{path}?{quote(query, safe='=&')}" if query else path


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip

_claim_names = st.sampled_from(
    ["iss", "aud", "exp", "nbf", "iat", "oid", "azp", "appid", "tid", "groups", "roles", "scp",
     "sub", "ver"]
)  # fmt: skip


@st.composite
def _bodies(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.binary(max_size=200))
    if kind == 2:
        return json.dumps(draw(_json_value)).encode()
    body: dict[str, Any] = {
        "messages": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "x"]) | _json_value,
                     "content": st.text(max_size=40) | _json_value}
                ),
                max_size=3,
            )
        ),
    }  # fmt: skip
    for name, strategy in (
        ("model", _deployment | _json_value),
        ("max_tokens", st.integers(-5, 40) | _json_value),
        ("stream", st.booleans() | _json_value),
        ("stream_options", st.none() | _json_value),
        ("input", st.text(max_size=30) | _json_value),
    ):
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return json.dumps(body).encode()


_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
).map(str.strip)


@st.composite
def _near_valid(draw: st.DrawFn, h: EntraHarness, tokens: list[str]) -> dict[str, Any]:
    """A request with good credentials and a mostly sensible body, so that the run also
    reaches admission, routing, the backend and the relay."""
    credential = draw(st.sampled_from(["key-a", "key-b", "token-a", "token-b"]))
    if credential.startswith("key"):
        headers = {"api-key": h.keys[credential[-1]]}
    else:
        headers = {"authorization": f"Bearer {tokens[0 if credential.endswith('a') else 1]}"}
    headers["content-type"] = "application/json"
    kind = draw(st.sampled_from(["chat", "v1-chat", "embeddings", "models"]))
    if kind == "models":
        return {"method": "GET", "url": "/openai/v1/models", "headers": headers, "content": None}
    body: dict[str, Any] = {}
    if kind == "embeddings":
        url = "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
        body["input"] = draw(st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3))
    else:
        deployment = draw(st.sampled_from(["gpt-4o-mini", "gpt-4o"]))
        if kind == "chat":
            url = f"/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
        else:
            url, body["model"] = "/openai/v1/chat/completions", deployment
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=60))}]
        body["max_tokens"] = draw(st.integers(1, 16) | st.integers(-3, 0) | st.just(10**6))
        if draw(st.booleans()):
            body["stream"] = True
            if draw(st.booleans()):
                body["stream_options"] = draw(
                    st.just({"include_usage": True})
                    | st.just({"include_usage": False})
                    | _json_value
                )
    return {"method": "POST", "url": url, "headers": headers, "content": json.dumps(body)}


@st.composite
def _requests(draw: st.DrawFn, h: EntraHarness, tokens: list[str]) -> dict[str, Any]:
    if draw(st.integers(0, 3)) == 0:
        return draw(_near_valid(h, tokens))
    headers: dict[str, str] = {}
    idp = h.idp
    assert idp is not None
    token = draw(
        st.none()
        | st.sampled_from(tokens)
        | st.builds(lambda c: idp.issue(c), st.dictionaries(_claim_names, _json_value))
        # A valid token of a mapped app with some claims replaced by anything at all.
        | st.builds(
            lambda c: idp.issue(idp.claims(azp=APP) | c), st.dictionaries(_claim_names, _json_value)
        )
        | st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=60).map(
            lambda s: "eyJ" + s
        )
    )
    if token is not None:
        headers["authorization"] = (
            draw(st.sampled_from(["Bearer ", "bearer ", "Basic ", ""])) + token
        )
    key = draw(st.none() | st.sampled_from(list(h.keys.values())) | _header_value)
    if key:
        headers[draw(st.sampled_from(["api-key", "ocp-apim-subscription-key"]))] = key
    if draw(st.booleans()):
        headers["content-type"] = draw(
            st.sampled_from(["application/json", "text/plain", "application/json; charset=x"])
            | _header_value
        )
    if draw(st.booleans()):
        headers["x-forwarded-for"] = draw(
            st.sampled_from(["203.0.113.1", "::1, 10.0.0.1", "not-an-ip", ", ,", "[::1]:80"])
            | _header_value
        )
    for name in draw(
        st.lists(st.sampled_from(["x-a", "x-b", "accept", "x-ms-client"]), max_size=3)
    ):
        headers[name] = draw(_header_value)
    return {
        "method": draw(st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD"])),
        "url": draw(_paths()),
        "headers": {k: v.encode("latin-1") for k, v in headers.items() if v},
        "content": draw(_bodies()),
    }


def test_fuzz_client_endpoints(
    live: tuple[EntraHarness, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    h, tokens = live
    caplog.set_level(logging.ERROR)
    seen: dict[int, int] = {}

    with httpx.Client(timeout=30) as client:

        @given(request=_requests(h, tokens))
        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(request: dict[str, Any]) -> None:
            # An absolute URL: a path starting with "//" stays a path.
            resp = client.request(**{**request, "url": h.url + request["url"]})
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert resp.status_code != 500, (request, resp.text)
            assert "Traceback" not in resp.text and 'File "' not in resp.text, resp.text
            if resp.status_code >= 400 and request["method"] != "HEAD":
                body = resp.json()
                assert set(body) == {"error"}, body
                assert isinstance(body["error"]["message"], str) and body["error"]["message"]

        run()

    # The run went deep: both refusals and successful, forwarded requests happened.
    assert seen.get(200, 0) > 0 and seen.get(401, 0) > 0, seen
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
