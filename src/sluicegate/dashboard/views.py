"""The dashboard: server-rendered pages over ``AdminService``, at ``/dashboard``.

Access needs the admin token, entered once on the login page, or (with ``admin.entra``) an
Entra ID sign-in of an administrator (``admin.signin``: a plain link starts the authorization
code flow, ``/dashboard/auth/callback`` finishes it). Either way the answer is a session cookie
(HttpOnly, SameSite=Strict, Path=/dashboard, signed; see ``admin.auth``) and the token never
appears in a URL. Every cookie the dashboard sets is ``Secure`` when the request came over
https or a configured ``redirect_uri`` is https (``Dashboard.cookie_secure``). Every form that
changes something, signing out included, carries a CSRF token derived from the session. Form
bodies are read up to ``FORM_LIMIT`` bytes (413 past it, at once: the rest is never read) and
within ``security.body_read_timeout_seconds`` (408). Pages are rendered with Jinja2
(autoescaping), charts are SVG drawn here, and the only script is ``static/app.js`` (copy
buttons, confirmations, auto-submitting selectors); a Content-Security-Policy allows nothing
else.
"""

from __future__ import annotations

import logging
import math
import time
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sluicegate.accounting.periods import DAY, floor_day, floor_hour, month_bounds
from sluicegate.accounting.pricing import format_money, nanos_to_decimal
from sluicegate.admin.access import AdminAccess, AdminFailure
from sluicegate.admin.api import (
    BODY_TIMEOUT_HEADERS,
    Query,
    client_address,
    csv_response,
    read_body,
    run,
)
from sluicegate.admin.auth import COOKIE_NAME, SESSION_SECONDS, AdminAuth
from sluicegate.admin.schemas import text_problem
from sluicegate.admin.service import AdminError, AdminService, subscription_view
from sluicegate.admin.signin import (
    CALLBACK_PATH,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    EntraSignIn,
    SignInError,
)
from sluicegate.auth.subscriptions import TRANSITIONS, SubscriptionState
from sluicegate.dashboard import charts

log = logging.getLogger("sluicegate.admin")

PAGE_SIZE = 50
#: The largest form body read (the dashboard's forms are a few short fields). Applies before
#: sign-in too (the login form): nobody can make the gateway hold more than this per request.
FORM_LIMIT = 64 * 1024
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
PERIODS = {
    "24h": "Last 24 hours",
    "7d": "Last 7 days",
    "month": "This month",
    "30d": "Last 30 days",
    "last-month": "Last month",
}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sluicegate.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = lambda v: f"{int(v):,}"
    env.filters["short"] = charts.short_number
    env.filters["dt"] = lambda t: (
        "—" if t is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(t)))
    )
    env.filters["date"] = lambda t: time.strftime("%d %b %Y", time.gmtime(float(t)))
    return env


def money_text(nanos: int, currency: str, places: int = 2) -> str:
    """``$1,234.57`` (or ``1,234.57 CHF``); amounts that would show as zero keep two
    significant digits (``format_money``)."""
    text = format_money(nanos, places)
    symbol = _SYMBOLS.get(currency)
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def money_axis(value: float, top: float, currency: str) -> str:
    """An axis label with just enough decimals to tell the ticks apart."""
    places = 0 if top >= 4 else min(9, max(2, -math.floor(math.log10(top / 4)) + 1))
    symbol = _SYMBOLS.get(currency, "")
    return f"{symbol}{value:,.{places}f}"


def period_range(period: str, now: float) -> tuple[float, float, str]:
    """(start, end, granularity) of a named period."""
    if period == "24h":
        return floor_hour(now) - 23 * 3600, now, "hour"
    if period == "7d":
        return floor_day(now) - 6 * DAY, now, "day"
    if period == "30d":
        return floor_day(now) - 29 * DAY, now, "day"
    if period == "last-month":
        m0, _ = month_bounds(now)
        p0, _ = month_bounds(m0 - 1)
        return p0, m0, "day"
    m0, _ = month_bounds(now)
    return m0, now, "day" if now - m0 > 2 * DAY else "hour"


