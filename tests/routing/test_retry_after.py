"""Reading the wait a backend asks for: retry-after-ms, retry-after (seconds or HTTP date),
and Azure's "Please retry after N seconds" message."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from sluicegate.routing.retry_after import (
    parse_retry_after,
    parse_retry_after_ms,
    retry_after_from_body,
    retry_after_from_headers,
)

NOW = 1_700_000_000.0


def test_retry_after_ms_is_milliseconds() -> None:
    assert parse_retry_after_ms("1500") == 1.5
    assert parse_retry_after_ms("12.5") == pytest.approx(0.0125)
    assert parse_retry_after_ms(None) is None
    assert parse_retry_after_ms("soon") is None
    assert parse_retry_after_ms("-5") is None
    assert parse_retry_after_ms("nan") is None


def test_retry_after_seconds_integer_and_decimal() -> None:
    assert parse_retry_after("6", NOW) == 6.0
    assert parse_retry_after(" 0.25 ", NOW) == 0.25
    assert parse_retry_after("", NOW) is None
    assert parse_retry_after("later", NOW) is None


def test_retry_after_http_date() -> None:
    when = datetime.fromtimestamp(NOW + 42, UTC)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(42)
    past = datetime.fromtimestamp(NOW - 100, UTC)
    assert parse_retry_after(format_datetime(past, usegmt=True), NOW) == 0.0
    # The obsolete asctime form has no zone: HTTP dates are GMT.
    assert parse_retry_after("Sun Nov  6 08:49:47 1994", 784111777.0) == pytest.approx(10)
    assert parse_retry_after("Someday, 99 Foo 2024", NOW) is None


def test_headers_prefer_ms_and_accept_any_case_and_bytes() -> None:
    headers = [(b"Retry-After", b"7"), (b"retry-after-ms", b"6400")]
    assert retry_after_from_headers(headers, NOW) == 6.4
    assert retry_after_from_headers([("RETRY-AFTER", "3")], NOW) == 3.0
    assert retry_after_from_headers([(b"retry-after-ms", b"x"), (b"retry-after", b"2")], NOW) == 2
    assert retry_after_from_headers([(b"x-ratelimit-remaining-tokens", b"0")], NOW) is None


def test_wait_from_azure_messages() -> None:
    classic = (
        b'{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation '
        b"under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your "
        b'current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here"}}'
    )
    assert retry_after_from_body(classic) == 6.0
    foundry = b'{"error":{"message":"Rate limit of 2000 per 60s exceeded. Please wait 33 seconds before retrying."}}'  # noqa: E501
    assert retry_after_from_body(foundry) == 33.0
    assert retry_after_from_body(b'{"error":{"code":"InternalServerError"}}') is None
