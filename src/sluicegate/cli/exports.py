"""``sluicegate exports``: where each usage export stands, and moving its cursor (through the
admin service, like the admin API). Neither needs the key secret."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import typer

from sluicegate.cli.context import open_admin
from sluicegate.cli.tables import cell, id_column, text_column
from sluicegate.config.model import GatewayConfig


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def print_exports(config: GatewayConfig, as_json: bool) -> None:
    """Each export (``AdminService.exports``): a table, or ``--json`` as the admin API gives
    it (``{"items": [...]}``, times as epoch seconds)."""
    service = open_admin(config, issues_keys=False)
    try:
        items = service.exports()
    finally:
        if service.engine is not None:
            service.engine.dispose()
    if as_json:
        typer.echo(json.dumps({"items": items}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Usage exports ({len(items)})")
    id_column(table, "export", [i["name"] for i in items])
    for col in ("type", "cursor", "gaps", "lag", "exported", "moved (UTC)"):
        text_column(table, col, "right" if col in ("cursor", "gaps", "lag", "exported") else "left")
    for i in items:
        kind = i["type"] if i["configured"] else "(not configured)"
        table.add_row(
            cell(i["name"]),
            kind,
            _number(i["last_record_id"]) if i["started"] else "(not started)",
            _number(i["gap_ids"]),
            _number(i["lag_records"]),
            _number(i["exported"]),
            _when(i["updated_at"]),
        )
    Console().print(table)


def rewind_export(
    config: GatewayConfig,
    name: str,
    *,
    after_record_id: int | None,
    since: float | None,
    skip: bool,
    as_json: bool,
) -> None:
    """Move export ``name``'s cursor (``AdminService.rewind_export``) and say where to."""
    service = open_admin(config, issues_keys=False)
    try:
        moved: dict[str, Any] = service.rewind_export(
            name, after_record_id=after_record_id, since=since, skip=skip
        )
    finally:
        if service.engine is not None:
            service.engine.dispose()
    if as_json:
        typer.echo(json.dumps(moved, indent=2))
        return
    typer.echo(
        f"export {name}: cursor moved from record {moved['previous_record_id']} to "
        f"{moved['last_record_id']}; the next cycle sends the records above it"
    )
    if moved["skipped"]:
        typer.echo(f"skipped {moved['skipped']} record(s): they will never be sent", err=True)
