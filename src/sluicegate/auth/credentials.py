"""Finding the caller's credential in a request.

A subscription key is accepted in ``api-key`` (what ``AzureOpenAI`` sends),
``Ocp-Apim-Subscription-Key`` (APIM's header), ``Authorization: Bearer`` (what ``OpenAI`` sends
on the v1 API) and the ``subscription-key`` query parameter (checked only when no header
carries a key, as in APIM). The same key in several places is fine; two *different* keys make
the request ambiguous and it is refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

KEY_HEADERS = (b"api-key", b"ocp-apim-subscription-key")


@dataclass(frozen=True, slots=True)
class Presented:
    key: str | None
    ambiguous: bool = False


def find_key(headers: list[tuple[bytes, bytes]], query_string: bytes) -> Presented:
    """Extract the subscription key from ASGI headers (lower-case names) and the raw query."""
    found: str | None = None
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
            if found is None:
                found = text
            elif found != text:
                ambiguous = True
    if found is None and query_string and b"subscription-key" in query_string:
        for qname, qvalue in parse_qsl(query_string.decode("latin-1")):
            if qname == "subscription-key" and qvalue:
                found = qvalue
                break
    return Presented(found, ambiguous)
