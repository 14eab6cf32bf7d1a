"""Headroom from x-ratelimit-remaining-*: reports, dispatch accounting, staleness."""

from __future__ import annotations

from sluicegate.routing.headroom import Headroom, Report, report_from_headers


def _headers(tokens: int | None, requests: int | None) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", b"application/json")]
    if tokens is not None:
        out.append((b"X-RateLimit-Remaining-Tokens", str(tokens).encode()))
        out.append((b"x-ratelimit-limit-tokens", b"10000"))
    if requests is not None:
        out.append((b"x-ratelimit-remaining-requests", str(requests).encode()))
    return out


def test_report_from_headers() -> None:
    r = report_from_headers(_headers(900, 7))
    assert r == Report(900, 7, 10000, None)
    assert report_from_headers(_headers(None, None)).empty
    assert report_from_headers([(b"x-ratelimit-remaining-tokens", b"junk")]).empty
    assert report_from_headers([(b"x-ratelimit-remaining-tokens", b"-4")]).remaining_tokens == 0


def test_unknown_fits_and_report_limits() -> None:
    h = Headroom()
    assert h.fits(10**9, 0.0, 10.0)
    marks = h.dispatch(100)
    assert h.observe(Report(250, 10), marks, now=1.0)
    assert h.fits(250, 1.0, 10.0)
    assert not h.fits(251, 1.0, 10.0)


def test_requests_sent_after_the_report_are_subtracted() -> None:
    h = Headroom()
    first = h.dispatch(100)
    h.dispatch(100)  # in flight, sent after `first`: not yet in the backend's figure
    h.dispatch(50)
    h.observe(Report(1000, 5), first, now=0.0)
    current = h.current(0.0, 10.0)
    assert current is not None
    assert current.remaining_tokens == 850
    assert current.remaining_requests == 3


def test_an_answer_to_an_older_request_is_ignored() -> None:
    h = Headroom()
    old = h.dispatch(100)
    new = h.dispatch(100)
    h.settle(old)
    assert h.observe(Report(500, 5), new, now=1.0)
    assert not h.observe(Report(900, 9), old, now=1.1)  # a budget from before the newer charge
    current = h.current(1.1, 10.0)
    assert current is not None and current.remaining_tokens == 500


def test_earlier_requests_still_in_flight_count_as_missing_from_a_report() -> None:
    """On many connections an earlier request can reach the backend after a later one: the
    later one's report does not hold it, and its own answer (older) is ignored."""
    h = Headroom()
    early = h.dispatch(100)  # dispatched first, arrives at the backend second
    late = h.dispatch(60)
    answered = h.dispatch(10)  # dispatched and answered before the report: in it
    h.settle(answered)
    after = h.dispatch(30)  # dispatched after the reported request: subtracted as before
    assert h.observe(Report(200, 9), late, now=0.0)
    current = h.current(0.0, 10.0)
    assert current is not None
    # 200 reported − 100 of `early` (in flight, maybe not in it) − 10 and 30 sent since.
    assert (current.remaining_tokens, current.remaining_requests) == (60, 6)
    assert h.fits(60, 0.0, 10.0) and not h.fits(61, 0.0, 10.0)
    h.settle(late)
    assert not h.observe(Report(300, 9), early, now=0.1)
    h.settle(early)
    h.settle(after)  # answers without reports change nothing until the next report
    assert h.current(0.1, 10.0) == current


def test_no_requests_left_means_no_fit() -> None:
    h = Headroom()
    h.observe(Report(10_000, 0), h.dispatch(1), now=0.0)
    assert not h.fits(1, 0.0, 10.0)


def test_stale_reports_and_forget() -> None:
    h = Headroom()
    h.observe(Report(0, 0), h.dispatch(10), now=0.0)
    assert not h.fits(1, 9.9, 10.0)
    assert h.fits(1, 10.1, 10.0)
    assert h.current(10.1, 10.0) is None
    h.observe(Report(0, 0), h.dispatch(10), now=20.0)
    h.forget()
    assert h.fits(1, 20.0, 10.0)
    assert repr(h) == "Headroom(unknown)"


def test_adopt_only_newer_reports() -> None:
    h = Headroom()
    first = h.dispatch(10)
    h.observe(Report(500, 5), first, now=5.0)
    h.settle(first)
    assert not h.adopt(Report(9000, 90), 4.0)
    assert h.adopt(Report(100, 1), 6.0)
    h.dispatch(40)
    current = h.current(6.0, 10.0)
    assert current is not None and current.remaining_tokens == 60
    assert "tokens=100" in repr(h)


def test_an_adopted_report_may_miss_our_requests_in_flight() -> None:
    h = Headroom()
    h.dispatch(25)  # ours, in flight when the other instance's request reached the backend
    assert h.adopt(Report(100, 4), 1.0)
    current = h.current(1.0, 10.0)
    assert current is not None
    assert (current.remaining_tokens, current.remaining_requests) == (75, 3)
