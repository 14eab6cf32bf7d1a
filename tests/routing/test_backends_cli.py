"""`sluicegate backends`: pools as configured, with the live state of a running gateway."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from sluicegate.cli.main import app, main
from tests.routing.harness import Routed, body, chat_deployment, pool_config, start_sim


def test_backends_shows_pools_state_and_headroom(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sims = {"ptu": start_sim(chat_deployment(tpm=50_000)), "down": start_sim()}
    down_port = sims["down"].port
    sims["down"].stop()  # nothing listens there: connection refused
    pool = [{"backend": "down", "priority": 1}, {"backend": "ptu", "priority": 2, "weight": 2}]
    config = pool_config(
        tmp_path, sims, pool, kinds={"ptu": "ptu"},
        routing={"circuit_breaker": {"failures": 1, "trip_seconds": 30}},
    )  # fmt: skip
    config["backends"][1]["url"] = f"http://127.0.0.1:{down_port}"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    routed = Routed(config, sims)
    try:
        r = httpx.post(routed.chat_url(), json=body(10), headers={"api-key": routed.key})
        assert r.status_code == 200
        assert main(["backends", "--config", str(path), "--url", routed.url, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        rows = {row["backend"]: row for row in out["items"]}
        assert rows["down"]["state"] == "open" and 25 < rows["down"]["open_seconds"] <= 30
        assert rows["ptu"]["state"] == "closed"
        assert rows["ptu"]["kind"] == "ptu" and rows["ptu"]["weight"] == 2
        assert 0 < rows["ptu"]["headroom_tokens"] < 50_000
        assert rows["ptu"]["in_flight"] == 0
        assert "live state" in out["source"]
        # The table, and the same view from the gateway object (for the admin API).
        assert main(["backends", "--config", str(path), "--url", routed.url]) == 0
        table = capsys.readouterr().out
        assert "open" in table and "ptu" in table
        views = routed.states()
        assert views["down"]["state"] == "open" and views["down"]["last_error"] == "connection"
        assert views["ptu"]["headroom_tokens"] == rows["ptu"]["headroom_tokens"]
        assert routed.gw.gateway.runtime.backends["down"].state == "open"
        assert "down/gpt-4o: open for" in repr(routed.gw.gateway.router)
        # Without a running gateway: the configuration only.
        assert main(["backends", "--config", str(path), "--json"]) == 0
        offline = json.loads(capsys.readouterr().out)
        assert {row["state"] for row in offline["items"]} == {"unknown"}
        # (main() reports 0 for every exit code; the command itself exits 1, as `app` says.)
        args = ["backends", "--config", str(path), "--url", "http://127.0.0.1:9"]
        assert app(args=args, standalone_mode=False) == 1
        assert "cannot read the live state" in capsys.readouterr().err
    finally:
        routed.stop()
        sims["ptu"].stop()
