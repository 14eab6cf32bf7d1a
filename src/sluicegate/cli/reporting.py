"""Printing usage reports and forecasts as a table, CSV or JSON (through the admin service,
like the admin API and the dashboard). Neither needs the key secret.

A group without a value (requests refused before a subscription, deployment or backend was
known; no model named by the backend) is ``(none)`` in a table, as on the dashboard; ``null``
in JSON and an empty ``key`` in CSV, as the admin API gives them."""

from __future__ import annotations

import json
import sys
import time

import typer

from sluicegate.accounting.chargeback import DIMENSIONS
from sluicegate.accounting.pricing import format_money
from sluicegate.admin.service import AdminError, money, report_csv, report_rows
from sluicegate.cli.context import open_admin
from sluicegate.cli.tables import NO_VALUE, cell, id_column, label, text_column
from sluicegate.config.model import GatewayConfig


def print_report(config: GatewayConfig, start: float, end: float, by: str, fmt: str) -> None:
    """Tokens and cost per ``by`` (rows sorted by cost), the total last."""
    if by not in DIMENSIONS:
        raise typer.BadParameter(f"--by must be one of {', '.join(DIMENSIONS)}")
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter("--format must be table, csv or json")
    service = open_admin(config, issues_keys=False)
    try:
        report = service.usage_report(start=start, end=end, by=by)
    except AdminError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    if report.note:  # the range covered is wider than asked (purged hourly rollups)
        typer.echo(f"note: {report.note}", err=True)
    if fmt == "json":
        out = {
            "from": report.start,
            "to": report.end,
            "by": by,
            "currency": report.currency,
            "rows": report_rows(report),
        }
        typer.echo(json.dumps(out, indent=2))
        return
    if fmt == "csv":
        sys.stdout.write(report_csv(report))
        return
    from rich.console import Console
    from rich.table import Table

    fmt_t = "%Y-%m-%d %H:%M"
    title = (
        f"Usage by {by}, {time.strftime(fmt_t, time.gmtime(report.start))} – "
        f"{time.strftime(fmt_t, time.gmtime(report.end))} UTC, cost in {report.currency}"
    )
    none = any(row.key is None for row in report.rows)
    table = Table(
        title=title,
        caption=f"{NO_VALUE}: {_NO_VALUE_MEANS.get(by, f'no {by}')}" if none else None,
    )
    keys = ["(total)", *(label(row.key) for row in report.rows)]
    if by == "subscription":  # ids, which `keys show` takes: never cut
        id_column(table, "key", keys)
    else:
        text_column(table, "key")
    for col in ("requests", "input", "output", "total tokens", "PTU share", "cost", "unpriced"):
        text_column(table, col, "right")
    for row in [*report.rows, report.total]:
        table.add_row(
            cell("(total)" if row is report.total else label(row.key)),
            f"{row.requests:,}",
            f"{row.prompt_tokens:,}",
            f"{row.completion_tokens:,}",
            f"{row.total_tokens:,}",
            format_money(row.ptu_nanos, 4),
            format_money(row.cost_nanos, 4),
            f"{row.unpriced_records:,}" if row.unpriced_records else "",
        )
    Console().print(table)
    if report.total.unpriced_records:
        typer.echo(
            f"warning: {report.total.unpriced_records:,} record(s) have no price and are not in "
            "the cost; 'sluicegate config check' lists unpriced deployments",
            err=True,
        )


#: Per dimension, which requests a report's ``(none)`` row counts (a ``None`` key).
_NO_VALUE_MEANS = {
    "subscription": "requests refused before a subscription was known (no or unknown key)",
    "owner": "requests refused before a subscription was known (no or unknown key)",
    "product": "requests refused before a subscription was known (no or unknown key)",
    "deployment": "requests refused before a deployment was chosen",
    "backend": "requests refused before routing (no backend tried)",
    "model": "requests without a model named by a backend (refused, or failed upstream)",
}


