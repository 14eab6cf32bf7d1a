"""``GET /admin/api/exports`` and ``POST /admin/api/exports/{name}/rewind`` on a real gateway
whose export ships to the fake Event Hub (``simulator.event_hub``), on SQLite and PostgreSQL:
the cursor and the lag as listed, a rewind by record id and by time re-sending exactly the
records after the point, a forward move refused without ``skip`` (and with it, the records
passed over never sent), 404 for an unknown export, 401 without the admin token. Then
``accounting.export.rewind`` against a cycle in flight (the row lock on PostgreSQL, the
row's version on SQLite)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from sluicegate.accounting.export import CursorStore, ExportBusy, RewindRefused, rewind
from sluicegate.simulator.event_hub import EventHubThread, FakeEventHub
from sluicegate.storage.schema import usage_records
from tests.accounting.conftest import chat_record, engine, write_ledger  # noqa: F401  (fixture)
from tests.admin.harness import AdminHarness, admin_gateway
from tests.support.pg import pg_database_url, throwaway_database  # noqa: F401  (fixture)

KEY_ENV = "SG_TEST_EVENTHUB_KEY"


def wait_until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


@dataclass
class Live:
    """A gateway exporting to ``hub`` (as ``usage``) and a key to make traffic with; shared
    by the tests of one database (each test counts from what was there before it)."""

    h: AdminHarness
    hub: FakeEventHub
    key: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("exports")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp / 'ledger.db'}"
        else:
            url = stack.enter_context(throwaway_database())
        hub = stack.enter_context(EventHubThread(FakeEventHub(key_name="send")))
        previous = os.environ.get(KEY_ENV)
        os.environ[KEY_ENV] = hub.key
        stack.callback(_restore, previous)
        export: dict[str, Any] = {
            "name": "usage",
            "type": "event_hub",
            "url": hub.url,
            "sas_key_name": "send",
            "sas_key_env": KEY_ENV,
            "interval_seconds": 0.05,
            "start": "earliest",
        }
        h = stack.enter_context(admin_gateway(tmp, storage_url=url, exports=[export]))
        _, key = h.create("team-a", "exp")
        yield Live(h, hub, key)


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = previous


def record_ids(hub: FakeEventHub) -> list[int]:
    return [int(e.json()["record_id"]) for e in hub.events()]


def ledger(h: AdminHarness) -> list[tuple[int, float]]:
    """(id, ts) of every record, oldest first."""
    with h.gw.gateway.engine.connect() as conn:
        rows = conn.execute(select(usage_records.c.id, usage_records.c.ts).order_by("id"))
        return [(int(r.id), float(r.ts)) for r in rows]


def traffic(live: Live, n: int) -> list[int]:
    """``n`` chats; the ids of their records (once written), oldest first."""
    before = len(ledger(live.h))
    for i in range(n):
        assert live.h.chat(live.key, "gpt-4o-mini", f"hello {i}") == 200
    live.h.records(before + n)
    return [i for i, _ in ledger(live.h)[before:]]


def listed(h: AdminHarness) -> dict[str, dict[str, Any]]:
    r = h.api.get("/exports")
    assert r.status_code == 200, r.text
    return {item["name"]: item for item in r.json()["items"]}


def caught_up(live: Live) -> dict[str, Any]:
    """The export's listing once it delivered every record."""
    newest = ledger(live.h)[-1][0]
    wait_until(lambda: listed(live.h)["usage"]["last_record_id"] == newest)
    return listed(live.h)["usage"]


def test_list_shows_the_cursor_and_the_lag(live: Live) -> None:
    h, hub = live.h, live.hub
    before = caught_up(live) if ledger(h) else None
    ids = traffic(live, 3)
    usage = caught_up(live)
    assert record_ids(hub)[-3:] == ids
    assert usage["configured"] is True and usage["started"] is True
    assert usage["type"] == "event_hub" and usage["url"] == hub.url
    assert usage["newest_record_id"] == ids[-1] and usage["lag_records"] == 0
    assert usage["exported"] == len(hub.events()) == usage["sent_since_start"]
    if before is not None:
        assert usage["exported"] == before["exported"] + 3
    assert usage["gap_ids"] == 0 and usage["lost"] == 0 and usage["last_failure"] is None
    assert usage["updated_at"] >= usage["created_at"] > 0
    # A cursor left in the database by an export no longer configured is listed too, with
    # its lag (it starts below the oldest record: every record waits).
    CursorStore(h.gw.gateway.engine, "retired").ensure("earliest")
    first = ledger(h)[0][0]
    retired = listed(h)["retired"]
    assert retired["configured"] is False and retired["type"] is None and retired["url"] is None
    assert retired["last_record_id"] == first - 1
    assert retired["lag_records"] == ids[-1] - first + 1
    assert retired["sent_since_start"] is None
    assert [i["name"] for i in h.api.get("/exports").json()["items"]] == ["usage", "retired"]


