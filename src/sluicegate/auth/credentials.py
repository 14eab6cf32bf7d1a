"""Finding the caller's credentials in a request: a subscription key, a token, or both.

A subscription key is accepted in ``api-key`` (what ``AzureOpenAI`` sends),
``Ocp-Apim-Subscription-Key`` (APIM's header), ``Authorization: Bearer`` (what ``OpenAI`` sends
on the v1 API) and the ``subscription-key`` query parameter (checked only when no header
carries a key, as in APIM). The same key in several places is fine; two *different* keys make
the request ambiguous and it is refused rather than guessed at.

A token (a JWT: three base64url segments, the first starting with ``eyJ``, the encoding of
``{"``) is told from a key by its shape, wherever it comes, and collected apart: two different
tokens are ambiguous too. What happens when a key *and* a token come is the pipeline's rule
(both must hold and name the same subscription; see docs/entra-id.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

KEY_HEADERS = (b"api-key", b"ocp-apim-subscription-key")

_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def looks_like_jwt(value: str) -> bool:
    """True when ``value`` has a compact JWS's shape (not whether it is valid). Subscription
    keys (``sg-…``) never have it."""
    return _JWT_SHAPE.fullmatch(value) is not None


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Presented:
    """What a request carries. ``ambiguous``: two different keys, or two different tokens."""

    key: str | None
    ambiguous: bool = False
    token: str | None = None


def find_key(headers: list[tuple[bytes, bytes]], query_string: bytes) -> Presented:
    """Extract the subscription key and the token from ASGI headers (lower-case names) and
    the raw query."""
    key: str | None = None
    token: str | None = None
    ambiguous = False
    for name, value in headers:
        candidate: bytes | None = None
        if name in KEY_HEADERS:
            candidate = value.strip()
        elif name == b"authorization":
            scheme, _, rest = value.partition(b" ")
            if scheme.lower() == b"bearer":
                candidate = rest.strip()
        if candidate:
            text = candidate.decode("latin-1")
            if looks_like_jwt(text):
                if token is not None and token != text:
                    ambiguous = True
                token = token or text
            elif key is None:
                key = text
            elif key != text:
                ambiguous = True
    if key is None and query_string and b"subscription-key" in query_string:
        for qname, qvalue in parse_qsl(query_string.decode("latin-1")):
            if qname == "subscription-key" and qvalue:
                key = qvalue
                break
    return Presented(key, ambiguous, token)
