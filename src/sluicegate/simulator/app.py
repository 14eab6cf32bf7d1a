"""The simulator as an aiohttp application: Azure OpenAI's routes, auth, limits and answers.

Routes (all under ``/openai`` need a key; ``/_sim`` does not)::

    POST /openai/deployments/{deployment}/chat/completions?api-version=…
    POST /openai/deployments/{deployment}/completions?api-version=…
    POST /openai/deployments/{deployment}/embeddings?api-version=…
    POST /openai/responses?api-version=…            (deployment = body "model")
    POST /openai/v1/chat/completions | completions | embeddings | responses   (body "model")
    GET  /openai/v1/models, GET /openai/models
    GET|DELETE /openai/v1/responses/{id}, POST …/{id}/cancel, GET …/{id}/input_items
        (also under /openai/responses/{id}?api-version=…: stored responses, ``stored.py``)
    GET  /_sim/health · GET|DELETE /_sim/log (truth log) · DELETE /_sim/limits (empty windows)

Order of checks for a model call: route and ``api-version`` (404 ``"404"``), credentials
(401), body JSON and ``model`` (400), deployment (404 ``DeploymentNotFound``), operation vs
model kind (400 ``OperationNotSupported``), body validation (400), forced status faults
(500/503/429, uncharged), admission against TPM/RPM (429, nothing charged), random faults,
the content filter on the prompt (forced ``filter-prompt``: 400, charged — Azure counts a
request at arrival, before filtering), then the answer — paced by ``ttft_ms`` and
``tokens_per_second`` (per choice: ``n`` choices are written side by side).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from sluicegate.clock import Clock, SystemClock
from sluicegate.simulator import delivery, errors, payloads, sse
from sluicegate.simulator.config import SimConfig, SimDeployment
from sluicegate.simulator.errors import Operation
from sluicegate.simulator.faults import (
    FAULT_HEADER,
    FILTER_CATEGORIES,
    STATUS_FAULTS,
    Fault,
    draw_fault,
    parse_fault,
)
from sluicegate.simulator.plan import BadRequest, RequestPlan, plan_request
from sluicegate.simulator.state import SIM_STATE, Call, SimulatorState
from sluicegate.simulator.stored import StoredResponses, StoredRoutes
from sluicegate.simulator.window import retry_after_values

_ID_PREFIX: dict[Operation, str] = {
    "chat": "chatcmpl-",
    "completions": "cmpl-",
    "embeddings": "",
    "responses": "resp_",
}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: The first API version that takes ``stream_options`` (``include_usage``) on chat and
#: completions; older ones refuse it as an unknown argument.
STREAM_OPTIONS_SINCE = "2024-08-01"


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A model call that passed every check and was charged."""

    operation: Operation
    deployment: SimDeployment
    plan: RequestPlan
    body: dict[str, Any]
    fault: Fault | None


