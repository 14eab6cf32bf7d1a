from sluicegate.auth.credentials import find_key


def test_every_place_a_key_can_come_from() -> None:
    assert find_key([(b"api-key", b"k1")], b"").key == "k1"
    assert find_key([(b"ocp-apim-subscription-key", b"k2")], b"").key == "k2"
    assert find_key([(b"authorization", b"Bearer k3")], b"").key == "k3"
    assert find_key([], b"api-version=1&subscription-key=k4").key == "k4"


def test_header_wins_over_query_and_same_key_twice_is_fine() -> None:
    found = find_key(
        [(b"api-key", b"k1"), (b"authorization", b"Bearer k1")], b"subscription-key=zz"
    )
    assert found.key == "k1"
    assert not found.ambiguous


def test_two_different_keys_are_ambiguous() -> None:
    found = find_key([(b"api-key", b"k1"), (b"ocp-apim-subscription-key", b"k2")], b"")
    assert found.ambiguous


def test_no_key() -> None:
    assert find_key([(b"authorization", b"Basic abc")], b"").key is None
