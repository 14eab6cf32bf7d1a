from sluicegate.auth.credentials import find_key


def test_every_place_a_key_can_come_from() -> None:
    assert find_key([(b"api-key", b"k1")], b"").key == "k1"
    assert find_key([(b"ocp-apim-subscription-key", b"k2")], b"").key == "k2"
    assert find_key([(b"authorization", b"Bearer k3")], b"").key == "k3"
    assert find_key([], b"api-version=1&subscription-key=k4").key == "k4"


def test_same_key_in_headers_and_query_is_fine() -> None:
    found = find_key(
        [(b"api-key", b"k1"), (b"authorization", b"Bearer k1")],
        b"api-version=1&subscription-key=k1&API-Key=k1",
    )
    assert (found.key, found.ambiguous) == ("k1", False)


def test_api_key_query_parameter_in_any_case_or_escape() -> None:
    for query in (b"api-key=k5", b"api-version=1&Api-Key=k5", b"API-KEY=k5&x=y", b"api-ke%79=k5"):
        assert find_key([], query).key == "k5", query
    assert find_key([], b"api-version=1&SUBSCRIPTION-KEY=k6").key == "k6"
    # an empty parameter carries no key; other names ending in "key" are not keys
    assert find_key([], b"api-key=&monkey=k7&api-keys=k7").key is None


def test_a_different_key_in_the_query_is_ambiguous() -> None:
    # The query is not a fallback that a header silences: a different key there is refused.
    assert find_key([(b"api-key", b"k1")], b"subscription-key=zz").ambiguous
    assert find_key([(b"ocp-apim-subscription-key", b"k1")], b"api-key=zz").ambiguous
    assert find_key([], b"api-key=k1&subscription-key=zz").ambiguous
    assert find_key([], b"api-key=k1&Api-Key=zz").ambiguous


def test_two_different_keys_are_ambiguous() -> None:
    found = find_key([(b"api-key", b"k1"), (b"ocp-apim-subscription-key", b"k2")], b"")
    assert found.ambiguous


def test_no_key() -> None:
    assert find_key([(b"authorization", b"Basic abc")], b"").key is None