class _Simulator:
    """The request handlers, bound to one ``SimulatorState``."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state
        #: The Responses API's stored responses (``stored.py``).
        self.stored = StoredResponses()

    def routes(self) -> list[web.RouteDef]:
        def gen(operation: Operation, dated: bool, in_path: bool) -> _Handler:
            async def handler(request: web.Request) -> web.StreamResponse:
                return await self._handle(request, operation, dated, in_path)

            return handler

        dep = "/openai/deployments/{deployment}"
        return [
            web.post(f"{dep}/chat/completions", gen("chat", True, True)),
            web.post(f"{dep}/completions", gen("completions", True, True)),
            web.post(f"{dep}/embeddings", gen("embeddings", True, True)),
            web.post("/openai/responses", gen("responses", True, False)),
            web.post("/openai/v1/chat/completions", gen("chat", False, False)),
            web.post("/openai/v1/completions", gen("completions", False, False)),
            web.post("/openai/v1/embeddings", gen("embeddings", False, False)),
            web.post("/openai/v1/responses", gen("responses", False, False)),
            web.get("/openai/v1/models", self._models),
            web.get("/openai/models", self._models),
            web.get("/_sim/health", self._health),
            web.get("/_sim/log", self._log),
            web.delete("/_sim/log", self._clear_log),
            web.delete("/_sim/limits", self._clear_limits),
            *StoredRoutes(self.state, self.stored, self._authorized).routes(),
            web.route("*", "/openai/{tail:.*}", self._not_found),
        ]

    # --- small endpoints ---------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _log(self, request: web.Request) -> web.Response:
        return web.Response(body=self.state.truth.to_json(), content_type="application/json")

    async def _clear_log(self, request: web.Request) -> web.Response:
        cleared = len(self.state.truth)
        self.state.truth.clear()
        return web.json_response({"cleared": cleared})

    async def _clear_limits(self, request: web.Request) -> web.Response:
        self.state.reset_limits()
        return web.json_response({"reset": True})

    async def _not_found(self, request: web.Request) -> web.Response:
        call = Call(request, self.state, None)
        self.state.truth.append(call.record)
        return call.respond(404, errors.RESOURCE_NOT_FOUND)

    async def _models(self, request: web.Request) -> web.Response:
        call = Call(request, self.state, None)
        self.state.truth.append(call.record)
        if not self._authorized(request):
            return call.respond(401, errors.UNAUTHORIZED)
        created = int(self.state.clock.now())
        return call.respond(200, payloads.models_body(self.state.config.deployments, created))

    def _authorized(self, request: web.Request) -> bool:
        return self.state.authorized(
            request.headers.get("api-key"), request.headers.get("authorization")
        )

    # --- model calls -------------------------------------------------------------------------

    async def _handle(
        self, request: web.Request, operation: Operation, dated: bool, in_path: bool
    ) -> web.StreamResponse:
        call = Call(request, self.state, operation)
        try:
            admitted = await self._admit(request, call, operation, dated, in_path)
            if isinstance(admitted, web.Response):
                return admitted
            return await self._serve(request, call, admitted)
        except asyncio.CancelledError:
            call.record.client_gone = True  # handler cancelled because the client left
            raise
        finally:
            self.state.truth.append(call.record)

    async def _admit(
        self, request: web.Request, call: Call, operation: Operation, dated: bool, in_path: bool
    ) -> _Admitted | web.Response:
        """Every check up to and including the charge; a Response if the call ends here."""
        state, rec = self.state, call.record
        api_version = request.query.get("api-version")
        if dated and not api_version:
            return call.respond(404, errors.RESOURCE_NOT_FOUND)
        api_version = rec.api_version = api_version or "v1"
        if not self._authorized(request):
            return call.respond(401, errors.UNAUTHORIZED)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            message = "The request body must be a JSON object."
            return call.respond(400, errors.invalid_request(message))
        if (
            "stream_options" in body
            and operation in ("chat", "completions")
            and api_version[:4].isdigit()
            and api_version < STREAM_OPTIONS_SINCE
        ):
            # As Azure answers API versions from before stream_options existed (up to
            # 2024-07-01-preview; it came with 2024-08-01-preview): an unknown argument.
            message = (
                "Unrecognized request argument supplied: stream_options. Please contact us "
                "through an Azure support request at: https://go.microsoft.com/fwlink/"
                "?linkid=2213926 for further questions."
            )
            return call.respond(400, errors.invalid_request(message))
        name = request.match_info["deployment"] if in_path else body.get("model")
        if not isinstance(name, str) or not name:
            message = "You must provide a model parameter."
            return call.respond(400, errors.invalid_request(message, "model"))
        deployment = state.deployments.get(name)
        if deployment is None:
            return call.respond(404, errors.DEPLOYMENT_NOT_FOUND)
        rec.deployment = call.headers["x-ms-deployment-name"] = name
        limiter = state.limiters[name]
        now = state.clock.monotonic()
        call.limits(limiter.snapshot(now))  # replaced by the admission's figures below
        if (operation == "embeddings") != (deployment.kind == "embeddings"):
            return call.respond(400, errors.operation_not_supported(operation, deployment.model))
        if operation == "responses" and (missing := self.stored.missing_previous(body)):
            return call.respond(400, missing)  # another resource's id: nothing charged
        try:
            plan = plan_request(operation, body, deployment)
        except BadRequest as exc:
            return call.respond(400, errors.invalid_request(exc.message, exc.param))
        fault: Fault | None = None
        raw_fault = request.headers.get(FAULT_HEADER)
        if raw_fault:
            try:
                fault = parse_fault(raw_fault)
            except ValueError as exc:
                return call.respond(400, errors.invalid_request(str(exc), FAULT_HEADER))
            if fault.kind in FILTER_CATEGORIES and operation == "embeddings":
                message = f"x-sim-fault {fault.kind} does not apply to embeddings (not filtered)."
                return call.respond(400, errors.invalid_request(message, FAULT_HEADER))
        rec.streamed, rec.include_usage = plan.stream, plan.include_usage
        rec.stream_options, rec.estimate = plan.stream_options, plan.estimate
        rec.prompt_tokens = plan.prompt_tokens
        rec.completion_tokens = plan.usage_completion_tokens if operation != "embeddings" else None
        if fault is not None and fault.kind in STATUS_FAULTS:
            rec.fault = fault.kind
            return self._status_fault(call, fault, operation, api_version)
        admission = limiter.admit(plan.estimate, now)
        call.limits(admission)
        if not admission.admitted:
            seconds, ms = retry_after_values(admission.retry_after_s)
            call.retry_after(seconds, ms)
            exceeded = admission.exceeded or "tokens"
            return call.respond(429, errors.rate_limited(operation, api_version, seconds, exceeded))
        if fault is None:
            fault = draw_fault(state.rng, deployment)
        if fault is not None:
            rec.fault = fault.kind if fault.forced else f"random:{fault.kind}"
        return _Admitted(operation, deployment, plan, body, fault)

    async def _serve(
        self, request: web.Request, call: Call, admitted: _Admitted
    ) -> web.StreamResponse:
        """Answer an admitted call, carrying out its fault if it has one."""
        operation, deployment, plan, fault = (
            admitted.operation,
            admitted.deployment,
            admitted.plan,
            admitted.fault,
        )
        kind = fault.kind if fault is not None else None
        if kind == "500":
            return call.respond(500, errors.INTERNAL_ERROR)
        if fault is not None and kind == "filter-prompt":
            call.record.completion_tokens = None  # nothing is generated for a blocked prompt
            results = payloads.filter_results(payloads.PROMPT_FILTER_CATEGORIES, fault.category)
            return call.respond(400, errors.content_filtered_prompt(results))
        if kind == "hang":
            return await delivery.hang(request, call, self.state, deployment.hang_max_s)
        delay = deployment.ttft_ms / 1000.0
        if fault is not None and kind == "slow":
            delay += (fault.arg if fault.arg is not None else deployment.slow_ms) / 1000.0
        cut = kind == "cut"
        if operation == "embeddings":
            if delay > 0:
                await asyncio.sleep(delay)
            body = payloads.embeddings_body(
                deployment.model,
                plan.inputs,
                plan.dimensions,
                plan.prompt_tokens,
                plan.encoding_format,
            )
            return await delivery.send_body(request, call, body, cut)
        answer = self._answer(call, admitted)
        call.record.finish_reason = answer.finish_reason
        call.record.completion_tokens = answer.usage_completion_tokens
        if operation == "responses":
            self.stored.keep(answer, admitted.body)
        tps = deployment.tokens_per_second
        if plan.stream:
            if operation == "chat":
                stream = sse.chat_plan(answer, plan.include_usage)
            elif operation == "completions":
                stream = sse.completions_plan(answer, plan.include_usage)
            else:
                stream = sse.responses_plan(answer, admitted.body)
            # The choices are generated side by side: n stream events per token time.
            rate = tps * answer.choices
            return await delivery.send_stream(request, call, stream, rate, delay, cut)
        delay += answer.completion_tokens / tps if tps > 0 else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        if operation == "chat":
            body = payloads.chat_body(answer)
        elif operation == "completions":
            body = payloads.completions_body(answer)
        else:
            body = payloads.responses_body(answer, admitted.body)
        call.record.tokens_sent = answer.completion_tokens * answer.choices if not cut else None
        return await delivery.send_body(request, call, body, cut)

    def _answer(self, call: Call, admitted: _Admitted) -> payloads.Answer:
        operation, deployment, plan = admitted.operation, admitted.deployment, admitted.plan
        completion, finish = plan.completion_tokens, plan.finish_reason
        filtered: str | None = None
        fault = admitted.fault
        if fault is not None and fault.kind == "filter-answer":
            # The filter stops the answer half-way; what was written is still billed and
            # reported in usage (azure-openai-api.md §5: a 200 with finish_reason
            # "content_filter").
            completion, finish, filtered = completion // 2, "content_filter", fault.category
        return payloads.Answer(
            operation=operation,
            response_id=_ID_PREFIX[operation] + call.record.request_id.replace("-", ""),
            created=int(self.state.clock.now()),
            model=deployment.model,
            prompt_tokens=plan.prompt_tokens,
            completion_tokens=completion,
            finish_reason=finish,
            system_fingerprint=self.state.fingerprints[deployment.name],
            choices=plan.choices,
            generated=plan.generated,
            audio_tokens=plan.audio_tokens,
            filtered=filtered,
        )

    def _status_fault(
        self, call: Call, fault: Fault, operation: Operation, api_version: str
    ) -> web.Response:
        """A forced 500, 503 or 429 (the latter two with optional ``retry-after``)."""
        if fault.kind == "500":
            return call.respond(500, errors.INTERNAL_ERROR)
        wait = fault.arg if fault.arg is not None else (1.0 if fault.kind == "429" else None)
        seconds = 1
        if wait is not None and wait > 0:
            seconds, ms = retry_after_values(wait)
            call.retry_after(seconds, ms)
        if fault.kind == "503":
            return call.respond(503, errors.SERVICE_UNAVAILABLE)
        return call.respond(429, errors.rate_limited(operation, api_version, seconds, "tokens"))


def create_simulator_app(config: SimConfig, clock: Clock | None = None) -> web.Application:
    """A fake Azure OpenAI for ``config``; ``clock`` drives the rate-limit windows and the
    ``created`` timestamps (pacing sleeps use real time). One app per event loop; its state
    is reachable with ``simulator_state(app)``."""
    state = SimulatorState(config, clock or SystemClock())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_STATE] = state
    app.add_routes(_Simulator(state).routes())

    async def closing(_: web.Application) -> None:
        state.closing = True

    app.on_shutdown.append(closing)
    return app
