"""Opening the admin service from the command line (same service layer as the admin API)."""

from __future__ import annotations

import os

from sluicegate.admin.service import AdminService
from sluicegate.config.model import GatewayConfig
from sluicegate.gateway import key_hasher_for
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.subscriptions import SubscriptionRepository


def open_admin(config: GatewayConfig) -> AdminService:
    migrate(config.storage.url)
    engine = create_engine_for(config.storage.url)
    return AdminService(
        config,
        SubscriptionRepository(engine),
        key_hasher_for(config, dict(os.environ)),
        engine=engine,
    )
