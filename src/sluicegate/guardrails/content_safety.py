"""Prompts checked with Azure AI Content Safety before they are routed: APIM's
``llm-content-safety`` (docs/content-safety.md).

``ContentSafetyService`` is one Content Safety resource: a connection pool and credentials of
its own (a ``Backend``: an api-key from the environment or Key Vault, sent in
``Ocp-Apim-Subscription-Key``, or an Entra ID token kept fresh in the background) and its two
calls, ``text:analyze`` and ``text:shieldPrompt`` (REST API version :data:`API_VERSION`).
``ContentSafetyGuard`` is one product's policy: it takes the request's text, sends it
(in pieces of at most :data:`MAX_TEXT_CHARS` characters, the service's limit per call; APIM
answers 500 to a longer text instead), runs the analyses and Prompt Shields side by side, and
refuses the request with 403 ``content_filter`` when a category reaches its threshold, a
blocklist matches or an attack is detected. The decisions (which text, how it is cut, what
blocks) are pure functions here; the guard only carries them out.

Which text: what the token estimate reads (``tokens/estimate.py``): chat messages (text
contents and parts, names, tool calls' arguments and custom tools' input); the Responses
API's instructions and input items; completions' prompts; embeddings' inputs; On Your
Data sources' ``role_information``. Tool definitions and response formats are read whole
(every string of their schemas, and the property names: the model reads them all, ``$defs``
included), not as the estimate samples them. Images, audio and files are left out, and so
are role names (``user``, ``system``, …: a blocklist term never matches them). A
completions prompt of token ids cannot be checked and is refused (400); embeddings' token
arrays are not checked (nothing is generated).

A check costs the request one round trip to the service (the calls run concurrently); a
product without ``content_safety`` pays one attribute check in the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import (
    BackendConfig,
    ContentSafetyServiceConfig,
    ProductContentSafetyConfig,
    TimeoutsConfig,
)
from sluicegate.proxy.errors import GatewayError
from sluicegate.tokens import estimate
from sluicegate.tokens.offload import INLINE_COUNT_BYTES, counting_thread
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.identity import BackendAuthError

if TYPE_CHECKING:
    from sluicegate.proxy.context import RequestContext

log = logging.getLogger("sluicegate.guardrails")

API_VERSION = "2024-09-01"
#: The most characters (Unicode code points) one ``text:analyze`` or ``text:shieldPrompt``
#: call takes; a longer text is sent in several calls.
MAX_TEXT_CHARS = 10_000
#: Characters each piece of a long text repeats of the one before: more than a blocklist item
#: holds (at most 128 characters), so that no item is cut in two.
OVERLAP_CHARS = 256
#: Calls of one check in flight at once (a long prompt makes many).
MAX_CONCURRENT_CALLS = 8
#: The largest answer read from the service (its answers are a few hundred bytes).
_MAX_ANSWER_BYTES = 1024 * 1024
#: At most one warning per service in this many seconds about failed checks.
_WARNING_INTERVAL_S = 10.0
#: Why a request was refused, in this order of precedence (the metric's ``reason``).
REASONS = ("PromptAttack", "Blocklist", "Hate", "SelfHarm", "Sexual", "Violence")
#: Content Safety's category → Azure OpenAI's content filter name.
_FILTER_NAMES = {
    "Hate": "hate",
    "SelfHarm": "self_harm",
    "Sexual": "sexual",
    "Violence": "violence",
}
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


# -- which text ----------------------------------------------------------------------------------


class _TextCollector(estimate._Meter):
    """The token estimate's walk over a request body, keeping the text instead of counting it
    (fixed costs, for images and the like, are dropped)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        super().__init__(None)
        self.parts: list[str] = []

    def string(self, text: str) -> None:
        if text and text not in _ROLES:
            self.parts.append(text)

    def fixed(self, tokens: int) -> None:
        return

    def strings(self, value: object) -> None:
        """Every string in ``value`` (a tool definition, a schema), however deep, but the
        values of ``type`` keys (JSON Schema's and the tools' own words); and the names under
        ``properties`` and the like, which the model reads as well."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                self.string(item)
            elif isinstance(item, Mapping):
                for key, child in reversed(list(item.items())):
                    if key == "type" and isinstance(child, str):
                        continue
                    if key in _NAMED_SCHEMAS and isinstance(child, Mapping):
                        self.parts.extend(name for name in child if isinstance(name, str))
                    stack.append(child)
            elif isinstance(item, list):
                stack.extend(reversed(item))


#: Schema keys whose children's names are text the model reads (property and type names).
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def prompt_text(body: Mapping[str, Any], operation: str) -> str:
    """All text of a request body for ``operation`` (a route's, e.g. ``chat/completions``),
    joined by line breaks (see the module docstring); ``""`` when it has none."""
    collector = _TextCollector()
    op = estimate.normalise_operation(operation)
    if op == estimate.CHAT:
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, Mapping):
                estimate._message(message, collector)
                calls = message.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, Mapping) and "function" not in call:
                        collector.strings(call.get("custom"))  # a custom tool's input
        collector.strings(body.get("tools"))
        collector.strings(body.get("functions"))
        collector.strings(body.get("response_format"))
        for source in _list(body.get("data_sources")):
            # On Your Data: role_information is a system message the model reads; the rest
            # (endpoints, index names, the search service's credentials) is not sent.
            parameters = source.get("parameters") if isinstance(source, Mapping) else None
            if isinstance(parameters, Mapping):
                collector.text(parameters.get("role_information"))
    elif op == estimate.RESPONSES:
        estimate._responses(
            {"instructions": body.get("instructions"), "input": body.get("input")}, collector
        )
        collector.strings(_without_credentials(body.get("tools")))
        text = body.get("text")
        if isinstance(text, Mapping):
            collector.strings(text.get("format"))
    elif op == estimate.EMBEDDINGS:
        estimate._inputs(body.get("input"), collector)
    elif op == estimate.COMPLETIONS:
        estimate._inputs(body.get("prompt"), collector)
        collector.text(body.get("suffix"))
    else:
        estimate._walk_text(body, collector)
    return "\n".join(collector.parts)


#: Keys of a Responses MCP tool that hold the MCP server's credentials, not text.
_MCP_CREDENTIALS = frozenset({"headers", "authorization"})


def _without_credentials(tools: object) -> object:
    """``tools`` without their MCP tools' credentials: they are no prompt, and a token is
    not sent to one more service."""
    if not isinstance(tools, list):
        return tools
    return [
        {k: v for k, v in tool.items() if k not in _MCP_CREDENTIALS}
        if isinstance(tool, Mapping) and tool.get("type") == "mcp"
        else tool
        for tool in tools
    ]


def _token_prompt(body: Mapping[str, Any], operation: str) -> bool:
    """Whether a completions request gives its prompt as token ids (a list of integers, or
    a list holding one): text the model reads that no check can."""
    if estimate.normalise_operation(operation) != estimate.COMPLETIONS:
        return False
    prompt = body.get("prompt")
    return isinstance(prompt, list) and any(isinstance(p, int | list) for p in prompt)


def split_text(text: str, limit: int = MAX_TEXT_CHARS, overlap: int = OVERLAP_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut after a line break or a space
    in each piece's second half where there is one (a word cut in two would slip past a
    blocklist), else at the limit. Each piece after the first starts at least ``overlap``
    characters before the previous one's end (after a space where there is one), so that a
    blocklist phrase across a cut ("project nightingale" cut after "project ") is whole in
    one piece. Pieces of whitespace only are left out (the service refuses an empty text)."""
    pieces: list[str] = []
    overlap = min(overlap, limit // 4)
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = max(
            text.rfind("\n", start + limit // 2, end), text.rfind(" ", start + limit // 2, end)
        )
        cut = end if cut < 0 else cut + 1
        pieces.append(text[start:cut])
        back = cut - overlap
        space = max(text.rfind("\n", back - overlap, back), text.rfind(" ", back - overlap, back))
        start = back if space < 0 else space + 1
    pieces.append(text[start:])
    return [piece for piece in pieces if piece.strip()]


# -- what blocks --------------------------------------------------------------------------------


@dataclass(slots=True)
class Findings:
    """What the service found in all pieces of a prompt: each category's highest severity,
    the blocklists that matched, whether Prompt Shields saw an attack."""

    severities: dict[str, int] = field(default_factory=dict)
    blocklists: list[str] = field(default_factory=list)
    attack: bool = False

    def add_analysis(self, answer: Mapping[str, Any]) -> None:
        """Merge a ``text:analyze`` answer (``categoriesAnalysis``, ``blocklistsMatch``)."""
        for entry in _list(answer.get("categoriesAnalysis")):
            if isinstance(entry, Mapping) and isinstance(entry.get("category"), str):
                severity = entry.get("severity")
                value = severity if isinstance(severity, int) else 0
                category = entry["category"]
                self.severities[category] = max(value, self.severities.get(category, 0))
        for match in _list(answer.get("blocklistsMatch")):
            name = match.get("blocklistName") if isinstance(match, Mapping) else None
            if isinstance(name, str) and name not in self.blocklists:
                self.blocklists.append(name)

    def add_shield(self, answer: Mapping[str, Any]) -> None:
        """Merge a ``text:shieldPrompt`` answer (``userPromptAnalysis.attackDetected``)."""
        analysis = answer.get("userPromptAnalysis")
        if isinstance(analysis, Mapping) and analysis.get("attackDetected") is True:
            self.attack = True


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def blocking_reasons(findings: Findings, policy: ProductContentSafetyConfig) -> list[str]:
    """Why ``policy`` refuses a prompt with these findings, in :data:`REASONS` order (empty:
    it passes). A category blocks at a severity of at least its threshold (APIM's rule)."""
    reasons: list[str] = []
    if policy.shield_prompt and findings.attack:
        reasons.append("PromptAttack")
    if findings.blocklists:
        reasons.append("Blocklist")
    thresholds = _thresholds(policy)
    for category in REASONS[2:]:
        threshold = thresholds.get(category)
        if threshold is not None and findings.severities.get(category, 0) >= threshold:
            reasons.append(category)
    return reasons


def _thresholds(policy: ProductContentSafetyConfig) -> dict[str, int]:
    return {str(category): threshold for category, threshold in policy.categories.items()}


def _severity_name(severity: int) -> str:
    """Azure OpenAI's filter levels for a Content Safety severity (0-1, 2-3, 4-5, 6-7)."""
    return ("safe", "low", "medium", "high")[max(0, min(severity, 7)) // 2]


class ContentFiltered(GatewayError):
    """A prompt the product's content safety policy refuses: 403 ``content_filter``, with
    ``innererror`` as Azure OpenAI's own filter words it (``ResponsibleAIPolicyViolation``
    and a ``content_filter_result``), so that clients that read it keep working."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(403, "content_filter", message)
        self.result = result

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "code": self.code,
                    "message": self.message,
                    "param": "prompt",
                    "status": self.status,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": self.result,
                    },
                }
            }
        )


def refusal(
    product: str, reasons: list[str], findings: Findings, policy: ProductContentSafetyConfig
) -> ContentFiltered:
    """The 403 for a refused prompt: what blocked it (never the prompt's text, nor the
    blocklist terms it matched) and the filter result in Azure OpenAI's shape."""
    said: list[str] = []
    for reason in reasons:
        if reason == "PromptAttack":
            said.append("Prompt Shields detected a prompt attack")
        elif reason == "Blocklist":
            names = ", ".join(repr(n) for n in findings.blocklists)
            said.append(f"it matches blocklist {names}")
        else:
            severity = findings.severities.get(reason, 0)
            threshold = _thresholds(policy)[reason]
            said.append(f"category {reason} has severity {severity} (threshold {threshold})")
    result: dict[str, Any] = {}
    for category, threshold in policy.categories.items():
        severity = findings.severities.get(category, 0)
        result[_FILTER_NAMES[category]] = {
            "filtered": severity >= threshold,
            "severity": _severity_name(severity),
        }
    if policy.shield_prompt:
        result["jailbreak"] = {"filtered": findings.attack, "detected": findings.attack}
    if policy.blocklists:
        result["custom_blocklists"] = {
            "filtered": bool(findings.blocklists),
            "details": [{"filtered": True, "id": name} for name in findings.blocklists],
        }
    return ContentFiltered(
        f"The prompt was refused by the gateway's content safety policy (product {product!r}): "
        f"{'; '.join(said)}. It was not sent to the model. Change the prompt, or ask the "
        "gateway's operators about the policy.",
        result,
    )


# -- the service ----------------------------------------------------------------------------------


class ContentSafetyUnavailable(Exception):
    """A check could not be completed. ``transient``: the service was unreachable, slow,
    throttling or failing (5xx), rather than refusing the gateway's call (a wrong key, an
    unknown blocklist): a configuration problem. ``reason`` (the client is told it) holds no
    secret; ``detail``, for the log only, what the operators need besides (azure-identity's
    reasons carry tenant and application ids, AADSTS codes, endpoint details)."""

    def __init__(self, reason: str, transient: bool = True, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.detail = detail


class ContentSafetyService:
    """One Azure AI Content Safety resource. ``open()`` before use (reads a Key Vault key,
    starts the token refresh), ``close()`` after; calls are safe from many tasks at once
    (one event loop)."""

    def __init__(
        self,
        config: ContentSafetyServiceConfig,
        environ: Mapping[str, str],
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.timeout = config.timeout_seconds
        self._clock = clock or SystemClock()
        backend = BackendConfig(
            name=config.name,
            url=config.url,
            auth=config.auth,
            timeouts=TimeoutsConfig(connect=min(5.0, config.timeout_seconds)),
            max_connections=config.max_connections,
        )
        try:
            self._backend = Backend(backend, dict(environ), self._clock)
        except RuntimeError as exc:
            reason = str(exc).removeprefix(f"backend {config.name}: ")
            raise RuntimeError(f"content safety service {config.name}: {reason}") from None
        self._warned_at: float | None = None
        self._unwarned = 0

    async def open(self) -> None:
        await self._backend.open()

    async def close(self) -> None:
        await self._backend.close()

    def secrets(self) -> list[str]:
        """Its key or token (for tests that prove none leaks)."""
        return self._backend.secrets()

    async def analyze(self, text: str, policy: ProductContentSafetyConfig) -> dict[str, Any]:
        """``text:analyze`` of one piece of text with ``policy``'s categories and blocklists."""
        payload: dict[str, Any] = {
            "text": text,
            "categories": list(policy.categories),
            "outputType": policy.output_type,
        }
        if policy.blocklists:
            # A blocklist hit refuses the prompt whatever the categories say: no need to wait
            # for their analysis.
            payload["blocklistNames"] = policy.blocklists
            payload["haltOnBlocklistHit"] = True
        return await self._post("text:analyze", payload)

    async def shield(self, text: str) -> dict[str, Any]:
        """``text:shieldPrompt`` of one piece of text as the user prompt."""
        return await self._post("text:shieldPrompt", {"userPrompt": text, "documents": []})

    async def _post(self, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.config.url}/contentsafety/{operation}?api-version={API_VERSION}"
        try:
            auth = await self._backend.request_auth()
        except BackendAuthError as exc:
            raise ContentSafetyUnavailable("no Entra ID token", detail=str(exc)) from None
        headers = [("content-type", "application/json"), ("accept", "application/json"), *auth]
        try:
            response = await self._backend.client.request(
                "POST", url, headers, orjson.dumps(payload)
            )
        except TimeoutError:
            raise ContentSafetyUnavailable("connecting timed out") from None
        except OSError as exc:
            raise ContentSafetyUnavailable(f"unreachable ({type(exc).__name__})") from None
        chunks: list[bytes] = []
        try:
            size = 0
            while data := await response.readany():
                chunks.append(data)
                size += len(data)
                if size > _MAX_ANSWER_BYTES:
                    raise ContentSafetyUnavailable("its answer is too large")
            response.release()
        except OSError as exc:
            raise ContentSafetyUnavailable(f"its answer broke off ({type(exc).__name__})") from None
        finally:
            response.close()  # (nothing after release(): only the first of the two counts)
        raw = b"".join(chunks)
        status = response.status
        if status != 200:
            raise ContentSafetyUnavailable(
                f"{operation} answered {status}{_error_code(raw)}",
                transient=status in (408, 429) or status >= 500,
            )
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise ContentSafetyUnavailable(f"{operation} answered 200 without a JSON object")
        return answer

    def failed(self, product: str, reason: str, action: str, request_id: str) -> None:
        """Log a failed check (``reason``: its reason and detail): at most one warning every
        ``_WARNING_INTERVAL_S`` seconds per service, with how many failures it stands for."""
        now = self._clock.monotonic()
        if self._warned_at is not None and now - self._warned_at < _WARNING_INTERVAL_S:
            self._unwarned += 1
            return
        more = f" ({self._unwarned} more since the last warning)" if self._unwarned else ""
        log.warning(
            "content safety service %s: the check of request %s (product %s) failed: %s; "
            "the request was %s%s",
            self.name, request_id, product, reason,
            "refused" if action == "block" else "let through unchecked", more,
        )  # fmt: skip
        self._warned_at, self._unwarned = now, 0

    def __repr__(self) -> str:
        return f"ContentSafetyService(name={self.name!r}, url={self.config.url!r})"


def _error_code(raw: bytes) -> str:
    """`` (code)`` from an answer in the ``{"error": {"code", …}}`` shape, else ``""``."""
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    code = error.get("code") if isinstance(error, dict) else None
    return f" ({code[:100]})" if isinstance(code, str) else ""


# -- the check ---------------------------------------------------------------------------------


class ContentSafetyObserver(Protocol):
    """Where checks are counted (``metrics.registry.GatewayMetrics``)."""

    def content_safety_refused(self, product: str, reason: str) -> None: ...

    def content_safety_failed(self, product: str, action: str) -> None: ...


class ContentSafetyGuard:
    """One product's ``content_safety`` policy over its service."""

    def __init__(
        self, product: str, policy: ProductContentSafetyConfig, service: ContentSafetyService
    ) -> None:
        self.product = product
        self.policy = policy
        self.service = service
        self.analyze = bool(policy.categories or policy.blocklists)
        self.observer: ContentSafetyObserver | None = None

    async def check(self, ctx: RequestContext) -> None:
        """Check the request's text; return if it passes, raise ``ContentFiltered`` (403) if
        the policy refuses it. When the check cannot be completed within the service's
        ``timeout_seconds``: return (``on_error: allow``) or raise 503
        ``ContentSafetyUnavailable`` (the service unreachable, slow or failing) / 500
        ``ContentSafetyError`` (it refused the gateway's call). A refusal marks the request's
        record (``extra.content_safety``: the first reason). Checked by nobody: a text longer
        than ``max_text_chars`` (413) and a completions prompt of token ids (400)."""
        body = ctx.json
        if body is not None and _token_prompt(body, ctx.route.operation):
            raise GatewayError(
                400,
                "ContentSafetyTokenPrompt",
                f"Product {self.product!r} checks prompts with its content safety service, "
                "which reads text: send the prompt as text, not as token ids.",
            )
        operation = ctx.route.operation
        if body is None:
            text = ""
        elif len(ctx.body) > INLINE_COUNT_BYTES:
            # Off the event loop, as admission counts it: the walk of an 8 MB body of small
            # items takes seconds, which every other request would wait out.
            text = await counting_thread().run(lambda: prompt_text(body, operation))
        else:
            text = prompt_text(body, operation)
        if len(text) > self.policy.max_text_chars:
            raise GatewayError(
                413,
                "ContentSafetyTextTooLong",
                f"The request's text is {len(text):,} characters long; product "
                f"{self.product!r} checks prompts of at most {self.policy.max_text_chars:,} "
                "characters with its content safety service. Send a shorter prompt.",
            )
        pieces = split_text(text) if text else []
        if not pieces:
            return
        try:
            async with asyncio.timeout(self.service.timeout):
                findings = await self._findings(pieces)
        except (ContentSafetyUnavailable, TimeoutError) as exc:
            if isinstance(exc, ContentSafetyUnavailable):
                failure = exc
            else:
                failure = ContentSafetyUnavailable(f"no answer within {self.service.timeout:g} s")
            self._failed(ctx, failure)
            return
        reasons = blocking_reasons(findings, self.policy)
        if reasons:
            ctx.extra = {**ctx.extra, "content_safety": reasons[0]}
            if self.observer is not None:
                self.observer.content_safety_refused(self.product, reasons[0])
            raise refusal(self.product, reasons, findings, self.policy)

    def unchecked_operation(self, ctx: RequestContext) -> None:
        """A request the check does not read: a deployment's other operations (images,
        audio, …) and the passthrough paths (files, batches, …). One with a body could carry
        a prompt past the check (an image's prompt, a batch's input file): refused with 403
        ``OperationNotAllowed`` unless the product's configuration says ``passthrough: true``
        in so many words. Bodiless ones (reading or deleting a stored response, a cancel)
        carry none and pass."""
        if not ctx.body or (ctx.product is not None and ctx.product.config.passthrough):
            return
        raise GatewayError(
            403,
            "OperationNotAllowed",
            f"Product {self.product!r} checks prompts with its content safety service, which "
            "reads chat/completions, completions, embeddings and responses only: a body sent "
            f"to {ctx.route.upstream_suffix!r} would not be checked.",
        )

    async def _findings(self, pieces: list[str]) -> Findings:
        """Every call for every piece, concurrently (at most ``MAX_CONCURRENT_CALLS`` at a
        time); the first failure cancels the others and is raised."""
        findings = Findings()
        slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)

        async def analyze(piece: str) -> None:
            async with slots:
                findings.add_analysis(await self.service.analyze(piece, self.policy))

        async def shield(piece: str) -> None:
            async with slots:
                findings.add_shield(await self.service.shield(piece))

        try:
            async with asyncio.TaskGroup() as group:
                for piece in pieces:
                    if self.analyze:
                        group.create_task(analyze(piece))
                    if self.policy.shield_prompt:
                        group.create_task(shield(piece))
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None
        return findings

    def _failed(self, ctx: RequestContext, failure: ContentSafetyUnavailable) -> None:
        action = self.policy.on_error
        logged = f"{failure.reason} ({failure.detail})" if failure.detail else failure.reason
        self.service.failed(self.product, logged, action, ctx.request_id)
        if self.observer is not None:
            self.observer.content_safety_failed(self.product, action)
        if action == "allow":
            return
        if failure.transient:
            raise GatewayError(
                503,
                "ContentSafetyUnavailable",
                f"The gateway could not check the prompt with its content safety service "
                f"({failure.reason}), and product {self.product!r} refuses prompts it cannot "
                "check. Retry shortly.",
                retry_after=1,
            )
        raise GatewayError(
            500,
            "ContentSafetyError",
            f"The gateway's content safety service refused its check of the prompt "
            f"({failure.reason}), and product {self.product!r} refuses prompts it cannot "
            f"check. Tell the gateway's operators (request id {ctx.request_id}).",
        )

    def __repr__(self) -> str:
        return f"ContentSafetyGuard(product={self.product!r}, service={self.service.name!r})"
