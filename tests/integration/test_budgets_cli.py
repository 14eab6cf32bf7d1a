"""``sluicegate budgets``: each budgeted subscription's budget, what it spent this period (from
the ledger, at the configured prices) and whether it is refused, as a table and as JSON."""

from __future__ import annotations

import json
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cli_output import (
    BACKEND,
    SECRET,
    create_key,
    recent,
    record,
    run_cli,
    write_config,
    write_records,
)


def test_budgets_lists_spent_and_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    # Each record: 1,000 prompt tokens at 1 and 200 completion tokens at 2 per million:
    # 0.0014; two of them, 0.0028, spend a budget of 0.002; one, 0.0014, does not.
    budget = {"amount": "0.002", "period": "monthly"}
    config = write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'l.db'}",
        products=[{"name": "p", "budget": budget}, {"name": "free"}],
    )
    over, under = (create_key(capsys, config)["id"] for _ in range(2))
    free = create_key(capsys, config, product="free")["id"]
    ts = recent()
    subs = [over, over, under, free]
    write_records(config, tmp_path, [record(i, ts, s, refused=False) for i, s in enumerate(subs)])

    code, out, err = run_cli(capsys, "budgets", "-c", str(config), "--json")
    assert code == 0, err
    items = {i["subscription_id"]: i for i in json.loads(out)["items"]}
    assert set(items) == {over, under}
    assert items[over]["spent"] == "0.002800000" and items[over]["refused"] is True
    assert items[under]["spent"] == "0.001400000" and items[under]["refused"] is False
    assert items[over]["period"] == "monthly" and items[over]["currency"] == "USD"

    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(capsys, "budgets", "-c", str(config))
    assert code == 0, err
    assert over in out and under in out and "refused" in out
    assert out.index(over) < out.index(under)  # the most spent first

    code, out, err = run_cli(capsys, "budgets", "-c", str(config), "--subscription", "sub_nope")
    assert code == 1 and "no subscription 'sub_nope'" in err


def test_budgets_count_no_ptu_by_default_and_never_its_cost_ahead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_KEY_SECRET", SECRET)
    monthly_cost = 31_000
    ptu = [{"backend": BACKEND, "monthly_cost": monthly_cost, "effective_from": "2020-01-01"}]
    url = f"sqlite:///{tmp_path / 'l.db'}"
    budget: dict[str, Any] = {"amount": "500", "period": "monthly"}
    config = write_config(tmp_path, url, products=[{"name": "p", "budget": budget}], ptu=ptu)
    sid = create_key(capsys, config)["id"]
    ts = recent()
    write_records(config, tmp_path, [record(0, ts, sid, refused=False)])

    code, out, err = run_cli(capsys, "budgets", "-c", str(config), "--json")
    assert code == 0, err
    [item] = json.loads(out)["items"]
    # The reserved backend's records cost nothing pay-as-you-go; its reservation is left out.
    assert item["spent"] == "0.000000000" and item["refused"] is False

    budget["include_ptu"] = True
    config = write_config(tmp_path, url, products=[{"name": "p", "budget": budget}], ptu=ptu)
    code, out, err = run_cli(capsys, "budgets", "-c", str(config), "--json")
    assert code == 0, err
    [item] = json.loads(out)["items"]
    # The whole share of the reservation from the month's start until now, not of the month.
    start = datetime.fromisoformat(item["period_start"].replace("Z", "+00:00")).timestamp()
    end = datetime.fromisoformat(item["period_end"].replace("Z", "+00:00")).timestamp()
    so_far = monthly_cost * (time.time() - start) / (end - start)
    assert 0 < Decimal(item["spent"]) <= Decimal(str(so_far)) + 1
