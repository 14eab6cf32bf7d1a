"""Deterministic token arithmetic, generated text and embedding vectors.

The simulator does not tokenise for real; it defines tokens so that a test can predict every
number it reports:

* a *word* is a whitespace-separated run (``str.split()``); one word is one token;
* chat prompt tokens = sum over messages of (4 + tokens of the message's content) + 3, where
  the content is a string (its words) or a list of parts: a text part counts the words of
  its ``text``, an image, audio or file part counts as below (other parts count 0);
* an image part (``image_url`` in chat, ``input_image`` in the Responses API) counts as
  OpenAI publishes for its vision models (the rule Azure bills by): ``detail: "low"`` is 85
  tokens; otherwise (``high``, ``auto`` or none given) the image is scaled to fit in
  2048×2048, then its shortest side to 768 px, and costs 85 + 170 per 512-px tile. The size
  is read from a ``data:`` URL holding a PNG, GIF or JPEG; for any other URL (the simulator
  fetches nothing) it is taken as 1024×1024, i.e. 765 tokens;
* an audio part (``input_audio``) counts 10 tokens per second of audio (OpenAI's published
  rate for user audio: one token per 100 ms), rounded up: the length is read from a WAV
  header, other formats are taken as 128 kbit/s (16,000 bytes per second of audio). These
  tokens are also reported as ``prompt_tokens_details.audio_tokens``;
* a file part (``file`` in chat, ``input_file`` in the Responses API) holding a PDF counts as
  OpenAI describes PDF input: the text extracted from it plus an image of every page. Here
  the text is the words of the literal strings shown by ``Tj``/``TJ`` in its uncompressed
  content streams, and a page's image is its ``/MediaBox`` at 2 px per point (US Letter when
  it has none: 1224×1584 px, 765 tokens) counted as a high-detail image. A file the
  simulator cannot read (a ``file_id``, a URL, not a PDF) counts as one Letter page;
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
import binascii
import hashlib
import math
import re
import struct
import sys
from array import array
from dataclasses import dataclass
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


#: Image tokens (OpenAI's vision pricing rule for gpt-4o-class models, which Azure bills by):
#: a low-detail image, and a high-detail one's base plus one per 512-px tile after scaling.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
IMAGE_TILE_PX = 512
IMAGE_FIT_PX = 2048
IMAGE_SHORT_SIDE_PX = 768
#: Size assumed for an image the simulator cannot measure (a remote URL): 1024×1024.
DEFAULT_IMAGE_SIZE = (1024, 1024)
#: Audio: one token per 100 ms of user audio; bytes per second assumed for compressed audio.
AUDIO_TOKENS_PER_SECOND = 10
AUDIO_ASSUMED_BYTES_PER_SECOND = 16_000


@dataclass(frozen=True, slots=True)
class PromptCount:
    """Prompt tokens of a request, and how many of them are audio (usage details)."""

    total: int
    audio: int = 0


def image_tokens(width: int, height: int, detail: str | None = None) -> int:
    """Tokens of one image of ``width``×``height`` px (see the module docstring)."""
    if detail == "low":
        return IMAGE_BASE_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > IMAGE_FIT_PX:  # fit in 2048×2048
        scale = IMAGE_FIT_PX / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > IMAGE_SHORT_SIDE_PX:  # then the shortest side down to 768 (never up)
        scale = IMAGE_SHORT_SIDE_PX / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(round(w, 6) / IMAGE_TILE_PX) * math.ceil(round(h, 6) / IMAGE_TILE_PX)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * max(1, tiles)


def _data_url_bytes(url: str) -> bytes | None:
    """The decoded payload of a base64 ``data:`` URL, or None."""
    if not url.startswith("data:"):
        return None
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        return None
    return _b64(payload)


def _b64(payload: str) -> bytes | None:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a JPEG's first SOF segment."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def sniff_image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF or JPEG image, or None if not recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
    elif data[:2] == b"\xff\xd8":
        size = _jpeg_size(data)
        if size is None:
            return None
        width, height = size
    else:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _image_part_tokens(part: dict[str, Any]) -> int:
    raw = part.get("image_url")
    # chat: {"image_url": {"url": …, "detail": …}}; Responses: {"image_url": "…", "detail": …}
    url = raw.get("url") if isinstance(raw, dict) else raw
    detail = raw.get("detail") if isinstance(raw, dict) else part.get("detail")
    if detail == "low":
        return IMAGE_BASE_TOKENS
    size = None
    if isinstance(url, str):
        data = _data_url_bytes(url)
        size = sniff_image_size(data) if data else None
    width, height = size or DEFAULT_IMAGE_SIZE
    return image_tokens(width, height, detail if isinstance(detail, str) else None)


def audio_seconds(data: bytes) -> float:
    """Length of an audio clip: from the WAV header, else at 128 kbit/s."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        byte_rate = 0
        i = 12
        while i + 8 <= len(data):
            chunk, size = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
            if chunk == b"fmt " and size >= 12:
                byte_rate = int.from_bytes(data[i + 16 : i + 20], "little")
            elif chunk == b"data":
                if byte_rate > 0:
                    return min(size, len(data) - i - 8) / byte_rate
                break
            i += 8 + size + (size & 1)
    return len(data) / AUDIO_ASSUMED_BYTES_PER_SECOND


