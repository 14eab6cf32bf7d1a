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
Data sources' ``role_information``; and what the estimate leaves out: chat's Predicted
Outputs (``prediction.content``), a stored prompt's ``prompt.variables`` and a reasoning
item's reasoning text (Responses).
Tool definitions and response formats are read whole (every string of their schemas, and
the property names: the model reads them all, ``$defs`` included), not as the estimate
samples them. Images, audio and files are left out, and so are role names (``user``,
``system``, …: a blocklist term never matches them). A completions prompt of token ids
cannot be checked and is refused (400); embeddings' token arrays are not checked (nothing
is generated). Prompt Shields gets the third-party content in it (tool results:
:func:`prompt_parts`) as ``documents``, the rest as ``userPrompt``, within its limits per
call (:func:`shield_calls`).

A check costs the request one round trip to the service (the calls run concurrently); a
product without ``content_safety`` pays one attribute check in the pipeline. A client that
leaves during the check has its calls cancelled (``ContentSafetyGuard.check``'s ``hook``).
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
from sluicegate.proxy.asgi import ClientGone
from sluicegate.proxy.errors import GatewayError
from sluicegate.tokens import estimate
from sluicegate.tokens.offload import INLINE_COUNT_BYTES, counting_thread
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.identity import BackendAuthError

if TYPE_CHECKING:
    from sluicegate.proxy.asgi import DisconnectHook
    from sluicegate.proxy.context import RequestContext

log = logging.getLogger("sluicegate.guardrails")

API_VERSION = "2024-09-01"
#: The most characters (Unicode code points) one ``text:analyze`` or ``text:shieldPrompt``
#: call takes; a longer text is sent in several calls.
MAX_TEXT_CHARS = 10_000
#: Characters each piece of a long text repeats of the one before: more than a blocklist item
#: holds (at most 128 characters), so that no item is cut in two.
OVERLAP_CHARS = 256
#: The most documents one ``text:shieldPrompt`` call takes (their characters count towards
#: :data:`MAX_TEXT_CHARS` together with the user prompt's: see :func:`shield_calls`).
MAX_SHIELD_DOCUMENTS = 5
#: Calls of one check in flight at once (a long prompt makes many).
MAX_CONCURRENT_CALLS = 8
#: The largest answer read from the service (its answers are a few hundred bytes).
_MAX_ANSWER_BYTES = 1024 * 1024
#: At most one warning per service in this many seconds about failed checks.
_WARNING_INTERVAL_S = 10.0
#: Why a request was refused, in this order of precedence (the metric's ``reason``).
REASONS = (
    "PromptAttack", "IndirectAttack", "Blocklist", "Hate", "SelfHarm", "Sexual", "Violence"
)  # fmt: skip
_CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
#: The one category a blocklist-only policy's ``text:analyze`` calls ask for (and ignore).
BLOCKLIST_ONLY_CATEGORY = "Hate"
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
    (fixed costs, for images and the like, are dropped). Every text goes to ``parts``; text
    walked between :meth:`begin_document` and :meth:`end_document` (third-party content: a
    tool's result) makes one of ``documents``, the rest goes to ``user`` as well."""

    __slots__ = ("_document", "documents", "parts", "user")

    def __init__(self) -> None:
        super().__init__(None)
        self.parts: list[str] = []
        self.user: list[str] = []
        self.documents: list[str] = []
        self._document: list[str] | None = None

    def string(self, text: str) -> None:
        if text and text not in _ROLES:
            self._keep(text)

    def _keep(self, text: str) -> None:
        self.parts.append(text)
        (self.user if self._document is None else self._document).append(text)

    def fixed(self, tokens: int) -> None:
        return

    def begin_document(self) -> None:
        self._document = []

    def end_document(self) -> None:
        """One document of the text walked since :meth:`begin_document` (none if it had no
        text)."""
        if self._document:
            self.documents.append("\n".join(self._document))
        self._document = None

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
                        for name in child:
                            if isinstance(name, str) and name:
                                self._keep(name)
                    stack.append(child)
            elif isinstance(item, list):
                stack.extend(reversed(item))

    def document(self, value: object) -> None:
        """Every text of ``value`` (a tool's output: a string, content parts, a list of
        search results, …) as one document; its images, audio and files left out."""
        self.begin_document()
        self.strings(estimate._without_media(value, estimate._Meter(None), 0))
        self.end_document()


#: Schema keys whose children's names are text the model reads (property and type names).
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


@dataclass(frozen=True, slots=True)
class PromptText:
    """A request's text as the check sends it: ``text``, all of it (``text:analyze``), and
    the same text apart for Prompt Shields: ``documents``, the third-party content in it
    (each tool result one document), and ``user``, the rest (what the client, its user and
    its system prompt wrote)."""

    text: str
    user: str
    documents: list[str]


def prompt_text(body: Mapping[str, Any], operation: str) -> str:
    """All text of a request body for ``operation`` (a route's, e.g. ``chat/completions``),
    joined by line breaks (see the module docstring); ``""`` when it has none."""
    return prompt_parts(body, operation).text


def prompt_parts(body: Mapping[str, Any], operation: str) -> PromptText:
    """The text of a request body for ``operation`` (:func:`prompt_text`), with its
    third-party content apart: chat messages of role ``tool`` and ``function`` (their
    content; their names and call ids are the user's), the Responses API's tool outputs
    (``function_call_output`` and every other ``*_call_output`` item, an MCP call's output
    or error, an MCP server's tool list, file search results, code interpreter outputs)."""
    collector = _TextCollector()
    op = estimate.normalise_operation(operation)
    if op == estimate.CHAT:
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, Mapping):
                continue
            if message.get("role") in _TOOL_ROLES:
                estimate._message({k: v for k, v in message.items() if k != "content"}, collector)
                collector.document(message.get("content"))
                continue
            estimate._message(message, collector)
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, Mapping) and "function" not in call:
                    collector.strings(call.get("custom"))  # a custom tool's input
        _prediction(body.get("prediction"), collector)
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
        _responses_input(body, collector)
        _prompt_variables(body.get("prompt"), collector)
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
    return PromptText("\n".join(collector.parts), "\n".join(collector.user), collector.documents)


