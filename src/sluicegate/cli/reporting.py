"""Printing usage reports as a table, CSV or JSON."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import time

import typer

from sluicegate.config.model import GatewayConfig
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.reports import usage_report

_BY = ("subscription", "owner", "product", "deployment", "backend", "model")


def print_report(config: GatewayConfig, start: float, end: float, by: str, fmt: str) -> None:
    if by not in _BY:
        raise typer.BadParameter(f"--by must be one of {', '.join(_BY)}")
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter("--format must be table, csv or json")
    migrate(config.storage.url)
    engine = create_engine_for(config.storage.url)
    rows = [dataclasses.asdict(r) for r in usage_report(engine, start=start, end=end, by=by)]  # type: ignore[arg-type]
    engine.dispose()
    if fmt == "json":
        typer.echo(json.dumps({"from": start, "to": end, "by": by, "rows": rows}, indent=2))
        return
    columns = list(rows[0].keys()) if rows else ["key", "requests", "total_tokens"]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
        return
    from rich.console import Console
    from rich.table import Table

    fmt_t = "%Y-%m-%d %H:%M"
    title = (
        f"Usage by {by}, {time.strftime(fmt_t, time.gmtime(start))} – "
        f"{time.strftime(fmt_t, time.gmtime(end))} UTC"
    )
    table = Table(title=title)
    for col in columns:
        table.add_column(col.replace("_", " "), justify="left" if col == "key" else "right")
    for row in rows:
        table.add_row(*(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns))
    Console().print(table)
