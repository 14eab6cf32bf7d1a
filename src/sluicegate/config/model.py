"""The declarative configuration: ``gateway.yaml`` as validated pydantic models.

Everything here is data. It is parsed and validated once (``config.loader``) and compiled into
the runtime objects the gateway uses (``runtime``); nothing reads the environment afterwards,
except where a model names an environment variable that holds a secret (secrets never need to
be written into the file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sluicegate.config.admin import AdminEntraConfig
from sluicegate.config.oidc import OidcConfig, TokenRule, check_networks
from sluicegate.limits.policy import LimitPolicy
from sluicegate.messages.config import MessageLogPolicy, MessageLogSink


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: Seconds to finish in-flight requests after SIGTERM before they are closed.
    graceful_shutdown_seconds: float = Field(default=20.0, ge=0)
    #: Client connections this worker holds open at once. A connection beyond gets 503
    #: ``TooManyConnections`` (``Retry-After: 1``) to its first request and is closed, so
    #: that idle or slow clients cannot take the descriptors the backends' pools need.
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    #: Serve HTTPS with this certificate chain and private key (PEM files; both or neither).
    tls_cert: str | None = None
    tls_key: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ListenConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        return self


#: The scope of Azure OpenAI (Cognitive Services) tokens.
COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"


#: What an Entra ID identity can be (backend auth types, and a Key Vault reference's credential).
EntraIdentityType = Literal["managed-identity", "workload-identity", "service-principal"]


class EntraIdentityConfig(_Strict):
    """The fields that choose an Entra ID identity, shared by a backend's ``auth`` section and
    a Key Vault reference (``auth.key_vault``): ``identity_type`` says which kind, and
    ``upstream.identity.credential_for`` builds the ``azure-identity`` credential from them."""

    #: User-assigned managed identity, workload identity or service principal (app) id.
    client_id: str | None = None
    tenant_id: str | None = None
    #: Environment variable holding a service principal's client secret.
    client_secret_env: str | None = None
    #: Entra ID authority, e.g. ``https://login.microsoftonline.us`` for Azure Government
    #: (default: public cloud). Not used by managed identity (its endpoint is local).
    authority_host: str | None = None

    @property
    def identity_type(self) -> str:
        raise NotImplementedError

    def _identity_problem(self, kind: str) -> str | None:
        """What is wrong with the identity fields for an identity of ``kind``, if anything."""
        if kind == "service-principal" and not (
            self.tenant_id and self.client_id and self.client_secret_env
        ):
            return f"{kind} needs tenant_id, client_id and client_secret_env"
        if self.authority_host is not None and not self.authority_host.startswith("https://"):
            return "authority_host must be an https:// URL"
        return None


#: Key Vault secret names: 1-127 letters, digits and dashes.
_SECRET_NAME = r"^[0-9A-Za-z-]{1,127}$"


class KeyVaultSecretConfig(EntraIdentityConfig):
    """An api-key held as an Azure Key Vault secret (``auth.key_vault``).

    The secret is read when the gateway starts (it refuses to start if it cannot be), then
    again every ``refresh_seconds`` in the background, so that a rotated key (a new version
    of the secret) is used without a restart. ``version`` pins one version of the secret,
    which never changes: it is read once. ``credential`` is the Entra ID identity the gateway
    reads the vault as (it needs the *get* permission on secrets: the "Key Vault Secrets
    User" role, or an access policy), with ``client_id``/``tenant_id``/``client_secret_env``
    as for a backend's own ``auth``; the token's scope comes from the vault's challenge.
    """

    #: The vault, e.g. ``https://myvault.vault.azure.net``.
    vault_url: str
    #: The secret's name in the vault.
    secret: str = Field(pattern=_SECRET_NAME)
    #: A fixed version (read once); None: the current version, re-read every refresh.
    version: str | None = Field(default=None, pattern=r"^[0-9A-Za-z]{1,64}$")
    refresh_seconds: float = Field(default=3600.0, gt=0)
    credential: EntraIdentityType = "managed-identity"

    @field_validator("vault_url")
    @classmethod
    def _vault_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.path.strip("/"):
            raise ValueError(
                f"must be the vault's https:// URL without a path (https://NAME.vault.azure.net),"
                f" got {value!r}"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _identity(self) -> KeyVaultSecretConfig:
        problem = self._identity_problem(self.credential)
        if problem:
            raise ValueError(f"credential {problem}")
        return self

    @property
    def identity_type(self) -> str:
        return self.credential

    @property
    def reference(self) -> str:
        """The secret as Azure names it (vault URL, secret and version if pinned): for
        messages, never holding the value."""
        suffix = f"/{self.version}" if self.version else ""
        return f"{self.vault_url}/secrets/{self.secret}{suffix}"


class BackendAuthConfig(EntraIdentityConfig):
    """How the gateway authenticates to a backend.

    ``api-key``: the key is read from the environment variable ``key_env`` at start, or from
    an Azure Key Vault secret (``key_vault``, see ``KeyVaultSecretConfig``); exactly one.
    ``none``: nothing is added (an OpenAI-compatible server without auth).
    ``managed-identity``: an Entra ID token from the host's managed identity (system-assigned,
    or user-assigned with ``client_id``; in AKS with workload identity configured, that).
    ``workload-identity``: federated token file (``AZURE_FEDERATED_TOKEN_FILE``), explicitly.
    ``service-principal``: ``tenant_id``, ``client_id`` and the secret in ``client_secret_env``.
    Entra tokens are sent as ``Authorization: Bearer``, cached, and refreshed in the background
    before they expire (see docs/routing.md).
    """

    type: Literal[
        "api-key", "none", "managed-identity", "workload-identity", "service-principal"
    ] = "api-key"
    key_env: str | None = None
    key_vault: KeyVaultSecretConfig | None = None
    header: str = "api-key"
    scope: str = COGNITIVE_SERVICES_SCOPE
    #: Refresh a token this many seconds before it expires (at most half its lifetime).
    refresh_before_seconds: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _key_env_for_api_key(self) -> BackendAuthConfig:
        if self.type == "api-key":
            if self.key_env and self.key_vault is not None:
                raise ValueError(
                    "auth type api-key takes the key from key_env or from key_vault, not both"
                )
            if not self.key_env and self.key_vault is None:
                raise ValueError(
                    "auth type api-key needs key_env (the environment variable that holds the "
                    "key) or key_vault (an Azure Key Vault secret that holds it)"
                )
        elif self.key_vault is not None:
            raise ValueError(
                f"key_vault is for auth type api-key (the key to send), not {self.type}; the "
                "vault's own identity goes in key_vault.credential"
            )
        problem = self._identity_problem(self.type)
        if problem:
            raise ValueError(f"auth type {problem}")
        return self

    @property
    def identity_type(self) -> str:
        return self.type

    @property
    def entra(self) -> bool:
        """The backend takes Entra ID bearer tokens (not a static key)."""
        return self.type in ("managed-identity", "workload-identity", "service-principal")


class TimeoutsConfig(_Strict):
    connect: float = Field(default=5.0, gt=0)
    #: Seconds from sending the request to the response's status line and headers.
    first_byte: float = Field(default=120.0, gt=0)
    #: Seconds allowed between two chunks of a response body.
    between_chunks: float = Field(default=60.0, gt=0)
    #: Seconds the client may take to accept each part of this backend's answer (while its
    #: connection's send buffer is full); past that it is treated as gone (docs/architecture.md).
    client_write: float = Field(default=60.0, gt=0)


class BackendCircuitBreakerConfig(_Strict):
    """A backend's own circuit breaker rule (APIM: one rule per backend): every field given
    replaces that of ``routing.circuit_breaker`` (``CircuitBreakerConfig``, whose fields
    these are); a field left out (or null) is the global one's. The merged rule is
    validated again (``GatewayConfig._backend_breakers``)."""

    enabled: bool | None = None
    failures: int | None = Field(default=None, ge=1)
    throttles: int | None = Field(default=None, ge=1)
    interval_seconds: float | None = Field(default=None, gt=0)
    trip_seconds: float | None = Field(default=None, gt=0)
    max_trip_seconds: float | None = Field(default=None, gt=0)
    honour_retry_after: bool | None = None

    def over(self, base: CircuitBreakerConfig) -> CircuitBreakerConfig:
        """This rule merged over ``base``, field by field; raises ``ValidationError`` if
        the result is inconsistent (``max_trip_seconds`` below ``trip_seconds``)."""
        return CircuitBreakerConfig.model_validate(
            {**base.model_dump(), **self.model_dump(exclude_none=True)}
        )


class BackendConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    auth: BackendAuthConfig = BackendAuthConfig(type="none")
    kind: Literal["ptu", "paygo", "other"] = "paygo"
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_connections: int = Field(default=256, ge=1)
    #: This backend's circuit breaker rule, merged over ``routing.circuit_breaker``.
    circuit_breaker: BackendCircuitBreakerConfig | None = None

    def breaker(self, base: CircuitBreakerConfig) -> CircuitBreakerConfig:
        """The rule this backend's breakers follow: its own merged over ``base`` (the
        global ``routing.circuit_breaker``), or ``base``."""
        return base if self.circuit_breaker is None else self.circuit_breaker.over(base)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        return value.rstrip("/")


class PoolMemberConfig(_Strict):
    """One backend deployment of a pool: lower ``priority`` numbers are used first; within a
    priority, traffic is shared in proportion to ``weight``."""

    backend: str
    #: The deployment's name on that backend (default: the pool's ``backend_deployment``, else
    #: the client-facing deployment name).
    backend_deployment: str | None = None
    priority: int = Field(default=1, ge=0, le=1000)
    weight: int = Field(default=1, ge=1, le=1000)


class DeploymentConfig(_Strict):
    """A deployment name that clients use, mapped to one backend (``backend``) or to a pool
    of backend deployments (``pool``; see docs/routing.md).

    With ``pool``, ``backend`` is filled in with the first member of the lowest priority (the
    primary, for reports); giving both is allowed only if ``backend`` is a member.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    backend: str
    backend_deployment: str | None = None
    pool: list[PoolMemberConfig] | None = Field(default=None, min_length=1, max_length=64)
    #: The model behind it (chooses the tokenizer for estimates), e.g. ``gpt-4o-mini``.
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _primary_backend(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("pool"), list):
            return data
        members = [m for m in data["pool"] if isinstance(m, dict) and "backend" in m]
        if not members:
            return data
        primary = min(members, key=lambda m: m.get("priority", 1))["backend"]
        backend = data.get("backend")
        if backend is None:
            return {**data, "backend": primary}
        if backend not in {m["backend"] for m in members}:
            raise ValueError(
                f"backend {backend!r} is not a member of the pool: give backend or pool, "
                "not both (with pool, backend is its primary member)"
            )
        return data

    @property
    def upstream_name(self) -> str:
        return self.backend_deployment or self.name

    def members(self) -> list[PoolMemberConfig]:
        """The pool, with every member's backend deployment name filled in (a deployment
        with only ``backend`` is a one-member pool)."""
        if self.pool is None:
            return [PoolMemberConfig(backend=self.backend, backend_deployment=self.upstream_name)]
        return [
            m.model_copy(update={"backend_deployment": m.backend_deployment or self.upstream_name})
            for m in self.pool
        ]


