"""Which kind of request a path is: a pure function of method and path."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class RouteKind(enum.Enum):
    DEPLOYMENT = "deployment"  # /openai/deployments/{d}/{operation}: deployment in the path
    V1 = "v1"  # /openai/v1/{operation}: deployment in the body's "model"
    MODELS = "models"  # GET /openai/v1/models, /openai/models: what the caller may use
    PASSTHROUGH = "passthrough"  # any other path under /openai/
    NOT_FOUND = "not_found"
    #: A path the gateway would forward unmetered but will not (``_forwardable``).
    REFUSED = "refused"


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
    #: The stored response a ``…/responses/{id}…`` path names (GET, DELETE, cancel,
    #: input_items): Responses affinity sends it to the backend that holds it.
    response_id: str | None = None

    @property
    def metered(self) -> bool:
        return self.operation in METERED_OPERATIONS


_V1_OPERATIONS = frozenset({"chat/completions", "completions", "embeddings", "responses"})

#: What a forwarded path may hold once uvicorn has percent-decoded it: RFC 3986's path
#: characters without "%" (a "%2F" left after decoding would be decoded again by the backend)
#: and ";" (servers that take ";…" as path parameters drop it).
_PATH_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~/:@!$&'()*+,=]+")
#: A POST whose path ends like this is a metered operation, whatever else its path says.
_METERED_TAILS = tuple("/" + operation for operation in sorted(METERED_OPERATIONS))


def match_route(method: str, path: str) -> Route:
    """Classify a request path (``scope["path"]``, percent-decoded). Accepts the APIM-style
    paths without the ``/openai`` prefix.

    A path that would be forwarded unmetered (a passthrough path, or a deployment's other
    operations) is ``REFUSED`` unless ``_forwardable``: only metered routes are checked
    against the configuration, and a backend may read a path more loosely than this match
    does (letter case, dot segments, a decoded "?"), which would serve a metered operation
    outside the limits and the ledger. Metered routes pay nothing for the check: their
    upstream path is built from the configuration and the exact operation."""
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
            if operation in METERED_OPERATIONS:
                if method != "POST":
                    # Azure has no such operation (a GET of chat/completions): its "wrong
                    # path" answer, not a complaint about the empty body, and nothing sent.
                    return Route(RouteKind.NOT_FOUND)
            elif not _forwardable(method, path) or _responses_respelled(operation):
                return Route(RouteKind.REFUSED)
            route = Route(RouteKind.DEPLOYMENT, operation, parts[1], operation)
            if operation.startswith(_RESPONSES):
                route.response_id = _response_id(operation)
            return route
        return Route(RouteKind.NOT_FOUND)
    if rest.startswith("v1/"):
        operation = rest[3:].rstrip("/")
        if method == "POST" and operation in _V1_OPERATIONS:
            return Route(RouteKind.V1, operation, None, "v1/" + operation)
        if method == "GET" and operation == "models":
            return Route(RouteKind.MODELS, "models")
        return _passthrough(method, path, rest)
    if method == "GET" and rest.rstrip("/") == "models":
        return Route(RouteKind.MODELS, "models")
    if method == "POST" and rest.rstrip("/") == "responses":
        return Route(RouteKind.V1, "responses", None, "responses")
    if not rest:
        return Route(RouteKind.NOT_FOUND)
    return _passthrough(method, path, rest)


def _passthrough(method: str, path: str, rest: str) -> Route:
    if not _forwardable(method, path):
        return Route(RouteKind.REFUSED)
    route = Route(RouteKind.PASSTHROUGH, "passthrough", None, rest)
    tail = rest[3:] if rest.startswith("v1/") else rest
    if tail.startswith(_RESPONSES):
        route.response_id = _response_id(tail)
    elif _responses_respelled(rest):
        return Route(RouteKind.REFUSED)
    return route


_RESPONSES = "responses/"


def _responses_respelled(rest: str) -> bool:
    """True when ``rest`` (the path after ``/openai/``, or a deployment's operation) names
    what the SDKs spell ``v1/``, ``deployments/`` or ``responses/{id}`` in another letter
    case. Responses affinity guards a stored response by the id it reads from the SDKs'
    spelling (another subscription naming it gets 404, no backend asked); a backend that
    reads paths case-insensitively would serve ``Responses/{id}`` past that guard. Only
    non-metered paths reach this check, and only their fixed words are compared: deployment
    names and ids keep their case."""
    lowered = rest.lower()
    if lowered.startswith(("v1/", "deployments/")) and not rest.startswith(("v1/", "deployments/")):
        return True
    if lowered.startswith("deployments/"):
        lowered = lowered.split("/", 2)[2] if lowered.count("/") >= 2 else ""
        rest = rest.split("/", 2)[2] if rest.count("/") >= 2 else ""
    if lowered.startswith("v1/"):
        lowered, rest = lowered[3:], rest[3:]
    return lowered.startswith(_RESPONSES) and not rest.startswith(_RESPONSES)


def _response_id(tail: str) -> str | None:
    """The id in ``responses/{id}[/…]``, or None when the segment is empty."""
    return tail[len(_RESPONSES) :].split("/", 1)[0] or None


def _forwardable(method: str, path: str) -> bool:
    """Plain characters only, no empty or dot segments, and for a POST no metered operation
    under another name (``Chat/Completions``, ``…/extensions/chat/completions``): an SDK
    never sends such paths, and a backend might serve them as the operation."""
    if _PATH_CHARACTERS.fullmatch(path) is None or "//" in path or "/." in path:
        return False
    return method != "POST" or not path.lower().rstrip("/").endswith(_METERED_TAILS)
