"""Building the admin side of a gateway: the REST API, the dashboard and the rollup job.

``mount_admin(gateway, environ)`` returns the gateway's ASGI app with ``/admin/api`` and
``/dashboard`` mounted, and ties the background rollup job to the app's lifespan: it starts
once the gateway has started and stops when shutdown begins (the gateway then flushes its
ledger; the next report or start rolls those last records up). With ``admin.entra``, the
admin side's Entra ID validator (its own, not the client side's) starts and stops with it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from sluicegate.accounting.job import RollupJob
from sluicegate.admin.access import AdminAccess
from sluicegate.admin.api import AdminApi
from sluicegate.admin.auth import AdminAuth
from sluicegate.admin.service import AdminService
from sluicegate.admin.signin import EntraSignIn
from sluicegate.app import GatewayApp
from sluicegate.dashboard.views import Dashboard
from sluicegate.gateway import Gateway
from sluicegate.metrics.registry import BackendSample
from sluicegate.proxy.asgi import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from sluicegate.admin.entra import AdminEntra


def backend_status(gateway: Gateway) -> list[dict[str, Any]]:
    """Each backend: configuration, its breakers' rule, in-flight requests, and what recent
    records say.

    A ``state`` attribute on the backend object (routing's circuit breaker, where present)
    wins over the state derived from recent records."""
    out: list[dict[str, Any]] = []
    routing: dict[str, list[dict[str, Any]]] = {}
    for view in gateway.backend_states():
        routing.setdefault(str(view["backend"]), []).append(view)
    for backend in gateway.runtime.backends.values():
        recent = gateway.metrics.health.recent(backend.name)
        state = getattr(backend, "state", None)
        out.append(
            {
                "name": backend.name,
                "url": backend.base_url,
                "kind": backend.kind,
                "state": str(state)
                if state is not None
                else gateway.metrics.health.state(backend.name),
                "in_flight": backend.in_flight,
                **recent,
                # Circuit state, open-until, headroom and last error per backend deployment.
                "routing": routing.get(backend.name, []),
                # The rule its breakers follow (its own merged over the global one).
                "circuit_breaker": gateway.router.breaker_rule(backend.name),
            }
        )
    return out


def _samples(gateway: Gateway) -> list[BackendSample]:
    return [
        BackendSample(
            b["name"],
            b["state"],
            b["in_flight"],
            getattr(gateway.runtime.backends[b["name"]], "headroom_tokens", None),
        )
        for b in backend_status(gateway)
    ]


class AdminGatewayApp(GatewayApp):
    """``GatewayApp`` whose lifespan also runs the rollup job (and the admin side's Entra ID
    validator, with ``admin.entra``)."""

    def __init__(
        self, gateway: Gateway, admin_app: Any, job: RollupJob, entra: AdminEntra | None = None
    ) -> None:
        super().__init__(gateway, admin_app)
        self.job = job
        self.entra = entra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return
        job, entra = self.job, self.entra

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(job.stop)
                if entra is not None:
                    await entra.aclose()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                if entra is not None:
                    await entra.start()  # never fails: a silent IdP is tried again later
                job.start()
            await send(message)

        await super().__call__(scope, lifespan_receive, lifespan_send)


def admin_service(gateway: Gateway) -> AdminService:
    """The service over a running gateway (what the API and the dashboard use)."""
    return AdminService(
        gateway.config,
        gateway.repository,
        gateway.hasher,
        gateway.clock,
        engine=gateway.engine,
        backend_status=lambda: backend_status(gateway),
        ledger_stats=gateway.ledger.stats,
        exporters=() if gateway.exports is None else gateway.exports.exporters,
    )


def mount_admin(gateway: Gateway, environ: Mapping[str, str]) -> AdminGatewayApp:
    token_env = gateway.config.admin.token_env
    auth = AdminAuth(environ.get(token_env), token_env)
    entra_config = gateway.config.admin.entra
    entra = None
    if entra_config is not None:
        # Imported here: PyJWT and cryptography load only when admin sign-in is configured.
        from sluicegate.admin.entra import AdminEntra

        entra = AdminEntra(entra_config, gateway.clock, environ)

    def count_failure(reason: str) -> None:
        if gateway.config.metrics.enabled:
            gateway.metrics.auth_failures.labels(reason).inc()

    access = AdminAccess(auth, entra, count_failure)
    signin = None if entra is None else EntraSignIn(entra, auth, gateway.clock)
    service = admin_service(gateway)
    assert service.rollups is not None
    gateway.metrics.watch_backends(lambda: _samples(gateway))

    async def to_dashboard(request: Request) -> Response:
        return RedirectResponse("/dashboard/", 307)

    root = Starlette(
        routes=[
            Mount("/admin/api", AdminApi(service, access).app()),
            Mount("/dashboard", Dashboard(service, access, signin).app()),
            Route("/admin", to_dashboard),
            Route("/admin/", to_dashboard),
        ]
    )
    job = RollupJob(service.rollups, gateway.config.retention, gateway.budgets)
    return AdminGatewayApp(gateway, root, job, entra)
