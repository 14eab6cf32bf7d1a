"""What one simulator app owns (``SimulatorState``) and per-request bookkeeping (``Call``).

The state is touched only from the app's event loop, so admission (check, then charge) is
atomic without locks.
"""

from __future__ import annotations

import hashlib
import random
import uuid

from aiohttp import web

from sluicegate.clock import Clock
from sluicegate.simulator.config import SimConfig, SimDeployment
from sluicegate.simulator.truth import TruthLog, TruthRecord, safe_headers
from sluicegate.simulator.window import Admission, DeploymentLimiter

JSON_TYPE = "application/json; charset=utf-8"


class SimulatorState:
    """Config, clock, one limiter per deployment, the seeded RNG and the truth log."""

    def __init__(self, config: SimConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.deployments: dict[str, SimDeployment] = {d.name: d for d in config.deployments}
        self.limiters: dict[str, DeploymentLimiter] = {}
        self.reset_limits()
        self.rng = random.Random(config.seed)
        self.truth = TruthLog()
        #: Set when the app shuts down, so that hung requests let go at once.
        self.closing = False
        self.fingerprints = {
            d.name: "fp_" + hashlib.sha256(d.model.encode()).hexdigest()[:10]
            for d in config.deployments
        }
        self._api_keys = frozenset(config.api_keys)
        self._bearers = frozenset(config.api_keys) | frozenset(config.bearer_tokens)

    def reset_limits(self) -> None:
        """Forget every charge (empty windows)."""
        self.limiters = {d.name: DeploymentLimiter(d.tpm, d.rpm) for d in self.config.deployments}

    def authorized(self, api_key: str | None, authorization: str | None) -> bool:
        """A configured key in ``api-key``, or a key or bearer token after ``Bearer``."""
        if api_key is not None and api_key in self._api_keys:
            return True
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            return scheme.lower() == "bearer" and token.strip() in self._bearers
        return False

    def __repr__(self) -> str:
        return (
            f"SimulatorState(deployments={list(self.deployments)}, limiters={self.limiters!r}, "
            f"truth={self.truth!r})"
        )


SIM_STATE = web.AppKey("sluicegate_simulator_state", SimulatorState)


def simulator_state(app: web.Application) -> SimulatorState:
    """The state of an app made by ``create_simulator_app`` (for in-process inspection)."""
    return app[SIM_STATE]


class Call:
    """One request's response headers so far and its truth record.

    Every response carries ``x-request-id`` (also the truth record's id), ``apim-request-id``,
    ``x-ms-region`` and, when the client sent one, ``x-ms-client-request-id`` back.
    """

    __slots__ = ("headers", "record")

    def __init__(self, request: web.Request, state: SimulatorState, operation: str | None) -> None:
        rid = str(uuid.uuid4())
        headers, api_key, authorization = safe_headers(request.headers.items())
        self.record = TruthRecord(
            request_id=rid,
            time=state.clock.now(),
            method=request.method,
            path=request.path,
            operation=operation,
            api_key_present=api_key,
            authorization_present=authorization,
            headers=headers,
        )
        self.headers: dict[str, str] = {
            "content-type": JSON_TYPE,
            "x-request-id": rid,
            "apim-request-id": rid,
            "x-ms-region": state.config.region,
            "x-content-type-options": "nosniff",
        }
        client_id = request.headers.get("x-ms-client-request-id")
        if client_id:
            self.headers["x-ms-client-request-id"] = client_id

    def limits(self, admission: Admission) -> None:
        """Add the ``x-ratelimit-*`` headers for the limits the deployment has."""
        h = self.headers
        if admission.limit_tokens is not None:
            h["x-ratelimit-limit-tokens"] = str(admission.limit_tokens)
            h["x-ratelimit-remaining-tokens"] = str(admission.remaining_tokens)
        if admission.limit_requests is not None:
            h["x-ratelimit-limit-requests"] = str(admission.limit_requests)
            h["x-ratelimit-remaining-requests"] = str(admission.remaining_requests)

    def retry_after(self, seconds: int, ms: int) -> None:
        self.headers["retry-after"] = str(seconds)
        self.headers["retry-after-ms"] = str(ms)

    def respond(self, status: int, body: bytes) -> web.Response:
        """A whole JSON response with the headers so far; records the status."""
        self.record.status = status
        return web.Response(status=status, body=body, headers=self.headers)