class Dashboard:
    def __init__(
        self,
        service: AdminService,
        access: AdminAccess,
        signin: EntraSignIn | None = None,
    ) -> None:
        self.service = service
        self.access = access
        self.auth: AdminAuth = access.auth
        self.signin = signin
        self.env = _env()
        self.env.globals["periods"] = PERIODS

    # -- plumbing ----------------------------------------------------------------------------

    def app(self) -> Starlette:
        guarded = [
            Route("/", self.guard(self.overview)),
            Route("/usage", self.guard(self.usage)),
            Route("/usage.csv", self.guard(self.usage_csv)),
            Route("/subscriptions", self.guard(self.subscriptions), methods=["GET", "POST"]),
            Route(
                "/subscriptions/{subscription_id}",
                self.guard(self.subscription),
                methods=["GET", "POST"],
            ),
            Route("/forecast", self.guard(self.forecast)),
            Route("/backends", self.guard(self.backends)),
        ]
        static = StaticFiles(packages=[("sluicegate.dashboard", "static")])
        return Starlette(
            routes=[
                Route("/login", self.login, methods=["GET", "POST"]),
                Route("/logout", self.guard(self.logout), methods=["POST"]),
                Route("/auth/start", self.signin_start, methods=["GET"]),
                Route("/auth/callback", self.signin_callback, methods=["GET"]),
                Mount("/static", static, name="static"),
                *guarded,
            ]
        )

    def _now(self) -> float:
        return self.service.clock.now()

    def guard(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            cookie = request.cookies.get(COOKIE_NAME)
            if not self.auth.check_session(cookie, self._now()):
                return RedirectResponse("/dashboard/login", 303)
            assert cookie is not None
            # Set before the CSRF check: the error page's own form (sign out) needs it.
            request.state.csrf = self.auth.csrf_token(cookie)
            form: dict[str, str] = {}
            try:
                if request.method == "POST":
                    form = await self._form(request)
                    if not self.auth.check_csrf(cookie, form.get("csrf")):
                        return self.render(
                            request,
                            "error.html",
                            {"message": "The form expired: reload the page."},
                            403,
                        )
                request.state.form = form
                response: Response = await handler(request)
            except AdminError as exc:
                return _closing_if_late(
                    self.render(request, "error.html", {"message": exc.message}, exc.status),
                    exc,
                )
            return response

        endpoint.__name__ = handler.__name__
        return endpoint

    def render(
        self, request: Request, template: str, context: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        ctx = {
            "request": request,
            "csrf": getattr(request.state, "csrf", ""),
            "path": request.url.path,
            "currency": self.service.prices.currency,
            "money": lambda n, places=2: money_text(int(n), self.service.prices.currency, places),
            **context,
        }
        html = self.env.get_template(template).render(ctx)
        return HTMLResponse(html, status, headers=_SECURITY_HEADERS)

    async def _form(self, request: Request) -> dict[str, str]:
        """The urlencoded form body (the dashboard sends no multipart forms), read with
        ``read_body``'s caps: ``AdminError`` 413/408/400 instead of an unbounded read."""
        security = self.service.config.security
        limit = min(FORM_LIMIT, security.max_body_bytes)
        raw = await read_body(request, limit, security.body_read_timeout_seconds)
        text = raw.decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}

    def cookie_secure(self, request: Request) -> bool:
        """Whether the dashboard's cookies get ``Secure`` (the one rule for all of them): the
        request came over https, or a configured ``redirect_uri`` is https. The latter means
        browsers reach the dashboard over https, through a TLS-terminating proxy in front,
        whatever the scheme of the request that reaches the gateway."""
        configured = self.signin.config_redirect_uri if self.signin is not None else None
        return request.url.scheme == "https" or bool(
            configured and configured.startswith("https://")
        )

    def _set_cookie(
        self,
        request: Request,
        response: Response,
        name: str,
        value: str | None,
        *,
        path: str,
        samesite: Literal["lax", "strict"],
        max_age: int = 0,
    ) -> None:
        """Set (or, with ``value`` None, delete) a dashboard cookie: HttpOnly, ``Secure`` as
        ``cookie_secure`` says."""
        secure = self.cookie_secure(request)
        if value is None:
            response.delete_cookie(name, path=path, secure=secure, httponly=True, samesite=samesite)
            return
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=path,
            httponly=True,
            samesite=samesite,
            secure=secure,
        )

    def _period(self, request: Request) -> tuple[str, float, float, str]:
        q = Query(request)
        now = self._now()
        period = q.text("period", tuple(PERIODS)) or "month"
        start, end, granularity = period_range(period, now)
        if request.query_params.get("from"):
            period = "custom"
            start = q.time("from", start)
            end = q.time("to", now)
            granularity = "hour" if end - start <= 3 * DAY else "day"
        return period, start, end, granularity

    # -- login -------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        error = "" if self.auth.enabled else self.auth.problem
        if request.method == "POST" and self.auth.enabled:
            try:
                form = await self._form(request)
            except AdminError as exc:
                return _closing_if_late(self._login_page(request, exc.message, exc.status), exc)
            if self.auth.check_token(form.get("token", "")):
                response = RedirectResponse("/dashboard/", 303)
                self._start_session(request, response)
                return response
            self.access.refused(
                AdminFailure.TOKEN_INVALID,
                401,
                client=client_address(request),
                surface="dashboard",
            )
            error = "That is not the admin token."
        return self._login_page(request, error, 401 if error else 200)

    def _login_page(self, request: Request, error: str, status: int) -> HTMLResponse:
        entra_problem = self.signin.entra.problem if self.signin is not None else ""
        return self.render(
            request,
            "login.html",
            {
                "error": error,
                "entra": self.signin is not None and self.auth.enabled and not entra_problem,
                "entra_problem": entra_problem,
            },
            status,
        )

    def _start_session(self, request: Request, response: Response) -> None:
        self._set_cookie(
            request,
            response,
            COOKIE_NAME,
            self.auth.new_session(self._now()),
            max_age=SESSION_SECONDS,
            path="/dashboard",
            samesite="strict",
        )

    async def logout(self, request: Request) -> Response:
        """Behind ``guard``: only a session's own form (its CSRF token) ends it; another
        site cannot sign an administrator out."""
        response = RedirectResponse("/dashboard/login", 303)
        self._set_cookie(request, response, COOKIE_NAME, None, path="/dashboard", samesite="strict")
        return response

    # -- Entra ID sign-in --------------------------------------------------------------------

    def _redirect_uri(self, request: Request) -> str:
        """The configured ``redirect_uri``, else this request's scheme and host (correct when
        the gateway is reached directly; behind a proxy, configure it)."""
        assert self.signin is not None
        configured = self.signin.config_redirect_uri
        if configured:
            return configured
        return f"{request.url.scheme}://{request.url.netloc}{CALLBACK_PATH}"

    async def signin_start(self, request: Request) -> Response:
        """A plain GET (a link, not a form: the CSP's ``form-action 'self'`` would stop a
        form whose answer redirects to the identity provider)."""
        if self.signin is None:
            return self._signin_error(request, 404, "Entra ID sign-in is not configured.")
        if not self.auth.enabled:
            return self._login_page(request, self.auth.problem, 503)
        if self.signin.entra.problem:
            return self._signin_error(request, 503, self.signin.entra.problem)
        redirect_uri = self._redirect_uri(request)
        try:
            url, pending = await self.signin.begin(redirect_uri)
        except SignInError as exc:
            return self._signin_error(request, exc.status, exc.message)
        response = RedirectResponse(url, 303)
        self._set_cookie(
            request,
            response,
            SIGNIN_COOKIE,
            pending,
            max_age=SIGNIN_SECONDS,
            path="/dashboard/auth",
            # Lax, not Strict: the callback is a navigation coming from the identity
            # provider's site, which does not carry Strict cookies.
            samesite="lax",
        )
        return response

    async def signin_callback(self, request: Request) -> Response:
        if self.signin is None:
            return self._signin_error(request, 404, "Entra ID sign-in is not configured.")
        if not self.auth.enabled:
            return self._login_page(request, self.auth.problem, 503)
        query = dict(request.query_params.items())
        try:
            token = await self.signin.finish(query, request.cookies.get(SIGNIN_COOKIE))
        except SignInError as exc:
            if exc.reason:
                self.access.refused(
                    exc.reason,
                    exc.status,
                    client=client_address(request),
                    surface="dashboard",
                    caller=exc.caller,
                )
            response = self._signin_error(request, exc.status, exc.message)
            self._set_cookie(
                request, response, SIGNIN_COOKIE, None, path="/dashboard/auth", samesite="lax"
            )
            return response
        log.info(
            "administrator signed in with Entra ID",
            extra={"caller": token.caller, "client": client_address(request)},
        )
        # A page that moves on by itself, not a redirect: the browser came here from the
        # identity provider's site, and a redirect would still be that cross-site navigation,
        # on which the SameSite=Strict session cookie is not sent.
        response = self.render(request, "signed_in.html", {})
        self._start_session(request, response)
        self._set_cookie(
            request, response, SIGNIN_COOKIE, None, path="/dashboard/auth", samesite="lax"
        )
        return response

    def _signin_error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "signin_error.html", {"message": message}, status)

    # -- pages -------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        period, start, end, granularity = self._period(request)
        by = Query(request).text("by", ("subscription", "product", "model", "deployment", "owner"))
        by = by or "subscription"
        report = await run(self.service.usage_report, start=start, end=end, by=by)
        series = await self._series(start=start, end=end, granularity=granularity, by=by)
        _, total_forecast, _ = await run(self.service.forecast, limit=1)
        names = await self._names(report.rows[:10] if by == "subscription" else [])
        labels = {k: names.get(k, k) for k in series.keys}
        token_chart = self._chart(series, "total_tokens", "tokens", labels, "tokens-chart")
        cost_chart = self._chart(
            series, "cost_nanos", self.service.prices.currency, labels, "cost-chart"
        )
        legend = [
            (charts.colour(i, k), labels.get(k, k), sum(series.values[k]["total_tokens"]))
            for i, k in enumerate(series.keys)
        ]
        return self.render(
            request,
            "overview.html",
            {
                "period": period,
                # Where purged hourly rollups widened the report, the range it covers.
                "start": report.start if report.note else start,
                "end": report.end if report.note else end,
                "by": by,
                "granularity": series.granularity,
                "report": report,
                "top": report.rows[:10],
                "names": names,
                "token_chart": charts.safe(token_chart),
                "cost_chart": charts.safe(cost_chart),
                "legend": legend,
                "forecast": total_forecast,
                "backends": self.service.backends(),
                "query": _query(request),
            },
        )

    async def _series(self, *, granularity: str, **kwargs: Any) -> Any:
        """The usage series by ``granularity``; by day where it is by hour and the service
        refuses it (422: hourly rollups of the range are purged)."""
        try:
            return await run(self.service.usage_series, granularity=granularity, **kwargs)
        except AdminError as exc:
            if granularity != "hour" or exc.status != 422:
                raise
            return await run(self.service.usage_series, granularity="day", **kwargs)

    def _chart(
        self, series: Any, metric: str, unit: str, labels: dict[str, str], chart_id: str
    ) -> str:
        if metric == "cost_nanos":
            lines = [
                charts.ChartSeries(
                    k,
                    labels.get(k, k),
                    [float(nanos_to_decimal(v)) for v in series.values[k][metric]],
                )
                for k in series.keys
            ]
            currency = self.service.prices.currency
            return charts.stacked_bars(
                series.buckets,
                lines,
                granularity=series.granularity,
                unit=unit,
                fmt=lambda v: money_text(int(Decimal(str(v)) * 10**9), currency),
                axis_fmt=lambda v, top: money_axis(v, top, currency),
                chart_id=chart_id,
            )
        lines = [
            charts.ChartSeries(k, labels.get(k, k), [float(v) for v in series.values[k][metric]])
            for k in series.keys
        ]
        return charts.stacked_bars(
            series.buckets,
            lines,
            granularity=series.granularity,
            unit=unit,
            fmt=lambda v: f"{int(v):,} {unit}",
            chart_id=chart_id,
        )

    async def _names(self, rows: list[Any]) -> dict[str, str]:
        """Display names of subscriptions ("name (owner)") for the given report rows."""
        out: dict[str, str] = {}
        for row in rows:
            if row.key is None:
                continue
            try:
                sub = await run(self.service.get, row.key)
            except AdminError:
                continue
            out[row.key] = f"{sub.name} ({sub.owner})"
        return out

    async def usage(self, request: Request) -> Response:
        q = Query(request)
        period, start, end, _ = self._period(request)
        by = q.text("by", ("subscription", "owner", "product", "deployment", "backend", "model"))
        by = by or "subscription"
        page = q.integer("page", 1, 1, 1_000_000)
        report = await run(self.service.usage_report, start=start, end=end, by=by)
        rows = report.rows[(page - 1) * 100 : page * 100]
        names = await self._names(rows) if by == "subscription" else {}
        return self.render(
            request,
            "usage.html",
            {
                "period": period,
                # Where purged hourly rollups widened the report, the range it covers.
                "start": report.start if report.note else start,
                "end": report.end if report.note else end,
                "by": by,
                "report": report,
                "rows": rows,
                "names": names,
                "page": page,
                "pages": max(1, -(-len(report.rows) // 100)),
                "query": _query(request),
                "csv_query": urlencode(
                    {"by": by, "from": str(report.start), "to": str(report.end)}
                ),
            },
        )

    async def usage_csv(self, request: Request) -> Response:
        q = Query(request)
        _, start, end, _ = self._period(request)
        by = q.text("by", ("subscription", "owner", "product", "deployment", "backend", "model"))
        report = await run(self.service.usage_report, start=start, end=end, by=by or "subscription")
        return csv_response(report)

    async def subscriptions(self, request: Request) -> Response:
        q = Query(request)
        issued = None
        error = ""
        form: dict[str, str] = request.state.form
        if request.method == "POST":
            fields = {f: form.get(f, "") for f in ("product", "owner", "name")}
            # The admin API's check (schemas.text_problem): a control character in a name
            # would reach terminals, logs and CSV exports as it is.
            problems = ((f, text_problem(v)) for f, v in fields.items())
            error = next((f"{f.capitalize()} {p}." for f, p in problems if p is not None), "")
            if not error:
                try:
                    issued = await run(self.service.create_subscription, **fields)
                except AdminError as exc:
                    error = exc.message
        search = q.text("search")
        state = q.text("state", tuple(SubscriptionState))
        page = q.integer("page", 1, 1, 10_000_000)
        subs, total = await run(
            self.service.list,
            offset=(page - 1) * PAGE_SIZE,
            limit=PAGE_SIZE,
            search=search,
            state=state,
        )
        return self.render(
            request,
            "subscriptions.html",
            {
                "subs": [subscription_view(s) for s in subs],
                "total": total,
                "page": page,
                "pages": max(1, -(-total // PAGE_SIZE)),
                "search": search or "",
                "state": state or "",
                "states": [str(st) for st in SubscriptionState],
                "products": self.service.products(),
                "issued": issued,
                "error": error,
                "form": form,
                "page_size": PAGE_SIZE,
                "query": _query(request, drop=("page",)),
            },
            422 if error else 200,
        )

    async def subscription(self, request: Request) -> Response:
        sub_id = str(request.path_params["subscription_id"])
        shown_key: tuple[str, str] | None = None
        if request.method == "POST":
            action = request.state.form.get("action", "")
            if action in TRANSITIONS:
                comment = request.state.form.get("state_comment") or None
                await run(self.service.change_state, sub_id, action, comment)
            elif action in ("rotate-primary", "rotate-secondary"):
                slot = action.split("-", 1)[1]
                issued = await run(self.service.rotate, sub_id, slot)
                key = issued.primary_key or issued.secondary_key
                assert key is not None
                shown_key = (slot, key)
            else:
                raise AdminError(422, f"unknown action {action!r}")
        sub = await run(self.service.get, sub_id)
        now = self._now()
        m0, _ = month_bounds(now)
        granularity = "day" if now - m0 > 2 * DAY else "hour"
        series = await self._series(
            start=m0, end=now, granularity=granularity, by="model", subscription_id=sub_id
        )
        report = await run(
            self.service.usage_report, start=m0, end=now, by="model", subscription_id=sub_id
        )
        projections, _, _ = await run(self.service.forecast, limit=1, subscription_id=sub_id)
        budgets = await run(self.service.budgets, sub_id)
        records = await run(
            self.service.records, subscription_id=sub_id, start=m0, limit=20, offset=0
        )
        chart = self._chart(series, "total_tokens", "tokens", {}, "tokens-chart")
        return self.render(
            request,
            "subscription.html",
            {
                "sub": subscription_view(sub),
                "shown_key": shown_key,
                "report": report,
                "chart": charts.safe(chart),
                "forecast": projections[0] if projections else None,
                "budget": budgets[0] if budgets else None,
                "records": records,
            },
        )

    async def forecast(self, request: Request) -> Response:
        q = Query(request)
        page = q.integer("page", 1, 1, 1_000_000)
        items, total, count = await run(
            self.service.forecast, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        names = await self._names(items)
        spark = {p.key: charts.safe(charts.sparkline(p.daily)) for p in items}
        deployments = await run(self.service.break_even)
        m0, m1 = month_bounds(self._now())
        return self.render(
            request,
            "forecast.html",
            {
                "items": items,
                "total": total,
                "count": count,
                "names": names,
                "spark": spark,
                "deployments": deployments,
                "page": page,
                "pages": max(1, -(-count // PAGE_SIZE)),
                "month_start": m0,
                "month_end": m1,
                "now": self._now(),
            },
        )

    async def backends(self, request: Request) -> Response:
        ledger = await run(self.service.ledger)
        return self.render(
            request,
            "backends.html",
            {
                "backends": self.service.backends(),
                "ledger": ledger,
                "prices": self.service.prices_view(),
            },
        )


def _closing_if_late(response: Response, exc: AdminError) -> Response:
    """``response`` to ``exc``; for a late body (408) it closes the connection too."""
    if exc.status == 408:
        response.headers.update(BODY_TIMEOUT_HEADERS)
    return response


def _query(request: Request, drop: tuple[str, ...] = ()) -> str:
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k not in drop])
