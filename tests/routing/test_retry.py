"""The retry policy: relay, next candidate, wait and retry the same, or give up."""

from __future__ import annotations

from sluicegate.routing.estimate import request_estimate
from sluicegate.routing.retry import Action, Outcome, RetryPolicy, is_backend_failure


def test_client_errors_are_relayed_not_retried() -> None:
    policy = RetryPolicy()
    for status in (400, 401, 403, 404, 413, 422):
        assert policy.decide(Outcome(status), 1, single=False, elapsed=0).action is Action.RELAY
    assert policy.decide(Outcome(200), 1, single=False, elapsed=0).action is Action.RELAY


def test_retryable_statuses_and_errors_go_to_the_next_candidate() -> None:
    policy = RetryPolicy(max_attempts=3)
    for outcome in (
        Outcome(429, retry_after=2),
        Outcome(500),
        Outcome(503),
        Outcome(408),
        Outcome(None, "connection"),
        Outcome(None, "timeout"),
        Outcome(None, "broken"),
    ):
        assert policy.decide(outcome, 1, single=False, elapsed=0).action is Action.NEXT
        assert policy.decide(outcome, 2, single=False, elapsed=0).action is Action.NEXT
        assert policy.decide(outcome, 3, single=False, elapsed=0).action is Action.GIVE_UP


def test_configured_statuses_only() -> None:
    policy = RetryPolicy(statuses=(429, 503))
    assert policy.decide(Outcome(500), 1, single=False, elapsed=0).action is Action.RELAY
    assert policy.decide(Outcome(None, "timeout"), 1, False, 0).action is Action.NEXT


def test_single_member_waits_as_long_as_asked_within_the_ceiling() -> None:
    policy = RetryPolicy(max_attempts=3, max_wait=10)
    d = policy.decide(Outcome(429, retry_after=2.5), 1, single=True, elapsed=0)
    assert (d.action, d.wait) == (Action.WAIT_SAME, 2.5)
    assert policy.decide(Outcome(429, retry_after=11), 1, True, 0).action is Action.GIVE_UP
    d = policy.decide(Outcome(500), 2, single=True, elapsed=0)
    assert (d.action, d.wait) == (Action.WAIT_SAME, 1.0)  # backoff when nothing was asked
    assert RetryPolicy(wait_same=False).decide(Outcome(500), 1, True, 0).action is Action.GIVE_UP
    assert RetryPolicy(max_wait=0.2).decide(Outcome(500), 1, True, 0).wait == 0.2


def test_single_member_waits_for_its_open_breaker_or_gives_up() -> None:
    """Retrying into an open breaker is pointless: the wait is at least the breaker's rest,
    and longer than ``max_wait`` (or the budget) is giving up."""
    policy = RetryPolicy(max_attempts=3, max_wait=10, budget=60)
    d = policy.decide(Outcome(429), 1, single=True, elapsed=0, out_for=9.5)
    assert (d.action, d.wait) == (Action.WAIT_SAME, 9.5)  # not the 0.5 s backoff
    d = policy.decide(Outcome(429, retry_after=6), 1, True, 0, out_for=5.9)
    assert (d.action, d.wait) == (Action.WAIT_SAME, 6)  # the longer of the two
    assert policy.decide(Outcome(429), 1, True, 0, out_for=10.5).action is Action.GIVE_UP
    assert policy.decide(Outcome(500), 1, True, 52, out_for=8).action is Action.GIVE_UP
    # Several members: the next one is tried at once, whatever this one's breaker says.
    assert policy.decide(Outcome(429), 1, False, 0, out_for=30).action is Action.NEXT


def test_budget_bounds_attempts_and_waits() -> None:
    policy = RetryPolicy(budget=5)
    assert policy.decide(Outcome(500), 1, single=False, elapsed=5).action is Action.GIVE_UP
    assert policy.decide(Outcome(429, retry_after=3), 1, True, 2.5).action is Action.GIVE_UP
    assert policy.decide(Outcome(429, retry_after=2), 1, True, 2.5).action is Action.WAIT_SAME


def test_what_counts_against_a_backend() -> None:
    assert all(is_backend_failure(s) for s in (408, 429, 500, 502, 503, 504, 599))
    assert not any(is_backend_failure(s) for s in (200, 400, 401, 404, 409, 413))
    assert Outcome(None, "timeout").reason == "timeout"
    assert Outcome(429).reason == "429" and Outcome(429).throttled


def test_request_estimate() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100, "n": 2}
    assert request_estimate(body, 400, "chat/completions", None, 256) == 100 + 200
    assert request_estimate(body, 400, "chat/completions", 90, 256) == 90 + 200
    assert request_estimate({"messages": []}, 40, "chat/completions", None, 256) == 10 + 256
    assert request_estimate({"input": "hi"}, 40, "embeddings", 3, 256) == 3
    assert request_estimate({"max_output_tokens": 7}, 0, "responses", None, 256) == 7
    assert request_estimate(None, 8, "passthrough", None, 256) == 2
