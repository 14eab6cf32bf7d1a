"""The limit policy of a product, overridable per subscription (APIM's azure-openai-token-limit).

A :class:`LimitPolicy` is immutable and validated once when the configuration is loaded;
typos are errors (``extra="forbid"``). Every limit is optional: a policy with none of
``tokens_per_minute``, ``requests_per_minute``, ``token_quota`` and ``request_quota`` admits
everything. See ``docs/limits.md`` for the attribute-by-attribute mapping to APIM.
"""

from __future__ import annotations

import hashlib
import re
import zoneinfo
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from sluicegate.tokens.estimate import TokenEstimate

QuotaPeriod = Literal["hourly", "daily", "weekly", "monthly", "yearly"]
CounterKeyKind = Literal["subscription", "owner", "product", "client_ip", "caller", "header"]
MaxTokensAction = Literal["reject", "clamp"]

DEFAULT_COMPLETION_TOKENS = 1024
"""Completion tokens reserved when a request sets no ``max_tokens``: a typical answer fits,
and the settle step corrects the counters to the real usage once the response ends."""

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]

_KEY_PREFIX: dict[CounterKeyKind, str] = {
    "subscription": "sub",
    "owner": "owner",
    "product": "product",
    "client_ip": "ip",
    "caller": "caller",
    "header": "hdr",
}

#: Counter keys whose value depends on the request, not only on the subscription: resolved
#: per request, the others once per subscription version.
REQUEST_KEYED: frozenset[str] = frozenset({"client_ip", "caller", "header"})

#: A header value longer than this (or with other than visible ASCII) is hashed into the
#: counter key: a client cannot make key names (Redis keys, memory) of unbounded size.
MAX_HEADER_KEY_CHARS = 128
_PLAIN_HEADER_VALUE = re.compile(rb"[!-~]{1,%d}" % MAX_HEADER_KEY_CHARS)


def header_key_value(raw: bytes) -> str | None:
    """The part of a ``counter_key: header`` key that comes from the header's raw value:
    the value itself (surrounding whitespace stripped) when it is 1 to
    :data:`MAX_HEADER_KEY_CHARS` visible ASCII characters, else ``sha256:`` and 32 hex
    digits of its hash; None for an empty value (the subscription counter applies)."""
    value = raw.strip()
    if not value:
        return None
    if _PLAIN_HEADER_VALUE.fullmatch(value):
        return value.decode("ascii")
    return "sha256:" + hashlib.sha256(value).hexdigest()[:32]


