"""The admin API's limits on what a request may make it do: request bodies are read with a
hard cap and a time bound (413, 408), and times outside 1970..9999 are refused (422), all in
the error shape ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import orjson

from sluicegate.admin.api import BODY_LIMIT, MAX_TIME
from tests.admin.harness import ADMIN_TOKEN, admin_gateway
from tests.admin.uploads import stream_body, trickle_body

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _error(body: bytes) -> dict[str, str]:
    error: dict[str, str] = orjson.loads(body)["error"]
    assert set(error) == {"code", "message"}
    return error


def test_a_body_over_the_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    """16 MiB streamed (chunked, no length declared) with valid credentials: 413 while the
    body is still coming. A server that read the whole body first could not answer before
    its end, which never comes."""
    with admin_gateway(tmp_path) as h:
        port = _port(h.url)
        answer = stream_body(port, "POST", "/admin/api/subscriptions", AUTH, 16 * BODY_LIMIT)
        assert answer.status == 413, answer
        error = _error(answer.body)
        assert error["code"] == "RequestEntityTooLarge"
        assert str(BODY_LIMIT) in error["message"]

        # Declared too large: refused at once, before a byte of it is sent.
        declared, _ = trickle_body(
            port, "POST", "/admin/api/subscriptions/sub_x/rotate", AUTH, length=BODY_LIMIT + 1
        )
        assert declared.status == 413 and declared.sent == 0, declared
        assert _error(declared.body)["code"] == "RequestEntityTooLarge"

        # A body within the limit still works.
        r = h.api.post("/subscriptions", json={"product": "starter", "owner": "o", "name": "n"})
        assert r.status_code == 201, r.text


def test_a_trickling_body_gets_408_and_the_connection_closes(tmp_path: Path) -> None:
    with admin_gateway(tmp_path, security={"body_read_timeout_seconds": 1}) as h:
        answer, took = trickle_body(_port(h.url), "POST", "/admin/api/subscriptions", AUTH)
        assert answer.status == 408, answer
        assert _error(answer.body)["code"] == "RequestTimeout"
        assert answer.headers["connection"] == "close" and answer.closed
        assert took < 5


def test_times_past_year_9999_are_refused(tmp_path: Path) -> None:
    """Epoch seconds beyond what ``datetime`` holds (the review's 500), just past the limit,
    and an ISO date before 1970: 422 with a message naming the parameter and the range. The
    latest accepted time works, monthly series included."""
    with admin_gateway(tmp_path) as h:
        paths = ["/usage", "/usage.csv", "/usage/series", "/records"]
        cases = [
            ({"from": "100000000000000", "to": "100000000000001"}, "from"),
            ({"from": str(int(MAX_TIME) - 86400), "to": str(int(MAX_TIME) + 1)}, "to"),
            ({"from": "1969-12-31", "to": "1970-01-02"}, "from"),
            ({"from": "1", "to": "9" * 400}, "to"),  # infinite as a float
        ]
        for when, name in cases:
            for path in paths:
                r = h.api.get(path, params=when)
                assert r.status_code == 422, (path, when, r.text)
                error = r.json()["error"]
                assert error["code"] == "InvalidRequest"
                assert error["message"].startswith(f"'{name}' must be from 1970-01-01"), error
            r = h.api.post("/rollups/rebuild", params=when)
            assert r.status_code == 422, r.text
        end = int(MAX_TIME)
        latest: list[tuple[str, dict[str, str | int]]] = [
            ("/usage", {"from": end - 40 * 86400}),
            ("/usage.csv", {"from": end - 40 * 86400}),
            ("/records", {"from": end - 40 * 86400}),
            ("/usage/series", {"from": end - 80 * 86400, "granularity": "month"}),
            ("/usage/series", {"from": end - 86400, "granularity": "hour"}),
        ]
        for path, params in latest:
            r = h.api.get(path, params={**params, "to": end})
            assert r.status_code == 200, (path, params, r.text)
