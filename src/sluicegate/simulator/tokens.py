"""Deterministic token arithmetic, generated text and embedding vectors.

The simulator does not tokenise for real; it defines tokens so that a test can predict every
number it reports:

* a *word* is a whitespace-separated run (``str.split()``); one word is one token;
* chat prompt tokens = sum over messages of (4 + words of the message's text) + 3, where the
  text is ``content`` when it is a string, or the ``text`` of every part of a content list
  (other parts such as images count 0);
* legacy completions and embeddings prompt tokens = words of every input string (an input
  given as token ids counts one per id);
* Responses API input counts like chat (a string input is one user message; ``instructions``
  is one more message);
* an answer of *n* tokens is the first *n* words of ``WORDS`` (cycled), joined by single
  spaces, so ``len(text.split()) == n``. Streamed, token *i* is ``WORDS[i]`` with a leading
  space for every token but the first: concatenating the deltas gives the same text.
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from array import array
from functools import lru_cache
from typing import Any

_TEXT = (
    "The sluice gate opens and the water finds its level; every team receives its share "
    "of the river, metered at the gate, counted in the ledger, and nobody drinks more "
    "than the channel allows. When the flood comes the keeper waits, lets the pressure "
    "fall, and opens again in good order."
)
WORDS: tuple[str, ...] = tuple(_TEXT.split(" "))

_WORD_COUNT = len(WORDS)
#: Stream pieces: token 0 carries no leading space, every later one does.
_FIRST_PIECES: tuple[str, ...] = WORDS
_LATER_PIECES: tuple[str, ...] = tuple(" " + w for w in WORDS)

CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_PER_REPLY = 3


def count_words(text: str) -> int:
    """Tokens of a piece of text: its whitespace-separated words."""
    return len(text.split())


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return count_words(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += count_words(text)
            elif isinstance(part, str):
                total += count_words(part)
        return total
    return 0


def chat_prompt_tokens(messages: list[Any]) -> int:
    """Prompt tokens of a chat request (see the module docstring for the rule)."""
    total = CHAT_TOKENS_PER_REPLY
    for message in messages:
        total += CHAT_TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            total += _content_words(message.get("content"))
    return total


def input_tokens(value: Any) -> int:
    """Tokens of an embeddings ``input`` or a legacy completions ``prompt``.

    A string counts its words, a list of ints one token per id, a list of strings or of
    id lists the sum of its items.
    """
    if isinstance(value, str):
        return count_words(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(input_tokens(v) for v in value)
    return 0


def responses_input_tokens(body: dict[str, Any]) -> int:
    """Input tokens of a Responses API request: ``input`` and ``instructions`` as chat."""
    raw = body.get("input")
    messages: list[Any] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"content": instructions})
    if isinstance(raw, str):
        messages.append({"content": raw})
    elif isinstance(raw, list):
        messages.extend(item for item in raw if isinstance(item, dict))
    return chat_prompt_tokens(messages)


@lru_cache(maxsize=4096)
def completion_text(n: int) -> str:
    """The answer of ``n`` tokens: ``n`` words from ``WORDS``, cycled, joined by spaces."""
    return " ".join(WORDS[i % _WORD_COUNT] for i in range(n))


def token_piece(i: int) -> str:
    """The streamed text of token ``i`` (0-based): a word, with a leading space after the first."""
    if i == 0:
        return _FIRST_PIECES[0]
    return _LATER_PIECES[i % _WORD_COUNT]


@lru_cache(maxsize=2048)
def embedding_vector(key: str, dimensions: int) -> tuple[float, ...]:
    """A unit vector of ``dimensions`` floats that depends only on ``key`` and the length.

    The components come from SHAKE-256 of the key, so the same input always embeds the same
    way and different inputs almost never collide; shortening a vector (``dimensions``) keeps
    its leading components before renormalising, as text-embedding-3 models do.
    """
    raw = hashlib.shake_256(key.encode("utf-8")).digest(2 * dimensions)
    ints = array("h")
    ints.frombytes(raw)
    values = [v / 32768.0 for v in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(round(v / norm, 8) for v in values)


def embedding_base64(vector: tuple[float, ...]) -> str:
    """The vector as base64 of little-endian float32, as ``encoding_format: base64`` returns."""
    packed = array("f", vector)
    if packed.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte floats
        raise RuntimeError("float32 array expected")
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
