"""A managed identity token endpoint on loopback, speaking App Service's protocol — what
``azure-identity``'s ``ManagedIdentityCredential`` uses when ``IDENTITY_ENDPOINT`` and
``IDENTITY_HEADER`` are set (so it never tries the instance metadata address)::

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=https://cognitiveservices.azure.com
        [&client_id=…]            X-IDENTITY-HEADER: {IDENTITY_HEADER}
    → 200 {"access_token": "…", "expires_on": "<epoch seconds>", "resource": "…",
           "token_type": "Bearer", "client_id": "…"}

Tokens are handed out in order from ``tokens`` (give the same list to the simulator's
``bearer_tokens``), each valid for ``lifetime`` seconds. Every request is logged in ``hits``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Hit:
    time: float
    params: dict[str, str]
    authorized: bool
    token: str | None
    expires_on: int | None


class IdentityEndpoint:
    """See the module docstring. ``start()``/``stop()`` or use as a context manager."""

    def __init__(self, lifetime: float = 3600.0, count: int = 64) -> None:
        self.lifetime = lifetime
        self.secret = "identity-header-" + os.urandom(8).hex()
        self.tokens = [f"mi-token-{i}-{os.urandom(12).hex()}" for i in range(count)]
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/msi/token"

    def environ(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.secret}

    def issued(self) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.token is not None]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                params = {k: v[0] for k, v in parse_qs(parts.query).items()}
                authorized = self.headers.get("X-IDENTITY-HEADER") == endpoint.secret
                ok = authorized and parts.path == "/msi/token" and "resource" in params
                token: str | None = None
                expires_on: int | None = None
                with endpoint._lock:
                    if ok:
                        token = endpoint.tokens[len([h for h in endpoint.hits if h.token])]
                        expires_on = int(time.time() + endpoint.lifetime)
                    endpoint.hits.append(Hit(time.time(), params, authorized, token, expires_on))
                if not ok:
                    body = json.dumps({"statusCode": 400, "message": "bad request"}).encode()
                    self.send_response(400 if authorized else 401)
                else:
                    body = json.dumps(
                        {
                            "access_token": token,
                            "expires_on": str(expires_on),
                            "resource": params["resource"],
                            "token_type": "Bearer",
                            "client_id": params.get("client_id", "system-assigned"),
                        }
                    ).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return None

        return Handler

    def start(self) -> IdentityEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> IdentityEndpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
