"""Shared pieces of the admin Entra ID tests: the admin app registration, its admin group and
role, the ``admin`` configuration section, and reading the auth failure metric."""

from __future__ import annotations

from typing import Any

from tests.admin.harness import ADMIN_TOKEN_ENV
from tests.support.idp import TestIdentityProvider

ADMIN_APP = "5f0c8a2e-0000-4000-8000-00000000ad01"  # the admin app registration (client id)
ADMIN_GROUP = "a1a1a1a1-0000-4000-8000-000000000001"
ADMIN_ROLE = "Gateway.Admin"


def admin_section(idp: TestIdentityProvider, **overrides: Any) -> dict[str, Any]:
    """``admin:`` with the admin token and ``entra`` trusting ``idp`` (``overrides`` go into
    ``entra``)."""
    entra: dict[str, Any] = {
        "discovery_url": idp.discovery_url,
        "client_id": ADMIN_APP,
        "groups": [ADMIN_GROUP],
        "roles": [ADMIN_ROLE],
    }
    entra.update(overrides)
    return {"token_env": ADMIN_TOKEN_ENV, "entra": entra}


def metric(text: str, reason: str) -> float:
    """``sluicegate_auth_failures_total{reason}`` in a /metrics text (0 when absent)."""
    prefix = f'sluicegate_auth_failures_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0
