"""``sluicegate`` — the command line: serve | demo | config check | keys | usage | forecast |
budgets | exports | backends | simulate."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from sluicegate.config.loader import (
    ConfigError,
    budget_price_warnings,
    environment_problems,
    header_quota_warnings,
    load_config,
    retention_warnings,
)
from sluicegate.config.model import GatewayConfig

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sluicegate.admin.service import AdminService
    from sluicegate.auth.subscriptions import KeySlot


def _plain_flag(option: TyperOption | None) -> TyperOption | None:
    """``option`` without a type in help when it is a flag. Typer's rich help shows every
    option's type, flags included (``--json <bool>``, ``--help <bool>``), as if they took a
    value; an empty metavar shows none (its plain help already leaves flags bare)."""
    if option is not None and option.is_bool_flag and option.metavar is None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    """A command whose help shows flags as flags (``_plain_flag``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperOption):
                _plain_flag(param)

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        return _plain_flag(super().get_help_option(ctx))


class _Group(TyperGroup):
    """A command group whose help shows ``--help`` as a flag (``_plain_flag``)."""

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        return _plain_flag(super().get_help_option(ctx))


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    help="sluicegate: a gateway for Azure OpenAI.",
)
config_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Check a configuration file.")
keys_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Manage subscriptions and their keys."
)
usage_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Usage reports from the ledger.")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(usage_app, name="usage")
exports_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Usage exports: where each stands; move a cursor."
)
app.add_typer(exports_app, name="exports")

#: The latest expiry a subscription may have: 3000-01-01 UTC, the admin API's bound
#: (``schemas.SubscriptionCreate.expires_at``); the dashboard shows it as a date.
LATEST_EXPIRY = 32_503_680_000.0

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="SLUICEGATE_CONFIG", help="Path of gateway.yaml."),
]


def _load(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(exc.explain(), err=True)
        raise typer.Exit(2) from None


@app.command(cls=_Command)
def serve(
    config: ConfigOpt = Path("gateway.yaml"),
    host: Annotated[str | None, typer.Option(help="Override listen.host.")] = None,
    # Range-checked here: uvloop would quietly listen on 70000 % 65536.
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Override listen.port.")
    ] = None,
) -> None:
    """Run the gateway in the foreground (SIGTERM stops it gracefully)."""
    cfg = _load(config)
    problems = environment_problems(cfg, dict(os.environ))
    if problems:
        typer.echo(f"{config}: cannot start:", err=True)
        for p in problems:
            typer.echo(f"  {p}", err=True)
        raise typer.Exit(2)
    from sluicegate.server import serve as run

    raise typer.Exit(run(cfg, host=host, port=port))


@config_app.command("check", cls=_Command)
def config_check(path: Annotated[Path, typer.Argument(help="gateway.yaml to check")]) -> None:
    """Validate a configuration file; every problem is printed with its location."""
    cfg = _load(path)
    warnings = (
        environment_problems(cfg, dict(os.environ))
        + retention_warnings(cfg)
        + header_quota_warnings(cfg)
        + budget_price_warnings(cfg)
    )
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    from sluicegate.accounting.pricing import PriceTable

    for w in PriceTable(cfg).unpriced_deployments():
        typer.echo(f"warning: prices: {w}", err=True)
    typer.echo(
        f"{path}: ok ({len(cfg.backends)} backends, {len(cfg.deployments)} deployments, "
        f"{len(cfg.products)} products, mode {cfg.mode})"
    )


def _admin(config: GatewayConfig, *, issues_keys: bool = False) -> AdminService:
    """``cli.context.open_admin``; the key secret is read only for a command that makes keys
    (``issues_keys``), the others work without it."""
    from sluicegate.cli.context import open_admin

    return open_admin(config, issues_keys=issues_keys)


def _reported(config: GatewayConfig | None = None) -> AbstractContextManager[None]:
    """``cli.context.reported_errors``: wrap every command that touches the database, so
    that a refused request or an unreachable database is one line and exit status 1."""
    from sluicegate.cli.context import reported_errors

    return reported_errors(config)


