"""The admin API's OpenAPI 3.1 document, built from its operation table and pydantic models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from sluicegate.admin import schemas

_REF = "#/components/schemas/{model}"


def param(
    name: str,
    where: str,
    schema: dict[str, Any],
    description: str = "",
    *,
    required: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": where, "required": required, "schema": schema}
    if description:
        out["description"] = description
    return out


@dataclass(frozen=True)
class Operation:
    """One route of the API: what it takes and answers, and its handler."""

    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    response: type[BaseModel] | None
    params: list[dict[str, Any]] = field(default_factory=list)
    body: type[BaseModel] | None = None
    #: Must a body be sent? (Otherwise an empty body means ``{}``.)
    body_required: bool = False
    status: int = 200
    errors: tuple[int, ...] = ()
    media_type: str = "application/json"

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.replace("_", " ").title().replace(" ", "")


_ERROR_TEXT = {
    401: "No valid admin credentials",
    403: "A valid Entra ID token of someone who is not an administrator",
    404: "Not found",
    409: "The subscription cannot change that way",
    422: "Invalid input",
    503: "The admin API is disabled (no admin token configured), or the identity provider's "
    "keys cannot be loaded",
}


def openapi_document(operations: list[Operation], prefix: str) -> dict[str, Any]:
    models: set[type[BaseModel]] = {schemas.Error}
    for op in operations:
        models.update(m for m in (op.response, op.body) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, defs = models_json_schema([(m, "validation") for m in ordered], ref_template=_REF)
    components = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        ok: dict[str, Any] = {"description": op.summary}
        if op.response is not None:
            ok["content"] = {
                op.media_type: {"schema": {"$ref": _REF.format(model=op.response.__name__)}}
            }
        else:
            ok["content"] = {op.media_type: {"schema": {"type": "string"}}}
        responses: dict[str, Any] = {str(op.status): ok}
        for status in (401, 403, 503, *op.errors):
            responses[str(status)] = {
                "description": _ERROR_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
            }
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "parameters": op.params,
            "responses": responses,
        }
        if op.body is not None:
            entry["requestBody"] = {
                "required": op.body_required,
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=op.body.__name__)}}
                },
            }
        paths.setdefault(prefix + op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sluicegate admin API",
            "version": "1",
            "description": "Subscriptions, usage and cost, forecasts and backend state. "
            "Every call needs 'Authorization: Bearer <admin token>', or an Entra ID access "
            "token of an administrator where admin.entra is configured.",
        },
        "servers": [{"url": "/"}],
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }
