"""Running the gateway under uvicorn (one worker; scale out with more processes)."""

from __future__ import annotations

import signal

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sluicegate.app import create_app
from sluicegate.config.model import GatewayConfig
from sluicegate.gateway import Gateway
from sluicegate.logs import configure_logging

_BAD_REQUEST = orjson.dumps(
    {
        "error": {
            "code": "InvalidRequest",
            "message": "The HTTP request is malformed (for example a header value with CR or "
            "LF characters, or an invalid request line). Fix the request and send it again.",
        }
    }
)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering unparseable requests in Azure's error shape
    instead of uvicorn's plain-text 400 (clients parse ``{"error": …}``)."""

    def send_400_response(self, msg: str) -> None:
        content = [
            b"HTTP/1.1 400 Bad Request\r\n",
            b"content-type: application/json; charset=utf-8\r\n",
            b"content-length: " + str(len(_BAD_REQUEST)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            _BAD_REQUEST,
        ]
        self.transport.write(b"".join(content))
        self.transport.close()


def build_server(
    config: GatewayConfig, *, host: str | None = None, port: int | None = None
) -> uvicorn.Server:
    gateway = Gateway(config)
    app = create_app(gateway)
    uv_config = uvicorn.Config(
        app,
        host=host or config.listen.host,
        port=config.listen.port if port is None else port,
        loop="uvloop",
        http=GatewayHttpProtocol,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is trusted only from configured proxies
        date_header=False,
        timeout_graceful_shutdown=int(config.listen.graceful_shutdown_seconds),
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=64 * 1024,
    )
    return uvicorn.Server(uv_config)


def serve(config: GatewayConfig, *, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGINT/SIGTERM: then stop accepting, let in-flight requests finish within the
    grace period, flush the ledger and exit 0."""
    configure_logging(config.logging.level)
    server = build_server(config, host=host, port=port)

    # uvicorn handles SIGINT/SIGTERM itself while it runs and, once it has shut down
    # gracefully, re-raises the signal to the handler that was there before. Make that handler
    # a clean exit, so that a graceful stop ends with status 0 (and a signal that arrives
    # before uvicorn is listening still stops the process).
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(0 if server.started else 1)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    server.run()
    return 0 if server.started else 1