def test_rewind_by_id_and_by_time_sends_exactly_the_records_after(live: Live) -> None:
    h, hub = live.h, live.hub
    ids = traffic(live, 4)
    caught_up(live)
    sent = len(hub.events())
    assert record_ids(hub)[-4:] == ids

    r = h.api.post("/exports/usage/rewind", json={"after_record_id": ids[1]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["previous_record_id"], body["last_record_id"], body["skipped"]) == (
        ids[3],
        ids[1],
        0,
    )
    wait_until(lambda: len(hub.events()) >= sent + 2)
    assert record_ids(hub)[sent:] == ids[2:]

    # By time: the first record at or after a moment between the first and second record.
    ts = dict(ledger(h))
    since = datetime.fromtimestamp((ts[ids[0]] + ts[ids[1]]) / 2, UTC).isoformat()
    r = h.api.post("/exports/usage/rewind", json={"since": since})
    assert r.status_code == 200, r.text
    assert r.json()["last_record_id"] == ids[0]
    wait_until(lambda: len(hub.events()) >= sent + 5)
    assert record_ids(hub)[sent + 2 :] == ids[1:]
    time.sleep(0.2)  # a few more cycles: nothing else is sent
    assert len(hub.events()) == sent + 5
    usage = caught_up(live)
    assert usage["exported"] == len(hub.events())


def test_forward_needs_skip_and_the_skipped_records_are_never_sent(live: Live) -> None:
    h, hub = live.h, live.hub
    traffic(live, 1)
    caught_up(live)
    sent = len(hub.events())
    # The hub refuses the next send and asks for 2 s: the records written now wait.
    hub.fail_next(1, 503, retry_after=2)
    ids = traffic(live, 2)
    wait_until(lambda: 503 in hub.statuses())
    usage = listed(h)["usage"]
    assert usage["last_record_id"] == ids[0] - 1 and usage["lag_records"] == 2
    assert usage["last_failure"] is not None

    r = h.api.post("/exports/usage/rewind", json={"after_record_id": ids[1]})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "Conflict"
    assert "skip 2 record(s)" in r.json()["error"]["message"]
    assert listed(h)["usage"]["last_record_id"] == ids[0] - 1  # not moved

    r = h.api.post("/exports/usage/rewind", json={"after_record_id": ids[1], "skip": True})
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] == 2 and r.json()["export"]["lag_records"] == 0
    later = traffic(live, 1)
    wait_until(lambda: len(hub.events()) > sent, within=15)
    assert record_ids(hub)[sent:] == later  # the two skipped: never sent
    assert not set(ids) & set(record_ids(hub))


def test_unknown_export_and_bad_bodies(live: Live) -> None:
    h = live.h
    r = h.api.post("/exports/nope/rewind", json={"after_record_id": 0})
    assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
    for body in ({}, {"after_record_id": 1, "since": "2026-01-01"}, {"since": "yesterday"}):
        r = h.api.post("/exports/usage/rewind", json=body)
        assert r.status_code == 422, (body, r.text)
    r = h.api.post("/exports/usage/rewind", json={"after_record_id": -1})
    assert r.status_code == 422


