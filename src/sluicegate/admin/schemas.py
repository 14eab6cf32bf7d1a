"""Request and response bodies of the admin API, as pydantic models.

The handlers build every JSON response through these models and the OpenAPI document's
schemas are generated from them, so the document cannot drift from what the API returns.
Money is an exact decimal string in the report's currency (``"12.340000000"``); times are
epoch seconds (UTC).
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

#: Unicode categories never accepted in a subscription's name, owner or product: control
#: characters (Cc: NUL, ESC, line breaks, tab, the C1 range), which reach terminals (escape
#: sequences), logs and CSV files as they are and which PostgreSQL partly refuses; format
#: characters (Cf: U+202E RIGHT-TO-LEFT OVERRIDE, zero-width spaces), which make a name
#: display as another; surrogates (Cs), which are not text; the line and paragraph
#: separators (Zl, Zp).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
#: Format characters that ordinary text needs: ZERO WIDTH NON-JOINER and ZERO WIDTH JOINER
#: (Persian and Indic scripts, emoji sequences).
_ALLOWED_FORMAT = frozenset("\u200c\u200d")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a subscription's name, owner or product (``"must not
    contain …"``), or None when it can. The one check behind the admin API (``Text``), the
    command line and the dashboard: a character of ``_REFUSED_CATEGORIES`` is refused,
    named by its code point and position (never printed itself)."""
    for position, char in enumerate(value, 1):
        if " " <= char <= "~":  # printable ASCII, nearly every character of a name
            continue
        if char in _ALLOWED_FORMAT:
            continue
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES:
            kind = "a control" if category == "Cc" else "an invisible formatting"
            return f"must not contain {kind} character (U+{ord(char):04X} at character {position})"
    return None


def escaped(value: str) -> str:
    """``value`` with each character ``text_problem`` refuses written as its escape
    (``\\x1b``, ``\\u202e``): for text shown on a terminal that may hold such characters
    (a name stored before the check, a backend's model name)."""
    if value.isprintable():  # the usual case, and a cheap test
        return value
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if char not in _ALLOWED_FORMAT
        and not (" " <= char <= "~")
        and unicodedata.category(char) in _REFUSED_CATEGORIES
        else char
        for char in value
    )


def _printable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("printable_text", problem)
    return value


#: A name, owner or product: 1 to 200 characters, none that ``text_problem`` refuses. (The
#: documented pattern is its control-character part: JSON Schema has no Unicode classes.)
Text = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f-\x9f]+$"}),
    AfterValidator(_printable),
]
#: A state comment (APIM's ``stateComment``): one line of at most 1000 characters.
Comment = Annotated[
    str,
    Field(max_length=1000, json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f-\x9f]*$"}),
    AfterValidator(_printable),
]
Money = Annotated[str, Field(pattern=r"^-?[0-9]+\.[0-9]{9}$", examples=["12.340000000"])]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    code: str
    message: str


class Error(_Model):
    error: ErrorBody


class Product(_Model):
    name: str
    description: str
    deployments: list[str]
    limits: Any = None
    approval_required: bool = False


class ProductList(_Model):
    items: list[Product]


class Subscription(_Model):
    id: str
    name: str
    owner: str
    product: str
    state: Literal["submitted", "active", "suspended", "rejected", "cancelled", "expired"] = Field(
        description="The effective state: 'expired' once expires_at has passed (unless "
        "rejected or cancelled). Only 'active' keys work (docs/subscriptions.md)."
    )
    state_comment: str | None = Field(
        default=None, description="The comment given with the last state change."
    )
    primary_key_prefix: str
    secondary_key_prefix: str
    created_at: float
    updated_at: float
    expires_at: float | None
    overrides: dict[str, Any]


class SubscriptionPage(_Model):
    total: int
    offset: int
    limit: int
    items: list[Subscription]


class Overrides(_Model):
    """A subscription's overrides, replaced whole. Unknown members are refused (a typo would
    otherwise be stored and silently do nothing)."""

    limits: dict[str, Any] = Field(
        default_factory=dict,
        description="Limit policy fields (docs/limits.md) merged one by one over the "
        "product's policy counted per subscription; null lifts a limit. Checked with the "
        "limit policy's own rules (422 naming the field).",
        examples=[{"tokens_per_minute": 50000, "requests_per_minute": None}],
    )
    budget: dict[str, Any] | None = Field(
        default=None,
        description="A spending budget replacing the product's, whole (docs/chargeback.md, "
        "Budgets): amount, period (daily/weekly/monthly), timezone, action (refuse/warn), "
        "warn_at; null lifts the product's budget; absent keeps it.",
        examples=[{"amount": "500", "period": "monthly", "action": "refuse", "warn_at": [0.8]}],
    )


