"""Which tokenizer a model uses, and counting the tokens of a text with it.

Model names arrive in Azure spelling (``gpt-35-turbo``, deployment-style suffixes), OpenAI
spelling (``gpt-3.5-turbo``), with provider prefixes (``azure/gpt-4o``) or as fine-tune ids
(``ft:gpt-4o-mini-2024-07-18:org::abc``); all are normalised before matching. A name that
matches no known family gets ``None``, and callers fall back to a character estimate
(:data:`CHARS_PER_TOKEN` characters per token, OpenAI's rule of thumb for English text).
"""

from __future__ import annotations

import functools
import math
import re

from sluicegate.tokens.bpe import BpeEncoding
from sluicegate.tokens.encodings import CL100K_BASE, O200K_BASE, get_encoding

CHARS_PER_TOKEN = 4
"""Characters per token assumed when the model's tokenizer is unknown."""

# Checked in order: the o200k families first, because "gpt-4" is a prefix of "gpt-4o",
# "gpt-4.1" and "gpt-4.5". A family must be followed by a separator or the end, so that
# "gpt-4" never claims "gpt-40x" style names it does not know.
_SEP = r"(?:[-.:_@]|$)"
_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"^(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|o[1-9]|codex-mini"
            r"|computer-use|gpt-realtime|gpt-audio)" + _SEP
        ),
        O200K_BASE,
    ),
    (
        re.compile(
            r"^(?:gpt-4|gpt-35-turbo|gpt-3\.5-turbo|text-embedding-ada-002|text-embedding-3"
            r"|davinci-002|babbage-002)" + _SEP
        ),
        CL100K_BASE,
    ),
)


def normalise_model(model: str) -> str:
    """Lower-case, without provider prefix (``azure/``) or fine-tune marker (``ft:``)."""
    name = model.strip().lower()
    name = name.rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:]
    return name


# Cached: a request names its model every time, and normalising and matching it again cost
# more than the rest of a cached estimate. Bounded, because names can come from request bodies.
@functools.lru_cache(maxsize=1024)
def encoding_name_for(model: str | None) -> str | None:
    """``"o200k_base"``, ``"cl100k_base"`` or ``None`` for an unknown or missing model.

    gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o-series, gpt-oss → o200k_base; gpt-4 (incl. turbo),
    gpt-35-turbo, text-embedding-ada-002 and text-embedding-3-* → cl100k_base.
    """
    if not model:
        return None
    name = normalise_model(model)
    for pattern, encoding in _FAMILIES:
        if pattern.match(name):
            return encoding
    return None


def encoding_for(model: str | None) -> BpeEncoding | None:
    """The tokenizer for ``model``, loaded from the shipped files on first use; or ``None``."""
    name = encoding_name_for(model)
    return None if name is None else get_encoding(name)


def count_text(text: str, encoding: BpeEncoding | None) -> int:
    """Tokens in ``text``; with no encoding, ``ceil(len(text) / CHARS_PER_TOKEN)``.

    Special-token markers in user text (``<|endoftext|>``) are counted as ordinary text, the
    way the model sees them (as tiktoken's ``encode_ordinary`` does).
    """
    if not text:
        return 0
    if encoding is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return encoding.count(text)


def count_tokens(text: str, model: str | None) -> int:
    """Tokens in ``text`` for ``model`` (exact for known families, chars/4 otherwise)."""
    return count_text(text, encoding_for(model))
