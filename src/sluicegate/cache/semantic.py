"""The semantic cache of chat completions: APIM's ``azure-openai-semantic-cache-lookup`` and
``-store`` for a product (docs/semantic-cache.md).

Lookup, in the pipeline after admission and content safety and before routing: the dialog's
text (:func:`dialog_text`) is embedded by the product's ``embeddings_deployment``, called
through the gateway's own router (:class:`Embedder`: the same pools, credentials, retries
and breakers as a client's request; its usage is a record of its own, and its tokens are
charged to the request's limits). The nearest stored answer of the request's partition
(:func:`partition_key`: product, ``vary_by``, deployment and every parameter that changes
the answer) within ``score_threshold`` answers the request, as it was stored, with
``x-sluicegate-cache: hit``; its record has no tokens and no backend. Otherwise the request
is routed as usual (``miss``), and a whole 200 answer whose every choice ended with
``finish_reason: stop`` (a text answer, not cut by ``length``, no tool calls, not filtered)
is stored.

Not looked up (``skip``): streams (the stored answer is a JSON body, and re-emitting it as a
stream is not done), dialogs of more than ``max_message_count`` messages, messages with
anything but text (an image or audio part: its meaning is not in the text compared), and
texts over :data:`MAX_TEXT_CHARS`. An embeddings call that fails (the backend down,
throttled, slow past ``timeout_seconds``) leaves the request to go on without the cache:
a cache is an optimisation, never a reason to refuse.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.cache.vectors import Vector, VectorStore, float32_vector, nearest, unit_vector
from sluicegate.clock import Clock
from sluicegate.config.model import ProductSemanticCacheConfig
from sluicegate.proxy.asgi import Message, Receive, Scope, Send
from sluicegate.proxy.context import RequestContext, new_request_id
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.failover import forward_routed
from sluicegate.proxy.routes import Route, RouteKind
from sluicegate.tokens.offload import counting_thread
from sluicegate.tokens.usage import Usage

if TYPE_CHECKING:
    from sluicegate.routing.pool import Member
    from sluicegate.routing.router import Router
    from sluicegate.runtime import Runtime
    from sluicegate.upstream.backend import Backend

log = logging.getLogger("sluicegate.cache")

#: The response header that tells whether the answer came from the cache.
CACHE_HEADER = b"x-sluicegate-cache"
#: The API version of the embeddings calls (GA; takes ``encoding_format``).
API_VERSION = "2024-10-21"
#: Dialog texts longer than this are not looked up: ~6,000 tokens, near the 8,192-token
#: input limit of the embeddings models, and a call that would fail is not made.
MAX_TEXT_CHARS = 24_000
#: Answers of more bytes than this are not stored: one of many MiB (many choices with their
#: logprobs) would push hundreds of others out of the store (``VectorStore.max_bytes``).
MAX_ANSWER_BYTES = 1024 * 1024
#: Seconds a product's lookups pause after its embeddings call timed out. A call given up at
#: ``timeout_seconds`` is no failure the backend's breaker hears of (it only abandons the
#: attempt); without the pause every request would wait that long while the backend hangs.
PAUSE_AFTER_TIMEOUT_SECONDS = 30.0
#: Partitions with more entries than this are searched in the counting thread. Measured
#: (1,536 dimensions, Python 3.11): ~0.15 µs an entry for the signs (2,000 entries: 0.3 ms)
#: and ~80 µs for each of the at most 8 exact cosines: up to ~1 ms inline.
INLINE_SEARCH_ENTRIES = 2_000
#: Body members that do not change the answer, left out of the partition: the messages are
#: compared by meaning; the deployment is in the key already; the rest is bookkeeping.
IGNORED_PARAMETERS = frozenset(
    {"messages", "model", "stream", "stream_options", "user", "metadata", "store"}
)
_SYSTEM_ROLES = frozenset({"system", "developer"})


# -- what is compared -----------------------------------------------------------------------------


def dialog_text(
    messages: object,
    ignore_system: bool,
    max_messages: int = 1_000,
    max_chars: int = MAX_TEXT_CHARS,
) -> str | None:
    """The canonical text of a dialog: one line per message, ``role: text`` (whitespace runs
    made one space; a message's name, and its tool calls' (or legacy ``function_call``'s)
    names and arguments, after its text), system and developer messages left out when
    ``ignore_system``. None when the dialog is not looked up: not a list of messages, a part
    that is not text (image, audio, file; an assistant's earlier ``audio``), no text at all,
    more than ``max_messages`` messages (system messages left out as above) or more than
    ``max_chars`` characters of text (counted as sent, before whitespace is collapsed: the
    walk stops there, so a huge prompt costs no more than that)."""
    if not isinstance(messages, list):
        return None
    lines: list[str] = []
    size = 0
    for message in messages:
        if not isinstance(message, Mapping):
            return None
        role = message.get("role")
        if not isinstance(role, str):
            return None
        if ignore_system and role in _SYSTEM_ROLES:
            continue
        words = _content_text(message.get("content"))
        if words is None:
            return None
        name = message.get("name")
        if isinstance(name, str) and name:
            words.append(f"({name})")
        if message.get("audio") is not None:
            return None  # an earlier audio answer, by its id: its meaning is not in the text
        calls = message.get("tool_calls")
        functions = [
            call.get("function") if isinstance(call, Mapping) else None
            for call in (calls if isinstance(calls, list) else ())
        ]
        if message.get("function_call") is not None:  # the legacy single call
            functions.append(message.get("function_call"))
        for function in functions:
            if not isinstance(function, Mapping):
                return None  # a custom tool's call: not compared
            words.append(f"{function.get('name')}({function.get('arguments')})")
        size += sum(map(len, words))
        if len(lines) == max_messages or size > max_chars:
            return None
        lines.append(f"{role}: {' '.join(' '.join(words).split())}")
    if not lines or not any(line.partition(": ")[2] for line in lines):
        return None
    text = "\n".join(lines)
    return text if len(text) <= max_chars else None


def _content_text(content: object) -> list[str] | None:
    """A message's text pieces; None for a part that is not text."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    pieces: list[str] = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "refusal"):
            return None
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            return None
        pieces.append(text)
    return pieces


def partition_key(
    product: str, who: str, deployment: str, body: Mapping[str, Any], query: str = ""
) -> bytes | None:
    """The partition a request's answer is stored in and looked up from: the product, whom
    it is shared with (``who``: ``vary_by``'s value), the deployment, the query string (the
    ``api-version``, on which the answer's shape depends; the key taken out already) and
    every body member but :data:`IGNORED_PARAMETERS` (temperature, tools, response format,
    n, seed, max tokens, logprobs, …: only the messages are matched by meaning). None when
    the body cannot be serialised canonically."""
    parameters = {k: v for k, v in body.items() if k not in IGNORED_PARAMETERS}
    try:
        canonical = orjson.dumps(
            [product, who, deployment, query, parameters], option=orjson.OPT_SORT_KEYS
        )
    except TypeError:
        return None
    return hashlib.sha256(canonical).digest()


def storable_model(body: bytes) -> tuple[bool, str | None]:
    """Whether an answer's body may be stored (a ``chat.completion`` whose every choice
    ended with ``finish_reason: stop`` and holds text, no tool calls), and its model."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(answer, dict) or answer.get("object") != "chat.completion":
        return False, None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False, None
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if (
            not isinstance(message, dict)
            or choice.get("finish_reason") != "stop"
            or not isinstance(message.get("content"), str)
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            return False, None
    model = answer.get("model")
    return True, model if isinstance(model, str) else None


# -- the embeddings call --------------------------------------------------------------------------


class EmbeddingFailed(Exception):
    """The embeddings call gave no vector; ``reason`` says why (for the log); ``timed_out``:
    no answer came within the bound (the call was given up)."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


class _Answer:
    """An ASGI ``send`` that keeps an answer instead of sending it."""

    __slots__ = ("parts", "status")

    def __init__(self) -> None:
        self.status = 0
        self.parts: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            self.parts.append(message["body"])


async def _no_disconnect() -> Message:
    """The ``receive`` of an embeddings call: nothing is ever received (the relay of its
    whole JSON answer does not listen; a relay in parts would wait here until it ends)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")  # pragma: no cover


_SCOPE: Scope = {
    "type": "http",
    "method": "POST",
    "headers": [(b"content-type", b"application/json")],
    "extensions": {},
}


class Embedder:
    """Embeds texts through a deployment of the gateway's own router: the request's
    subscription and product, the deployment's pool, its backends' pooled connections and
    credentials, the router's retries and breakers. Each call is written as a usage record of
    its own (operation ``embeddings``, ``extra.semantic_cache = "embedding"``, the request it
    served in ``extra.for_request``), and its tokens are added to the request's
    ``side_tokens``, which the limits charge when they settle it."""

    def __init__(
        self, router: Router, runtime: Runtime, clock: Clock, emit: Callable[[UsageRecord], None]
    ) -> None:
        self.router = router
        self.runtime = runtime
        self.clock = clock
        self.emit = emit

    async def embed(
        self, parent: RequestContext, deployment_name: str, text: str, within: float
    ) -> Vector:
        """The unit vector of ``text``; raises ``EmbeddingFailed`` when none came within
        ``within`` seconds (the call is then abandoned)."""
        deployment = self.runtime.deployments[deployment_name]
        payload = {"input": text, "encoding_format": "base64"}
        call = RequestContext(
            request_id=new_request_id(),
            ts=self.clock.now(),
            started=self.clock.monotonic(),
            route=Route(RouteKind.DEPLOYMENT, "embeddings", deployment_name, "embeddings"),
            deadlines=parent.deadlines,
            client_ip=parent.client_ip,
            subscription=parent.subscription,
            caller=parent.caller,
            product=parent.product,
            deployment=deployment,
            body=orjson.dumps(payload),
            json=payload,
        )
        answer = _Answer()
        # Every record of the call carries these: an attempt that failed over is written by
        # the router as its own record (with its own ``extra``), and is the cache's too.
        marks = {"semantic_cache": "embedding", "for_request": parent.request_id}

        def emit(record: UsageRecord) -> None:
            self.emit(dataclasses.replace(record, extra={**record.extra, **marks}))

        def upstream(member: Member, backend: Backend) -> tuple[str, bytes]:
            path = f"/openai/deployments/{member.deployment}/embeddings"
            return f"{backend.base_url}{path}?api-version={API_VERSION}", call.body

        receive: Receive = _no_disconnect
        try:
            async with asyncio.timeout(within):
                await forward_routed(
                    call, self.router, self.router.pools[deployment_name],
                    self.runtime.backends, upstream, _SCOPE, receive, answer.send,
                    self.clock, emit,
                )  # fmt: skip
        except TimeoutError:
            call.status = call.status or 504
            call.outcome, call.error_code = Outcome.BACKEND_ERROR, "EmbeddingsTimeout"
            raise EmbeddingFailed(f"no answer within {within:g} s", timed_out=True) from None
        except GatewayError as exc:
            call.status, call.error_code = exc.status, exc.code
            if call.outcome is Outcome.OK:
                call.outcome = Outcome.REJECTED
            raise EmbeddingFailed(f"{exc.status} {exc.code}") from None
        except asyncio.CancelledError:
            call.status, call.outcome = call.status or 499, Outcome.ABORTED
            raise
        finally:
            if call.usage is not None:
                parent.side_tokens += call.usage.total_tokens
            if not call.finished:
                call.finished = True
                emit(call.record(self.clock.monotonic()))
        if answer.status != 200:
            raise EmbeddingFailed(f"the embeddings deployment answered {answer.status}")
        return _vector(b"".join(answer.parts))


def _vector(body: bytes) -> Vector:
    """The first vector of an embeddings answer (base64 float32, or a list of floats)."""
    try:
        embedding = orjson.loads(body)["data"][0]["embedding"]
        if isinstance(embedding, str):
            return float32_vector(base64.b64decode(embedding, validate=True))
        if isinstance(embedding, list) and all(isinstance(v, int | float) for v in embedding):
            return unit_vector(embedding)
    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError, binascii.Error):
        pass
    raise EmbeddingFailed("the embeddings answer holds no vector")


# -- one product's cache --------------------------------------------------------------------------


class SemanticCacheObserver(Protocol):
    """Where lookups are counted (``metrics.registry.GatewayMetrics``)."""

    def semantic_cache_lookup(self, product: str, result: str) -> None: ...


class SemanticCache:
    """One product's ``semantic_cache``: its policy and its stored answers (in this process)."""

    def __init__(self, product: str, policy: ProductSemanticCacheConfig, clock: Clock) -> None:
        self.product = product
        self.policy = policy
        self.clock = clock
        self.store = VectorStore(policy.max_entries)
        self.observer: SemanticCacheObserver | None = None
        #: Lookups are skipped until then (monotonic): the embeddings call timed out.
        self.paused_until = 0.0

    def __repr__(self) -> str:
        return f"SemanticCache(product={self.product!r}, store={self.store!r})"

    async def lookup(
        self, ctx: RequestContext, send: Send, embedder: Embedder, query_string: str
    ) -> Send | None:
        """Answer ``ctx`` from the cache (None: answered) or return the ``send`` to relay its
        answer with (on a miss, one that stores the answer). ``query_string``: the request's,
        without its key (its ``api-version`` partitions the cache). Raises only what the
        client's own connection raises while a hit is sent."""
        if self.paused_until and self.clock.monotonic() < self.paused_until:
            return self._result(ctx, send, "skipped", b"skip")
        found = self._partition(ctx, query_string)
        if found is None:
            return self._result(ctx, send, "skipped", b"skip")
        partition, text = found
        policy = self.policy
        try:
            query = await embedder.embed(
                ctx, policy.embeddings_deployment, text, policy.timeout_seconds
            )
        except EmbeddingFailed as exc:
            pause = ""
            if exc.timed_out:
                self.paused_until = self.clock.monotonic() + PAUSE_AFTER_TIMEOUT_SECONDS
                pause = f"; lookups paused for {PAUSE_AFTER_TIMEOUT_SECONDS:g} s"
            log.info(
                "request %s: no semantic cache lookup for product %s: %s%s",
                ctx.request_id, self.product, exc.reason, pause,
            )  # fmt: skip
            return self._result(ctx, send, "error", b"skip")
        now = self.clock.monotonic()
        entries = self.store.candidates(partition, now)
        threshold = policy.score_threshold
        if len(entries) > INLINE_SEARCH_ENTRIES:
            hit = await counting_thread().run(lambda: nearest(entries, query, threshold, now))
        else:
            hit = nearest(entries, query, threshold, now)
        if hit is not None and hit[0].body:
            entry = hit[0]
            self.store.used(entry)
            self._result(ctx, send, "hit", b"hit")
            await self._answer(ctx, send, entry.body, entry.model)
            return None
        self._result(ctx, send, "miss", b"miss")
        return self._storing(send, partition, query)

    def _partition(self, ctx: RequestContext, query_string: str) -> tuple[bytes, str] | None:
        """The request's partition and text, or None when it is not looked up."""
        body = ctx.json
        if body is None or ctx.stream or ctx.deployment is None or ctx.subscription is None:
            return None
        policy = self.policy
        text = dialog_text(
            body.get("messages"), policy.ignore_system_messages, policy.max_message_count
        )
        if text is None:
            return None
        vary = policy.vary_by
        if vary == "product":
            who = ""
        elif vary == "caller":
            who = f"{ctx.subscription.id}\n{ctx.caller or ''}"
        else:
            who = ctx.subscription.id
        key = partition_key(self.product, who, ctx.deployment.name, body, query_string)
        return None if key is None else (key, text)

    def _result(self, ctx: RequestContext, send: Send, result: str, header: bytes) -> Send:
        ctx.response_headers.append((CACHE_HEADER, header))
        if self.observer is not None:
            self.observer.semantic_cache_lookup(self.product, result)
        return send

    async def _answer(
        self, ctx: RequestContext, send: Send, body: bytes, model: str | None
    ) -> None:
        """Send a stored answer. Its record: status 200, no tokens (the embeddings call has
        its own), no backend, ``extra.semantic_cache = "hit"``."""
        ctx.status, ctx.usage, ctx.model = 200, Usage(), model
        ctx.extra = _HIT
        if ctx.messages is not None:
            send = ctx.messages.tee(send, False, 200)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            *ctx.response_headers,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        ctx.ttfb = self.clock.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _storing(self, send: Send, partition: bytes, query: Vector) -> Send:
        """``send``, storing the answer it carries when it is a whole 200 answer that may be
        stored (:func:`storable_model`), just before it goes out."""
        status = 0

        async def storing(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status == 200:
                body = message.get("body")
                if body and not message.get("more_body"):
                    self._store(partition, query, body)
                status = 0  # one whole body only: an answer in parts is not stored
            await send(message)

        return storing

    def _store(self, partition: bytes, query: Vector, body: bytes) -> None:
        if len(body) > MAX_ANSWER_BYTES:
            return
        ok, model = storable_model(body)
        if ok:
            now = self.clock.monotonic()
            self.store.put(partition, query, body, model, now + self.policy.ttl_seconds, now)


_HIT: Mapping[str, str] = {"semantic_cache": "hit"}
