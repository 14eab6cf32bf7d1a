"""Which kind of request a path is: a pure function of method and path."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RouteKind(enum.Enum):
    DEPLOYMENT = "deployment"  # /openai/deployments/{d}/{operation}: deployment in the path
    V1 = "v1"  # /openai/v1/{operation}: deployment in the body's "model"
    MODELS = "models"  # GET /openai/v1/models, /openai/models: what the caller may use
    PASSTHROUGH = "passthrough"  # any other path under /openai/
    NOT_FOUND = "not_found"


#: Operations whose body is JSON and carries tokens the gateway meters.
METERED_OPERATIONS = frozenset({"chat/completions", "completions", "embeddings", "responses"})


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Route:
    kind: RouteKind
    operation: str = ""
    deployment: str | None = None
    #: The path as the backend should receive it, with ``{deployment}`` still to fill in for
    #: deployment routes (the backend's deployment name may differ from the client's).
    upstream_suffix: str = ""

    @property
    def metered(self) -> bool:
        return self.operation in METERED_OPERATIONS


_V1_OPERATIONS = frozenset({"chat/completions", "completions", "embeddings", "responses"})


def match_route(method: str, path: str) -> Route:
    """Classify a request path. Accepts the APIM-style paths without the ``/openai`` prefix."""
    if path.startswith("/openai/"):
        rest = path[len("/openai/") :]
    elif path.startswith("/deployments/"):
        rest = path[1:]
    else:
        return Route(RouteKind.NOT_FOUND)
    if rest.startswith("deployments/"):
        parts = rest.split("/", 2)
        if len(parts) == 3 and parts[1] and parts[2]:
            operation = parts[2].rstrip("/")
            if method != "POST" and operation in METERED_OPERATIONS:
                # Azure has no such operation (a GET of chat/completions): its "wrong path"
                # answer, not a complaint about the empty body, and nothing sent upstream.
                return Route(RouteKind.NOT_FOUND)
            return Route(RouteKind.DEPLOYMENT, operation, parts[1], operation)
        return Route(RouteKind.NOT_FOUND)
    if rest.startswith("v1/"):
        operation = rest[3:].rstrip("/")
        if method == "POST" and operation in _V1_OPERATIONS:
            return Route(RouteKind.V1, operation, None, "v1/" + operation)
        if method == "GET" and operation == "models":
            return Route(RouteKind.MODELS, "models")
        return Route(RouteKind.PASSTHROUGH, "passthrough", None, rest)
    if method == "GET" and rest.rstrip("/") == "models":
        return Route(RouteKind.MODELS, "models")
    if method == "POST" and rest.rstrip("/") == "responses":
        return Route(RouteKind.V1, "responses", None, "responses")
    if not rest:
        return Route(RouteKind.NOT_FOUND)
    return Route(RouteKind.PASSTHROUGH, "passthrough", None, rest)
