"""Fixtures for the token and hardening tests: a test identity provider and a simulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import simulator  # noqa: F401  (fixture)
from tests.support.idp import TestIdentityProvider


@pytest.fixture
def idp() -> Iterator[TestIdentityProvider]:
    with TestIdentityProvider() as provider:
        yield provider
