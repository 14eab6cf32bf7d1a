"""Images and audio in prompts count tokens as Azure bills them, so a gateway's estimate can be
checked against (and settled up to) a usage larger than text alone."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import httpx
import pytest

from sluicegate.simulator.tokens import (
    DEFAULT_IMAGE_SIZE,
    chat_prompt_count,
    chat_prompt_tokens,
    image_tokens,
    responses_input_tokens,
    sniff_image_size,
)
from tests.simulator.conftest import chat_url


def png(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR) of the given size; the pixels do not matter here."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def wav(seconds: float, rate: int = 16_000) -> bytes:
    """A mono 16-bit PCM WAV of ``seconds`` of silence."""
    data = b"\x00\x00" * int(rate * seconds)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def data_url(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    image: dict[str, Any] = {"url": url}
    if detail is not None:
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def one_user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(
    ("size", "detail", "tokens"),
    [
        # OpenAI's published examples for gpt-4o-class vision models:
        ((1024, 1024), "high", 765),  # → 768×768: 4 tiles
        ((2048, 4096), "high", 1105),  # → 1024×2048 → 768×1536: 6 tiles
        ((4096, 8192), "low", 85),  # low detail: a flat 85
        ((512, 512), None, 255),  # small: not scaled up, one tile ("auto" counts as high)
        ((768, 2048), "auto", 1445),  # 2 × 4 tiles: more than APIM's 1,200 per-image maximum
    ],
)
def test_image_rule(size: tuple[int, int], detail: str | None, tokens: int) -> None:
    assert image_tokens(*size, detail) == tokens


@pytest.mark.parametrize("make", [png, gif, jpeg])
def test_image_sizes_are_read_from_data_urls(make: Any) -> None:
    assert sniff_image_size(make(768, 2048)) == (768, 2048)
    mime = {png: "image/png", gif: "image/gif", jpeg: "image/jpeg"}[make]
    url = data_url(mime, make(768, 2048))
    assert chat_prompt_tokens(one_user(image_part(url))) == 4 + 1445 + 3
    assert chat_prompt_tokens(one_user(image_part(url, "low"))) == 4 + 85 + 3


def test_unknown_images_count_as_1024_square() -> None:
    assert DEFAULT_IMAGE_SIZE == (1024, 1024)
    for url in ("https://example.test/a.jpg", "data:image/png;base64,bm90IGFuIGltYWdl"):
        assert chat_prompt_tokens(one_user(image_part(url))) == 4 + 765 + 3


def test_responses_input_image_counts_too() -> None:
    url = data_url("image/png", png(2048, 4096))
    body = {
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this"},
                    {"type": "input_image", "image_url": url, "detail": "high"},
                ],
            }
        ]
    }
    assert responses_input_tokens(body) == 4 + 3 + 1105 + 3
    low = {"input": [{"role": "user", "content": [{"type": "input_image", "detail": "low"}]}]}
    assert responses_input_tokens(low) == 4 + 85 + 3


def test_audio_counts_ten_tokens_per_second() -> None:
    data = base64.b64encode(wav(2.5)).decode()
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    count = chat_prompt_count(one_user({"type": "text", "text": "transcribe"}, part))
    assert (count.total, count.audio) == (4 + 1 + 25 + 3, 25)
    # Compressed audio is taken as 128 kbit/s: 48,000 bytes ≈ 3 s → 30 tokens.
    silence = base64.b64encode(b"\x00" * 48_000).decode()
    mp3 = {"type": "input_audio", "input_audio": {"data": silence, "format": "mp3"}}
    assert chat_prompt_count(one_user(mp3)).audio == 30


async def test_usage_reports_image_and_audio_tokens(client: httpx.AsyncClient) -> None:
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav(1.0)).decode(), "format": "wav"},
    }
    messages = one_user(
        {"type": "text", "text": "describe"},
        image_part(data_url("image/png", png(768, 2048))),
        audio,
    )
    resp = await client.post(chat_url("free"), json={"messages": messages, "max_tokens": 2})
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] == 4 + 1 + 1445 + 10 + 3
    assert usage["prompt_tokens_details"]["audio_tokens"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2


def pdf(pages: list[tuple[float, float]], text: str = "", inherited: bool = False) -> bytes:
    """A small uncompressed PDF: one page object per size, ``text`` shown on the first page.

    ``inherited`` puts one MediaBox on the page tree instead of one per page."""
    tree_box = b" /MediaBox [0 0 %g %g]" % pages[0] if inherited else b""
    parts = [b"%%PDF-1.4\n1 0 obj << /Type /Pages /Count %d%s >> endobj\n" % (len(pages), tree_box)]
    for i, (w, h) in enumerate(pages):
        box = b"" if inherited else b" /MediaBox [0 0 %g %g]" % (w, h)
        parts.append(b"%d 0 obj << /Type /Page /Parent 1 0 R%s >> endobj\n" % (i + 2, box))
    stream = b"BT /F1 12 Tf (%s) Tj [(a\\) b) 120 (c)] TJ ET" % text.encode() if text else b""
    parts.append(
        b"9 0 obj << /Length %d >> stream\n%s\nendstream endobj\n%%%%EOF" % (len(stream), stream)
    )
    return b"".join(parts)


def test_pdf_files_count_their_text_and_an_image_per_page() -> None:
    # Letter (612×792 pt) at 2 px per point is 1224×1584 px: 765 tokens; A4 (595×842) too.
    # A 300×300 pt page is 600×600 px: 2×2 tiles of 512, 765; a 200×200 one is 400 px: 255.
    letter, small = (612.0, 792.0), (200.0, 200.0)
    url = data_url("application/pdf", pdf([letter, small], text="four words of text"))
    chat = {"type": "file", "file": {"filename": "a.pdf", "file_data": url}}
    # The shown text: "four words of text" (4) + "a\) b" (2) + "c" (1).
    assert chat_prompt_tokens(one_user(chat)) == 4 + (765 + 255 + 7) + 3
    three = url_of(pdf([small, small, small], inherited=True))
    responses = {
        "input": [{"role": "user", "content": [{"type": "input_file", "file_data": three}]}]
    }
    assert responses_input_tokens(responses) == 4 + 3 * 255 + 3


def url_of(raw: bytes) -> str:
    return data_url("application/pdf", raw)


def test_unreadable_files_count_as_one_letter_page() -> None:
    for part in (
        {"type": "file", "file": {"file_id": "assistant-abc"}},
        {"type": "file", "file": {"file_data": data_url("application/pdf", b"not a pdf")}},
        {"type": "input_file", "file_url": "https://example.test/a.pdf"},
    ):
        assert chat_prompt_tokens(one_user(part)) == 4 + 765 + 3


async def test_usage_reports_file_tokens(client: httpx.AsyncClient) -> None:
    file = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": url_of(pdf([(200.0, 200.0)]))},
    }
    messages = one_user({"type": "text", "text": "summarise"}, file)
    resp = await client.post(chat_url("free"), json={"messages": messages, "max_tokens": 2})
    assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens"] == 4 + 1 + 255 + 3
