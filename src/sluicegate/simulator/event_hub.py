"""A fake Azure Event Hub for the tests and the demo: the REST "send batch" of one hub.

``POST /{hub}/messages`` as the service takes it: ``Authorization`` a shared access
signature (checked against the configured policy name and key: the signature, the expiry and
that ``sr`` covers the hub) or ``Bearer`` one of ``bearer_tokens``; ``Content-Type:
application/vnd.microsoft.servicebus.json``; the body a JSON array of ``{"Body": "<text>",
"UserProperties": {...}}``. Answers as the service does: 201 with an empty body when
accepted, else the status with its XML error body (``<Error><Code>…</Code><Detail>…
TrackingId:…, SystemTracker:<host>:<hub>, Timestamp:…</Detail></Error>``: the detail names
the entity, as the service's do): 401 for a missing, malformed, wrong or expired signature,
404 for another hub, 413 above ``max_bytes`` (1 MB), 400 for a body that is not a batch. It can be
told to refuse the next N sends (``fail_next``) as the service refuses what it cannot take
now, each with its status and its ``<Error>`` body (:data:`FAULTS`): 503 ServerBusy (the
namespace's throughput units used up: error code 50002), 429, 403 QuotaExceeded
(``SubCode=40300``), a 403 refusing the sender itself (a network rule), or a 500; with a
``Retry-After`` if given. What it accepted is kept (``events()``, ``batches``) for the tests.

Thread-safe reads: the hub runs on one event loop (``start``), or in a thread of its own
(``EventHubThread``), while a test reads what it received from another.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from sluicegate.clock import Clock, SystemClock

#: The service's limit on a batch (bytes of the request body here).
MAX_BATCH_BYTES = 1_048_576
CONTENT_TYPE = "application/vnd.microsoft.servicebus.json"
#: What an item of a batch may hold.
_ITEM_KEYS = frozenset({"Body", "UserProperties", "BrokerProperties"})

#: The refusals ``fail_next`` can make, by name: the status and the start of the error's
#: ``Detail``, as the messaging REST APIs (Event Hubs', Service Bus's) word them. A 403 is
#: either a quota (the Service Bus family's ``QuotaExceeded``, ``SubCode=40300``; the send
#: batch API documents 403 as "quota exceeded") or the sender itself refused (an IP or
#: network rule): the same status, told apart only by the detail.
FAULTS: dict[str, tuple[int, str]] = {
    "server_busy": (
        503,
        "The request was terminated because the entity is being throttled. "
        "Error code : 50002. Sub error : 102.",
    ),
    "throttled": (429, "The request was throttled."),
    "quota_exceeded": (
        403,
        "QuotaExceeded: SubCode=40300. The quota of the namespace has been reached or exceeded.",
    ),
    "forbidden": (
        403,
        "Ip has been prevented to connect to the endpoint. For more information see: "
        "Virtual Network service endpoints.",
    ),
    "internal": (500, "The server was unable to process the request; please retry."),
}
#: The fault ``fail_next`` makes when given a status.
_FAULT_OF_STATUS = {503: "server_busy", 429: "throttled", 403: "quota_exceeded", 500: "internal"}


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One accepted event: its ``Body`` text and ``UserProperties``."""

    body: str
    user_properties: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def _error(
    status: int, detail: str, tracker: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The service's error answer. Its detail ends as the service's do, naming the entity
    refused (``tracker``: ``<namespace host>:<hub>``, the service's ``SystemTracker``)."""
    tracking = secrets.token_hex(16)
    text = (
        f"<Error><Code>{status}</Code><Detail>{detail} TrackingId:{tracking}, "
        f"SystemTracker:{tracker}, "
        f"Timestamp:{time.strftime('%m/%d/%Y %H:%M:%S')}</Detail></Error>"
    )
    return web.Response(
        status=status,
        text=text,
        content_type="application/xml",
        charset="utf-8",
        headers=headers,
    )


class FakeEventHub:
    """One hub (``hub``) of a namespace, the SAS policy ``key_name``/``key``. Start it on the
    running loop with ``start()``; ``url`` is then the hub's URL (what an export's ``url``
    takes)."""

    def __init__(
        self,
        *,
        hub: str = "usage",
        key_name: str = "send",
        key: str | None = None,
        bearer_tokens: list[str] | None = None,
        max_bytes: int = MAX_BATCH_BYTES,
        clock: Clock | None = None,
    ) -> None:
        self.hub = hub
        self.key_name = key_name
        self.key = key if key is not None else base64.b64encode(secrets.token_bytes(32)).decode()
        self.bearer_tokens = list(bearer_tokens or [])
        self.max_bytes = max_bytes
        self.clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._events: list[ReceivedEvent] = []
        #: Every accepted batch: its number of events.
        self.batches: list[int] = []
        #: Every send, accepted or not: ``(status, Authorization header, query string)``.
        self.requests: list[tuple[int, str, str]] = []
        self._faults: deque[tuple[int, str, float | None]] = deque()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- for tests ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.hub}"

    def events(self) -> list[ReceivedEvent]:
        """Every accepted event, in the order received."""
        with self._lock:
            return list(self._events)

    def fail_next(
        self, count: int, fault: str | int = "server_busy", retry_after: float | None = None
    ) -> None:
        """Refuse the next ``count`` sends (that pass auth) with ``fault``: a name of
        :data:`FAULTS`, or a status (503, 429, 403 and 500 answer as their fault, the 403 as
        ``quota_exceeded``; another status with a generic detail), with ``Retry-After:
        retry_after`` if given."""
        if isinstance(fault, str):
            if fault not in FAULTS:
                raise ValueError(f"no fault {fault!r}; one of {', '.join(FAULTS)}")
            status, detail = FAULTS[fault]
        elif fault in _FAULT_OF_STATUS:
            status, detail = FAULTS[_FAULT_OF_STATUS[fault]]
        else:
            status, detail = fault, "The request failed."
        with self._lock:
            self._faults.extend([(status, detail, retry_after)] * count)

    def statuses(self) -> list[int]:
        with self._lock:
            return [status for status, _, _ in self.requests]

    # -- the service -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_bytes * 4)
        app.router.add_post("/{hub}/messages", self._send)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeEventHub:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner
        return self

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _record(self, status: int, request: web.Request) -> None:
        with self._lock:
            self.requests.append(
                (status, request.headers.get("Authorization", ""), request.query_string)
            )

    async def _send(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        self._record(response.status, request)
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        entity = f"{request.host}/{request.match_info['hub']}".lower()
        tracker = f"{request.url.host}:{request.match_info['hub']}"
        problem = self._auth_problem(request.headers.get("Authorization"), entity)
        if problem is not None:
            return _error(401, problem, tracker)
        if request.match_info["hub"] != self.hub:
            return _error(
                404,
                f"The messaging entity 'sb://{entity}' could not be found. To know more visit "
                "https://aka.ms/sbResourceMgrExceptions.",
                tracker,
            )
        body = await request.read()
        if len(body) > self.max_bytes:
            return _error(
                413,
                f"The received message (size: {len(body)} bytes) exceeds the limit "
                f"({self.max_bytes} bytes) currently allowed on the link.",
                tracker,
            )
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            status, detail, wait = fault
            headers = None if wait is None else {"Retry-After": f"{wait:g}"}
            return _error(status, detail, tracker, headers)
        if request.content_type != CONTENT_TYPE:
            return _error(400, f"A batch needs Content-Type {CONTENT_TYPE}.", tracker)
        events = _batch(body)
        if events is None:
            return _error(
                400,
                'The batch must be a JSON array of {"Body": string, "UserProperties": {}}.',
                tracker,
            )
        with self._lock:
            self._events.extend(events)
            self.batches.append(len(events))
        return web.Response(status=201)

    def _auth_problem(self, header: str | None, entity: str) -> str | None:
        """Why ``header`` does not authorize a send to ``entity`` (host/hub), or None."""
        if not header:
            return "MissingToken: The authorization header was not provided."
        if header.startswith("Bearer "):
            if header[len("Bearer ") :] in self.bearer_tokens:
                return None
            return "InvalidIssuer: Token issuer is invalid."
        prefix = "SharedAccessSignature "
        if not header.startswith(prefix):
            return (
                "MalformedToken: The credentials contained in the authorization header are "
                "not in the WRAP format."
            )
        fields: dict[str, str] = {}
        for part in header[len(prefix) :].split("&"):
            name, sep, value = part.partition("=")
            if not sep or name in fields:
                return "MalformedToken: Invalid shared access signature."
            fields[name] = value
        if set(fields) != {"sr", "sig", "se", "skn"}:
            return "MalformedToken: sr, sig, se and skn are required."
        if fields["skn"] != self.key_name:
            return f"InvalidSignature: Unknown authorization rule '{fields['skn']}'."
        try:
            expiry = int(fields["se"])
        except ValueError:
            return "MalformedToken: se is not a number."
        if expiry <= self.clock.now():
            return f"ExpiredToken: The token is expired. Expiration time: '{expiry}'."
        digest = hmac.new(
            self.key.encode(), f"{fields['sr']}\n{expiry}".encode(), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(unquote(fields["sig"]), base64.b64encode(digest).decode()):
            return "InvalidSignature: The token has an invalid signature."
        resource = unquote(fields["sr"])
        parts = urlsplit(resource if "://" in resource else f"sb://{resource}")
        scope = f"{parts.netloc}{parts.path}".rstrip("/").lower()
        if entity != scope and not entity.startswith(scope + "/"):
            return f"InvalidAudience: The token's audience '{resource}' does not cover '{entity}'."
        return None


def _batch(body: bytes) -> list[ReceivedEvent] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, list) or not data:
        return None
    out: list[ReceivedEvent] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("Body"), str):
            return None
        props = item.get("UserProperties", {})
        if not isinstance(props, dict) or set(item) - _ITEM_KEYS:
            return None
        out.append(ReceivedEvent(item["Body"], props))
    return out


class EventHubThread:
    """A ``FakeEventHub`` on a loop of its own, in a daemon thread (for sync tests and the
    gateway's export worker, which runs its own loop). Context manager."""

    def __init__(self, hub: FakeEventHub | None = None) -> None:
        self.hub = hub or FakeEventHub()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> FakeEventHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.hub.start(), self._loop).result(10)
        return self.hub

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.hub.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeEventHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