class SubscriptionCreate(_Model):
    product: Text
    owner: Text
    name: Text
    expires_at: float | None = Field(default=None, ge=0, le=32503680000)
    overrides: Overrides | None = None
    state: Literal["submitted", "active"] | None = Field(
        default=None,
        description="Default: 'submitted' (awaiting approval) for a product with "
        "approval_required, else 'active'.",
    )
    state_comment: Comment | None = None


class StateChange(_Model):
    """The optional body of a state change (approve, reject, suspend, resume, cancel)."""

    state_comment: Comment | None = Field(
        default=None,
        description="Kept with the new state (APIM's stateComment); absent clears the last one.",
    )


class IssuedSubscription(_Model):
    """A new subscription with its two keys: shown only in this answer."""

    subscription: Subscription
    primary_key: str
    secondary_key: str


class RotateRequest(_Model):
    slot: Literal["primary", "secondary"] = "primary"


class RotatedKey(_Model):
    """The new key: shown only in this answer."""

    subscription: Subscription
    slot: Literal["primary", "secondary"]
    key: str


class ReportRow(_Model):
    key: str | None
    requests: int
    attempts: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    errors: int
    paygo_cost: Money
    ptu_cost: Money
    cost: Money
    unpriced_records: int
    unpriced_tokens: int


class PtuCharge(_Model):
    label: str
    start: float
    end: float
    cost: Money


class Report(_Model):
    start: float = Field(
        description="Start of the range covered (rounded down to the hour, or to the day "
        "where that day's hourly rollups are purged)."
    )
    end: float = Field(
        description="End of the range covered (rounded up to the hour, or to the day where "
        "that day's hourly rollups are purged)."
    )
    note: str | None = Field(
        default=None, description="Why the range covered is wider than asked, if it is."
    )
    by: str
    currency: str
    total_rows: int
    offset: int
    limit: int
    rows: list[ReportRow]
    total: ReportRow
    ptu: list[PtuCharge]


class SeriesLine(_Model):
    key: str
    requests: list[int]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    total_tokens: list[int]
    cost: list[Money]


class Series(_Model):
    start: float
    end: float
    note: str | None = Field(
        default=None, description="Why the range covered is wider than asked, if it is."
    )
    granularity: Literal["hour", "day", "month"]
    by: str
    currency: str
    buckets: list[float]
    series: list[SeriesLine]


class UsageRecord(_Model):
    request_id: str
    attempt: int
    ts: float
    subscription_id: str | None
    owner: str | None
    product: str | None
    deployment: str | None
    backend: str | None
    operation: str
    status: int
    outcome: str
    model: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    streamed: bool
    usage_estimated: bool
    ttfb_ms: float | None
    duration_ms: float
    cost: Money | None = Field(description="Null when no price applies (unpriced).")


class RecordPage(_Model):
    offset: int
    limit: int
    currency: str
    items: list[UsageRecord]


class Projection(_Model):
    key: str | None
    mtd_tokens: int
    mtd_cost: Money
    projected_tokens: int
    projected_cost: Money
    method: str
    daily_tokens: list[int]


class Forecast(_Model):
    now: float
    month_start: float
    month_end: float
    currency: str
    total_rows: int
    offset: int
    limit: int
    items: list[Projection]
    total: Projection


class BreakEven(_Model):
    deployment: str
    backend: str
    on_ptu: bool
    mtd_prompt_tokens: int
    mtd_completion_tokens: int
    projected_tokens: int
    peak_tokens_per_minute: int
    paygo_monthly_cost: Money | None
    ptu_monthly_cost: Money | None
    ptu_units: int | None
    break_even_tokens: int | None
    cheaper: Literal["ptu", "paygo"] | None
    note: str


class BreakEvenList(_Model):
    currency: str
    items: list[BreakEven]


