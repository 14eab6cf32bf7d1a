"""The disconnect hook the gateway's HTTP protocol offers relays (proxy.asgi)."""

from __future__ import annotations

from sluicegate.proxy.asgi import DISCONNECT_HOOK, DisconnectHook, disconnect_hook


def test_callbacks_run_once_on_fire_and_at_once_after() -> None:
    hook = DisconnectHook()
    calls: list[str] = []
    hook.add(lambda: calls.append("a"))
    removed = lambda: calls.append("removed")  # noqa: E731
    hook.add(removed)
    hook.remove(removed)
    hook.fire()
    hook.fire()
    assert calls == ["a"]
    hook.add(lambda: calls.append("late"))  # the client had already gone
    assert calls == ["a", "late"]


def test_a_failing_callback_does_not_stop_the_others() -> None:
    hook = DisconnectHook()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    hook.add(broken)
    hook.add(lambda: calls.append("b"))
    hook.fire()
    assert calls == ["b"]


def test_found_only_where_the_server_offers_it() -> None:
    hook = DisconnectHook()
    assert disconnect_hook({"extensions": {DISCONNECT_HOOK: {"hook": hook}}}) is hook
    assert disconnect_hook({"type": "http"}) is None
    assert disconnect_hook({"extensions": {DISCONNECT_HOOK: "nonsense"}}) is None
