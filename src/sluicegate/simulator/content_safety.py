"""A fake Azure AI Content Safety, for the tests (the demo does not run it): the two calls
the gateway makes, answered deterministically from configured words, phrases and blocklists.

Routes (REST API versions ``2023-10-01`` and ``2024-09-01``; another or none: 404)::

    POST /contentsafety/text:analyze?api-version=…       {"text", "categories", "outputType",
         → {"blocklistsMatch": [...],                      "blocklistNames", "haltOnBlocklistHit"}
            "categoriesAnalysis": [{"category", "severity"}]}
    POST /contentsafety/text:shieldPrompt?api-version=…  {"userPrompt", "documents"}
         → {"userPromptAnalysis": {"attackDetected"}, "documentsAnalysis": [{"attackDetected"}]}

As the service does: the key in ``Ocp-Apim-Subscription-Key`` (or an Entra ID token as
``Authorization: Bearer``; here one of ``bearer_tokens``), else 401; a body that is not valid
(empty text, more than 10,000 characters, an unknown category or output type; for Prompt
Shields a user prompt of more than 10,000 characters, more than five documents or documents
of more than 10,000 characters together, a document that is not text) 400
``InvalidRequestBody``; an unknown blocklist 404 ``BlocklistNotFound``; errors in the shape
``{"error": {"code", "message", "details": []}}``.

What it finds: a category's severity is the highest one configured in ``words`` for a word
the text contains (case-insensitive; 0 if none), rounded down to 0, 2, 4 or 6 for
``FourSeverityLevels`` (the service's default output type); a blocklist item matches when the
text contains it (case-insensitive), and with ``haltOnBlocklistHit`` no category is then
analysed; Prompt Shields detects an attack in a text that contains one of ``attack_phrases``:
in the user prompt (``userPromptAnalysis``) and in each document on its own
(``documentsAnalysis``, one answer per document, in their order).

``ContentSafetyState`` keeps every call (path, headers, body) in ``calls``, and can be made to
fail (``fail_status``) or to answer late (``delay_s``) while it runs, for outage tests. A call
whose client closes its connection while it waits out ``delay_s`` is answered no more
(``abandoned`` counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

Category = Literal["Hate", "SelfHarm", "Sexual", "Violence"]
CATEGORIES: tuple[Category, ...] = ("Hate", "SelfHarm", "Sexual", "Violence")
API_VERSIONS = frozenset({"2023-10-01", "2024-09-01"})
MAX_TEXT_CHARS = 10_000
#: Prompt Shields' limits: documents per call, and their characters together.
MAX_DOCUMENTS = 5
MAX_DOCUMENTS_CHARS = 10_000
#: How often a delayed answer looks whether its client is still connected.
_CLOSED_POLL_S = 0.01
#: The key ``ContentSafetySimConfig`` accepts by default.
DEFAULT_CONTENT_SAFETY_KEY = "sim-content-safety-key-0000"
_START_TIMEOUT_S = 30.0


class ContentSafetySimConfig(BaseModel):
    """What the fake finds (see the module docstring) and which credentials it takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_keys: list[str] = Field(default_factory=lambda: [DEFAULT_CONTENT_SAFETY_KEY])
    bearer_tokens: list[str] = Field(default_factory=list)
    #: Word (matched case-insensitively anywhere in the text) → category → severity 0-7.
    words: dict[str, dict[Category, Annotated[int, Field(ge=0, le=7)]]] = Field(
        default_factory=dict
    )
    attack_phrases: list[str] = Field(default_factory=lambda: ["ignore all previous instructions"])
    #: Blocklist name → its items.
    blocklists: dict[str, list[str]] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SafetyCall:
    """One request the fake received: its path (with the query), headers (names in lower
    case) and JSON body (None if it was not JSON)."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ContentSafetyState:
    """The fake's live state. ``fail_status`` (e.g. 500, 503): every call gets it;
    ``delay_s``: every answer waits this long first (``max_in_flight`` shows how many calls
    waited at once). Safe to read and set from other threads
    (single attribute reads and list appends)."""

    config: ContentSafetySimConfig
    calls: list[SafetyCall] = field(default_factory=list)
    fail_status: int | None = None
    delay_s: float = 0.0
    #: Calls waiting out ``delay_s`` now, and the most there were at once.
    in_flight: int = 0
    max_in_flight: int = 0
    #: Calls whose client closed the connection while they waited out ``delay_s``.
    abandoned: int = 0


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": []}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _ok(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _unauthorized() -> web.Response:
    return _error(
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
        "provide a valid key for an active subscription and use a correct regional API "
        "endpoint for your resource.",
    )


class _ContentSafety:
    def __init__(self, state: ContentSafetyState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/contentsafety/text:analyze", self._analyze),
            web.post("/contentsafety/text:shieldPrompt", self._shield),
        ]

    async def _received(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Log the call, then the checks every call shares: fault, version, credentials."""
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.state.calls.append(SafetyCall(request.path_qs, headers, body))
        if self.state.delay_s > 0:
            state = self.state
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                left = await self._left(request, state.delay_s)
            finally:
                state.in_flight -= 1
            if left:  # an answer nobody reads (aiohttp drops it)
                return body, _error(499, "ClientClosedRequest", "The client left.")
        if self.state.fail_status is not None:
            return body, _error(
                self.state.fail_status,
                "InternalServerError",
                "The service is temporarily unable to process the request.",
            )
        if request.query.get("api-version") not in API_VERSIONS:
            return body, _error(404, "404", "Resource not found")
        config = self.state.config
        key = headers.get("ocp-apim-subscription-key")
        bearer = headers.get("authorization", "")
        token = bearer[7:] if bearer[:7].lower() == "bearer " else None
        if key not in config.api_keys and token not in config.bearer_tokens:
            return body, _unauthorized()
        if not isinstance(body, dict):
            return body, _error(400, "InvalidRequestBody", "The request body is not valid JSON.")
        return body, None

    async def _left(self, request: web.Request, seconds: float) -> bool:
        """Sleep ``seconds``; True (sooner) if the client closes its connection meanwhile
        (aiohttp does not cancel a handler whose client left: this looks)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (remaining := until - loop.time()) > 0:
            transport = request.transport
            if transport is None or transport.is_closing():
                self.state.abandoned += 1
                return True
            await asyncio.sleep(min(remaining, _CLOSED_POLL_S))
        return False

    async def _analyze(self, request: web.Request) -> web.Response:
        body, refused = await self._received(request)
        if refused is not None:
            return refused
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return _error(400, "InvalidRequestBody", "The text is empty or missing.")
        if len(text) > MAX_TEXT_CHARS:
            return _error(
                400,
                "InvalidRequestBody",
                f"The text is too long: at most {MAX_TEXT_CHARS} characters.",
            )
        categories = body.get("categories") or list(CATEGORIES)
        if not isinstance(categories, list) or any(c not in CATEGORIES for c in categories):
            return _error(400, "InvalidRequestBody", "Unknown category in categories.")
        output = body.get("outputType", "FourSeverityLevels")
        if output not in ("FourSeverityLevels", "EightSeverityLevels"):
            return _error(400, "InvalidRequestBody", f"Unknown outputType {output!r}.")
        names = body.get("blocklistNames") or []
        config = self.state.config
        lowered = text.lower()
        matches: list[dict[str, str]] = []
        for name in names:
            items = config.blocklists.get(name) if isinstance(name, str) else None
            if items is None:
                return _error(404, "BlocklistNotFound", f"Blocklist {name!r} does not exist.")
            for item in items:
                if item.lower() in lowered:
                    item_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}/{item}"))
                    matches.append(
                        {
                            "blocklistName": name,
                            "blocklistItemId": item_id,
                            "blocklistItemText": item,
                        }
                    )
        if matches and body.get("haltOnBlocklistHit") is True:
            return _ok({"blocklistsMatch": matches, "categoriesAnalysis": []})
        analysis = []
        for category in categories:
            severity = max(
                (s.get(category, 0) for w, s in config.words.items() if w.lower() in lowered),
                default=0,
            )
            if output == "FourSeverityLevels":
                severity -= severity % 2
            analysis.append({"category": category, "severity": severity})
        return _ok({"blocklistsMatch": matches, "categoriesAnalysis": analysis})

    async def _shield(self, request: web.Request) -> web.Response:
        body, refused = await self._received(request)
        if refused is not None:
            return refused
        prompt = body.get("userPrompt", "")
        documents = body.get("documents") or []
        if (
            not isinstance(prompt, str)
            or not isinstance(documents, list)
            or not all(isinstance(d, str) for d in documents)
        ):
            return _error(400, "InvalidRequestBody", "userPrompt and documents must be text.")
        if not prompt and not documents:
            return _error(400, "InvalidRequestBody", "Give a userPrompt or documents.")
        if len(prompt) > MAX_TEXT_CHARS:
            return _error(
                400,
                "InvalidRequestBody",
                f"The userPrompt is too long: at most {MAX_TEXT_CHARS} characters.",
            )
        if len(documents) > MAX_DOCUMENTS or sum(map(len, documents)) > MAX_DOCUMENTS_CHARS:
            return _error(
                400,
                "InvalidRequestBody",
                f"Too many documents: at most {MAX_DOCUMENTS}, of at most "
                f"{MAX_DOCUMENTS_CHARS} characters together.",
            )
        return _ok(
            {
                "userPromptAnalysis": {"attackDetected": bool(prompt) and self._attack(prompt)},
                "documentsAnalysis": [{"attackDetected": self._attack(d)} for d in documents],
            }
        )

    def _attack(self, text: str) -> bool:
        lowered = text.lower()
        return any(phrase.lower() in lowered for phrase in self.state.config.attack_phrases)


def add_content_safety_routes(app: web.Application, state: ContentSafetyState) -> None:
    """Serve the fake's routes from ``app`` (e.g. beside the Azure OpenAI simulator's)."""
    app.add_routes(_ContentSafety(state).routes())


class ContentSafetyThread:
    """The fake on its own loopback port, thread and event loop, for synchronous code.
    ``start()`` returns once it listens; ``stop()`` shuts it down. A context manager."""

    def __init__(
        self, config: ContentSafetySimConfig | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.state = ContentSafetyState(config or ContentSafetySimConfig())
        self.host = host
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="content-safety-sim", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ContentSafetyThread:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("the content safety simulator did not start listening in time")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            app = web.Application()
            add_content_safety_routes(app, self.state)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            try:
                await runner.setup()
                site = web.TCPSite(runner, self.host, 0)
                await site.start()
                self.port = int(runner.addresses[0][1])
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                await runner.cleanup()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        asyncio.run(main())

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> ContentSafetyThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