#: The branches of the configuration's tagged unions. pydantic puts a branch's tag in the
#: locations of its errors; ``config.loader`` drops them (they are not keys of the file).
_ONE_POLICY = "(one policy)"
_POLICY_LIST = "(list of policies)"
UNION_TAGS = frozenset({_ONE_POLICY, _POLICY_LIST})


def _policy_shape(value: Any) -> str | None:
    # The input's shape chooses the branch, so that only that branch's errors are reported
    # (pydantic's plain union reports every branch's, named by its internals).
    if isinstance(value, list | tuple):
        return _POLICY_LIST
    if isinstance(value, dict | LimitPolicy):
        return _ONE_POLICY
    return None


#: One limit policy (a mapping) or a list of them.
LimitPolicies = Annotated[
    Annotated[LimitPolicy, Tag(_ONE_POLICY)] | Annotated[list[LimitPolicy], Tag(_POLICY_LIST)],
    Discriminator(
        _policy_shape,
        custom_error_type="limits_shape",
        custom_error_message="must be a limit policy (a mapping) or a list of them",
    ),
]


BudgetPeriod = Literal["daily", "weekly", "monthly"]
#: The longest each budget period lasts, in days.
BUDGET_PERIOD_DAYS: dict[str, int] = {"daily": 1, "weekly": 7, "monthly": 31}