_TOOL_ROLES = frozenset({"tool", "function"})
#: Responses input items → their keys that hold third-party content (besides every
#: ``*_call_output`` item's ``output``).
_DOCUMENT_KEYS: dict[str, tuple[str, ...]] = {
    "mcp_call": ("output", "error"),
    "mcp_list_tools": ("tools", "error"),
    "file_search_call": ("results",),
    "code_interpreter_call": ("outputs",),
}


def _responses_input(body: Mapping[str, Any], collector: _TextCollector) -> None:
    """The Responses API's ``instructions`` and ``input``, as the estimate walks them, each
    tool output item's output as a document of its own."""
    items = body.get("input")
    if not isinstance(items, list):
        estimate._responses({"instructions": body.get("instructions"), "input": items}, collector)
        return
    estimate._responses({"instructions": body.get("instructions")}, collector)
    for item in items:
        kind = item.get("type") if isinstance(item, Mapping) else None
        keys = _DOCUMENT_KEYS.get(kind) if isinstance(kind, str) else None
        if keys is None and isinstance(kind, str) and kind.endswith("_call_output"):
            keys = ("output",)
        if keys is None:
            estimate._responses({"input": [item]}, collector)
            if kind == "reasoning" and isinstance(item, Mapping):
                # Its reasoning text (``reasoning_text`` parts), which the estimate leaves
                # out: what an open-weight model is given back of its earlier turn.
                content = item.get("content")
                for part in content if isinstance(content, list) else ():
                    estimate._part(part, collector)
            continue
        assert isinstance(item, Mapping)
        # The item's ids, names and arguments are the client's own (the model's calls).
        rest = {k: v for k, v in item.items() if k not in keys}
        estimate._responses({"input": [rest]}, collector)
        collector.document([item.get(key) for key in keys])


def _prediction(prediction: object, collector: _TextCollector) -> None:
    """A chat request's Predicted Outputs (``{"type": "content", "content": …}``, a string
    or text parts): text the model is given, the client's own."""
    if isinstance(prediction, Mapping):
        estimate._content(prediction.get("content"), collector)


def _prompt_variables(prompt: object, collector: _TextCollector) -> None:
    """The values a Responses request substitutes into a stored prompt (``prompt.variables``:
    strings, or input items of which text is read: ``input_text``; images and files are
    not sent). The stored prompt itself is the operators' (kept by the service, not
    in the request)."""
    variables = prompt.get("variables") if isinstance(prompt, Mapping) else None
    if isinstance(variables, Mapping):
        for value in variables.values():
            estimate._part(value, collector)


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


