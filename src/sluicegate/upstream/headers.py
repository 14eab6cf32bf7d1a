"""Header hygiene between client, gateway and backend: pure functions over header lists."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote

from sluicegate.auth.credentials import is_key_parameter, may_hold_key_parameter

#: Never forwarded in either direction (RFC 9110 §7.6.1 plus framing the gateway redoes).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)

#: The client's credentials: the backend gets the gateway's own instead.
CLIENT_CREDENTIALS = frozenset({"api-key", "authorization", "ocp-apim-subscription-key"})

#: Request headers the gateway sets itself.
REQUEST_DROPPED = HOP_BY_HOP | CLIENT_CREDENTIALS | {"accept-encoding", "cookie", "expect"}

#: A backend deployment's own rate-limit figures: they describe one deployment shared by
#: every team (another team's use shows in them) behind a gateway that balances over several,
#: so they mean nothing to a client, whose limits are the gateway's (which sets these names
#: itself where a product has limits). Read by routing's headroom before they are dropped.
BACKEND_RATE_HEADERS = frozenset(
    f"x-ratelimit-{kind}-{unit}"
    for kind in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
)

#: Response headers the gateway sets itself (the body may be re-framed or decompressed).
RESPONSE_DROPPED = (
    HOP_BY_HOP | BACKEND_RATE_HEADERS | {"content-encoding", "set-cookie", "server", "date"}
)
_RESPONSE_DROPPED_BYTES = frozenset(name.encode("latin-1") for name in RESPONSE_DROPPED)


def upstream_request_headers(
    client_headers: list[tuple[bytes, bytes]],
    backend_auth: list[tuple[str, str]],
    request_id: str,
) -> dict[str, str]:
    """The headers to send to the backend: the client's, minus hop-by-hop (those RFC 9110
    names and those the client's ``Connection`` header names) and credentials, plus the
    backend's auth and a correlation id. Names are lower case."""
    out: dict[str, str] = {}
    nominated: set[str] | None = None
    for raw_name, raw_value in client_headers:
        name = raw_name.decode("latin-1")
        if name in REQUEST_DROPPED or name.startswith("x-sluicegate-"):
            if name == "connection":
                nominated = connection_options(raw_value, nominated)
            continue
        value = raw_value.decode("latin-1")
        if name in out:
            out[name] = f"{out[name]}, {value}"
        else:
            out[name] = value
    if nominated:
        for name in nominated:
            out.pop(name, None)
    out.setdefault("x-ms-client-request-id", request_id)
    out["accept-encoding"] = "identity"
    for name, value in backend_auth:
        out[name] = value
    return out


def client_response_headers(
    upstream: Sequence[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The backend's response headers the client may see, then the gateway's own.

    Where the gateway sets a header itself (``extra``), its value replaces the backend's:
    the client is limited by the gateway, not by the backend's shared deployment.
    Headers the backend's ``Connection`` header names are hop-by-hop too (RFC 9110 §7.6.1):
    they are meant for the gateway's connection, not the client's, and are dropped.
    """
    own = dict(extra)  # the names (a set comprehension would be a call of its own)
    out: list[tuple[bytes, bytes]] = []
    nominated: set[str] | None = None
    for name, value in upstream:
        lowered = name.lower()
        if lowered in _RESPONSE_DROPPED_BYTES or lowered in own:
            if lowered == b"connection":
                nominated = connection_options(value, nominated)
            continue
        out.append((lowered, value))
    if nominated:
        # Rare (backends send "keep-alive" or "close", which name no header): a second pass
        # only then, since a named header may come before the Connection header.
        out = [(n, v) for n, v in out if n.decode("latin-1") not in nominated]
    out.extend(extra)
    return out


def relayed_length(upstream: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The backend's ``Content-Length`` (``upstream``: its headers, names in lower case) if
    it still holds for the body the client gets when the gateway relays it unchanged; None
    when there is none, or when the body is compressed: the upstream client decodes such an
    answer (``upstream/client.py``; the gateway asks for ``identity``), so its length is
    not the client's."""
    length = None
    for name, value in upstream:
        if name == b"content-length":
            length = value.strip()
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return None
    return length if length is not None and length.isdigit() else None


#: ``Connection`` options that are not header names (RFC 9112 §9.3, §9.6).
_CONNECTION_TOKENS = frozenset({"close", "keep-alive", ""})


def connection_options(value: bytes, into: set[str] | None) -> set[str] | None:
    """The header names a ``Connection`` header's ``value`` lists, lower case, added to
    ``into``; None while it names none (the usual ``keep-alive`` or ``close``)."""
    for token in value.decode("latin-1").split(","):
        name = token.strip().lower()
        if name not in _CONNECTION_TOKENS:
            into = into if into is not None else set()
            into.add(name)
    return into


def strip_key_from_query(query_string: bytes) -> str:
    """The query string for the backend: the client's, without any parameter that carries a
    subscription key (``api-key``, ``subscription-key``: every occurrence, in any letter case
    or percent-encoding that decodes to such a name, with a value or without), whether or not
    it was the key the request was authenticated with. The other parameters go as the client
    sent them, byte for byte, in their order."""
    if not query_string:
        return ""
    query = query_string.decode("latin-1")
    if not may_hold_key_parameter(query_string):
        return query
    # Split as parse_qsl does (on "&" only) and decode each name as it does, so what
    # find_key could take for a key is what is dropped here; the kept parts are not
    # re-encoded (urlencode would rewrite the client's escapes).
    kept = [
        part
        for part in query.split("&")
        if not is_key_parameter(unquote(part.partition("=")[0].replace("+", " ")))
    ]
    return "&".join(kept)
