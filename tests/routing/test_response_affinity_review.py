"""Responses affinity, checked in review: only a 2xx answer teaches an id, whatever the
answer's first bytes look like.

An error answer to a Responses creation relayed in parts (the gateway does not read a
non-2xx answer whole) may start with ``{"id": "resp_…"`` as a Responses object does; it
must not be learned (``leading_response_id`` is for 2xx answers past the whole-answer
limit only), or its "id" would route and own an id no resource holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from sluicegate.routing.affinity import ResponseAffinity
from tests.integration.wire_backend import Request, WireBackend, chunk, head
from tests.routing.harness import one_member_gateway

_ERROR_ID = "resp_error0001"


async def _refuse_in_parts(request: Request, writer: asyncio.StreamWriter) -> None:
    """A 400 for a Responses creation whose body starts like a Responses object, sent in two
    chunks a moment apart (so it is relayed in parts)."""
    body = json.dumps(
        {
            "id": _ERROR_ID,
            "object": "response",
            "status": "failed",
            "error": {"code": "invalid_prompt", "message": "Refused."},
        }
    ).encode()
    writer.write(head(400) + chunk(body[:40]))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(chunk(body[40:]) + chunk(b""))
    await writer.drain()


def test_an_error_answer_starting_like_a_response_is_not_learned(
    tmp_path: Path, started: list[Any]
) -> None:
    backend = WireBackend(_refuse_in_parts)
    with backend.running():
        routed = one_member_gateway(tmp_path, backend.url, {}, started)
        affinity = routed.gw.gateway.router.affinity
        assert isinstance(affinity, ResponseAffinity)
        r = httpx.post(
            f"{routed.url}/openai/v1/responses",
            headers={"api-key": routed.key},
            json={"model": "gpt-4o", "input": "hi"},
            timeout=10,
        )
        assert r.status_code == 400 and r.json()["id"] == _ERROR_ID  # relayed as it came
        assert affinity.holder(_ERROR_ID) is None
        assert affinity.learned == 0