class BudgetConfig(_Strict):
    """A spending budget (docs/chargeback.md, "Budgets"): at most ``amount`` (in the prices'
    currency) per calendar ``period`` in ``timezone`` (cut as token quotas are). Over it,
    ``action: refuse`` answers 403 ``BudgetExceeded`` until the period renews; ``warn`` only
    logs and counts. ``warn_at``: fractions of ``amount`` (e.g. ``[0.8, 1.0]``) at which a
    warning is logged once per period, whatever the action. Checked after the fact by a
    background job: a budget, not a hard cap (use ``token_quota`` for one)."""

    amount: Decimal = Field(gt=0)
    period: BudgetPeriod = "monthly"
    timezone: str = "UTC"
    action: Literal["refuse", "warn"] = "refuse"
    warn_at: list[float] = Field(default_factory=list, max_length=10)
    #: Count the subscription's share of PTU reservations' cost so far (as the charge-back
    #: reports do) besides its pay-as-you-go cost. Off by default: a reservation is a fixed
    #: cost paid anyway, and one subscription's share of it moves with everybody's usage.
    include_ptu: bool = False

    @field_validator("period", mode="before")
    @classmethod
    def _lower_period(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("amount")
    @classmethod
    def _precision(cls, value: Decimal) -> Decimal:
        return _six_decimals(value)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return LimitPolicy._known_zone(value)  # the token quotas' rule and message

    @field_validator("warn_at")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f <= 10 for f in value):
            raise ValueError("warn_at holds fractions of the amount, each above 0 (1.0 = all)")
        return sorted(set(value))


#: Azure AI Content Safety's harm categories (``categories`` of a product's ``content_safety``).
ContentSafetyCategory = Literal["Hate", "SelfHarm", "Sexual", "Violence"]


class ContentSafetyAuthConfig(BackendAuthConfig):
    """How the gateway authenticates to an Azure AI Content Safety resource: a backend's
    ``auth`` (api-key from ``key_env`` or ``key_vault``, or an Entra ID identity with the
    Cognitive Services scope; the identity needs the "Cognitive Services User" role), the key
    sent in Content Safety's own header, ``Ocp-Apim-Subscription-Key``."""

    header: str = "Ocp-Apim-Subscription-Key"


