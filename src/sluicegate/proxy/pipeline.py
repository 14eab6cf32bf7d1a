"""The request path: authenticate → admit → route → forward → relay → settle → record.

Each step is a small method; decisions live in pure modules (routes, credentials, headers,
usage) and this class only carries them out. The contract: every request that reached a
subscription produces exactly one usage record (per upstream attempt), whatever happens —
success, refusal, backend failure, client disconnect, cancellation at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.auth.credentials import find_key
from sluicegate.auth.index import SubscriptionIndex
from sluicegate.auth.subscriptions import Subscription, SubscriptionState
from sluicegate.clock import Clock
from sluicegate.messages.capture import MessageCapture
from sluicegate.proxy import errors
from sluicegate.proxy.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    disconnect_hook,
    header,
    read_body,
    send_error,
    send_json,
)
from sluicegate.proxy.context import RequestContext, new_request_id
from sluicegate.proxy.deadlines import Deadlines
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.failover import forget_deleted, forward_routed, forward_single, held_backend
from sluicegate.proxy.network import NetworkPolicy
from sluicegate.proxy.routes import RouteKind, match_route
from sluicegate.routing.build import router_for
from sluicegate.routing.pool import Member
from sluicegate.routing.router import Router
from sluicegate.runtime import Runtime
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.headers import strip_key_from_query

if TYPE_CHECKING:
    from sluicegate.accounting.budgets import Budgets

    # Imported where used: PyJWT and cryptography load only when tokens are accepted.
    from sluicegate.auth.bearer import TokenAuthenticator
    from sluicegate.cache.semantic import Embedder
    from sluicegate.messages.sink import MessageLog

log = logging.getLogger("sluicegate.proxy")

REQUEST_ID_HEADER = b"x-sluicegate-request-id"
#: How long a request cancelled at shutdown may take to settle its reservation (one round
#: trip to the limit store; the shutdown waits for it).
_SETTLE_WHEN_CANCELLED_SECONDS = 1.0
#: RFC 6750's challenge on a refused bearer token.
_INVALID_TOKEN = ("www-authenticate", 'Bearer error="invalid_token"')


#: The first dated API version whose chat/completions accept ``stream_options``: older ones
#: answer 400 "Unrecognized request argument supplied: stream_options" (2024-06-01 and
#: before; the v1 API and 2024-08-01-preview on accept it).
STREAM_OPTIONS_SINCE = b"2024-08-01"


def accepts_stream_options(query_string: bytes) -> bool:
    """Whether the API version the client asked for (its ``api-version``) accepts
    ``stream_options``: on older ones the gateway cannot ask for a stream's usage, and
    estimates it. No version (the v1 API) or one that is not a date (``preview``) accepts it."""
    at = query_string.find(b"api-version=")
    while at > 0 and query_string[at - 1] != 0x26:  # "&": the parameter, not a suffix of one
        at = query_string.find(b"api-version=", at + 1)
    if at < 0:
        return True
    version = query_string[at + 12 : at + 22]
    return not (version[:4].isdigit() and version < STREAM_OPTIONS_SINCE)


class Admitter(Protocol):
    """The limiter as the pipeline sees it (see ``limits``)."""

    async def admit(self, ctx: RequestContext) -> None:
        """Reserve capacity for the request or raise ``GatewayError`` (429/403/503)."""

    async def finish(self, ctx: RequestContext) -> None:
        """Settle the reservation with the usage in ``ctx`` (or release it on failure)."""


#: What the operators can do for an inactive subscription, by state (the refusal says it).
_REACTIVATE = {
    SubscriptionState.SUBMITTED: "approve it.",
    SubscriptionState.SUSPENDED: "resume it or to issue a new subscription.",
}


class Pipeline:
    """Serves everything under ``/openai/`` (and APIM's ``/deployments/``)."""

    def __init__(
        self,
        runtime: Runtime,
        index: SubscriptionIndex,
        clock: Clock,
        sinks: list[Callable[[UsageRecord], None]],
        admitter: Admitter | None = None,
        observers: list[Callable[[UsageRecord], None]] | None = None,
        router: Router | None = None,
        tokens: TokenAuthenticator | None = None,
        network: NetworkPolicy | None = None,
        budgets: Budgets | None = None,
        messages: MessageLog | None = None,
    ) -> None:
        """``sinks`` receive every record of an authenticated request (the ledger among
        them); ``observers`` (metrics, access log) also those of unauthenticated ones.
        ``router`` routes deployments over their pools (default: one with in-process state,
        built from ``runtime``). ``tokens`` authenticates bearer JWTs (None: tokens are
        refused); ``network`` decides the client address, IP allow-lists and the body read
        timeout (default: from ``runtime``'s configuration). ``budgets``: the subscriptions
        over their spending budget, refused with 403 (``accounting.budgets``; None: none).
        ``messages``: the message log of products that have one (None: nothing logged)."""
        self.runtime = runtime
        self.router = router if router is not None else router_for(runtime, clock)
        self.index = index
        self.clock = clock
        self.sinks = sinks
        self.observers = observers or []
        self.admitter = admitter
        self.max_body = runtime.config.security.max_body_bytes
        self.tokens = tokens
        self.network = network if network is not None else NetworkPolicy.from_config(runtime.config)
        self.deadlines = Deadlines()
        self.budgets = budgets
        self.messages = messages
        #: The semantic cache's embeddings calls, through this pipeline's router (None: no
        #: product has a cache).
        self.embedder: Embedder | None = None
        if any(p.semantic_cache is not None for p in runtime.products.values()):
            from sluicegate.cache.semantic import Embedder

            self.embedder = Embedder(self.router, runtime, clock, self._emit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext(
            request_id=new_request_id(),
            ts=self.clock.now(),
            started=self.clock.monotonic(),
            route=match_route(scope["method"], scope["path"]),
            deadlines=self.deadlines,
            client_ip=self.network.client_ip(scope),
            headers=scope["headers"],
        )
        # 408 for bodies that trickle in.
        receive = self.network.body_deadline(receive, self.deadlines)
        ctx.response_headers.append((REQUEST_ID_HEADER, ctx.request_id.encode("ascii")))
        try:
            try:
                await self._handle(ctx, scope, receive, send)
            except GatewayError as exc:
                ctx.status, ctx.error_code = exc.status, exc.code
                if ctx.messages is not None:
                    ctx.messages.refused(exc.status, exc.code, exc.message)
                if ctx.outcome is Outcome.OK:
                    ctx.outcome = Outcome.REJECTED
                await send_error(send, exc, ctx.response_headers)
            except ClientGone:
                ctx.status, ctx.outcome = 499, Outcome.ABORTED
            except asyncio.CancelledError:
                # Shutdown past its grace period, in the middle of the request.
                ctx.outcome = Outcome.ABORTED
                ctx.status = ctx.status or 499
                raise
            except Exception:
                log.exception("unexpected error in the request path (request %s)", ctx.request_id)
                ctx.status, ctx.outcome, ctx.error_code = 500, Outcome.BACKEND_ERROR, "GatewayError"
                err = GatewayError(
                    500,
                    "InternalServerError",
                    f"The gateway failed to process the request (request id {ctx.request_id}).",
                )
                try:
                    await send_error(send, err, ctx.response_headers)
                    if ctx.messages is not None:  # the answer the client got: this error
                        ctx.messages.refused(err.status, err.code, err.message)
                except Exception:  # the response had already started; nothing more to say
                    log.debug("could not send the error response", exc_info=True)
            if self.admitter is not None and ctx.admission is not None:
                ctx.settled = True  # never twice, even if cancelled during it
                try:
                    await self.admitter.finish(ctx)
                except Exception:
                    log.exception("settling the limits failed (request %s)", ctx.request_id)
        except asyncio.CancelledError:
            # Cancelled at any await above (the request's, an error's answer, the settling):
            # at shutdown, past its grace period. The reservation is still settled, briefly,
            # and a client that got nothing yet gets Azure's answer for a service going away
            # (the SDKs retry it, on another instance). The cancellation ends here, with the
            # request's task: re-raised, uvicorn would log a traceback and answer a plain 500.
            await self._settle_cancelled(ctx)
            try:
                gone = errors.shutting_down()
                await send_error(send, gone, ctx.response_headers)
                ctx.status = 503
                if ctx.messages is not None:
                    ctx.messages.refused(gone.status, gone.code, gone.message)
            except Exception:  # the answer had started: uvicorn closes the connection
                log.debug("request %s cut at shutdown mid-answer", ctx.request_id)
        finally:
            # The record is written whatever happened, once (``_finish_sync`` checks).
            self._finish_sync(ctx)

    async def _settle_cancelled(self, ctx: RequestContext) -> None:
        """Settle the reservation of a request being cancelled, unless that began already;
        give up after ``_SETTLE_WHEN_CANCELLED_SECONDS``."""
        if self.admitter is None or ctx.admission is None or ctx.settled:
            return
        ctx.settled = True
        try:
            async with asyncio.timeout(_SETTLE_WHEN_CANCELLED_SECONDS):
                await self.admitter.finish(ctx)
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("settling the limits of request %s failed: %r", ctx.request_id, exc)

    def _finish_sync(self, ctx: RequestContext) -> None:
        if ctx.finished:  # written once, even if called again on cancellation
            if ctx.messages is not None:  # by failover, cancelled waiting to retry: logged here
                ctx.messages.finish(
                    ctx.record(self.clock.monotonic()), ctx.json, ctx.body, ctx.headers
                )
            return
        ctx.finished = True
        record = ctx.record(self.clock.monotonic())
        self._emit(record)
        if ctx.messages is not None:  # after the record: its final token counts go with it
            ctx.messages.finish(record, ctx.json, ctx.body, ctx.headers)

    def _emit(self, record: UsageRecord) -> None:
        # Unauthenticated requests reach the metrics and the log, not the ledger: a stranger
        # cannot fill the ledger.
        sinks = self.sinks if record.subscription_id is not None else self.observers
        for sink in sinks:
            try:
                sink(record)
            except Exception:
                log.exception("a usage sink failed (request %s)", record.request_id)

    async def _handle(
        self, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        route = ctx.route
        if route.kind is RouteKind.NOT_FOUND:
            raise errors.resource_not_found()
        if route.kind is RouteKind.REFUSED:
            raise errors.refused_path()
        await self._authenticate(ctx, scope)
        if route.kind is RouteKind.MODELS:
            await self._models(ctx, send)
            ctx.status = 200
            return
        if self.budgets is not None and ctx.subscription is not None:
            # One dict lookup: what was spent is computed off the request path.
            self.budgets.check(ctx.subscription.id, ctx.ts)
        ctx.body = await read_body(scope, receive, self.max_body)
        query = strip_key_from_query(scope["query_string"])
        if route.kind is RouteKind.PASSTHROUGH:
            product = ctx.product
            assert product is not None
            if not product.passthrough:
                raise GatewayError(
                    403,
                    "OperationNotAllowed",
                    f"Your subscription's product {product.name!r} may use only its "
                    "deployments' chat/completions, completions, embeddings, responses and "
                    "other /openai/deployments/{deployment}/… operations, not this path.",
                )
            if product.content_safety is not None:
                product.content_safety.unchecked_operation(ctx)  # a body here is not checked
            backend = self.runtime.passthrough
            if route.response_id is not None:  # Responses affinity: to the holder
                backend = (
                    await held_backend(ctx, self.router.affinity, self.runtime.backends) or backend
                )
            ctx.backend_name = backend.name
            url = f"{backend.base_url}/openai/{route.upstream_suffix}"
            if query:
                url = f"{url}?{query}"
            await forward_single(ctx, backend, scope, receive, send, url, self.clock)
            if route.response_id is not None:  # Responses affinity: a deleted id is forgotten
                forget_deleted(ctx, scope, self.router.affinity)
            return
        self._prepare(ctx, scope)
        if self.admitter is not None and route.metered:
            await self.admitter.admit(ctx)
        guard = ctx.product.content_safety if ctx.product is not None else None
        if guard is not None and route.metered:
            # After admission (the refused request counts against the request rate; its
            # reservation is released), before routing: a refused prompt reaches no backend.
            hook = disconnect_hook(scope)
            await guard.check(ctx, hook)  # cancelled (ClientGone) if the client leaves
            if hook is not None and hook.fired:
                raise ClientGone  # it left during the check: no model runs its prompt
        elif guard is not None:
            guard.unchecked_operation(ctx)  # a deployment's images, audio, …: not checked
        cache = ctx.product.semantic_cache if ctx.product is not None else None
        if cache is not None and route.operation == "chat/completions":
            # After admission (a hit counts against the request rate) and content safety (a
            # prompt it refuses is never answered from the cache), before routing.
            assert self.embedder is not None
            relay_send = await cache.lookup(ctx, send, self.embedder, query)
            if relay_send is None:
                return  # answered from the cache
            hook = disconnect_hook(scope)
            if hook is not None and hook.fired:
                raise ClientGone  # it left during the lookup: no model runs its prompt
            send = relay_send
        deployment = ctx.deployment
        assert deployment is not None

        def upstream(member: Member, backend: Backend) -> tuple[str, bytes]:
            return self._upstream(ctx, query, member, backend)

        await forward_routed(
            ctx,
            self.router,
            self.router.pools[deployment.name],
            self.runtime.backends,
            upstream,
            scope,
            receive,
            send,
            self.clock,
            self._emit,
        )

    async def _authenticate(self, ctx: RequestContext, scope: Scope) -> None:
        """Key or token → an active subscription of an offered product, from an allowed
        address. With both a key and a token, both must hold and name the same subscription
        (docs/entra-id.md)."""
        presented = find_key(scope["headers"], scope["query_string"])
        if presented.ambiguous:
            raise errors.ambiguous_key()
        sub: Subscription | None = None
        if presented.key is not None:
            match = self.index.lookup(presented.key)
            if match is None:
                raise errors.invalid_key()
            sub = match.subscription
        if presented.token is not None:
            by_token, caller = await self._token_subscription(ctx, presented.token)
            if sub is not None and sub.id != by_token.id:
                raise self._credentials_disagree(ctx, sub.id, by_token.id)
            sub, ctx.caller = by_token, caller
        if sub is None:
            raise errors.missing_key()
        if sub.state is not SubscriptionState.ACTIVE or sub.expires_at is not None:
            self._refuse_inactive(sub, ctx.ts)
        product = self.runtime.products.get(sub.product)
        if product is None:
            raise GatewayError(
                403,
                "ProductNotFound",
                f"Subscription {sub.id} belongs to product {sub.product!r}, which this gateway "
                "no longer offers. Ask the gateway's operators to move it.",
            )
        if presented.token is None and product.config.require_token:
            raise GatewayError(
                401,
                "TokenRequired",  # auth.token_types.TokenFailure.REQUIRED
                f"Access denied: product {product.name!r} takes Entra ID / OIDC tokens only, "
                "not subscription keys. Send 'Authorization: Bearer <token>'.",
                headers=[("www-authenticate", "Bearer")],
            )
        self.network.check_product(product.name, ctx.client_ip)
        ctx.subscription, ctx.product = sub, product

    # -- token authentication (auth.bearer): the hook _authenticate calls ----------------------

    @staticmethod
    def _refuse_inactive(sub: Subscription, now: float) -> None:
        """Raise the refusal of a subscription whose keys do not work at ``now``: expired
        (past ``expires_at``, unless rejected or cancelled first: the state the admin API
        shows, ``effective_state``) or not active, saying what the operators can do."""
        state = sub.effective_state(now)
        if state is SubscriptionState.EXPIRED:
            assert sub.expires_at is not None
            raise GatewayError(
                403,
                "SubscriptionExpired",
                f"Subscription {sub.id} expired at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(sub.expires_at))}. "
                "Ask the gateway's operators to issue a new subscription.",
            )
        if state is not SubscriptionState.ACTIVE:
            raise GatewayError(
                403,
                "SubscriptionInactive",
                f"Subscription {sub.id} is {state.value}. Ask the gateway's operators to "
                + _REACTIVATE.get(state, "issue a new subscription."),
            )

    async def _token_subscription(
        self, ctx: RequestContext, token: str
    ) -> tuple[Subscription, str | None]:
        """The subscription a bearer JWT maps to, and the caller's identity."""
        from sluicegate.auth.tokens import TokenError, TokenFailure

        if self.tokens is None:
            raise GatewayError(
                401,
                TokenFailure.NOT_ACCEPTED.value,
                "Access denied: this gateway does not accept Entra ID / OIDC tokens. Send a "
                "subscription key in the 'api-key' header.",
                headers=[_INVALID_TOKEN],
            )
        try:
            match = await self.tokens.authenticate(token, ctx.request_id)
            sub = self.index.get(match.subscription_id)
            if sub is None:
                raise self.tokens.no_subscription(match, ctx.request_id)
        except TokenError as exc:
            raise GatewayError(
                exc.status,
                exc.code,
                exc.message,
                headers=[_INVALID_TOKEN] if exc.status == 401 else None,
                retry_after=exc.retry_after,
            ) from None
        return sub, match.caller

    def _credentials_disagree(
        self, ctx: RequestContext, key_sub: str, token_sub: str
    ) -> GatewayError:
        from sluicegate.auth.tokens import TokenError, TokenFailure

        exc = TokenError(
            TokenFailure.CREDENTIALS_DISAGREE,
            f"The subscription key belongs to subscription {key_sub}, but the token maps to "
            f"subscription {token_sub}. Send one credential, or a key and a token of the "
            "same subscription.",
            403,
        )
        if self.tokens is not None:
            self.tokens.refused(exc, ctx.request_id)
        return GatewayError(exc.status, exc.code, exc.message)

    def _prepare(self, ctx: RequestContext, scope: Scope) -> None:
        """Parse and check the JSON body and pick the deployment. Changes the body only where
        the gateway must (usage for streams; backend names are set per attempt)."""
        route = ctx.route
        content_type = header(scope, b"content-type") or b""
        needs_json = route.metered or route.kind is RouteKind.V1
        body: dict[str, Any] | None = None
        if needs_json:
            if b"json" not in content_type.lower():
                raise GatewayError(
                    415,
                    "UnsupportedMediaType",
                    "This operation takes a JSON body: send 'Content-Type: application/json'.",
                )
            try:
                parsed = orjson.loads(ctx.body)
            except orjson.JSONDecodeError as exc:
                raise errors.bad_request(
                    "InvalidJson", f"The request body is not valid JSON ({exc.msg} at {exc.pos})."
                ) from None
            if not isinstance(parsed, dict):
                raise errors.bad_request("InvalidJson", "The request body must be a JSON object.")
            body = parsed
            ctx.json = body
        name = route.deployment
        if name is None:
            model = body.get("model") if body is not None else None
            if not isinstance(model, str) or not model:
                raise errors.bad_request(
                    "MissingModel",
                    "The request body must name the deployment in 'model' on the v1 API.",
                )
            name = model
        deployment = self.runtime.deployments.get(name)
        if deployment is None:
            raise errors.deployment_not_found(name)
        product = ctx.product
        assert product is not None
        if not product.allows(name):
            raise GatewayError(
                403,
                "DeploymentNotAllowed",
                f"Your subscription's product {product.name!r} does not include deployment "
                f"{name!r}. GET /openai/v1/models lists the deployments you may use.",
            )
        ctx.deployment = deployment
        if product.message_log is not None and self.messages is not None and route.metered:
            # Metered operations only: a deployment's others (audio, images) carry no messages.
            ctx.messages = MessageCapture(
                product.message_log, self.messages, scope["path"], scope["query_string"],
                deployment.model, route.operation,
            )  # fmt: skip
        changed = False
        if body is not None:
            ctx.stream = body.get("stream") is True
            if ctx.stream and route.operation in ("chat/completions", "completions"):
                options = body.get("stream_options")
                if not (
                    isinstance(options, dict) and options.get("include_usage") is True
                ) and accepts_stream_options(scope["query_string"]):
                    new_options = dict(options) if isinstance(options, dict) else {}
                    new_options["include_usage"] = True
                    body["stream_options"] = new_options
                    ctx.injected_usage = changed = True
            if product.content_safety is not None and route.metered:
                # The check reads this parse of the body; the model is sent the same parse,
                # never the client's bytes, so that no text reaches it unchecked where JSON
                # parsers differ (duplicate keys: orjson keeps the last, others the first).
                changed = True
        if changed:
            ctx.body = orjson.dumps(body)

    def _upstream(
        self, ctx: RequestContext, query: str, member: Member, backend: Backend
    ) -> tuple[str, bytes]:
        """The URL and body of an attempt on ``member``: its backend, and its deployment
        name in the path (deployment routes) or in the body's ``model`` (v1 routes)."""
        route = ctx.route
        body = ctx.body
        base = backend.base_url
        if route.kind is RouteKind.DEPLOYMENT:
            url = f"{base}/openai/deployments/{member.deployment}/{route.upstream_suffix}"
        else:
            url = f"{base}/openai/{route.upstream_suffix}"
            if ctx.json is not None and ctx.json.get("model") != member.deployment:
                body = orjson.dumps({**ctx.json, "model": member.deployment})
        return (f"{url}?{query}" if query else url), body

    async def _models(self, ctx: RequestContext, send: Send) -> None:
        product = ctx.product
        assert product is not None
        data = [
            {
                "id": d.name,
                "object": "model",
                "created": 0,
                "owned_by": "sluicegate",
                "model": d.model,
            }
            for d in self.runtime.deployments.values()
            if product.allows(d.name)
        ]
        await send_json(send, 200, {"object": "list", "data": data}, ctx.response_headers)