def print_forecast(config: GatewayConfig, limit: int, as_json: bool) -> None:
    """Month-end projections per subscription, and PTU against pay-as-you-go per deployment."""
    service = open_admin(config, issues_keys=False)
    items, total, count = service.forecast(limit=limit)
    deployments = service.break_even()
    currency = service.prices.currency
    if as_json:
        out = {
            "currency": currency,
            "subscriptions": [
                {
                    "id": p.key,
                    "mtd_tokens": p.mtd_tokens,
                    "mtd_cost": money(p.mtd_cost_nanos),
                    "projected_tokens": p.projected_tokens,
                    "projected_cost": money(p.projected_cost_nanos),
                    "method": p.method,
                }
                for p in items
            ],
            "total": {
                "mtd_tokens": total.mtd_tokens,
                "projected_tokens": total.projected_tokens,
                "projected_cost": money(total.projected_cost_nanos),
            },
            "deployments": [
                {
                    "deployment": d.deployment,
                    "projected_tokens": d.projected_tokens,
                    "paygo_monthly_cost": None
                    if d.paygo_monthly_nanos is None
                    else money(d.paygo_monthly_nanos),
                    "ptu_monthly_cost": None
                    if d.ptu_monthly_nanos is None
                    else money(d.ptu_monthly_nanos),
                    "break_even_tokens": d.break_even_tokens,
                    "cheaper": d.cheaper,
                    "note": d.note,
                }
                for d in deployments
            ],
        }
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"Month-end forecast ({count} subscriptions with usage, cost in {currency})"
    )
    keys = ["(total)", *(label(p.key) for p in items)]
    id_column(table, "subscription", keys)  # ids, which `keys show` takes: never cut
    for col in ("tokens so far", "cost so far", "projected tokens", "projected cost", "method"):
        text_column(table, col, "left" if col == "method" else "right")
    for p in [*items, total]:
        table.add_row(
            cell("(total)" if p is total else label(p.key)),
            f"{p.mtd_tokens:,}",
            format_money(p.mtd_cost_nanos, 4),
            f"{p.projected_tokens:,}",
            format_money(p.projected_cost_nanos, 4),
            p.method,
        )
    console.print(table)
    be = Table(title="PTU or pay-as-you-go, per deployment (this month's traffic)")
    for col in (
        "deployment",
        "projected tokens",
        "peak tokens/min",
        "pay-as-you-go/month",
        "PTU/month",
        "break-even tokens",
        "cheaper",
        "note",
    ):
        text_column(be, col, "left" if col in ("deployment", "cheaper", "note") else "right")
    for d in deployments:
        be.add_row(
            d.deployment,
            f"{d.projected_tokens:,}",
            f"{d.peak_tokens_per_minute:,}",
            "—" if d.paygo_monthly_nanos is None else format_money(d.paygo_monthly_nanos),
            "—" if d.ptu_monthly_nanos is None else format_money(d.ptu_monthly_nanos),
            "—" if d.break_even_tokens is None else f"{d.break_even_tokens:,}",
            d.cheaper or "—",
            d.note,
        )
    console.print(be)


def print_budgets(config: GatewayConfig, subscription_id: str | None, as_json: bool) -> None:
    """Budgets and their spending in the current period, the most spent (by ratio) first."""
    service = open_admin(config, issues_keys=False)
    try:
        statuses = service.budgets(subscription_id)
    except AdminError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    statuses.sort(key=lambda s: (-s.ratio, s.subscription_id))
    if as_json:
        typer.echo(json.dumps({"items": [s.as_dict() for s in statuses]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Budgets ({len(statuses)} subscriptions)")
    id_column(table, "subscription", [s.subscription_id for s in statuses])
    for col in ("spent", "budget", "%", "renews (UTC)", "state"):
        text_column(table, col, "right" if col in ("spent", "budget", "%") else "left")
    for s in statuses:
        state = "refused" if s.refuses else "over, warn" if s.over else "ok"
        table.add_row(
            cell(s.subscription_id),
            format_money(s.spent_nanos),
            f"{format_money(s.amount_nanos)} {s.currency}/{s.noun()}",
            f"{s.ratio:.0%}",
            s.as_dict()["period_end"][:16].replace("T", " "),
            state,
        )
    Console().print(table)
