"""Errors the gateway itself answers, in Azure OpenAI's shape.

Every refusal is a ``GatewayError``: an HTTP status, an Azure-style ``code`` and a message
that says what happened and what to do, plus headers such as ``Retry-After``. The pipeline
turns it into ``{"error": {"code": …, "message": …}}``; nothing else (no stack trace, no
exception text from a library) ever reaches the client.
"""

from __future__ import annotations

import math

import orjson


class GatewayError(Exception):
    """A request the gateway answers itself. ``outcome`` is what the ledger records."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers or [])
        if retry_after is not None:
            wait = max(retry_after, 0.0)
            self.headers.append(("retry-after", str(max(1, math.ceil(wait)))))
            self.headers.append(("retry-after-ms", str(max(1, math.ceil(wait * 1000)))))
        if should_retry is not None:
            self.headers.append(("x-should-retry", "true" if should_retry else "false"))

    def body(self) -> bytes:
        return orjson.dumps({"error": {"code": self.code, "message": self.message}})


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, "401", message)


def missing_key() -> GatewayError:
    return unauthorized(
        "Access denied due to a missing subscription key. Send your sluicegate key in the "
        "'api-key' header (or 'Authorization: Bearer <key>')."
    )


def invalid_key() -> GatewayError:
    return unauthorized(
        "Access denied due to an invalid subscription key. Make sure to provide a valid key "
        "for an active subscription."
    )


def ambiguous_key() -> GatewayError:
    return GatewayError(
        400,
        "AmbiguousCredentials",
        "The request carries different subscription keys in several places (api-key or "
        "Ocp-Apim-Subscription-Key header, Authorization, api-key or subscription-key query "
        "parameter). Send one key.",
    )


def deployment_not_found(name: str) -> GatewayError:
    return GatewayError(
        404,
        "DeploymentNotFound",
        f"The API deployment {name!r} does not exist on this gateway. Check the deployment "
        "name; GET /openai/v1/models lists the deployments your key may use.",
    )


def resource_not_found() -> GatewayError:
    return GatewayError(404, "404", "Resource not found")


def shutting_down() -> GatewayError:
    return GatewayError(
        503,
        "ServiceUnavailable",
        "The gateway instance is shutting down and could not finish the request. Retry it.",
        retry_after=1,
        headers=[("connection", "close")],
    )


def refused_path() -> GatewayError:
    return GatewayError(
        404,
        "404",
        "Resource not found. The gateway forwards chat/completions, completions, embeddings "
        "and responses only on their own paths (/openai/deployments/{deployment}/{operation} "
        "or /openai/v1/{operation}, in lower case), and other paths only in plain characters "
        "(no spaces, '%', ';', '?' or '#' once decoded), without empty or dot segments.",
    )


def bad_request(code: str, message: str) -> GatewayError:
    return GatewayError(400, code, message)