def test_the_admin_token_is_required(live: Live) -> None:
    base = f"{live.h.url}/admin/api"
    r = httpx.get(f"{base}/exports")
    assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
    r = httpx.post(f"{base}/exports/usage/rewind", json={"after_record_id": 0})
    assert r.status_code == 401
    r = httpx.get(f"{base}/exports", headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 401


# -- rewind against a cycle in flight ------------------------------------------------------


def test_a_rewind_never_loses_to_a_cycle_in_flight(
    engine: Engine,  # noqa: F811
    tmp_path: Path,
) -> None:
    """PostgreSQL: a cycle holds the row lock while it sends: a rewind waits for it, and
    gives up with ``ExportBusy`` past its wait. SQLite: the cycle's move after a rewind moves
    nothing (conditional on the version): the rewind stands."""
    write_ledger(engine, tmp_path, [chat_record(f"r{i}", 1e9 + i, "s", 10) for i in range(3)])
    store = CursorStore(engine, "usage")
    store.ensure("latest")
    top = store.state()
    assert top is not None
    upto = top[0].upto
    claim = store.claim()
    assert claim is not None
    if engine.dialect.name == "postgresql":
        timer = threading.Timer(0.3, claim.release)
        try:
            with pytest.raises(ExportBusy):
                rewind(engine, "usage", after_record_id=upto - 2, lock_seconds=0.2)
            timer.start()
            moved = rewind(engine, "usage", after_record_id=upto - 2)  # waits for the release
        finally:
            if timer.is_alive():
                timer.join()
            claim.release()
        assert moved.last_record_id == upto - 2
    else:
        moved = rewind(engine, "usage", after_record_id=upto - 2)
        assert moved.last_record_id == upto - 2
        from sluicegate.accounting.export import Move

        assert claim.move(Move(upto, (), 0), 0) is False  # the stale cycle moves nothing
    state = store.state()
    assert state is not None and state[0].upto == upto - 2


def test_a_listed_url_has_no_credentials_or_query() -> None:
    from sluicegate.admin.service import _bare_url

    assert _bare_url("https://user:secret@hooks.example:8443/in?code=abc#x") == (
        "https://hooks.example:8443/in"
    )
    assert _bare_url("http://[::1]:9/hub") == "http://[::1]:9/hub"
    # A port the configuration let through but urllib cannot read: shown as given, no
    # ValueError (the whole listing was a 500, the CLI a traceback).
    assert _bare_url("https://u:p@hooks.example:99999/in") == "https://hooks.example:99999/in"
    assert _bare_url("https://u:p@[::1]:x/in") == "https://[::1]:x/in"


# -- forward moves: the ledger's end and the ids in flight ----------------------------------


def test_a_move_past_the_newest_record_is_refused(
    engine: Engine,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A point above the ledger's newest record would pass over records not written yet
    (none of them counted as skipped): refused, with skip too; up to the newest it moves."""
    write_ledger(engine, tmp_path, [chat_record(f"r{i}", 1e9 + i, "s", 10) for i in range(2)])
    store = CursorStore(engine, "usage")
    store.ensure("latest")
    state = store.state()
    assert state is not None
    top = state[0].upto
    for skip in (False, True):
        with pytest.raises(RewindRefused, match="newest record"):
            rewind(engine, "usage", after_record_id=top + 100, skip=skip)
    state = store.state()
    assert state is not None and state[0].upto == top
    assert rewind(engine, "usage", after_record_id=top).last_record_id == top


def test_a_forward_move_keeps_the_ids_in_flight_as_gaps(
    engine: Engine,  # noqa: F811
    tmp_path: Path,
) -> None:
    """PostgreSQL: an id with no record yet (in flight: it commits later) is not skipped by
    a forward move — it stays a gap, below the cursor's old point and on the way; the
    records passed over are. SQLite keeps no gaps."""
    write_ledger(engine, tmp_path, [chat_record(f"r{i}", 1e9 + i, "s", 10) for i in range(3)])
    with engine.begin() as conn:
        ids = [int(i) for i in conn.execute(select(usage_records.c.id).order_by("id")).scalars()]
        conn.execute(usage_records.delete().where(usage_records.c.id == ids[1]))
    store = CursorStore(engine, "usage")
    store.ensure("latest")
    write_ledger(engine, tmp_path, [chat_record(f"s{i}", 2e9 + i, "s", 10) for i in range(3)])
    with engine.begin() as conn:
        later = [
            int(i)
            for i in conn.execute(
                select(usage_records.c.id).where(usage_records.c.id > ids[2]).order_by("id")
            ).scalars()
        ]
        conn.execute(usage_records.delete().where(usage_records.c.id == later[1]))
    moved = rewind(engine, "usage", after_record_id=later[2], skip=True)
    state = store.state()
    assert state is not None
    if engine.dialect.name == "postgresql":
        assert moved.skipped == 2
        assert state[0].gaps == ((ids[1], ids[1]), (later[1], later[1]))
    else:
        assert moved.skipped == 2 and state[0].gaps == ()