def _expiry(expires_in_days: float | None, now: float) -> float | None:
    """``--expires-in-days`` as an epoch time (None: never expires). Zero, negative, NaN and
    infinite values are usage errors: none of them is a time to store."""
    if expires_in_days is None:
        return None
    if not (math.isfinite(expires_in_days) and expires_in_days > 0):
        raise typer.BadParameter(
            f"must be a number of days greater than 0, not {expires_in_days!r}",
            param_hint="'--expires-in-days'",
        )
    expires = now + expires_in_days * 86400
    if expires > LATEST_EXPIRY:
        raise typer.BadParameter("must end before the year 3000", param_hint="'--expires-in-days'")
    return expires


def _printable(**values: str) -> None:
    """Refuse (one line, exit status 2, before anything is opened) an option's value that
    ``admin.schemas.text_problem`` refuses: a control character in a name would reach
    terminals, logs and CSV exports as it is."""
    from sluicegate.admin.schemas import text_problem

    for option, value in values.items():
        problem = text_problem(value)
        if problem is not None:
            typer.echo(f"error: --{option} {problem}", err=True)
            raise typer.Exit(2)


#: Fields of ``subscription_view`` that hold an epoch time (``None``: never, for expiry).
_TIMES = ("created_at", "updated_at", "expires_at")


