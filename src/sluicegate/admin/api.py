"""The admin REST API (Starlette), mounted at ``/admin/api``.

Every call needs ``Authorization: Bearer <admin token>`` or, with ``admin.entra``, an Entra
ID access token of an administrator (see ``admin.access``), also the OpenAPI document at
``/admin/api/openapi.json``. Every handler parses and checks its input, runs one
``AdminService`` operation in a worker thread (they block on the database) and answers
through a model of ``admin.schemas``. Errors are ``{"error": {"code", "message"}}``: 401
without valid credentials, 403 for a valid token of someone who is not an administrator, 404
for an unknown subscription or path, 408 for a request body that does not arrive within
``security.body_read_timeout_seconds``, 409 for a change the subscription's state does not
allow (a cancelled subscription takes none; ``auth.subscriptions.TRANSITIONS``),
413 for a request body over ``BODY_LIMIT`` (or ``security.max_body_bytes``, if smaller), 422
for invalid input, 503 when the admin API is disabled (or the IdP's keys are unavailable).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio.to_thread
import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from sluicegate.accounting.chargeback import DIMENSIONS, OTHER, ChargeReport
from sluicegate.accounting.forecast import Projection
from sluicegate.accounting.periods import month_start
from sluicegate.admin import schemas
from sluicegate.admin.access import AdminAccess, AdminDenied
from sluicegate.admin.openapi import Operation, openapi_document, param
from sluicegate.admin.service import (
    AdminError,
    AdminService,
    money,
    report_csv,
    report_rows,
    subscription_view,
    validation_message,
)
from sluicegate.auth.subscriptions import TRANSITIONS, SubscriptionState
from sluicegate.storage.engine import database_busy, database_unreachable

log = logging.getLogger("sluicegate.admin")

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]
_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
#: The largest admin API request body read. The largest request is a subscription to create
#: (three texts of at most 200 characters and the overrides, a handful of limit fields): a
#: few KiB even with every character escaped.
BODY_LIMIT = 1024 * 1024
#: The times ``Query.time`` accepts: 1970 to 9999-01-01T00:00:00Z. Reports widen ranges to
#: whole hours and months, and the next month of December 9999 is past what ``datetime``
#: holds: later times would fail there (a 500) instead of being refused.
MIN_TIME = 0.0
MAX_TIME = 253_370_764_800.0
#: Headers of a 408 answer: the rest of the late body is never read, so the connection must
#: not carry another request (a slow sender would otherwise keep it open).
BODY_TIMEOUT_HEADERS = {"Connection": "close"}


#: On every answer: they hold new keys and usage data, which no cache (a proxy's, the
#: browser's) may keep.
_NO_STORE = {"Cache-Control": "no-store"}


def json_response(model: BaseModel | dict[str, Any], status: int = 200) -> Response:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return Response(orjson.dumps(data), status, _NO_STORE, media_type="application/json")


def error_response(status: int, message: str, code: str | None = None) -> Response:
    codes = {
        400: "InvalidRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        405: "MethodNotAllowed",
        408: "RequestTimeout",
        409: "Conflict",
        413: "RequestEntityTooLarge",
        422: "InvalidRequest",
        503: "Unavailable",
    }
    body = {"error": {"code": code or codes.get(status, str(status)), "message": message}}
    headers = dict(_NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sluicegate-admin"'
    if status == 408:
        headers.update(BODY_TIMEOUT_HEADERS)
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The request body, read with a hard cap: at most ``limit`` bytes, complete within
    ``seconds`` of the start of the read.

    Raises ``AdminError``: 413 when ``Content-Length`` declares more than ``limit`` (nothing
    is read) or as soon as the bytes read pass it (the rest is never read or kept); 408 when
    the body is late; 400 when the client goes away before the body's end. Never holds more
    than ``limit`` bytes plus one network read.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds), aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
    except TimeoutError:
        raise AdminError(
            408,
            f"the request body did not arrive within {seconds:g} seconds; send it promptly",
        ) from None
    except ClientDisconnect:
        raise AdminError(400, "the client went away before the end of the request body") from None
    return b"".join(parts)


def _too_large(limit: int) -> AdminError:
    return AdminError(413, f"the request body is larger than the {limit} bytes accepted here")


def denied_response(exc: AdminDenied) -> Response:
    """A refused admin request; token refusals say so in ``WWW-Authenticate`` (RFC 6750)."""
    response = error_response(exc.status, exc.message, exc.code)
    if exc.status == 401 and exc.code != "Unauthorized":
        response.headers["WWW-Authenticate"] = (
            'Bearer realm="sluicegate-admin", error="invalid_token"'
        )
    elif exc.status == 403:
        response.headers["WWW-Authenticate"] = (
            'Bearer realm="sluicegate-admin", error="insufficient_scope"'
        )
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(int(exc.retry_after))
    return response


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else ""


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking service call in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


class Query:
    """Typed access to query parameters; every problem is an ``AdminError(422)``."""

    def __init__(self, request: Request) -> None:
        self._q = request.query_params

    def text(self, name: str, choices: tuple[str, ...] | None = None) -> str | None:
        value = self._q.get(name)
        if value is None or value == "":
            return None
        if len(value) > 200 or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise AdminError(422, f"'{name}' must be printable text of at most 200 characters")
        if choices is not None and value not in choices:
            raise AdminError(422, f"'{name}' must be one of {', '.join(choices)}")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self._q.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise AdminError(422, f"'{name}' must be an integer") from None
        if not lo <= value <= hi:
            raise AdminError(422, f"'{name}' must be between {lo} and {hi}")
        return value

    def time(self, name: str, default: float) -> float:
        """An ISO 8601 date or date-time (UTC unless it says otherwise), or epoch seconds,
        from ``MIN_TIME`` (1970) to ``MAX_TIME`` (9999-01-01T00:00:00Z) inclusive; the
        default is returned as it is."""
        raw = self._q.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw) if raw.replace(".", "", 1).isdigit() else _iso(raw)
        except (ValueError, OverflowError):
            raise AdminError(
                422, f"'{name}' must be an ISO 8601 date/date-time or epoch seconds"
            ) from None
        if not MIN_TIME <= value <= MAX_TIME:  # also refuses inf (a long run of digits)
            raise AdminError(
                422, f"'{name}' must be from 1970-01-01 up to 9999-01-01T00:00:00Z (UTC)"
            )
        return value


def _iso(raw: str) -> float:
    dt = datetime.fromisoformat(raw)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def subscription_model(sub: Any) -> schemas.Subscription:
    return schemas.Subscription.model_validate(subscription_view(sub))


def _subscription_id(request: Request) -> str:
    value = str(request.path_params["subscription_id"])
    if len(value) > 64 or not all(ch.isalnum() or ch in "_.:-" for ch in value):
        raise AdminError(404, f"no subscription {value[:64]!r}")
    return value


def _projection(p: Projection) -> schemas.Projection:
    return schemas.Projection(
        key=p.key,
        mtd_tokens=p.mtd_tokens,
        mtd_cost=money(p.mtd_cost_nanos),
        projected_tokens=p.projected_tokens,
        projected_cost=money(p.projected_cost_nanos),
        method=p.method,
        daily_tokens=list(p.daily),
    )


def report_model(report: ChargeReport, offset: int, limit: int) -> schemas.Report:
    rows = [schemas.ReportRow.model_validate(_no_currency(r)) for r in report_rows(report)]
    return schemas.Report(
        start=report.start,
        end=report.end,
        note=report.note or None,
        by=report.by,
        currency=report.currency,
        total_rows=len(rows) - 1,
        offset=offset,
        limit=limit,
        rows=rows[:-1][offset : offset + limit],
        total=rows[-1],
        ptu=[
            schemas.PtuCharge(label=i.label, start=i.start, end=i.end, cost=money(i.cost_nanos))
            for i in report.ptu
        ],
    )


def _no_currency(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "currency"}


#: The wait a 503 for a busy or unreachable database asks for (SQLite's busy timeout).
RETRY_AFTER_BUSY_SECONDS = 5


class AdminApi:
    """The handlers, bound to one service and one set of credentials."""

    def __init__(self, service: AdminService, access: AdminAccess) -> None:
        self.service = service
        self.access = access
        self.operations = self._operations()

    # -- plumbing ----------------------------------------------------------------------------

    def guarded(self, handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                caller = await self.access.authorize(
                    request.headers.get("authorization"), client_address(request)
                )
            except AdminDenied as exc:
                return denied_response(exc)
            try:
                response = await handler(request)
            except AdminError as exc:
                response = error_response(exc.status, exc.message)
            except Exception as exc:
                if database_busy(exc) or database_unreachable(exc):
                    # Passes by itself (SQLite's write lock held past the busy timeout, the
                    # server restarting): "retry", not a failure of the admin API.
                    log.warning(
                        "admin API: %s %s: the database is busy or unreachable (%s)",
                        request.method,
                        request.url.path,
                        type(exc).__name__,
                    )
                    response = error_response(
                        503, "the database is busy or unreachable; retry shortly", "DatabaseBusy"
                    )
                    response.headers["Retry-After"] = str(RETRY_AFTER_BUSY_SECONDS)
                else:
                    log.exception("admin API: %s %s failed", request.method, request.url.path)
                    response = error_response(
                        500, "the admin API failed; see the gateway's log", "InternalError"
                    )
            if request.method != "GET":
                # An audit trail of changes: who (the admin token, or the Entra ID caller),
                # what, and how it ended. Never a credential: paths hold ids only.
                log.info(
                    "admin API: %s %s by %s: %d",
                    request.method,
                    request.url.path,
                    caller.name or caller.method,
                    response.status_code,
                    extra={"admin": caller.name or caller.method, "status": response.status_code},
                )
            return response

        return endpoint

    def app(self) -> Starlette:
        routes = [
            Route(op.path, self.guarded(op.handler), methods=[op.method.upper()])
            for op in self.operations
        ]
        routes.append(Route("/openapi.json", self.guarded(self.openapi), methods=["GET"]))

        async def not_found(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            if status in (404, 405):
                # Unknown paths are refused like known ones to strangers, not revealed.
                try:
                    await self.access.authorize(
                        request.headers.get("authorization"), client_address(request)
                    )
                except AdminDenied as denied:
                    return denied_response(denied)
            return error_response(status, "no such admin API operation")

        return Starlette(routes=routes, exception_handlers={HTTPException: not_found})

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document(self.operations, "/admin/api"))

    async def _body(
        self, request: Request, model: type[BaseModel], *, required: bool = False
    ) -> Any:
        """The request body as ``model``; an empty body is ``{}`` unless ``required``."""
        security = self.service.config.security
        limit = min(BODY_LIMIT, security.max_body_bytes)
        raw = await read_body(request, limit, security.body_read_timeout_seconds)
        if required and not raw.strip():
            raise AdminError(422, "body: a JSON object is required")
        try:
            data = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise AdminError(422, "the body must be JSON") from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise AdminError(422, validation_message(exc)) from None

    def _range(self, q: Query) -> tuple[float, float]:
        now = self.service.clock.now()
        return q.time("from", float(month_start(now))), q.time("to", now)

    # -- handlers ----------------------------------------------------------------------------

    async def products(self, request: Request) -> Response:
        items = [schemas.Product.model_validate(p) for p in self.service.products()]
        return json_response(schemas.ProductList(items=items))

    async def list_subscriptions(self, request: Request) -> Response:
        q = Query(request)
        offset, limit = q.integer("offset", 0, 0, 10_000_000), q.integer("limit", 50, 1, 1000)
        subs, total = await run(
            self.service.list,
            offset=offset,
            limit=limit,
            search=q.text("search"),
            product=q.text("product"),
            state=q.text("state", tuple(SubscriptionState)),
        )
        items = [subscription_model(s) for s in subs]
        return json_response(
            schemas.SubscriptionPage(total=total, offset=offset, limit=limit, items=items)
        )

    async def create_subscription(self, request: Request) -> Response:
        body = await self._body(request, schemas.SubscriptionCreate)
        overrides = body.overrides
        issued = await run(
            self.service.create_subscription,
            product=body.product,
            owner=body.owner,
            name=body.name,
            expires_at=body.expires_at,
            overrides=None if overrides is None else overrides.model_dump(exclude_unset=True),
            state=body.state,
            state_comment=body.state_comment,
        )
        assert issued.primary_key is not None and issued.secondary_key is not None
        out = schemas.IssuedSubscription(
            subscription=subscription_model(issued.subscription),
            primary_key=issued.primary_key,
            secondary_key=issued.secondary_key,
        )
        return json_response(out, 201)

    async def get_subscription(self, request: Request) -> Response:
        sub = await run(self.service.get, _subscription_id(request))
        return json_response(subscription_model(sub))

    def _state_change(self, action: str) -> Handler:
        async def handler(request: Request) -> Response:
            sub_id = _subscription_id(request)
            body = await self._body(request, schemas.StateChange)
            sub = await run(self.service.change_state, sub_id, action, body.state_comment)
            return json_response(subscription_model(sub))

        handler.__name__ = action
        return handler

    async def rotate(self, request: Request) -> Response:
        sub_id = _subscription_id(request)
        body = await self._body(request, schemas.RotateRequest)
        issued = await run(self.service.rotate, sub_id, body.slot)
        key = issued.primary_key or issued.secondary_key
        assert key is not None
        return json_response(
            schemas.RotatedKey(
                subscription=subscription_model(issued.subscription), slot=body.slot, key=key
            )
        )

    async def set_overrides(self, request: Request) -> Response:
        sub_id = _subscription_id(request)
        body = await self._body(request, schemas.Overrides, required=True)
        sub = await run(self.service.set_overrides, sub_id, body.model_dump(exclude_unset=True))
        return json_response(subscription_model(sub))

    async def usage(self, request: Request) -> Response:
        q = Query(request)
        start, end = self._range(q)
        offset, limit = q.integer("offset", 0, 0, 10_000_000), q.integer("limit", 100, 1, 1000)
        report = await run(
            self.service.usage_report,
            start=start,
            end=end,
            by=q.text("by", DIMENSIONS) or "subscription",
            subscription_id=q.text("subscription_id"),
        )
        return json_response(report_model(report, offset, limit))

    async def usage_csv(self, request: Request) -> Response:
        q = Query(request)
        start, end = self._range(q)
        report = await run(
            self.service.usage_report,
            start=start,
            end=end,
            by=q.text("by", DIMENSIONS) or "subscription",
            subscription_id=q.text("subscription_id"),
        )
        return csv_response(report)

    async def series(self, request: Request) -> Response:
        q = Query(request)
        start, end = self._range(q)
        granularity = q.text("granularity", ("hour", "day", "month")) or "day"
        s = await run(
            self.service.usage_series,
            start=start,
            end=end,
            granularity=granularity,
            by=q.text("by", DIMENSIONS) or "subscription",
            top=q.integer("top", 8, 1, 50),
            subscription_id=q.text("subscription_id"),
        )
        lines = [
            schemas.SeriesLine(
                key=key,
                requests=s.values[key]["requests"],
                prompt_tokens=s.values[key]["prompt_tokens"],
                completion_tokens=s.values[key]["completion_tokens"],
                total_tokens=s.values[key]["total_tokens"],
                cost=[money(v) for v in s.values[key]["cost_nanos"]],
            )
            for key in s.keys
        ]
        return json_response(
            schemas.Series(
                start=s.start,
                end=s.end,
                note=s.note or None,
                granularity=s.granularity,  # type: ignore[arg-type]
                by=s.by,
                currency=s.currency,
                buckets=[float(b) for b in s.buckets],
                series=lines,
            )
        )

    async def records(self, request: Request) -> Response:
        q = Query(request)
        offset, limit = q.integer("offset", 0, 0, 10_000_000), q.integer("limit", 100, 1, 1000)
        rows = await run(
            self.service.records,
            start=q.time("from", 0.0) or None,
            end=q.time("to", 0.0) or None,
            subscription_id=q.text("subscription_id"),
            offset=offset,
            limit=limit,
        )
        items = [
            schemas.UsageRecord(
                request_id=r.request_id,
                attempt=r.attempt,
                ts=r.ts,
                subscription_id=r.subscription_id,
                owner=r.owner,
                product=r.product,
                deployment=r.deployment,
                backend=r.backend,
                operation=r.operation,
                status=r.status,
                outcome=str(r.outcome),
                model=r.model,
                prompt_tokens=r.prompt_tokens,
                cached_tokens=r.cached_tokens,
                completion_tokens=r.completion_tokens,
                total_tokens=r.total_tokens,
                streamed=r.streamed,
                usage_estimated=r.usage_estimated,
                ttfb_ms=r.ttfb_ms,
                duration_ms=r.duration_ms,
                cost=None if cost is None else money(cost),
            )
            for r, cost in rows
        ]
        return json_response(
            schemas.RecordPage(
                offset=offset, limit=limit, currency=self.service.prices.currency, items=items
            )
        )

    async def forecast(self, request: Request) -> Response:
        q = Query(request)
        offset, limit = q.integer("offset", 0, 0, 10_000_000), q.integer("limit", 50, 1, 1000)
        items, total, count = await run(
            self.service.forecast,
            offset=offset,
            limit=limit,
            subscription_id=q.text("subscription_id"),
        )
        now = self.service.clock.now()
        from sluicegate.accounting.periods import month_bounds

        m0, m1 = month_bounds(now)
        return json_response(
            schemas.Forecast(
                now=now,
                month_start=m0,
                month_end=m1,
                currency=self.service.prices.currency,
                total_rows=count,
                offset=offset,
                limit=limit,
                items=[_projection(p) for p in items],
                total=_projection(total),
            )
        )

    async def break_even(self, request: Request) -> Response:
        rows = await run(self.service.break_even)
        items = [
            schemas.BreakEven(
                deployment=b.deployment,
                backend=b.backend,
                on_ptu=b.on_ptu,
                mtd_prompt_tokens=b.mtd_prompt_tokens,
                mtd_completion_tokens=b.mtd_completion_tokens,
                projected_tokens=b.projected_tokens,
                peak_tokens_per_minute=b.peak_tokens_per_minute,
                paygo_monthly_cost=None
                if b.paygo_monthly_nanos is None
                else money(b.paygo_monthly_nanos),
                ptu_monthly_cost=None
                if b.ptu_monthly_nanos is None
                else money(b.ptu_monthly_nanos),
                ptu_units=b.ptu_units,
                break_even_tokens=b.break_even_tokens,
                cheaper=b.cheaper,  # type: ignore[arg-type]
                note=b.note,
            )
            for b in rows
        ]
        return json_response(
            schemas.BreakEvenList(currency=self.service.prices.currency, items=items)
        )

    async def prices(self, request: Request) -> Response:
        return json_response(schemas.Prices.model_validate(self.service.prices_view()))

    async def backends(self, request: Request) -> Response:
        items = [schemas.Backend.model_validate(b) for b in self.service.backends()]
        return json_response(schemas.BackendList(items=items))

    async def budgets(self, request: Request) -> Response:
        q = Query(request)
        items = await run(self.service.budgets, q.text("subscription_id"))
        return json_response(
            schemas.BudgetList(items=[schemas.Budget.model_validate(b.as_dict()) for b in items])
        )

    async def ledger(self, request: Request) -> Response:
        return json_response(schemas.Ledger.model_validate(await run(self.service.ledger)))

    async def refresh(self, request: Request) -> Response:
        r = await run(self.service.refresh_rollups)
        return json_response(schemas.RollupRun(**_run_fields(r)))

    async def rebuild(self, request: Request) -> Response:
        q = Query(request)
        start, end = self._range(q)
        r = await run(self.service.rebuild_rollups, start, end)
        return json_response(schemas.RollupRun(**_run_fields(r)))

    async def exports(self, request: Request) -> Response:
        items = [schemas.Export.model_validate(e) for e in await run(self.service.exports)]
        return json_response(schemas.ExportList(items=items))

    async def rewind_export(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        if len(name) > 100 or not all(ch.isalnum() or ch in "_.-" for ch in name):
            raise AdminError(404, f"no export {name[:100]!r}")
        body: schemas.ExportRewind = await self._body(request, schemas.ExportRewind, required=True)
        since = None
        if body.since is not None:
            try:
                since = _iso(body.since)
            except (ValueError, OverflowError):
                raise AdminError(422, "since: must be an ISO 8601 date or date-time") from None
            if not MIN_TIME <= since <= MAX_TIME:
                raise AdminError(422, "since: must be from 1970-01-01 up to 9999-01-01")
        moved = await run(
            self.service.rewind_export,
            name,
            after_record_id=body.after_record_id,
            since=since,
            skip=body.skip,
        )
        return json_response(schemas.ExportRewound.model_validate(moved))

    # -- the operation table (drives both the routes and the OpenAPI document) ---------------

    def _operations(self) -> list[Operation]:
        sid = param(
            "subscription_id", "path", {"type": "string", "pattern": _ID_PATTERN}, required=True
        )
        page = [
            param("offset", "query", {"type": "integer", "minimum": 0, "maximum": 10_000_000}),
            param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
        ]
        text = {"type": "string", "maxLength": 200, "pattern": r"^[^\x00-\x1f\x7f]*$"}
        when = {
            "type": "string",
            "description": "ISO 8601 date or date-time (UTC if no offset) or epoch seconds, "
            "from 1970-01-01 up to 9999-01-01T00:00:00Z",
            "format": "date-time",
        }
        rng = [
            param("from", "query", when, "default: the first of this month (UTC)"),
            param("to", "query", when, "default: now"),
        ]
        by = param("by", "query", {"type": "string", "enum": list(DIMENSIONS)})
        only = param("subscription_id", "query", text)
        sub = schemas.Subscription
        ops = [
            Operation("get", "/products", self.products, "List products", schemas.ProductList),
            Operation(
                "get",
                "/subscriptions",
                self.list_subscriptions,
                "List subscriptions (paged, with search)",
                schemas.SubscriptionPage,
                [
                    *page,
                    param("search", "query", text, "substring of id, name or owner"),
                    param("product", "query", text),
                    param("state", "query", {"type": "string", "enum": list(SubscriptionState)}),
                ],
            ),
            Operation(
                "post",
                "/subscriptions",
                self.create_subscription,
                "Create a subscription; its keys are shown only in this answer",
                schemas.IssuedSubscription,
                body=schemas.SubscriptionCreate,
                body_required=True,
                status=201,
                errors=(408, 413, 422),
            ),
            Operation(
                "get",
                "/subscriptions/{subscription_id}",
                self.get_subscription,
                "Show a subscription",
                sub,
                [sid],
                errors=(404,),
            ),
        ]
        for action, transition in TRANSITIONS.items():
            sources = ", ".join(sorted(s.value for s in transition.sources))
            ops.append(
                Operation(
                    "post",
                    f"/subscriptions/{{subscription_id}}/{action}",
                    self._state_change(action),
                    f"{action.capitalize()} a subscription: to {transition.target.value}, "
                    f"from {sources} (else 409)",
                    sub,
                    [sid],
                    body=schemas.StateChange,
                    errors=(404, 408, 409, 413, 422),
                )
            )
        ops += [
            Operation(
                "post",
                "/subscriptions/{subscription_id}/rotate",
                self.rotate,
                "Replace one key; the new value is shown only in this answer",
                schemas.RotatedKey,
                [sid],
                body=schemas.RotateRequest,
                errors=(404, 408, 409, 413, 422),
            ),
            Operation(
                "put",
                "/subscriptions/{subscription_id}/overrides",
                self.set_overrides,
                "Replace a subscription's overrides (its limits over the product's); running "
                "gateways apply them within a second",
                sub,
                [sid],
                body=schemas.Overrides,
                body_required=True,
                errors=(404, 408, 409, 413, 422),
            ),
            Operation(
                "get",
                "/usage",
                self.usage,
                "Charge-back: tokens and cost per group",
                schemas.Report,
                [*rng, by, only, *page],
                errors=(422,),
            ),
            Operation(
                "get",
                "/usage.csv",
                self.usage_csv,
                "Charge-back report as CSV",
                None,
                [*rng, by, only],
                errors=(422,),
                media_type="text/csv",
            ),
            Operation(
                "get",
                "/usage/series",
                self.series,
                "Tokens and cost per hour/day/month for the top groups",
                schemas.Series,
                [
                    *rng,
                    by,
                    only,
                    param(
                        "granularity", "query", {"type": "string", "enum": ["hour", "day", "month"]}
                    ),
                    param("top", "query", {"type": "integer", "minimum": 1, "maximum": 50}),
                ],
                errors=(422,),
            ),
            Operation(
                "get",
                "/records",
                self.records,
                "Raw usage records with their cost",
                schemas.RecordPage,
                [*rng, only, *page],
                errors=(422,),
            ),
            Operation(
                "get",
                "/forecast",
                self.forecast,
                "Projected month-end tokens and cost per subscription",
                schemas.Forecast,
                [only, *page],
                errors=(422,),
            ),
            Operation(
                "get",
                "/forecast/deployments",
                self.break_even,
                "PTU against pay-as-you-go per deployment",
                schemas.BreakEvenList,
            ),
            Operation("get", "/prices", self.prices, "The price table", schemas.Prices),
            Operation("get", "/backends", self.backends, "Backend state", schemas.BackendList),
            Operation(
                "get",
                "/budgets",
                self.budgets,
                "Budgets and what each subscription spent in the current period",
                schemas.BudgetList,
                [only],
                errors=(404, 422),
            ),
            Operation("get", "/ledger", self.ledger, "Ledger and rollup state", schemas.Ledger),
            Operation(
                "get",
                "/exports",
                self.exports,
                "Usage exports and where each cursor stands",
                schemas.ExportList,
            ),
            Operation(
                "post",
                "/exports/{name}/rewind",
                self.rewind_export,
                "Move an export's cursor: its next cycle sends the records from there (a "
                "forward move past undelivered records needs skip)",
                schemas.ExportRewound,
                [
                    param(
                        "name",
                        "path",
                        {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,100}$"},
                        required=True,
                    )
                ],
                body=schemas.ExportRewind,
                body_required=True,
                errors=(404, 408, 409, 413, 422),
            ),
            Operation(
                "post",
                "/rollups/refresh",
                self.refresh,
                "Bring the rollups up to date now",
                schemas.RollupRun,
            ),
            Operation(
                "post",
                "/rollups/rebuild",
                self.rebuild,
                "Recompute and re-price the rollups of a range (raw records still kept)",
                schemas.RollupRun,
                rng,
                errors=(422,),
            ),
        ]
        return ops


def _run_fields(run_: Any) -> dict[str, Any]:
    return {
        "hours": run_.hours,
        "days": run_.days,
        "last_record_id": run_.last_record_id,
        "seconds": run_.seconds,
    }


def csv_response(report: ChargeReport) -> Response:
    name = f"usage-by-{report.by}-{datetime.fromtimestamp(report.start, UTC):%Y%m%d%H}.csv"
    return Response(
        report_csv(report),
        media_type="text/csv; charset=utf-8",
        headers={**_NO_STORE, "Content-Disposition": f'attachment; filename="{name}"'},
    )


__all__ = [
    "OTHER",
    "AdminApi",
    "csv_response",
    "error_response",
    "json_response",
    "read_body",
    "run",
]
