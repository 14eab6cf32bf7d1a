"""The admin API against its own OpenAPI document: schemathesis generates requests for every
operation from the document and a live gateway on loopback must answer each one without a
server error, with a documented status code, content type and response schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.admin.harness import ADMIN_TOKEN, AdminHarness, admin_gateway

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
#: schemathesis leaves an operation's type parameters (parameters, schema) to the spec.
Operation = schemathesis.APIOperation[Any, Any, Any, Any]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminHarness]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    with admin_gateway(
        tmp, prices=[{"deployment": "gpt-4o-mini", "input": 0.15, "output": 0.6}]
    ) as h:
        _, key = h.create("team-a", "seed")
        for i in range(3):
            assert h.chat(key, "gpt-4o-mini", f"seed traffic {i}") == 200
        h.records(3)
        yield h


@pytest.fixture(scope="module")
def admin_schema(live: AdminHarness) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live.url}/admin/api/openapi.json", headers=AUTH)


def test_admin_api_conforms_to_its_openapi_document(
    admin_schema: schemathesis.BaseSchema,
) -> None:
    # schemathesis's own pytest plugin does not run under this pytest version, so each
    # operation gets a hypothesis test of its own here.
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations: list[Operation] = []
    for result in admin_schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # every operation of the document loads
        operations.append(result.ok())
    # 20 + GET /budgets + GET /exports + POST rewind + POST approve and reject
    assert len(operations) == 25
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case: schemathesis.Case[Operation]) -> None:
            case.call_and_validate(headers=AUTH, checks=checks)

        run()