class ContentSafetyServiceConfig(_Strict):
    """An Azure AI Content Safety resource products can check prompts with
    (docs/content-safety.md)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    #: The resource's endpoint, ``https://<resource>.cognitiveservices.azure.com``.
    url: str
    auth: ContentSafetyAuthConfig
    #: Seconds one check may take (every call it makes, together) before it counts as failed
    #: (the product's ``on_error`` decides what then happens to the request).
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    #: Connections to the service held open at once.
    max_connections: int = Field(default=64, ge=1, le=4096)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError(
                "must be the resource's endpoint, https://<resource>.cognitiveservices.azure.com"
                f", got {value!r}"
            )
        return value.rstrip("/")


class ProductContentSafetyConfig(_Strict):
    """APIM's ``llm-content-safety`` for a product: every prompt is checked with the named
    Content Safety ``service`` before it is routed, and refused with 403 when a category
    reaches its threshold, a blocklist matches or (``shield_prompt``) Prompt Shields detects
    an attack (docs/content-safety.md)."""

    service: str
    #: Also ask Prompt Shields whether the prompt is a jailbreak / injection attack.
    shield_prompt: bool = False
    #: Category → severity threshold: a prompt whose severity reaches it is refused.
    categories: dict[ContentSafetyCategory, Annotated[int, Field(ge=0, le=7)]] = Field(
        default_factory=dict
    )
    #: Severities 0, 2, 4, 6 (``FourSeverityLevels``, APIM's default) or 0-7.
    output_type: Literal["FourSeverityLevels", "EightSeverityLevels"] = "FourSeverityLevels"
    #: Names of blocklists on the Content Safety resource: any match refuses the prompt.
    blocklists: list[str] = Field(default_factory=list, max_length=100)
    #: The service unreachable, failing or too slow: refuse the request (503/500) or let it
    #: through unchecked.
    on_error: Literal["block", "allow"] = "block"
    #: The longest text checked: a longer prompt is refused (413) rather than sent as
    #: hundreds of billed calls (10,000 characters each) or let through partly unchecked.
    #: 500,000 characters is about 125,000 tokens, a 128k-context model's whole window.
    max_text_chars: int = Field(default=500_000, ge=1, le=10_000_000)

    @field_validator("blocklists")
    @classmethod
    def _blocklist_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "_-." for c in name):
                raise ValueError(
                    f"{name!r} is not a blocklist name (1-64 letters, digits, '_', '-', '.')"
                )
        return value

    @model_validator(mode="after")
    def _does_something(self) -> ProductContentSafetyConfig:
        if not (self.categories or self.blocklists or self.shield_prompt):
            raise ValueError(
                "give categories (with thresholds), blocklists or shield_prompt: true; "
                "without any, nothing would ever be refused"
            )
        never = [str(c) for c, t in self.categories.items() if t == 7]
        if never and self.output_type == "FourSeverityLevels":
            raise ValueError(
                f"threshold 7 ({', '.join(never)}) is never reached with FourSeverityLevels, "
                "whose severities are 0, 2, 4 and 6: give 6, or output_type: EightSeverityLevels"
            )
        return self


class ProductSemanticCacheConfig(_Strict):
    """APIM's ``azure-openai-semantic-cache-lookup`` / ``-store`` for a product: chat
    completions answered from earlier answers to prompts of the same meaning
    (docs/semantic-cache.md). In memory, per gateway process."""

    #: A deployment of this gateway (``deployments``) whose backends serve embeddings: the
    #: prompts are embedded through it (same backends, credentials, retries and breakers).
    embeddings_deployment: str
    #: The largest distance (``1 - cosine similarity``, APIM's ``score-threshold``) at which a
    #: stored answer is reused: lower is stricter. Microsoft: start near 0.05; above 0.2
    #: risks wrong answers.
    score_threshold: float = Field(default=0.05, ge=0.0, le=1.0)
    #: Seconds a stored answer is reused (APIM's ``duration``).
    ttl_seconds: int = Field(default=120, ge=1, le=30 * 86_400)
    #: Leave system and developer messages out of the text compared (and out of the
    #: partition): a change of system prompt does not empty the cache.
    ignore_system_messages: bool = True
    #: Requests whose dialog has more messages than this (after leaving out system messages)
    #: are neither looked up nor stored.
    max_message_count: int = Field(default=10, ge=1, le=1_000)
    #: Who shares answers: each ``subscription`` (default), the whole ``product``, or each
    #: ``caller`` (the Entra ID / OIDC identity of a token; a request with a key alone
    #: partitions by its subscription). Never shared across products.
    vary_by: Literal["subscription", "product", "caller"] = "subscription"
    #: Answers kept for this product in each gateway process; the least recently used go.
    max_entries: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Seconds the embeddings call may take before the request goes on without the cache.
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)


class ProductConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    #: Deployment names this product may use; ``["*"]`` means all.
    deployments: list[str] = Field(default_factory=lambda: ["*"])
    #: May the product's keys use the paths the gateway passes through unmetered (files,
    #: batches, images and audio on the v1 API, …)? Those name their model in the body or in
    #: a batch's file, past the deployment check, so by default only a product that may use
    #: every deployment may (None: ``deployments == ["*"]``). With ``content_safety``, only
    #: ``true`` lets a request with a body past the check on those paths (and on a
    #: deployment's unmetered operations): docs/content-safety.md.
    passthrough: bool | None = None
    #: Limit policy or policies (tokens/requests per minute, quota, each with its counter
    #: key); see docs/limits.md.
    limits: LimitPolicies | None = None
    #: Only clients from these addresses or CIDR networks may use the product (None: anyone).
    #: The client address is the peer's, or X-Forwarded-For's behind a trusted proxy.
    allowed_ips: list[str] | None = None
    #: Only Entra ID / OIDC tokens authenticate for this product (APIM: an API behind
    #: ``validate-jwt`` only): a request with a subscription key and no token gets 401
    #: ``TokenRequired``. Needs an ``oidc`` section. Default: keys and tokens.
    require_token: bool = False
    #: New subscriptions of this product start ``submitted`` (APIM's ``approvalRequired``):
    #: their keys work once an administrator approves them (docs/subscriptions.md). An
    #: administrator creating one may still give ``state: active``. Default: they start active.
    approval_required: bool = False
    #: A spending budget for each of the product's subscriptions (a subscription's
    #: overrides may replace or lift it); see docs/chargeback.md, "Budgets".
    budget: BudgetConfig | None = None
    #: Log the text of prompts and completions (APIM's LLM logs); see docs/message-log.md.
    message_log: MessageLogPolicy | None = None
    #: Check prompts with Azure AI Content Safety before routing (docs/content-safety.md).
    content_safety: ProductContentSafetyConfig | None = None
    #: Answer chat completions from earlier answers of similar prompts (docs/semantic-cache.md).
    semantic_cache: ProductSemanticCacheConfig | None = None

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_networks(value, "allowed_ips")

    def limit_policies(self) -> tuple[LimitPolicy, ...]:
        if self.limits is None:
            return ()
        return tuple(self.limits) if isinstance(self.limits, list) else (self.limits,)


class StorageConfig(_Strict):
    #: ``sqlite:///relative/or/absolute.db`` (default) or ``postgresql://user@host/db``.
    url: str = "sqlite:///var/sluicegate.db"
    #: Where records wait on local disk while the database is unreachable.
    spill_dir: str = "var/spill"
    batch_size: int = Field(default=500, ge=1)
    flush_interval_seconds: float = Field(default=0.2, gt=0)
    max_pending: int = Field(default=20_000, ge=1)
    #: Seconds the in-memory subscription view may go without a successful refresh (the
    #: database unreachable) before requests are refused with 503 ``SubscriptionViewStale``;
    #: None: serve from the last view for as long as the outage lasts. Keep it several times
    #: ``refresh_seconds``, or one slow refresh refuses requests.
    max_stale_seconds: float | None = Field(default=None, ge=1)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgresql+psycopg", "postgres"):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value


class RedisConfig(_Strict):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "sg"
    fail_mode: Literal["open", "closed"] = "open"
    #: Whose clock the shared rate windows run on: Redis's (one clock for every instance) or
    #: each gateway's (deterministic: for tests with a fake clock). docs/limits.md, "Time".
    clock: Literal["redis", "gateway"] = "redis"


class AdminConfig(_Strict):
    #: Environment variable holding the admin API token. It also keys the dashboard's session
    #: cookies, so admin access (Entra ID sign-in included) needs it set.
    token_env: str = "SLUICEGATE_ADMIN_TOKEN"
    #: Administrators may also sign in with Entra ID / OIDC (docs/entra-id.md, "Administrators").
    entra: AdminEntraConfig | None = None


class SecurityConfig(_Strict):
    #: Environment variable holding the secret that keys are hashed with. In embedded mode,
    #: when it is unset, a secret is generated once and kept beside the database.
    key_secret_env: str = "SLUICEGATE_KEY_SECRET"
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: Requests with more header fields, or a longer request head (request line and headers),
    #: are refused with 431.
    max_header_count: int = Field(default=100, ge=16, le=10_000)
    max_header_bytes: int = Field(default=32 * 1024, ge=4096, le=1024 * 1024)
    #: Seconds a client has to send the whole request body once the gateway starts reading it
    #: (slow senders get 408). It also bounds the rest of a body the gateway answered before
    #: reading it (401, 404, 413): the body is read and dropped for at most this long, then
    #: the connection is closed.
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Seconds a client has to send a request's whole head (request line and headers): from
    #: the connection's opening for its first request, from the first byte of the head for a
    #: later one. A head still incomplete then gets 408; a connection that sent nothing is
    #: closed. (Between requests, an idle kept-alive connection is closed after 30 s.)
    head_read_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Direct peers (addresses or CIDR networks) whose X-Forwarded-For is believed. From anyone
    #: else the header is ignored and the client address is the peer's.
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return check_networks(value, "trusted_proxies")


class MetricsConfig(_Strict):
    enabled: bool = True
    #: At most this many subscriptions get their own label value; the rest share "other".
    max_subscription_labels: int = Field(default=200, ge=0)


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: One JSON line per request.
    access_log: bool = True


def _to_utc(value: Any) -> Any:
    """A YAML date (``2026-01-01``) means midnight UTC; a naive date-time is UTC."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _six_decimals(value: Decimal) -> Decimal:
    if value.as_tuple().exponent < -6:  # type: ignore[operator]
        raise ValueError("at most 6 decimal places")
    return value