def _audio_part_tokens(part: dict[str, Any]) -> int:
    audio = part.get("input_audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        return 0
    seconds = audio_seconds(_b64(audio["data"]) or b"")
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND - 1e-9)


#: A PDF page's image: its MediaBox at this many pixels per point; Letter when unknown.
PDF_PIXELS_PER_POINT = 2
PDF_DEFAULT_PAGE_POINTS = (612.0, 792.0)
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PDF_MEDIA_BOX = re.compile(
    rb"/MediaBox\s*\[\s*(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s*\]"
)
_PDF_SHOWN_TEXT = re.compile(rb"\(((?:[^()\\]|\\.)*)\)\s*Tj|\[((?:[^\]])*)\]\s*TJ")
_PDF_STRING = re.compile(rb"\(((?:[^()\\]|\\.)*)\)")


def _pdf_page_tokens(width_pt: float, height_pt: float) -> int:
    return image_tokens(
        max(1, round(width_pt * PDF_PIXELS_PER_POINT)),
        max(1, round(height_pt * PDF_PIXELS_PER_POINT)),
    )


def pdf_tokens(data: bytes | None) -> int:
    """Tokens of a PDF file part (see the module docstring): text words plus page images."""
    default_page = _pdf_page_tokens(*PDF_DEFAULT_PAGE_POINTS)
    if data is None or not data.startswith(b"%PDF-"):
        return default_page
    boxes = [
        (abs(float(x1) - float(x0)), abs(float(y1) - float(y0)))
        for x0, y0, x1, y1 in _PDF_MEDIA_BOX.findall(data)
    ]
    pages = max(1, len(_PDF_PAGE.findall(data)))
    # A MediaBox per page when there is one each; else the first (inherited) or Letter.
    sizes = boxes if len(boxes) == pages else [boxes[0] if boxes else PDF_DEFAULT_PAGE_POINTS]
    images = sum(_pdf_page_tokens(*sizes[min(i, len(sizes) - 1)]) for i in range(pages))
    words = 0
    for single, array_ in _PDF_SHOWN_TEXT.findall(data):
        for piece in [single] if single else _PDF_STRING.findall(array_):
            words += count_words(piece.decode("latin-1"))
    return images + words


def _file_part_tokens(part: dict[str, Any]) -> int:
    # chat: {"file": {"file_data": "data:application/pdf;base64,…"}};
    # Responses: {"file_data": "data:…"} (a bare base64 string is accepted too)
    raw = part.get("file")
    data = raw.get("file_data") if isinstance(raw, dict) else part.get("file_data")
    if not isinstance(data, str):
        return pdf_tokens(None)
    return pdf_tokens(_data_url_bytes(data) if data.startswith("data:") else _b64(data))


def _content_tokens(content: Any) -> PromptCount:
    if isinstance(content, str):
        return PromptCount(count_words(content))
    if isinstance(content, list):
        total = audio = 0
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind in ("image_url", "input_image"):
                    total += _image_part_tokens(part)
                elif kind in ("file", "input_file"):
                    total += _file_part_tokens(part)
                elif kind == "input_audio":
                    tokens = _audio_part_tokens(part)
                    total += tokens
                    audio += tokens
                else:
                    text = part.get("text")
                    if isinstance(text, str):
                        total += count_words(text)
            elif isinstance(part, str):
                total += count_words(part)
        return PromptCount(total, audio)
    return PromptCount(0)


