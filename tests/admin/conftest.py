"""Fixtures for the admin API's tests."""

from tests.integration.conftest import simulator  # noqa: F401  (fixture)