class PriceConfig(_Strict):
    """Pay-as-you-go price of one deployment (or of every deployment of a model), per million
    tokens, in force from ``effective_from`` until the next entry for the same match.

    A ``deployment`` entry wins over a ``model`` entry; ``model`` is compared with the
    deployment's configured ``model`` (and, for records of deployments no longer configured,
    with the model the backend reported). See docs/chargeback.md.
    """

    deployment: str | None = None
    model: str | None = None
    #: Prompt tokens, per million.
    input: Decimal = Field(ge=0)
    #: Cached prompt tokens, per million (default: the input price).
    cached_input: Decimal | None = Field(default=None, ge=0)
    #: Completion tokens (reasoning included), per million.
    output: Decimal = Field(default=Decimal(0), ge=0)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    #: When this price starts to apply (UTC); default: always.
    effective_from: datetime | None = None

    @field_validator("effective_from", mode="before")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        return _to_utc(value)

    @field_validator("input", "cached_input", "output")
    @classmethod
    def _precision(cls, value: Decimal | None) -> Decimal | None:
        return None if value is None else _six_decimals(value)

    @model_validator(mode="after")
    def _one_match(self) -> PriceConfig:
        if (self.deployment is None) == (self.model is None):
            raise ValueError("give exactly one of deployment or model")
        return self


class PtuCostConfig(_Strict):
    """A provisioned (PTU) reservation: its monthly cost is allocated to teams by their share
    of the tokens served by the matching backend (and deployment, when given). Tokens it
    serves carry no per-token price."""

    backend: str | None = None
    deployment: str | None = None
    monthly_cost: Decimal = Field(ge=0)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    effective_from: datetime | None = None
    #: Provisioned throughput units reserved (informational; used by the break-even view).
    units: int | None = Field(default=None, ge=1)

    @field_validator("effective_from", mode="before")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        return _to_utc(value)

    @field_validator("monthly_cost")
    @classmethod
    def _precision(cls, value: Decimal) -> Decimal:
        return _six_decimals(value)

    @model_validator(mode="after")
    def _some_match(self) -> PtuCostConfig:
        if self.backend is None and self.deployment is None:
            raise ValueError("give a backend, a deployment or both")
        return self


class PtuQuoteConfig(_Strict):
    """What a PTU reservation would cost for a deployment or model: the input of the
    break-even forecast (PTU against pay-as-you-go for the observed traffic)."""

    deployment: str | None = None
    model: str | None = None
    unit_monthly_cost: Decimal = Field(gt=0)
    #: Input tokens per minute one unit sustains.
    tokens_per_minute_per_unit: int = Field(gt=0)
    #: One output token uses the capacity of this many input tokens.
    output_token_weight: Decimal = Field(default=Decimal(4), ge=0)
    min_units: int = Field(default=15, ge=1)
    unit_increment: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _one_match(self) -> PtuQuoteConfig:
        if (self.deployment is None) == (self.model is None):
            raise ValueError("give exactly one of deployment or model")
        return self


class RetentionConfig(_Strict):
    #: Raw usage records older than this many days are deleted once rolled up (None: keep).
    raw_records_days: float | None = Field(default=None, gt=0)
    #: Hourly rollups older than this are deleted (None: keep), but not while their day's raw
    #: records are kept (a rebuild recomputes the day from its hours); daily rollups are kept.
    hourly_rollups_days: float | None = Field(default=None, gt=0)
    #: Seconds between two runs of the background job that updates rollups and purges.
    rollup_interval_seconds: float = Field(default=10.0, gt=0)


#: The scope of Azure Event Hubs tokens (an export's Entra ID identity).
EVENT_HUBS_SCOPE = "https://eventhubs.azure.net/.default"


class ExportIdentityConfig(EntraIdentityConfig):
    """The Entra ID identity an ``event_hub`` export sends as (it needs the "Azure Event Hubs
    Data Sender" role on the hub): fields as for a backend's ``auth``."""

    type: EntraIdentityType = "managed-identity"
    scope: str = EVENT_HUBS_SCOPE
    refresh_before_seconds: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _identity(self) -> ExportIdentityConfig:
        problem = self._identity_problem(self.type)
        if problem:
            raise ValueError(f"identity type {problem}")
        return self

    @property
    def identity_type(self) -> str:
        return self.type


