"""Tables the command line prints, readable in a narrow terminal (80 columns).

Rich fits a table to the terminal by cutting cells to ``…``. That is never acceptable for an
identifier the next command takes (``keys show <id>``), nor for a name that is only useful
whole (a backend, a deployment), so:

* an id column (``id_column``) is kept on one line at its full width; the other columns give
  way first;
* every other column folds what does not fit onto further lines (``text_column``) instead of
  cutting it;
* ``sluicegate backends`` has more columns than 80 characters hold with its names whole, so
  where its table does not fit it prints each pool member as a few lines instead
  (``print_backends``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from sluicegate.routing.overview import Row

Justify = Literal["left", "right"]

#: How a report or a table names a group without a value (``None`` in the data): refused
#: before a subscription, deployment or backend was known, or no model named by the backend.
#: The dashboard shows it the same way.
NO_VALUE = "(none)"

_UNBOUNDED = 1 << 20


def id_column(table: Table, header: str, values: Iterable[str]) -> None:
    """Add a column of identifiers: never wrapped or cut, as wide as its longest value."""
    width = max((len(v) for v in values), default=0)
    table.add_column(header, no_wrap=True, min_width=max(width, len(header)))


def text_column(table: Table, header: str, justify: Justify = "left") -> None:
    """Add a column whose cells (and header) fold onto further lines when the terminal is too
    narrow, so no value is ever shown cut to ``…``."""
    table.add_column(header, justify=justify, overflow="fold")


def label(key: str | None) -> str:
    """A report's group key as the table shows it (``NO_VALUE`` for ``None``; control and
    formatting characters escaped, ``admin.schemas.escaped``)."""
    from sluicegate.admin.schemas import escaped

    return NO_VALUE if key is None else escaped(key)


def cell(value: str) -> Text:
    """A stored value (a name, an owner, a report's key) as a table cell: its control and
    formatting characters escaped (``admin.schemas.escaped``: a name stored before they were
    refused must not drive the terminal), and never read as rich markup (``[/b]`` in a name
    made the table fail, ``[bold]`` restyled it)."""
    from sluicegate.admin.schemas import escaped

    return Text(escaped(value))


def _opt(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _state(row: Row) -> str:
    if row.open_seconds is None:
        return row.state
    reason = f", {row.open_reason}" if row.open_reason else ""
    return f"{row.state} ({row.open_seconds:.1f}s{reason})"


def _backends_table(rows: Sequence[Row], note: str) -> Table:
    table = Table(title="Backends by deployment", caption=note)
    for col in ("deployment", "backend", "backend deployment"):
        text_column(table, col)
    for col in ("prio", "weight"):
        text_column(table, col, "right")
    for col in ("kind", "state"):
        text_column(table, col)
    for col in ("headroom tokens", "headroom requests", "in flight"):
        text_column(table, col, "right")
    for r in rows:
        table.add_row(
            r.deployment, r.backend, r.backend_deployment, str(r.priority), str(r.weight),
            r.kind, _state(r), _opt(r.headroom_tokens), _opt(r.headroom_requests),
            _opt(r.in_flight),
        )  # fmt: skip
    return table


def _backends_lines(rows: Sequence[Row], note: str) -> list[str]:
    lines = ["Backends by deployment", f"({note})"]
    deployment = None
    for r in rows:
        if r.deployment != deployment:
            deployment = r.deployment
            lines += ["", r.deployment]
        lines.append(f"  {r.backend}, backend deployment {r.backend_deployment}")
        lines.append(f"    prio {r.priority}, weight {r.weight}, {r.kind}; state: {_state(r)}")
        if (r.headroom_tokens, r.headroom_requests, r.in_flight) != (None, None, None):
            lines.append(
                f"    headroom: {_opt(r.headroom_tokens)} tokens, "
                f"{_opt(r.headroom_requests)} requests; in flight: {_opt(r.in_flight)}"
            )
    return lines


def print_backends(rows: Sequence[Row], note: str, console: Console | None = None) -> None:
    """Each deployment's pool with its live state: a table when it fits the terminal with
    every cell on one line, else the same facts as a few lines per pool member (a table of
    ten columns at 80 characters would break every name into fragments)."""
    console = console or Console()
    table = _backends_table(rows, note)
    # Measured without the terminal's bound (a measurement is clamped to it): the width
    # the table takes with no cell broken.
    unbounded = console.options.update_width(_UNBOUNDED)
    if Measurement.get(console, unbounded, table).maximum <= console.width:
        console.print(table)
        return
    for line in _backends_lines(rows, note):
        # Text, not markup: a name holding "[...]" is printed as it is.
        console.print(Text(line))