def shield_calls(
    user: str,
    documents: list[str],
    limit: int = MAX_TEXT_CHARS,
    max_documents: int = MAX_SHIELD_DOCUMENTS,
) -> list[tuple[str, list[str]]]:
    """The ``(userPrompt, documents)`` of each ``text:shieldPrompt`` call that checks
    ``user`` and ``documents``: the user text in :func:`split_text`'s pieces, one a call;
    each document too (a long one in several pieces, each a document). The documents fill
    the room the last user piece leaves, then calls of their own (``userPrompt`` empty).
    A call holds at most ``max_documents`` documents, and at most ``limit`` characters
    all told (user prompt and documents: the stricter reading of the service's limits of
    10,000 characters for the prompt and 10,000 for its at most five documents); past
    ``max_documents`` a piece joins the call's last document (both third-party content),
    rather than open a call for five short tool results each."""
    calls: list[tuple[str, list[str]]] = [(piece, []) for piece in split_text(user, limit)]
    room = limit - len(calls[-1][0]) if calls else 0
    for document in documents:
        for piece in split_text(document, limit):
            docs = calls[-1][1] if calls else None
            if docs is not None and len(docs) >= max_documents:
                if len(piece) + 1 <= room:  # (a sixth document would be refused: 400)
                    docs[-1] = f"{docs[-1]}\n{piece}"
                    room -= len(piece) + 1
                else:
                    calls.append(("", [piece]))
                    room = limit - len(piece)
            elif docs is not None and len(piece) <= room:
                docs.append(piece)
                room -= len(piece)
            else:
                calls.append(("", [piece]))
                room = limit - len(piece)
    return calls


# -- what blocks --------------------------------------------------------------------------------


