"""Opening the admin service from the command line (same service layer as the admin API), and
reporting what goes wrong there as one line instead of a traceback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from sluicegate.admin.service import AdminError, AdminService
from sluicegate.config.model import GatewayConfig
from sluicegate.gateway import key_hasher_for
from sluicegate.storage.engine import create_engine_for, database_problem, first_line
from sluicegate.storage.migrations import migrate
from sluicegate.storage.subscriptions import SubscriptionRepository


class CommandFailed(Exception):
    """A command cannot go on for a reason its user can fix; ``reported_errors`` prints the
    message as ``error: <message>``."""


def open_admin(config: GatewayConfig, *, issues_keys: bool = True) -> AdminService:
    """The admin service on ``config``'s database, migrated to the newest schema first.

    Only a command that makes keys (``issues_keys``: creating a subscription, rotating a key)
    needs the key secret, to hash them; the others (listings, reports, forecasts, state
    changes) get a service without a hasher, so they run where the secret is not set.

    Raises SQLAlchemy's errors or ``OSError`` when the database cannot be reached or created,
    ``CommandFailed`` when ``issues_keys`` and the key secret is missing or unusable.
    """
    migrate(config.storage.url)
    engine = create_engine_for(config.storage.url)
    hasher = None
    if issues_keys:
        try:
            hasher = key_hasher_for(config, dict(os.environ))
        except (RuntimeError, ValueError) as exc:  # unset in cluster mode, or too short
            engine.dispose()
            raise CommandFailed(f"key secret: {exc}") from None
    return AdminService(config, SubscriptionRepository(engine), hasher, engine=engine)


@contextmanager
def reported_errors(config: GatewayConfig | None = None) -> Iterator[None]:
    """Run a command's body; end it with ``error: <one line>`` on stderr and exit status 1
    when it raises ``AdminError``, ``CommandFailed``, a database error (``SQLAlchemyError``)
    or ``OSError`` (a file or directory that cannot be created or opened).

    A database error names ``config``'s database (password hidden) and gives the first line
    of the driver's message only: SQLAlchemy's own text goes on with the statement and its
    parameters (key hashes among them), and a driver's second line may quote a stored value.
    Other exceptions (click's usage errors included) pass through unchanged.
    """
    try:
        yield
    except (AdminError, CommandFailed) as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        where = ""
        if config is not None:
            where = f" {make_url(config.storage.url).render_as_string(hide_password=True)}"
        _fail(f"database{where}: {database_problem(exc)}")
    except OSError as exc:
        _fail(first_line(str(exc)) or type(exc).__name__)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