def chat_prompt_count(messages: list[Any]) -> PromptCount:
    """Prompt tokens of a chat request and the audio among them (see the module docstring)."""
    total, audio = CHAT_TOKENS_PER_REPLY, 0
    for message in messages:
        total += CHAT_TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            count = _content_tokens(message.get("content"))
            total += count.total
            audio += count.audio
    return PromptCount(total, audio)


def chat_prompt_tokens(messages: list[Any]) -> int:
    """Prompt tokens of a chat request (see the module docstring for the rule)."""
    return chat_prompt_count(messages).total


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


def responses_input_count(body: dict[str, Any]) -> PromptCount:
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
    return chat_prompt_count(messages)


def responses_input_tokens(body: dict[str, Any]) -> int:
    """Input tokens of a Responses API request: ``input`` and ``instructions`` as chat."""
    return responses_input_count(body).total


@lru_cache(maxsize=4096)
def completion_text(n: int) -> str:
    """The answer of ``n`` tokens: ``n`` words from ``WORDS``, cycled, joined by spaces."""
    return " ".join(WORDS[i % _WORD_COUNT] for i in range(n))


def token_piece(i: int) -> str:
    """The streamed text of token ``i`` (0-based): a word, with a leading space after the first."""
    if i == 0:
        return _FIRST_PIECES[0]
    return _LATER_PIECES[i % _WORD_COUNT]


#: What the simulator's embeddings count as words: runs of letters and digits, lower-cased.
_EMBEDDED_WORD = re.compile(r"\w+")


@lru_cache(maxsize=2048)
def embedding_vector(key: str, dimensions: int) -> tuple[float, ...]:
    """A unit vector of ``dimensions`` floats that depends only on ``key`` and the length.

    A hashed bag of words, so that similarity behaves as a real model's does for a semantic
    cache: each word (a run of letters and digits, lower-cased) adds a direction drawn from
    SHAKE-256 of the word, as often as it occurs, and the sum is normalised. Two wordings
    sharing most of their words are close (a cosine of about shared / all words), unrelated
    texts nearly orthogonal, the same text always embeds the same way. A key without words
    is hashed whole. Shortening a vector (``dimensions``) keeps its leading components before
    renormalising, as text-embedding-3 models do (SHAKE's shorter digests are prefixes of
    longer ones).

    The directions are added as whole integers (:func:`_word_lanes`: one big-integer addition
    a distinct word), not component by component: a document of thousands of distinct words
    embeds in milliseconds, and nothing is kept per word.
    """
    words: dict[str, int] = {}
    for word in _EMBEDDED_WORD.findall(key.lower()) or [key]:
        words[word] = words.get(word, 0) + 1
    total = 0
    for word, count in words.items():
        total += count * _word_lanes(word, dimensions)
    lanes = array("Q")
    lanes.frombytes(total.to_bytes(8 * dimensions, "little"))
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        lanes.byteswap()
    # Each lane holds the sum of the words' 16-bit draws u; a component is u - 32768.
    bias = 32768 * sum(words.values())
    sums = [lane - bias for lane in lanes]
    norm = math.sqrt(sum(v * v for v in sums)) or 1.0
    return tuple(round(v / norm, 8) for v in sums)


def _word_lanes(word: str, dimensions: int) -> int:
    """One word's direction: SHAKE-256 of the word as ``dimensions`` unsigned little-endian
    16-bit draws, each in a 64-bit lane of one integer, so that adding such integers adds the
    directions component-wise, with no carry between lanes (up to 2**48 words)."""
    raw = hashlib.shake_256(word.encode("utf-8")).digest(2 * dimensions)
    lanes = bytearray(8 * dimensions)
    lanes[0::8] = raw[0::2]
    lanes[1::8] = raw[1::2]
    return int.from_bytes(lanes, "little")


def embedding_base64(vector: tuple[float, ...]) -> str:
    """The vector as base64 of little-endian float32, as ``encoding_format: base64`` returns."""
    packed = array("f", vector)
    if packed.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte floats
        raise RuntimeError("float32 array expected")
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