@dataclass(slots=True)
class Findings:
    """What the service found in all pieces of a prompt: each category's highest severity,
    the blocklists that matched, whether Prompt Shields saw an attack in the user prompt
    (``attack``) or in a document (``indirect_attack``), and whether it was given documents
    at all (``documents``)."""

    severities: dict[str, int] = field(default_factory=dict)
    blocklists: list[str] = field(default_factory=list)
    attack: bool = False
    indirect_attack: bool = False
    documents: bool = False

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
        """Merge a ``text:shieldPrompt`` answer (``userPromptAnalysis.attackDetected``, and
        each of ``documentsAnalysis``'s)."""
        analysis = answer.get("userPromptAnalysis")
        if isinstance(analysis, Mapping) and analysis.get("attackDetected") is True:
            self.attack = True
        for document in _list(answer.get("documentsAnalysis")):
            if isinstance(document, Mapping) and document.get("attackDetected") is True:
                self.indirect_attack = True


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def blocking_reasons(findings: Findings, policy: ProductContentSafetyConfig) -> list[str]:
    """Why ``policy`` refuses a prompt with these findings, in :data:`REASONS` order (empty:
    it passes). A category blocks at a severity of at least its threshold (APIM's rule)."""
    reasons: list[str] = []
    if policy.shield_prompt and findings.attack:
        reasons.append("PromptAttack")
    if policy.shield_prompt and findings.indirect_attack:
        reasons.append("IndirectAttack")
    if findings.blocklists:
        reasons.append("Blocklist")
    thresholds = _thresholds(policy)
    for category in _CATEGORIES:
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
        elif reason == "IndirectAttack":
            said.append(
                "Prompt Shields detected an indirect prompt attack in third-party content "
                "(a tool's result)"
            )
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
        if findings.documents:
            # Azure OpenAI's name for an attack in documents, there only when it had any.
            indirect = findings.indirect_attack
            result["indirect_attack"] = {"filtered": indirect, "detected": indirect}
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
            # A blocklist-only policy asks for one category (its severity is not looked at):
            # categories not given means the default set, all four, and an empty list is
            # documented as nothing else. The price, per 1,000 characters, is the same.
            "categories": list(policy.categories) or [BLOCKLIST_ONLY_CATEGORY],
            "outputType": policy.output_type,
        }
        if policy.blocklists:
            # A blocklist hit refuses the prompt whatever the categories say: no need to wait
            # for their analysis.
            payload["blocklistNames"] = policy.blocklists
            payload["haltOnBlocklistHit"] = True
        return await self._post("text:analyze", payload)

    async def shield(self, user: str, documents: list[str] | None = None) -> dict[str, Any]:
        """``text:shieldPrompt`` of a user prompt and documents (within the service's limits:
        :func:`shield_calls`)."""
        payload = {"userPrompt": user, "documents": documents or []}
        return await self._post("text:shieldPrompt", payload)

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

    async def check(self, ctx: RequestContext, hook: DisconnectHook | None = None) -> None:
        """Check the request's text; return if it passes, raise ``ContentFiltered`` (403) if
        the policy refuses it. When the check cannot be completed within the service's
        ``timeout_seconds``: return (``on_error: allow``) or raise 503
        ``ContentSafetyUnavailable`` (the service unreachable, slow or failing) / 500
        ``ContentSafetyError`` (it refused the gateway's call). A refusal marks the request's
        record (``extra.content_safety``: the first reason). Checked by nobody: a text longer
        than ``max_text_chars`` (413) and a completions prompt of token ids (400).

        ``hook``: the client's connection; when it is lost during the check, the calls in
        flight are cancelled (their connections to the service closed) and ``ClientGone`` is
        raised: nobody waits for the verdict."""
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
            parts = PromptText("", "", [])
        elif len(ctx.body) > INLINE_COUNT_BYTES:
            # Off the event loop, as admission counts it: the walk of an 8 MB body of small
            # items takes seconds, which every other request would wait out.
            parts = await counting_thread().run(lambda: prompt_parts(body, operation))
        else:
            parts = prompt_parts(body, operation)
        text = parts.text
        if len(text) > self.policy.max_text_chars:
            raise GatewayError(
                413,
                "ContentSafetyTextTooLong",
                f"The request's text is {len(text):,} characters long; product "
                f"{self.product!r} checks prompts of at most {self.policy.max_text_chars:,} "
                "characters with its content safety service. Send a shorter prompt.",
            )
        pieces = split_text(text) if self.analyze else []
        shields = shield_calls(parts.user, parts.documents) if self.policy.shield_prompt else []
        if not pieces and not shields:
            return
        try:
            findings = await self._in_time(pieces, shields, hook)
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

    async def _in_time(
        self,
        pieces: list[str],
        shields: list[tuple[str, list[str]]],
        hook: DisconnectHook | None,
    ) -> Findings:
        """:meth:`_findings` within the service's ``timeout_seconds`` (else ``TimeoutError``),
        cancelled when ``hook`` says that the client left (then ``ClientGone``). The
        request's own task is cancelled, as ``asyncio.timeout`` does it: the task group
        cancels every call and waits for them, and each call closes its connection, so
        nothing of the check outlives it."""
        if hook is None:
            async with asyncio.timeout(self.service.timeout):
                return await self._findings(pieces, shields)
        if hook.fired:
            raise ClientGone
        task = asyncio.current_task()
        assert task is not None
        gone = False

        def left() -> None:
            nonlocal gone
            gone = True
            task.cancel()

        hook.add(left)
        try:
            async with asyncio.timeout(self.service.timeout):
                return await self._findings(pieces, shields)
        except asyncio.CancelledError:
            # Ours only when no one else (shutdown) cancelled the task as well.
            if gone and task.uncancel() == 0:
                raise ClientGone from None
            raise
        except BaseException:
            if gone:
                # A call failed just as the client left: the task group took the
                # cancellation for its own. The client is gone all the same.
                task.uncancel()
                raise ClientGone from None
            raise
        finally:
            hook.remove(left)

    async def _findings(self, pieces: list[str], shields: list[tuple[str, list[str]]]) -> Findings:
        """Every call, concurrently (at most ``MAX_CONCURRENT_CALLS`` at a time): the
        analysis of each of ``pieces``, Prompt Shields of each of ``shields``. The first
        failure cancels the others and is raised.

        The calls' task group runs in a task of its own, which the request's task awaits (a
        cancellation of the request's task, the client leaving or the deadline, reaches the
        group all the same): Python 3.11's ``TaskGroup`` leaves the task it runs in marked
        as cancelling when a call fails while it waits for the others (a CPython bug), and
        a request's task so marked turns its later backend deadlines (``Deadlines``) into a
        cancellation instead of ``TimeoutError``: the shutdown path, 503, no failover."""
        return await asyncio.create_task(self._calls(pieces, shields))

    async def _calls(self, pieces: list[str], shields: list[tuple[str, list[str]]]) -> Findings:
        """:meth:`_findings`, in the task it awaits."""
        findings = Findings(documents=any(documents for _, documents in shields))
        slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)

        async def analyze(piece: str) -> None:
            async with slots:
                findings.add_analysis(await self.service.analyze(piece, self.policy))

        async def shield(user: str, documents: list[str]) -> None:
            async with slots:
                findings.add_shield(await self.service.shield(user, documents))

        try:
            async with asyncio.TaskGroup() as group:
                # Side by side, so that a long prompt's first pieces get both answers first.
                for i in range(max(len(pieces), len(shields))):
                    if i < len(pieces):
                        group.create_task(analyze(pieces[i]))
                    if i < len(shields):
                        group.create_task(shield(*shields[i]))
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
