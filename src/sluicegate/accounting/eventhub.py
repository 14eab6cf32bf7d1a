"""Where usage exports send their batches: Azure Event Hubs' REST "send batch", or a webhook.

Event Hubs (``POST {hub}/messages?timeout=60&api-version=2014-01``, content type
``application/vnd.microsoft.servicebus.json``): the body is a JSON array of
``{"Body": "<event JSON as a string>", "UserProperties": {...}}``, one per event, answered
201. Authorization is a shared access signature built for every send (the documented format:
``SharedAccessSignature sr=<url-encoded hub URI>&sig=<url-encoded base64 HMAC-SHA256 of
"<url-encoded URI>\\n<expiry>">&se=<expiry>&skn=<policy>``, see :func:`sas_token`) or an
Entra ID token for ``https://eventhubs.azure.net/.default`` kept fresh by
``upstream.identity.TokenSource``. A batch is kept under :data:`EVENT_HUB_MAX_BATCH_BYTES`
(the service refuses more than 1 MB with 413).

Webhook: the events as a JSON array, ``application/json``, with an optional secret header;
any 2xx is success.

Every answer becomes a :class:`SendResult`: success, or a failure ``reason`` (a small fixed
set, used as a metric label) with the wait the receiver asked for (``Retry-After``). What the
receiver cannot take now is not an auth failure: 503 (Event Hubs' ServerBusy, its throughput
units used up), 429, and a 403 whose body names a quota (Event Hubs and Service Bus answer an
exceeded quota with 403 ``QuotaExceeded``, ``SubCode=40300``). A 403 that names none (an IP
or network rule refusing the sender, a missing role) is ``auth``, as is every 401. Nothing
here logs or returns a key, a signature or a token. One sender per export, used from one event
loop (the export worker's): ``start()`` there, then ``send()``, then ``aclose()``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import orjson

from sluicegate.clock import Clock
from sluicegate.config.model import ExportConfig
from sluicegate.routing.retry_after import retry_after_from_headers
from sluicegate.upstream.identity import TokenCredential, TokenSource, credential_for

#: An Event Hubs batch's body stays under this (the service's limit is 1 MB, 1,048,576
#: bytes, for the batch as it stores it: a margin for its own envelope).
EVENT_HUB_MAX_BATCH_BYTES = 1_000_000
#: A shared access signature is made for each send and valid this long.
SAS_LIFETIME_SECONDS = 3600
EVENT_HUB_CONTENT_TYPE = "application/vnd.microsoft.servicebus.json"
EVENT_HUB_QUERY = "?timeout=60&api-version=2014-01"

#: Failure reasons (``SendResult.reason``), the values of the failures metric's label.
REASONS = (
    "auth",  # 401, and a 403 refusing the sender: bad key, signature, token, role or network
    "quota",  # 403 naming a quota (QuotaExceeded, SubCode=40300): wait and try again
    "not_found",  # 404: no such hub (or path)
    "too_large",  # 413: the batch is too large
    "throttled",  # 429
    "busy",  # 503 (Event Hubs: ServerBusy)
    "server_error",  # other 5xx
    "rejected",  # other answers
    "timeout",  # no answer within timeout_seconds
    "connection",  # could not connect, or the connection broke
    "credential",  # no Entra ID token could be obtained
)


@dataclass(frozen=True, slots=True)
class SendResult:
    """How a send ended: ``ok``, else why (``reason``, one of :data:`REASONS`), the status
    (None without an answer), the receiver's requested wait in seconds and a short detail
    for the log (no secret in it)."""

    ok: bool
    reason: str = "ok"
    status: int | None = None
    retry_after: float | None = None
    detail: str = ""


def sas_token(resource_uri: str, key_name: str, key: str, expiry: int) -> str:
    """A shared access signature for ``resource_uri`` valid until ``expiry`` (epoch seconds):
    HMAC-SHA256 keyed with the key's text of ``"<url-encoded URI>\\n<expiry>"``, base64."""
    encoded = quote(resource_uri, safe="")
    digest = hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}&skn={key_name}"