class BreakerRule(_Model):
    """The rule a backend's circuit breakers follow (docs/routing.md, "A rule per backend"):
    ``source`` ``backend`` is its own ``backends[].circuit_breaker`` merged over
    ``routing.circuit_breaker``, ``routing`` the global rule alone."""

    source: Literal["backend", "routing"]
    enabled: bool
    failures: int
    throttles: int
    interval_seconds: float
    trip_seconds: float
    max_trip_seconds: float
    honour_retry_after: bool


class Backend(_Model):
    name: str
    url: str
    kind: str
    state: str
    #: The rule its breakers follow (the same for each of its deployments).
    circuit_breaker: BreakerRule | None = None
    in_flight: int | None = None
    attempts: int | None = None
    errors: int | None = None
    throttled: int | None = None
    last_status: int | None = None
    last_seen_seconds_ago: float | None = None
    #: Routing's view of each deployment on this backend: state (closed / open / half-open),
    #: open_until, headroom tokens and requests, in-flight attempts, last status and error.
    routing: list[dict[str, Any]] = []


class BackendList(_Model):
    items: list[Backend]


class Prices(_Model):
    currency: str
    prices: list[dict[str, Any]]
    ptu: list[dict[str, Any]]
    unpriced: list[str]


class Budget(_Model):
    """A subscription's budget and its spending in the current period (amounts are exact
    decimal strings of ``currency``; period bounds in UTC)."""

    subscription_id: str
    product: str
    source: Literal["product", "subscription"]
    amount: str
    currency: str
    period: str
    timezone: str
    action: Literal["refuse", "warn"]
    warn_at: list[float]
    spent: str
    ratio: float
    over: bool
    refused: bool
    period_start: str
    period_end: str
    unpriced_records: int


class BudgetList(_Model):
    items: list[Budget]


class Ledger(_Model):
    pending: int | None = None
    written: int | None = None
    failures: int | None = None
    spilled: int | None = None
    rejected: int | None = None
    last_write_seconds: float | None = None
    healthy: bool | None = None
    rollup_last_record_id: int | None = None
    raw_purged_before: float | None = None


class RollupRun(_Model):
    hours: int
    days: int
    last_record_id: int
    seconds: float


class Export(_Model):
    """A usage export and where its cursor stands (docs/chargeback.md, "Exporting usage").
    The cursor's fields are null for an export that has not run its first cycle
    (``started: false``); ``type``, ``url`` and ``products`` are null for one that is in the
    database but no longer configured (``configured: false``)."""

    name: str
    configured: bool
    type: Literal["event_hub", "webhook"] | None
    url: str | None = Field(description="Without credentials or query string.")
    products: list[str] | None
    started: bool
    last_record_id: int | None = Field(
        description="Every record up to this id was delivered (but those in the gaps)."
    )
    gap_ids: int | None = Field(
        description="PostgreSQL: ids below last_record_id still awaited (in flight when "
        "read); always 0 on SQLite."
    )
    newest_record_id: int | None = Field(description="The highest record id in the ledger.")
    lag_records: int | None = Field(
        description="Ids between the cursor and the newest record (the lag gauge's value)."
    )
    exported: int | None = Field(description="Events delivered since the cursor was created.")
    lost: int | None = Field(description="Ids given up on (records purged before export).")
    created_at: float | None
    updated_at: float | None = Field(
        description="When the cursor last moved: a delivery, or a rewind."
    )
    sent_since_start: int | None = Field(
        description="Events this gateway process delivered (null outside a running gateway)."
    )
    failures_since_start: int | None
    last_failure: str | None


class ExportList(_Model):
    items: list[Export]


class ExportRewind(_Model):
    """Where an export's next cycle starts: after a record id, or at the first record at or
    after a time. Exactly one of the two."""

    after_record_id: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Send every record above this id again (0: the whole ledger).",
    )
    since: str | None = Field(
        default=None,
        max_length=64,
        description="ISO 8601 date-time (UTC if no offset): send from the first record at "
        "or after it.",
        json_schema_extra={"format": "date-time"},
    )
    skip: bool = Field(
        default=False,
        description="Allow a forward move past records not delivered yet (they are never sent).",
    )


class ExportRewound(_Model):
    name: str
    previous_record_id: int
    last_record_id: int
    skipped: int = Field(description="Records a forward move passed over (never sent).")
    export: Export