def _iso(epoch: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the second (``2026-12-07T12:35:56Z``)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_sub(data: dict[str, Any], as_json: bool) -> None:
    """A subscription (``subscription_view``, perhaps with its new keys): ``--json`` as the
    admin API gives it (times as epoch seconds); else one field a line, times in ISO 8601 UTC
    and overrides as JSON."""
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from sluicegate.admin.schemas import escaped

    for key, value in data.items():
        if key in _TIMES:
            shown = "never" if value is None else _iso(value)
        elif key == "state_comment" and value is None:
            shown = "-"
        elif key == "overrides":
            shown = json.dumps(value)
        else:
            shown = escaped(str(value))  # a name stored before control characters were refused
        typer.echo(f"{key:>22}: {shown}")


@keys_app.command("create", cls=_Command)
def keys_create(
    product: Annotated[str, typer.Option(help="Product the subscription belongs to.")],
    owner: Annotated[str, typer.Option(help="Team or user that owns it.")],
    name: Annotated[str, typer.Option(help="Display name.")],
    config: ConfigOpt = Path("gateway.yaml"),
    expires_in_days: Annotated[
        float | None,
        typer.Option(help="Expire after this many days (more than 0; default: never)."),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="submitted or active (default: submitted if the product has "
            "approval_required, else active)."
        ),
    ] = None,
    comment: Annotated[
        str | None, typer.Option(help="A comment kept with the state (state_comment).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a subscription and print its two keys (shown only this once)."""
    from sluicegate.admin.service import subscription_view

    _printable(product=product, owner=owner, name=name)
    if comment is not None:
        _printable(comment=comment)
    if state is not None and state not in ("submitted", "active"):
        raise typer.BadParameter("must be submitted or active", param_hint="'--state'")
    expires = _expiry(expires_in_days, time.time())
    cfg = _load(config)
    with _reported(cfg):
        issued = _admin(cfg, issues_keys=True).create_subscription(
            product=product,
            owner=owner,
            name=name,
            expires_at=expires,
            state=state,
            state_comment=comment,
        )
    data = subscription_view(issued.subscription)
    data["primary_key"] = issued.primary_key
    data["secondary_key"] = issued.secondary_key
    _print_sub(data, as_json)
    if not as_json:
        typer.echo("\nThe keys are shown only now; store them safely.", err=True)


@keys_app.command("list", cls=_Command)
def keys_list(
    config: ConfigOpt = Path("gateway.yaml"),
    search: Annotated[str | None, typer.Option(help="Filter by id, name or owner.")] = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="Only this state: submitted, active, suspended, rejected, cancelled or expired."
        ),
    ] = None,
    offset: int = 0,
    limit: int = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List subscriptions (keys are never shown, only their prefixes). The state shown is
    the effective one: expired once the expiry has passed."""
    from sluicegate.admin.service import subscription_view

    cfg = _load(config)
    with _reported(cfg):
        subs, total = _admin(cfg).list(offset=offset, limit=limit, search=search, state=state)
    rows = [subscription_view(s) for s in subs]
    if as_json:
        typer.echo(json.dumps({"total": total, "items": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from sluicegate.cli.tables import cell, id_column, text_column

    # The id is what `keys show` and the others take, the prefix what tells a key's holder
    # which one it is: neither is ever cut (cli.tables).
    table = Table(title=f"{total} subscription(s)")
    id_column(table, "id", (r["id"] for r in rows))
    for col in ("name", "owner", "product", "state"):
        text_column(table, col)
    id_column(table, "primary key", (r["primary_key_prefix"] for r in rows))
    for r in rows:
        table.add_row(
            *(
                cell(str(r[c]))
                for c in ("id", "name", "owner", "product", "state", "primary_key_prefix")
            )
        )
    Console().print(table)


def _state_command(action: str, summary: str):  # type: ignore[no-untyped-def]
    def command(
        subscription_id: Annotated[str, typer.Argument(metavar="ID")],
        config: ConfigOpt = Path("gateway.yaml"),
        comment: Annotated[
            str | None,
            typer.Option(help="Keep this comment with the new state (state_comment)."),
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the subscription as JSON.")
        ] = False,
    ) -> None:
        from sluicegate.admin.service import subscription_view

        if comment is not None:
            _printable(comment=comment)
        cfg = _load(config)
        with _reported(cfg):
            sub = _admin(cfg).change_state(subscription_id, action, comment)
        if as_json:
            typer.echo(json.dumps(subscription_view(sub), indent=2))
        else:
            typer.echo(f"{sub.id}: {subscription_view(sub)['state']}")

    command.__doc__ = (
        f"{summary} A state the subscription cannot leave that way is refused (exit status 1)."
    )
    return command


for _action, _summary in (
    ("approve", "Approve a submitted subscription: its keys start working."),
    ("reject", "Reject a submitted subscription, for good."),
    ("suspend", "Suspend an active subscription: its keys stop working."),
    ("resume", "Resume a suspended subscription."),
    ("cancel", "Cancel a subscription, for good."),
):
    keys_app.command(_action, cls=_Command)(_state_command(_action, _summary))


@keys_app.command("show", cls=_Command)
def keys_show(
    subscription_id: Annotated[str, typer.Argument(metavar="ID")],
    config: ConfigOpt = Path("gateway.yaml"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one subscription."""
    from sluicegate.admin.service import subscription_view

    cfg = _load(config)
    with _reported(cfg):
        sub = _admin(cfg).get(subscription_id)
    _print_sub(subscription_view(sub), as_json)


@keys_app.command("rotate", cls=_Command)
def keys_rotate(
    subscription_id: Annotated[str, typer.Argument(metavar="ID")],
    key: Annotated[str, typer.Option(help="primary or secondary")] = "primary",
    config: ConfigOpt = Path("gateway.yaml"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Replace one of the two keys; the other keeps working (rotate without downtime)."""
    if key not in ("primary", "secondary"):
        typer.echo("error: --key must be primary or secondary", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    with _reported(cfg):
        slot: KeySlot = "primary" if key == "primary" else "secondary"
        issued = _admin(cfg, issues_keys=True).rotate(subscription_id, slot)
    value = issued.primary_key or issued.secondary_key
    if as_json:
        typer.echo(json.dumps({"id": subscription_id, f"{key}_key": value}))
    else:
        typer.echo(f"new {key} key for {subscription_id}: {value}\n(shown only now)")


def _parse_time(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"not an ISO date or date-time: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@usage_app.command("report", cls=_Command)
def usage_report(
    config: ConfigOpt = Path("gateway.yaml"),
    start: Annotated[
        str | None, typer.Option("--from", help="ISO date/time (UTC), default: 30 days ago")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="ISO date/time (UTC), default: now")
    ] = None,
    by: Annotated[
        str, typer.Option(help="subscription|owner|product|deployment|backend|model")
    ] = "subscription",
    fmt: Annotated[str, typer.Option("--format", help="table|csv|json")] = "table",
) -> None:
    """Tokens and cost per subscription, owner, product, deployment, backend or model over a
    period (whole hours, UTC), with PTU reservations allocated."""
    from sluicegate.cli.reporting import print_report

    now = time.time()
    since, until = _parse_time(start, now - 30 * 86400), _parse_time(end, now)
    cfg = _load(config)
    with _reported(cfg):
        print_report(cfg, since, until, by, fmt)


@app.command(cls=_Command)
def forecast(
    config: ConfigOpt = Path("gateway.yaml"),
    limit: Annotated[int, typer.Option(help="How many subscriptions (by cost so far).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Projected month-end tokens and cost per subscription, and PTU against pay-as-you-go per
    deployment (method: docs/chargeback.md)."""
    from sluicegate.cli.reporting import print_forecast

    cfg = _load(config)
    with _reported(cfg):
        print_forecast(cfg, limit, as_json)


@app.command(cls=_Command)
def budgets(
    config: ConfigOpt = Path("gateway.yaml"),
    subscription: Annotated[
        str | None, typer.Option(help="Only this subscription (its id).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each active subscription with a spending budget: the budget, what it spent this period
    and when the period renews (docs/chargeback.md, "Budgets")."""
    from sluicegate.cli.reporting import print_budgets

    cfg = _load(config)
    with _reported(cfg):
        print_budgets(cfg, subscription, as_json)


@exports_app.command("list", cls=_Command)
def exports_list(
    config: ConfigOpt = Path("gateway.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each usage export: its cursor, gaps, lag behind the ledger and events delivered
    (docs/chargeback.md, "Exporting usage")."""
    from sluicegate.cli.exports import print_exports

    cfg = _load(config)
    with _reported(cfg):
        print_exports(cfg, as_json)


@exports_app.command("rewind", cls=_Command)
def exports_rewind(
    name: Annotated[str, typer.Argument(help="The export's name.")],
    config: ConfigOpt = Path("gateway.yaml"),
    after_record_id: Annotated[
        int | None,
        typer.Option(min=0, help="Send every record above this id (again)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="ISO date/time (UTC): send from the first record at or after it."),
    ] = None,
    skip: Annotated[
        bool, typer.Option("--skip", help="Allow moving forward past undelivered records.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Move an export's cursor: its next cycle sends the records from there (consumers drop
    duplicates by record_id). Give --after-record-id or --since."""
    from sluicegate.cli.exports import rewind_export

    if (after_record_id is None) == (since is None):
        raise typer.BadParameter("give --after-record-id or --since (one of them)")
    when = None if since is None else _parse_time(since, 0.0)
    cfg = _load(config)
    with _reported(cfg):
        rewind_export(
            cfg, name, after_record_id=after_record_id, since=when, skip=skip, as_json=as_json
        )


@app.command(cls=_Command)
def backends(
    config: ConfigOpt = Path("gateway.yaml"),
    url: Annotated[
        str | None, typer.Option(help="A running gateway (e.g. http://127.0.0.1:8080).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each deployment's backend pool with its live state: circuit (closed, open until …,
    half-open), headroom, in-flight requests (see docs/routing.md)."""
    from sluicegate.cli.tables import print_backends
    from sluicegate.routing.overview import collect

    cfg = _load(config)
    try:
        rows, note = collect(cfg, url)
    except Exception as exc:  # unreachable gateway or Redis: say so, no traceback
        typer.echo(f"error: cannot read the live state: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"source": note, "items": [r.as_dict() for r in rows]}, indent=2))
    else:
        print_backends(rows, note)


@app.command(cls=_Command)
def simulate(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Simulator YAML.")] = None,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8081,
) -> None:
    """Run the built-in Azure OpenAI simulator."""
    from sluicegate.simulator.cli import simulate as run

    raise typer.Exit(run(config, host, port))


@app.command(cls=_Command)
def demo(
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    sim_port: Annotated[int, typer.Option(min=1, max=65535)] = 8081,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its files.")] = Path(
        "var/demo"
    ),
) -> None:
    """Start the simulator and the gateway, create a demo key and print working examples."""
    from sluicegate.cli.demo import run_demo

    with _reported():
        code = run_demo(port=port, sim_port=sim_port, workdir=workdir)
    raise typer.Exit(code)


def run() -> None:
    app()


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return its exit status,
    behaving exactly as the installed ``sluicegate`` script: usage errors are printed as
    such (status 2), Ctrl-C is status 130. ``python -m sluicegate.cli.main`` (how ``demo``
    starts its children) comes here."""
    try:
        # Standalone mode, as the script runs: click reports its own exceptions (a bad
        # option, a missing one) and ends with SystemExit, whose code is returned here.
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