#: A 403 body that names a quota rather than refusing the sender: Event Hubs and Service Bus
#: word an exceeded quota ``QuotaExceeded`` with ``SubCode=40300`` (the send batch API
#: documents its 403 as "quota exceeded"); a webhook may say it rate limits.
_QUOTA_REFUSAL = re.compile(r"quota|subcode=40300|throttl|rate.?limit", re.IGNORECASE)


def _status_reason(status: int, text: str, url: str) -> str:
    """The failure reason for an answer with ``status`` and (the start of) body ``text``, to
    a send to ``url``. A 403 names a quota only in its own words: the names the url gives
    its receiver, which refusals quote (Event Hubs' ``SystemTracker:<namespace>:<hub>``,
    ``sb://<namespace>/<hub>``), are left out first, so that a network rule's 403 from a hub
    called ``llm-quota`` stays ``auth``."""
    if status == 403 and _QUOTA_REFUSAL.search(_unnamed(text, url)):
        return "quota"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status == 413:
        return "too_large"
    if status == 429:
        return "throttled"
    if status == 503:
        return "busy"
    if status >= 500:
        return "server_error"
    return "rejected"


def _unnamed(text: str, url: str) -> str:
    """``text`` without the names in ``url`` (its host, the host's first label — an Event
    Hubs namespace — and each path segment), each where it stands as a whole name."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    names = {host, host.split(".", 1)[0], *parts.path.split("/")} - {""}
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", " ", text, flags=re.IGNORECASE)
    return text


def _redacted(text: str, headers: Mapping[str, str]) -> str:
    """``text`` (a refusal's body, for the log) without the credentials ``headers`` carried:
    receivers quote the key or token they refused. Each value goes, and the long parts of a
    signature or token (``sig``, as sent and decoded, a bearer token)."""
    secrets: set[str] = set()
    for name, value in headers.items():
        if name.lower() == "content-type":
            continue
        secrets.add(value)
        for part in re.split(r"[ &=]", value):
            if len(part) >= 16:
                secrets.update((part, unquote(part)))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class Sender(Protocol):
    """What an export sends through (see the module docstring)."""

    #: The largest body a batch may have (None: no limit but the batch size).
    max_batch_bytes: int | None

    def item(self, record_id: int, event: Mapping[str, Any]) -> bytes:
        """One event as it goes into the body's JSON array."""
        ...

    async def start(self) -> None: ...

    async def send(self, items: Sequence[bytes]) -> SendResult: ...

    async def aclose(self) -> None: ...


def body_size(item_sizes: int, count: int) -> int:
    """Bytes of a JSON array of ``count`` items of ``item_sizes`` bytes together."""
    return item_sizes + max(count - 1, 0) + 2


class _HttpSender:
    """The HTTP part both senders share: one session, one POST per batch, the answer read
    and mapped to a ``SendResult``."""

    max_batch_bytes: int | None = None
    success: tuple[int, ...] = ()

    def __init__(self, config: ExportConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                raise_for_status=False,
            )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _target(self) -> str:
        return self.config.url

    def _ok(self, status: int) -> bool:
        return 200 <= status < 300

    async def send(self, items: Sequence[bytes]) -> SendResult:
        await self.start()
        assert self._session is not None
        try:
            headers = await self._headers()
        except Exception as exc:  # the identity: no token (its message holds no secret)
            return SendResult(False, "credential", detail=str(exc)[:200])
        body = b"[" + b",".join(items) + b"]"
        try:
            # Redirects are not followed: aiohttp turns a redirected POST into a bodiless GET
            # (whose 2xx would move the cursor past events never delivered) and would carry a
            # webhook's secret header to the redirect's host. A 3xx is a failure (rejected).
            async with self._session.post(
                self._target(), data=body, headers=headers, allow_redirects=False
            ) as resp:
                text = (await resp.content.read(2048)).decode("utf-8", "replace")
                status = resp.status
                if self._ok(status):
                    return SendResult(True, status=status)
                wait = retry_after_from_headers(resp.headers.items(), self.clock.now())
        except TimeoutError:
            wait = self.config.timeout_seconds
            return SendResult(False, "timeout", detail=f"no answer in {wait:g} s")
        except aiohttp.ClientError as exc:
            return SendResult(False, "connection", detail=f"{type(exc).__name__}: {exc}"[:200])
        detail = _redacted(" ".join(text.split()), headers)[:200]
        return SendResult(
            False, _status_reason(status, text, self.config.url), status, wait, detail
        )


class EventHubSender(_HttpSender):
    """Azure Event Hubs' REST "send batch", by SAS or Entra ID (module docstring)."""

    max_batch_bytes: int | None = EVENT_HUB_MAX_BATCH_BYTES

    def __init__(
        self,
        config: ExportConfig,
        clock: Clock,
        environ: Mapping[str, str],
    ) -> None:
        super().__init__(config, clock)
        self._key: str | None = None
        self._credential: TokenCredential | None = None
        self._tokens: TokenSource | None = None  # built by start(), on the worker's loop
        if config.identity is None:
            assert config.sas_key_env is not None
            key = environ.get(config.sas_key_env)
            if not key:
                raise RuntimeError(
                    f"export {config.name}: environment variable {config.sas_key_env} "
                    "(the Event Hubs SAS key) is not set"
                )
            self._key = key
        else:
            try:
                self._credential = credential_for(config.identity, environ)
            except Exception as exc:
                raise RuntimeError(f"export {config.name}: {exc}") from None
        self._user_properties = {"export": config.name}

    def item(self, record_id: int, event: Mapping[str, Any]) -> bytes:
        return orjson.dumps(
            {
                "Body": orjson.dumps(event).decode(),
                "UserProperties": {**self._user_properties, "record_id": record_id},
            }
        )

    async def start(self) -> None:
        await super().start()
        if self._credential is not None and self._tokens is None:
            identity = self.config.identity
            assert identity is not None
            self._tokens = TokenSource(
                self._credential,
                identity.scope,
                self.clock,
                refresh_before=identity.refresh_before_seconds,
                name=f"export-{self.config.name}",
                wait=min(self.config.timeout_seconds, 30.0),
            )
            await self._tokens.start()

    async def aclose(self) -> None:
        tokens, self._tokens = self._tokens, None
        if tokens is not None:
            await tokens.aclose()
        await super().aclose()

    def _target(self) -> str:
        return f"{self.config.url}/messages{EVENT_HUB_QUERY}"

    def _ok(self, status: int) -> bool:
        return status == 201 or status == 200

    async def _headers(self) -> dict[str, str]:
        if self._key is not None:
            assert self.config.sas_key_name is not None
            expiry = int(self.clock.now()) + SAS_LIFETIME_SECONDS
            auth = sas_token(self.config.url, self.config.sas_key_name, self._key, expiry)
        else:
            if self._tokens is None:
                await self.start()
            assert self._tokens is not None
            auth = f"Bearer {await self._tokens.token()}"
        return {"Authorization": auth, "Content-Type": EVENT_HUB_CONTENT_TYPE}

    def __repr__(self) -> str:
        how = "sas" if self._key is not None else "entra"
        return f"<EventHubSender {self.config.name} {self.config.url} auth={how}>"


class WebhookSender(_HttpSender):
    """A JSON array of events POSTed to a URL; any 2xx is success."""

    def __init__(self, config: ExportConfig, clock: Clock, environ: Mapping[str, str]) -> None:
        super().__init__(config, clock)
        self._auth: dict[str, str] = {}
        if config.header is not None:
            assert config.secret_env is not None
            secret = environ.get(config.secret_env)
            if not secret:
                raise RuntimeError(
                    f"export {config.name}: environment variable {config.secret_env} "
                    "(the webhook's secret) is not set"
                )
            self._auth[config.header] = secret

    def item(self, record_id: int, event: Mapping[str, Any]) -> bytes:
        return orjson.dumps(event)

    async def _headers(self) -> dict[str, str]:
        return {**self._auth, "Content-Type": "application/json"}

    def __repr__(self) -> str:
        return f"<WebhookSender {self.config.name} {self.config.url}>"


def sender_for(config: ExportConfig, clock: Clock, environ: Mapping[str, str]) -> Sender:
    """The sender an export's configuration asks for. Raises ``RuntimeError`` when its secret
    is not in ``environ`` (the message names the variable, never a value)."""
    if config.type == "event_hub":
        return EventHubSender(config, clock, environ)
    return WebhookSender(config, clock, environ)
