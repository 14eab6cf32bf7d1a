"""The ASGI application: a thin dispatcher in front of the pipeline.

Pure ASGI on the hot path (no framework work per proxied request). Health, readiness and
metrics are answered here; the admin API and dashboard are mounted as a Starlette app when
present.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from sluicegate.gateway import Gateway
from sluicegate.proxy.asgi import Message, Receive, Scope, Send, send_bytes, send_error, send_json
from sluicegate.proxy.errors import GatewayError
from sluicegate.storage.engine import database_problem

log = logging.getLogger("sluicegate.app")

ASGIApp = Any


class GatewayApp:
    """``create_app(gateway)``: routes ``/openai/…`` and ``/deployments/…`` to the pipeline."""

    def __init__(self, gateway: Gateway, admin_app: ASGIApp | None = None) -> None:
        self.gateway = gateway
        self.pipeline = gateway.pipeline
        self.admin_app = admin_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(("/openai/", "/deployments/")):
                await self.pipeline(scope, receive, send)
            elif path == "/healthz":
                await send_json(send, 200, {"status": "ok"})
            elif path == "/readyz":
                # Ready = this instance can take requests: see Gateway.readiness. A database
                # outage alone keeps it ready (records spill; the body says so).
                ok, verdict = self.gateway.readiness()
                await send_json(send, 200 if ok else 503, verdict)
            elif path == "/metrics" and self.gateway.config.metrics.enabled:
                self.gateway.update_ledger_metrics()
                body = self.gateway.metrics.render()
                await send_bytes(send, 200, body, [(b"content-type", b"text/plain; version=0.0.4")])
            elif self.admin_app is not None and path.startswith(("/admin", "/dashboard")):
                await self.admin_app(scope, receive, send)
            else:
                await send_error(send, GatewayError(404, "404", "Resource not found"), [])
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.start()
                except SQLAlchemyError as exc:
                    # One line that says what to fix (a database that does not exist, a role
                    # refused), not a traceback that buries it: see database_problem. An
                    # unreachable database does not get here: Gateway.start waits for it.
                    where = make_url(self.gateway.config.storage.url)
                    problem = database_problem(exc)
                    log.error(
                        "the gateway could not start: database %s: %s",
                        where.render_as_string(hide_password=True),
                        problem,
                    )
                    await send({"type": "lifespan.startup.failed", "message": problem})
                    return
                except Exception as exc:
                    log.exception("the gateway could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.gateway.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(gateway: Gateway, environ: Mapping[str, str] | None = None) -> GatewayApp:
    """The gateway's ASGI app, with the admin API (``/admin/api``), the dashboard
    (``/dashboard``) and the background rollup job. The admin token is read from
    ``environ`` (default ``os.environ``) once, here."""
    from sluicegate.admin.mount import mount_admin

    return mount_admin(gateway, os.environ if environ is None else environ)