class LimitPolicy(BaseModel):
    """Token and request limits for one counter key.

    ``tokens_per_minute`` and ``requests_per_minute`` are sliding windows: no 60-second span
    of arrivals holds more than the limit (429 when exceeded); ``token_quota`` is a fixed
    calendar window of ``token_quota_period`` in ``quota_timezone`` (403 when exhausted);
    ``request_quota`` (APIM's ``quota-by-key calls``) counts admitted requests in a fixed
    calendar window of ``request_quota_period``, cut like the token quota's in the same
    ``quota_timezone`` (403 when exhausted). Each quota is set with its period; either may
    be set alone, or both.
    ``counter_key`` says whose counter is charged (``counter_header`` names the header of
    ``counter_key: header``).
    ``estimate_prompt_tokens=False`` is APIM's "use only usage from the response": nothing
    is estimated or reserved up front (a stream's prompt excepted), a request is admitted
    while the counter is below its limit, and the reported usage is charged at settle
    (:func:`tokens_to_reserve`). ``max_tokens_ceiling`` bounds
    what a request may ask for: rejected (400) or clamped. The ``*_header`` fields name the
    extra headers returned to the client (``None`` = not sent), as APIM's attributes do.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens_per_minute: int | None = Field(default=None, gt=0)
    requests_per_minute: int | None = Field(default=None, gt=0)
    token_quota: int | None = Field(default=None, gt=0)
    token_quota_period: QuotaPeriod | None = None
    #: Requests admitted per ``request_quota_period`` (APIM's ``quota-by-key calls``).
    request_quota: int | None = Field(default=None, gt=0)
    request_quota_period: QuotaPeriod | None = None
    quota_timezone: str = "UTC"
    counter_key: CounterKeyKind = "subscription"
    #: The request header whose value is the counter key with ``counter_key: header``
    #: (e.g. ``x-user-id``); required then, refused otherwise.
    counter_header: HeaderName | None = None
    estimate_prompt_tokens: bool = True
    default_completion_tokens: int = Field(default=DEFAULT_COMPLETION_TOKENS, ge=0)
    max_tokens_ceiling: int | None = Field(default=None, gt=0)
    max_tokens_action: MaxTokensAction = "reject"
    remaining_tokens_header: HeaderName | None = None
    remaining_quota_header: HeaderName | None = None
    #: The request quota's remaining requests (``remaining_quota_header`` is the token
    #: quota's).
    remaining_requests_quota_header: HeaderName | None = None
    tokens_consumed_header: HeaderName | None = None
    retry_after_header: HeaderName = "Retry-After"

    @field_validator("token_quota_period", "request_quota_period", mode="before")
    @classmethod
    def _lower_period(cls, value: object) -> object:
        # APIM spells the periods "Hourly", "Daily", …: accept that spelling too.
        return value.lower() if isinstance(value, str) else value

    @field_validator("counter_header")
    @classmethod
    def _lower_header(cls, value: str | None) -> str | None:
        # Header names are case-insensitive: X-User-Id and x-user-id are one counter.
        return value.lower() if value is not None else None

    @field_validator("quota_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value == "UTC":
            return value
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin; the "
                "system time-zone database or the tzdata package must be installed)"
            ) from exc
        return value

    @model_validator(mode="after")
    def _quota_has_period(self) -> LimitPolicy:
        if (self.token_quota is None) != (self.token_quota_period is None):
            raise ValueError("token_quota and token_quota_period must be set together")
        if (self.request_quota is None) != (self.request_quota_period is None):
            raise ValueError("request_quota and request_quota_period must be set together")
        if (self.counter_key == "header") != (self.counter_header is not None):
            raise ValueError(
                "counter_header must be set with counter_key: header (and only with it)"
            )
        return self

    @property
    def has_limits(self) -> bool:
        return (
            self.tokens_per_minute is not None
            or self.requests_per_minute is not None
            or self.token_quota is not None
            or self.request_quota is not None
        )


def merge(
    product_policy: LimitPolicy | None, subscription_overrides: Mapping[str, Any]
) -> LimitPolicy:
    """The product's policy with a subscription's overrides applied field by field.

    An override wins even when it is ``None`` (``{"tokens_per_minute": None}`` lifts the
    product's TPM for that subscription). The result is validated again, so an unknown field
    or an invalid combination raises ``pydantic.ValidationError``.
    """
    base = product_policy.model_dump() if product_policy is not None else {}
    return LimitPolicy.model_validate({**base, **subscription_overrides})


def resolve_counter_key(
    policy: LimitPolicy,
    *,
    subscription_id: str,
    owner: str | None = None,
    product: str | None = None,
    client_ip: str | None = None,
    caller: str | None = None,
    header_value: str | None = None,
) -> str:
    """The counter key value for a request, e.g. ``"sub:abc"`` or ``"owner:team-a"``.

    One counter per key value is shared wherever the same key is used (as in APIM). A
    subscription without an owner (or product) falls back to its own subscription counter;
    an unknown client IP is counted under ``ip:unknown``.

    * ``caller``: the authenticated caller (``RequestContext.caller``: the token's ``oid``,
      else its app id, else ``sub``), ``caller:<id>``, shared across subscriptions like
      ``owner``; a request without a token (a subscription key) falls back to the
      subscription counter.
    * ``header``: ``header_value`` (already bounded by :func:`header_key_value`), scoped
      within the subscription and the header's name, ``hdr:<sub id>:<header>:<value>``: one
      team's users cannot spend another team's counters by sending the same value. A missing
      or empty header falls back to the subscription counter.
    """
    kind = policy.counter_key
    value: str | None
    if kind == "owner":
        value = owner
    elif kind == "product":
        value = product
    elif kind == "client_ip":
        value = client_ip or "unknown"
    elif kind == "caller":
        value = caller
    elif kind == "header":
        value = (
            f"{subscription_id}:{policy.counter_header}:{header_value}"
            if header_value and policy.counter_header
            else None
        )
    else:
        value = subscription_id
    if not value:
        kind, value = "subscription", subscription_id
    return f"{_KEY_PREFIX[kind]}:{value}"


def tokens_to_reserve(policy: LimitPolicy, estimate: TokenEstimate, *, stream: bool = False) -> int:
    """Tokens to reserve at admission for ``policy``.

    * ``estimate_prompt_tokens`` true: the prompt estimate plus the completion budget
      (``max_tokens`` and its kin, else ``default_completion_tokens``), corrected to the
      reported usage at settle. (APIM reserves the prompt only; docs/limits.md.)
    * false, as APIM's ``estimate-prompt-tokens="false"`` ("use only usage from the
      response"): 0, whatever ``max_tokens`` the request sets (APIM ignores it for the limit
      too). A zero-cost admission needs the counter below its limit (admission asks room
      for ``max(cost, 1)``), and the settle charges the reported usage: the request that
      pushes a counter over its limit goes through, the next ones wait until the window
      frees room. Nothing reserved also means no protection against concurrent overshoot.
    * false, but the request streams: the prompt estimate only (APIM always estimates a
      streamed prompt); the completion is still charged from the usage at settle.
    """
    if policy.estimate_prompt_tokens:
        return estimate.prompt_tokens + estimate.completion_tokens
    return estimate.prompt_tokens if stream else 0