class ExportConfig(_Strict):
    """Usage records shipped, one JSON event each, to Azure Event Hubs or a webhook, off the
    request path and at least once (docs/chargeback.md, "Exporting usage")."""

    #: Unique; names the export's cursor in the database (renaming starts a new cursor).
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["event_hub", "webhook"]
    #: Event Hubs: ``https://{namespace}.servicebus.windows.net/{hub}``; webhook: any URL.
    url: str
    #: Event Hubs by SAS: the policy's name and the environment variable holding its key.
    sas_key_name: str | None = None
    sas_key_env: str | None = None
    #: Event Hubs by Entra ID (instead of SAS).
    identity: ExportIdentityConfig | None = None
    #: Webhook: a header sent with every batch, its value read from ``secret_env``.
    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")
    secret_env: str | None = None
    #: Records per batch (an Event Hubs batch is also kept under 1 MB).
    batch_size: int = Field(default=500, ge=1, le=10_000)
    #: Seconds between looks for new records once caught up.
    interval_seconds: float = Field(default=5.0, gt=0)
    #: Seconds a send may take before it counts as failed.
    timeout_seconds: float = Field(default=60.0, gt=0)
    #: Where a new export starts: every record in the ledger, or those committed from now on.
    start: Literal["earliest", "latest"] = "latest"
    #: Only records of these products (None: all).
    products: list[str] | None = Field(default=None, min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        # A url no send can reach would fail every cycle (or end it with an error of the HTTP
        # client's) until someone read the log: refused here, naming the export.
        export = f"export {info.data.get('name', '?')!r}"
        try:
            parts = urlsplit(value)
        except ValueError as exc:  # an unclosed IPv6 literal ("https://[::1/x")
            raise ValueError(f"{export}: the url cannot be read ({exc}), got {value!r}") from None
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError(f"must be an http:// or https:// URL without a query, got {value!r}")
        try:
            port = parts.port  # ValueError: not a number, or outside 0-65535
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(
                f"{export}: the url's port must be a number from 1 to 65535, got {value!r}"
            )
        if not parts.hostname:
            raise ValueError(f"{export}: the url has no host, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _auth(self) -> ExportConfig:
        sas = self.sas_key_name is not None or self.sas_key_env is not None
        if self.type == "event_hub":
            if self.header is not None or self.secret_env is not None:
                raise ValueError("header and secret_env are for webhooks; Event Hubs use SAS")
            # One segment: the sender adds "/messages" (a url copied from the REST page's
            # ".../{hub}/messages" would post to ".../messages/messages").
            hub = urlsplit(self.url).path.strip("/")
            if not hub or "/" in hub:
                raise ValueError(
                    "an event_hub url names the hub: https://NAMESPACE.servicebus.windows.net/HUB"
                )
            if sas and self.identity is not None:
                raise ValueError("give sas_key_name and sas_key_env, or identity, not both")
            if self.identity is None and not (self.sas_key_name and self.sas_key_env):
                raise ValueError(
                    "an event_hub export needs sas_key_name and sas_key_env (the environment "
                    "variable holding the key), or an Entra ID identity"
                )
        else:
            if sas or self.identity is not None:
                raise ValueError("sas_key_name, sas_key_env and identity are for event_hub")
            if (self.header is None) != (self.secret_env is None):
                raise ValueError("give both header and secret_env, or neither")
        return self


class RetryConfig(_Strict):
    """When a request goes to another backend (or waits and tries the same one again)."""

    #: Upstream attempts per request, the first included.
    max_attempts: int = Field(default=3, ge=1, le=10)
    #: Backend statuses that send the request on to the next candidate. Connection errors and
    #: timeouts before the first byte always do. Other 4xx (content filter) never do.
    statuses: list[int] = Field(default_factory=lambda: [408, 429, 500, 502, 503, 504])
    #: A single-member pool waits and retries the same backend, never longer than the
    #: backend's retry-after-ms/retry-after and ``max_wait_seconds``.
    wait_same: bool = True
    max_wait_seconds: float = Field(default=10.0, ge=0, le=120)
    #: No attempt starts later than this many seconds after the request arrived.
    budget_seconds: float = Field(default=60.0, gt=0)

    @field_validator("statuses")
    @classmethod
    def _retryable(cls, value: list[int]) -> list[int]:
        for status in value:
            if status < 400 or status > 599:
                raise ValueError(f"{status} is not an error status")
            if 400 <= status < 500 and status not in (408, 409, 429):
                raise ValueError(f"{status} is a client error: retrying it cannot help")
        return value


class CircuitBreakerConfig(_Strict):
    """APIM's backend circuit breaker, with a half-open probe and ``Retry-After`` honoured.
    A backend may have its own rule (``BackendConfig.circuit_breaker``), merged over this."""

    #: False: the breaker never trips (the backend is always tried; failover and retries
    #: still apply per request).
    enabled: bool = True
    #: Trip after this many 5xx answers, timeouts or connection errors within the interval.
    failures: int = Field(default=3, ge=1)
    #: Trip after this many 429s within the interval (1: the first 429 parks the backend).
    throttles: int = Field(default=1, ge=1)
    interval_seconds: float = Field(default=10.0, gt=0)
    #: How long a tripped backend stays out when it said nothing (doubles on every failed
    #: probe, up to ``max_trip_seconds``).
    trip_seconds: float = Field(default=10.0, gt=0)
    #: The longest a backend stays out, also when its Retry-After asks for more (Azure can
    #: say "retry after 86400 seconds").
    max_trip_seconds: float = Field(default=60.0, gt=0)
    #: A 429's retry-after-ms/retry-after decides how long the backend stays out.
    honour_retry_after: bool = True

    @model_validator(mode="after")
    def _cap(self) -> CircuitBreakerConfig:
        if self.max_trip_seconds < self.trip_seconds:
            raise ValueError(
                f"max_trip_seconds ({self.max_trip_seconds:g}) must be at least "
                f"trip_seconds ({self.trip_seconds:g})"
            )
        return self


class HeadroomConfig(_Strict):
    """Routing on the ``x-ratelimit-remaining-tokens/-requests`` backends report."""

    enabled: bool = True
    #: A backend's report is trusted this long; older, the backend counts as having room.
    stale_seconds: float = Field(default=10.0, gt=0)
    #: Completion tokens assumed for a request that sets no max_tokens (Azure charges some).
    default_completion_tokens: int = Field(default=256, ge=0)


class ResponseAffinityConfig(_Strict):
    """Stateful Responses API calls go to the backend that holds the response, for the
    subscription that created it only (docs/routing.md, "Responses affinity")."""

    #: Learn which backend answered each Responses creation (``store`` not false), for which
    #: subscription, and send continuations (``previous_response_id``) and
    #: ``responses/{id}`` calls there; another subscription naming the id gets Azure's
    #: answer for an unknown id.
    enabled: bool = True
    #: Response ids this instance remembers (least recently used go first; ~250 bytes each).
    max_ids: int = Field(default=100_000, ge=1)
    #: Cluster mode: seconds Redis keeps a learned id (default 30 days, Azure's retention of
    #: a stored response).
    ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)


class RoutingConfig(_Strict):
    """Pools, retries, circuit breakers and headroom (docs/routing.md)."""

    headroom: HeadroomConfig = HeadroomConfig()
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    response_affinity: ResponseAffinityConfig = ResponseAffinityConfig()
    #: Cluster mode: seconds between exchanges of backend state through Redis.
    sync_seconds: float = Field(default=0.25, gt=0, le=10)

    @field_validator("headroom", mode="before")
    @classmethod
    def _headroom_flag(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("response_affinity", mode="before")
    @classmethod
    def _affinity_flag(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class GatewayConfig(_Strict):
    mode: Literal["embedded", "cluster"] = "embedded"
    listen: ListenConfig = ListenConfig()
    storage: StorageConfig = StorageConfig()
    redis: RedisConfig | None = None
    admin: AdminConfig = AdminConfig()
    security: SecurityConfig = SecurityConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    #: Seconds between checks for subscription changes (every instance sees a change in time).
    refresh_seconds: float = Field(default=0.5, gt=0, le=5)
    #: Backend that serves paths under /openai/ the gateway has no route of its own for.
    passthrough_backend: str | None = None
    backends: list[BackendConfig] = Field(min_length=1)
    deployments: list[DeploymentConfig] = Field(min_length=1)
    products: list[ProductConfig] = Field(min_length=1)
    #: Pay-as-you-go prices (per million tokens), with effective dates.
    prices: list[PriceConfig] = Field(default_factory=list)
    #: Provisioned (PTU) reservations and their monthly cost.
    ptu: list[PtuCostConfig] = Field(default_factory=list)
    #: PTU quotes for the break-even forecast.
    ptu_quotes: list[PtuQuoteConfig] = Field(default_factory=list)
    retention: RetentionConfig = RetentionConfig()
    routing: RoutingConfig = RoutingConfig()
    #: Client authentication by Entra ID / OIDC tokens (docs/entra-id.md).
    oidc: OidcConfig | None = None
    #: Token → subscription mapping, first match wins (docs/entra-id.md).
    token_rules: list[TokenRule] = Field(default_factory=list)
    #: Where products' ``message_log`` entries go (docs/message-log.md).
    message_log: MessageLogSink = MessageLogSink()
    #: Usage records shipped to Event Hubs or webhooks (docs/chargeback.md).
    exports: list[ExportConfig] = Field(default_factory=list)
    #: Azure AI Content Safety resources products check prompts with (docs/content-safety.md).
    content_safety: list[ContentSafetyServiceConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        errors = reference_problems(ConfigParts.of(self))
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _export_references(self) -> GatewayConfig:
        errors: list[str] = []
        _duplicates("exports", [e.name for e in self.exports], errors)
        products = {p.name for p in self.products}
        for i, export in enumerate(self.exports):
            errors.extend(
                f"exports[{i}].products: unknown product {name!r}"
                for name in export.products or ()
                if name not in products
            )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _budgets_outlive_hourly_rollups(self) -> GatewayConfig:
        # A budget reads its period from the hourly rollups (a period need not start at UTC
        # midnight, so the daily ones cannot stand in for its first day): purging them
        # within a period would forget what was spent in it.
        days = self.retention.hourly_rollups_days
        if days is None:
            return self
        budgeted = [(p.budget, p.name) for p in self.products if p.budget is not None]
        if not budgeted:
            return self
        budget, name = max(budgeted, key=lambda b: BUDGET_PERIOD_DAYS[b[0].period])
        least = BUDGET_PERIOD_DAYS[budget.period] + 1
        if days < least:
            raise ValueError(
                f"retention.hourly_rollups_days ({days:g}) must be at least {least:g} (the "
                f"longest budget period, {budget.period} in product {name!r}, plus a day): a "
                "budget counts its period from the hourly rollups, and hours purged within "
                "the period would no longer count as spent"
            )
        return self

    @model_validator(mode="after")
    def _backend_breakers(self) -> GatewayConfig:
        # A backend's rule is checked merged over the global one: a backend may give only
        # max_trip_seconds, below a global trip_seconds.
        errors: list[str] = []
        for i, backend in enumerate(self.backends):
            try:
                backend.breaker(self.routing.circuit_breaker)
            except ValidationError as exc:
                errors.extend(
                    f"backends[{i}].circuit_breaker: backend {backend.name!r}: "
                    + str(err["msg"]).removeprefix("Value error, ")
                    + " (its rule merged over routing.circuit_breaker)"
                    for err in exc.errors(include_url=False)
                )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _stale_after_refreshes(self) -> GatewayConfig:
        # The view's age reaches refresh_seconds (plus the refresh's own time) between two
        # healthy refreshes: a bound below that refuses requests with the database up.
        stale = self.storage.max_stale_seconds
        least = 2 * self.refresh_seconds + 1
        if stale is not None and stale < least:
            raise ValueError(
                f"storage.max_stale_seconds ({stale:g}) must be at least 2 x refresh_seconds "
                f"+ 1 = {least:g}: the subscription view is refreshed every "
                f"{self.refresh_seconds:g} s, so a smaller bound refuses requests (503 "
                "SubscriptionViewStale) while the database is healthy"
            )
        return self


@dataclass(frozen=True)
class ConfigParts:
    """What the cross-reference checks (``reference_problems``) read: a whole configuration
    (``ConfigParts.of``), or the parts of an invalid file that did validate (built by
    ``config.loader``), so that one run reports field errors and cross-reference errors.

    Lists keep every entry at its index in the file. An entry that did not validate is
    ``None``, or, for backends and deployments, its name alone (a string) when it has one:
    others may name it, but its own references are not checked.
    """

    backends: Sequence[str | None]
    deployments: Sequence[DeploymentConfig | str | None]
    products: Sequence[ProductConfig | None]
    prices: Sequence[PriceConfig | None] = ()
    ptu: Sequence[PtuCostConfig | None] = ()
    ptu_quotes: Sequence[PtuQuoteConfig | None] = ()
    mode: str = "embedded"
    has_redis: bool = False
    #: None: the storage section did not validate (nothing to check).
    storage_url: str | None = None
    passthrough_backend: str | None = None
    has_token_rules: bool = False
    has_oidc: bool = False
    #: The content safety services' names; None: not checked (the section did not validate).
    content_safety: Sequence[str | None] | None = None

    @classmethod
    def of(cls, config: GatewayConfig) -> ConfigParts:
        return cls(
            backends=[b.name for b in config.backends],
            deployments=config.deployments,
            products=config.products,
            prices=config.prices,
            ptu=config.ptu,
            ptu_quotes=config.ptu_quotes,
            mode=config.mode,
            has_redis=config.redis is not None,
            storage_url=config.storage.url,
            passthrough_backend=config.passthrough_backend,
            has_token_rules=bool(config.token_rules),
            has_oidc=config.oidc is not None,
            content_safety=[s.name for s in config.content_safety],
        )


def _name(entry: DeploymentConfig | str | None) -> str | None:
    return entry.name if isinstance(entry, DeploymentConfig) else entry


def reference_problems(parts: ConfigParts) -> list[str]:
    """The problems between sections (unknown or duplicate names, what cluster mode needs,
    accounting entries), one line each, starting with its location in the file."""
    errors: list[str] = []
    backend_names = [n for n in parts.backends if n is not None]
    _duplicates("backends", parts.backends, errors)
    _duplicates("deployments", [_name(d) for d in parts.deployments], errors)
    _duplicates("products", [p.name if p else None for p in parts.products], errors)
    deployment_names = {n for n in map(_name, parts.deployments) if n is not None}
    for i, dep in enumerate(parts.deployments):
        if not isinstance(dep, DeploymentConfig):
            continue
        if dep.pool is None and dep.backend not in backend_names:
            errors.append(
                f"deployments[{i}].backend: unknown backend {dep.backend!r} "
                f"(known: {', '.join(backend_names)})"
            )
        seen_members: set[tuple[str, str]] = set()
        for j, member in enumerate(dep.members()):
            if dep.pool is not None and member.backend not in backend_names:
                errors.append(
                    f"deployments[{i}].pool[{j}].backend: unknown backend "
                    f"{member.backend!r} (known: {', '.join(backend_names)})"
                )
            key = (member.backend, member.backend_deployment or "")
            if key in seen_members:
                errors.append(
                    f"deployments[{i}].pool[{j}]: {member.backend}/"
                    f"{member.backend_deployment} is already a member"
                )
            seen_members.add(key)
    for i, prod in enumerate(parts.products):
        for name in prod.deployments if prod else ():
            if name != "*" and name not in deployment_names:
                errors.append(f"products[{i}].deployments: unknown deployment {name!r}")
    if parts.passthrough_backend and parts.passthrough_backend not in backend_names:
        errors.append(f"passthrough_backend: unknown backend {parts.passthrough_backend!r}")
    if parts.mode == "cluster":
        if not parts.has_redis:
            errors.append(
                "redis: cluster mode needs a redis section (`redis: {}` takes the default url "
                f"{RedisConfig.model_fields['url'].default})"
            )
        if parts.storage_url is not None and parts.storage_url.startswith("sqlite"):
            errors.append("storage.url: cluster mode needs a PostgreSQL url")
    errors.extend(_accounting_problems(parts, set(backend_names), deployment_names))
    if parts.has_token_rules and not parts.has_oidc:
        errors.append("token_rules: rules need an oidc section with at least one issuer")
    for i, prod in enumerate(parts.products):
        if prod is not None and prod.require_token and not parts.has_oidc:
            errors.append(f"products[{i}].require_token: needs an oidc section (tokens)")
        cache = prod.semantic_cache if prod is not None else None
        if cache is not None and cache.embeddings_deployment not in deployment_names:
            errors.append(
                f"products[{i}].semantic_cache.embeddings_deployment: unknown deployment "
                f"{cache.embeddings_deployment!r}"
            )
        if cache is not None and cache.vary_by == "caller" and not parts.has_oidc:
            errors.append(
                f"products[{i}].semantic_cache.vary_by: 'caller' needs an oidc section (callers "
                "are the identities of tokens)"
            )
    if parts.content_safety is not None:
        _duplicates("content_safety", parts.content_safety, errors)
        services = [n for n in parts.content_safety if n is not None]
        for i, prod in enumerate(parts.products):
            policy = prod.content_safety if prod is not None else None
            if policy is not None and policy.service not in services:
                errors.append(
                    f"products[{i}].content_safety.service: unknown content safety service "
                    f"{policy.service!r} (known: {', '.join(services) or 'none'})"
                )
    return errors


def _accounting_problems(
    parts: ConfigParts, backends: set[str], deployments: set[str]
) -> list[str]:
    """Cross-references of prices, PTU entries and quotes (see docs/chargeback.md)."""
    errors: list[str] = []
    seen: set[tuple[str, str, datetime | None]] = set()
    for i, price in enumerate(parts.prices):
        if price is None:
            continue
        kind = "deployment" if price.deployment else "model"
        name = price.deployment or price.model
        assert name is not None
        if kind == "deployment" and name not in deployments:
            errors.append(f"prices[{i}].deployment: unknown deployment {name!r}")
        if (kind, name, price.effective_from) in seen:
            errors.append(f"prices[{i}]: a second price for {kind} {name!r} from the same date")
        seen.add((kind, name, price.effective_from))
    for i, ptu in enumerate(parts.ptu):
        if ptu is None:
            continue
        if ptu.backend is not None and ptu.backend not in backends:
            errors.append(f"ptu[{i}].backend: unknown backend {ptu.backend!r}")
        if ptu.deployment is not None and ptu.deployment not in deployments:
            errors.append(f"ptu[{i}].deployment: unknown deployment {ptu.deployment!r}")
    for i, quote in enumerate(parts.ptu_quotes):
        if (
            quote is not None
            and quote.deployment is not None
            and quote.deployment not in deployments
        ):
            errors.append(f"ptu_quotes[{i}].deployment: unknown deployment {quote.deployment!r}")
    currencies = {p.currency for p in parts.prices if p} | {p.currency for p in parts.ptu if p}
    if len(currencies) > 1:
        errors.append(
            f"prices: one currency per gateway, found {', '.join(sorted(currencies))} "
            "(convert the prices to one currency)"
        )
    return errors


def _duplicates(section: str, names: Sequence[str | None], errors: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            continue
        if name in seen:
            errors.append(f"{section}[{i}].name: duplicate name {name!r}")
        seen.add(name)
