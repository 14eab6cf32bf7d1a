"""``strip_key_from_query``: what the backend gets of the client's query string."""

from sluicegate.upstream.headers import strip_key_from_query


def test_the_usual_query_goes_unchanged() -> None:
    assert strip_key_from_query(b"") == ""
    assert strip_key_from_query(b"api-version=2024-10-21") == "api-version=2024-10-21"


def test_every_key_parameter_is_dropped_the_rest_kept_byte_for_byte() -> None:
    query = (
        b"api-version=2024-10-21&api-key=sg-1&a=%20b+c&Subscription-Key=sg-2&API-KEY=sg-3"
        b"&subscription-key&api-ke%79=sg-4&monkey=1&api-key=&q=x%3Dy"
    )
    assert strip_key_from_query(query) == "api-version=2024-10-21&a=%20b+c&monkey=1&q=x%3Dy"
