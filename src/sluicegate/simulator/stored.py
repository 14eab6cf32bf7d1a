"""Stored responses: the Responses API's state, kept per simulated resource as Azure does.

Azure keeps every Responses answer created with ``store`` (the default) in the resource that
served it, for 30 days, and only that resource knows its id. So, per simulator (one
``StoredResponses`` in each ``SimulatorState``):

* a Responses call with ``previous_response_id`` this simulator does not hold is refused
  before anything is charged: 400 ``previous_response_not_found`` (Azure's answer, OpenAI's
  error shape: ``{"error": {"message": "Previous response with id '…' not found.", "type":
  "invalid_request_error", "param": "previous_response_id", "code":
  "previous_response_not_found"}}``);
* ``GET /openai/v1/responses/{id}`` (and ``/openai/responses/{id}?api-version=…``) answers
  the stored response object; with ``?stream=true`` its events are replayed
  (``response.created``, then ``response.completed``/``response.incomplete``), as a
  background response is resumed;
* ``DELETE …/responses/{id}`` forgets it (``{"id", "object": "response", "deleted": true}``);
* ``POST …/responses/{id}/cancel`` answers it with status ``cancelled`` if it was created
  with ``background: true``, else 400 (only background responses can be cancelled);
* ``GET …/responses/{id}/input_items`` lists the request's ``input`` as items;
* an id it does not hold: 404 ``{"error": {"code": "not_found", "message": "Response with
  id '…' not found.", …}}``.

Not imitated: the 30-day expiry, and background responses that are still ``queued`` or
``in_progress`` when first answered (here a background response is answered complete).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from sluicegate.simulator import errors
from sluicegate.simulator.payloads import Answer, response_object
from sluicegate.simulator.state import Call, SimulatorState


def previous_not_found(response_id: str) -> bytes:
    """The 400 for a ``previous_response_id`` this resource does not hold."""
    return orjson.dumps(
        {
            "error": {
                "message": f"Previous response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }
        }
    )


def response_not_found(response_id: str) -> bytes:
    """The 404 for a ``responses/{id}`` this resource does not hold."""
    return orjson.dumps(
        {
            "error": {
                "code": "not_found",
                "message": f"Response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": None,
            }
        }
    )


class StoredResponses:
    """The response objects (and their input items) this simulated resource holds."""

    def __init__(self) -> None:
        self._responses: dict[str, dict[str, Any]] = {}
        self._inputs: dict[str, list[dict[str, Any]]] = {}

    def missing_previous(self, body: dict[str, Any]) -> bytes | None:
        """The 400 to answer when the body names a ``previous_response_id`` not held here."""
        previous = body.get("previous_response_id")
        if previous is None or (isinstance(previous, str) and previous in self._responses):
            return None
        return previous_not_found(str(previous))

    def keep(self, answer: Answer, request: dict[str, Any]) -> None:
        """Store the answer's final response object unless the request says ``store: false``."""
        if request.get("store") is False:
            return
        obj = response_object(answer, request, done=True)
        self._responses[answer.response_id] = obj
        self._inputs[answer.response_id] = _input_items(answer.response_id, request.get("input"))

    def get(self, response_id: str) -> dict[str, Any] | None:
        return self._responses.get(response_id)

    def inputs(self, response_id: str) -> list[dict[str, Any]]:
        return self._inputs.get(response_id, [])

    def forget(self, response_id: str) -> None:
        self._responses.pop(response_id, None)
        self._inputs.pop(response_id, None)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._responses

    def __len__(self) -> int:
        return len(self._responses)


def _input_items(response_id: str, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    items: list[dict[str, Any]] = []
    for index, item in enumerate(value if isinstance(value, list) else ()):
        if not isinstance(item, dict):
            continue
        item = dict(item)
        content = item.get("content")
        if isinstance(content, str):
            item["content"] = [{"type": "input_text", "text": content}]
        item.setdefault("type", "message")
        item.setdefault("id", f"msg_{response_id[5:]}{index:04d}")
        items.append(item)
    return items


class StoredRoutes:
    """The ``responses/{id}`` routes of one simulator."""

    def __init__(
        self,
        state: SimulatorState,
        stored: StoredResponses,
        authorized: Callable[[web.Request], bool],
    ) -> None:
        self.state = state
        self.stored = stored
        self.authorized = authorized

    def routes(self) -> list[web.RouteDef]:
        out: list[web.RouteDef] = []
        for base, dated in (("/openai/v1/responses/{id}", False), ("/openai/responses/{id}", True)):
            out += [
                web.get(base, self._handler(self._retrieve, dated)),
                web.delete(base, self._handler(self._delete, dated)),
                web.post(f"{base}/cancel", self._handler(self._cancel, dated)),
                web.get(f"{base}/input_items", self._handler(self._input_items, dated)),
            ]
        return out

    def _handler(
        self,
        serve: Callable[[web.Request, Call, str, dict[str, Any]], web.StreamResponse],
        dated: bool,
    ) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            call = Call(request, self.state, "responses")
            try:
                if dated and not request.query.get("api-version"):
                    return call.respond(404, errors.RESOURCE_NOT_FOUND)
                if not self.authorized(request):
                    return call.respond(401, errors.UNAUTHORIZED)
                response_id = request.match_info["id"]
                stored = self.stored.get(response_id)
                if stored is None:
                    return call.respond(404, response_not_found(response_id))
                if serve == self._retrieve and request.query.get("stream") == "true":
                    return self._replay(call, stored)
                return serve(request, call, response_id, stored)
            finally:
                self.state.truth.append(call.record)

        return handler

    def _retrieve(
        self, request: web.Request, call: Call, response_id: str, stored: dict[str, Any]
    ) -> web.StreamResponse:
        return call.respond(200, orjson.dumps(stored))

    def _delete(
        self, request: web.Request, call: Call, response_id: str, stored: dict[str, Any]
    ) -> web.StreamResponse:
        self.stored.forget(response_id)
        body = {"id": response_id, "object": "response", "deleted": True}
        return call.respond(200, orjson.dumps(body))

    def _cancel(
        self, request: web.Request, call: Call, response_id: str, stored: dict[str, Any]
    ) -> web.StreamResponse:
        if not stored.get("background"):
            message = "Only responses created with background=true can be cancelled."
            return call.respond(400, errors.invalid_request(message))
        cancelled = copy.deepcopy(stored)
        cancelled["status"] = "cancelled"
        return call.respond(200, orjson.dumps(cancelled))

    def _input_items(
        self, request: web.Request, call: Call, response_id: str, stored: dict[str, Any]
    ) -> web.StreamResponse:
        items = self.stored.inputs(response_id)
        body = {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
        return call.respond(200, orjson.dumps(body))

    def _replay(self, call: Call, stored: dict[str, Any]) -> web.StreamResponse:
        """A stored response's events again (a background response resumed)."""
        end = "response.completed" if stored["status"] == "completed" else "response.incomplete"
        events = b"".join(
            b"event: %s\ndata: %s\n\n"
            % (
                kind.encode(),
                orjson.dumps({"type": kind, "response": stored, "sequence_number": i}),
            )
            for i, kind in enumerate(("response.created", end))
        )
        call.record.status = 200
        headers = {**call.headers, "content-type": "text/event-stream; charset=utf-8"}
        return web.Response(status=200, body=events, headers=headers)
