"""Finding the caller's credentials in a request: a subscription key, a token, or both.

A subscription key is accepted in ``api-key`` (what ``AzureOpenAI`` sends),
``Ocp-Apim-Subscription-Key`` (APIM's header), ``Authorization: Bearer`` (what ``OpenAI`` sends
on the v1 API) and the ``api-key`` and ``subscription-key`` query parameters (APIM's default
query name, and the one APIM's AI-Gateway labs configure). The same key in several places is
fine; two *different* keys make the request ambiguous and it is refused rather than guessed at,
a header's and the query's too (APIM would take the header's and ignore the query's).
Query parameter names are compared as ``parse_qsl`` decodes them, in any letter case
(``is_key_parameter``); the gateway strips every such parameter from what goes upstream
(``upstream/headers.py``), so the backend never sees a key in the query whether it was used
or not.

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

#: Query parameters that carry a subscription key (names in lower case, decoded).
KEY_PARAMETERS = frozenset({"api-key", "subscription-key"})

# Every key parameter's name ends in "y" or "Y", unless escaped (``api-ke%79`` decodes to
# ``api-key``): a query with none of these three bytes names no key parameter and is not
# parsed. The usual query (``api-version=…``) has none, and one character-class scan costs
# about as much as one substring test.
_MAYBE_KEY_PARAMETER = re.compile(rb"[yY%]")


def may_hold_key_parameter(query_string: bytes) -> bool:
    """False when the raw ``query_string`` surely holds no key parameter (a cheap scan);
    True when it may (then parse it)."""
    return _MAYBE_KEY_PARAMETER.search(query_string) is not None


def is_key_parameter(name: str) -> bool:
    """True when the decoded query parameter ``name`` carries a subscription key, in any
    letter case (``API-Key``, ``Subscription-Key``)."""
    return name.lower() in KEY_PARAMETERS


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
    the raw query. A query key parameter is always a key (never a token), and one with an
    empty value is no key (and no conflict)."""
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
    if query_string and may_hold_key_parameter(query_string):
        for qname, qvalue in parse_qsl(query_string.decode("latin-1")):
            if qvalue and is_key_parameter(qname):
                if key is None:
                    key = qvalue
                elif key != qvalue:
                    ambiguous = True
    return Presented(key, ambiguous, token)
