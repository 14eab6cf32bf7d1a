"""Read ``gateway.yaml``, validate it and explain every error with its location."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sluicegate.auth.keys import MIN_KEY_SECRET_BYTES
from sluicegate.config.model import (
    UNION_TAGS,
    BackendConfig,
    ConfigParts,
    DeploymentConfig,
    GatewayConfig,
    PriceConfig,
    ProductConfig,
    PtuCostConfig,
    PtuQuoteConfig,
    StorageConfig,
    reference_problems,
)

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """The configuration cannot be used. ``problems`` lists one line per error, each starting
    with the location in the file (``backends[1].url: …``)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def explain(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _internal(part: int | str) -> bool:
    """A part of a pydantic error location that is no key of the file: a validator's name
    (``function-after[…]``) or the tag of a union's branch."""
    return isinstance(part, str) and (part.startswith("function-") or part in UNION_TAGS)


def _problems(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _internal(p))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "value_error" and not loc and ": " in msg:
            # Cross-reference errors already carry their own locations, joined by "; ".
            problems.extend(msg.split("; "))
        else:
            problems.append(f"{_location(loc)}: {msg}")
    return problems


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    """Validate already-parsed YAML data. Raises ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of settings"])
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = _problems(exc)
        if all(err["loc"] for err in exc.errors()):
            # Field errors: pydantic skipped the cross-reference checks (a model validator
            # runs only once every field is valid). Run them on the parts that are valid, so
            # that one run lists every problem.
            problems.extend(reference_problems(_valid_parts(data)))
        raise ConfigError(source, problems) from exc


def _salvaged(model: type[_M], raw: Any) -> _M | None:
    """``raw`` as a ``model``; failing that, without its keys that have errors (so with their
    defaults), so that its other fields can be cross-checked; None if that fails too (a
    required key is wrong, or the entry as a whole is)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
    if not isinstance(raw, dict) or not all(err["loc"] for err in errors):
        return None
    bad = {err["loc"][0] for err in errors}
    try:
        return model.model_validate({k: v for k, v in raw.items() if k not in bad})
    except ValidationError:
        return None


def _entries(data: dict[str, Any], section: str, model: type[_M]) -> list[_M | None]:
    raw = data.get(section)
    return [_salvaged(model, entry) for entry in raw] if isinstance(raw, list) else []


def _named(data: dict[str, Any], section: str, model: type[_M]) -> list[_M | str | None]:
    """A section's entries, salvaged; an entry that is not even that, by its name if it has
    one (others may name it even though it has errors)."""
    raw = data.get(section)
    if not isinstance(raw, list):
        return []
    named: list[_M | str | None] = []
    for entry in raw:
        valid = _salvaged(model, entry)
        if valid is None and isinstance(entry, dict) and isinstance(entry.get("name"), str):
            named.append(entry["name"])
        else:
            named.append(valid)
    return named


def _valid_parts(data: dict[str, Any]) -> ConfigParts:
    """What the cross-reference checks read, from a file with field errors: each entry as
    far as it validates (``_salvaged``), every name given."""
    backends = [
        b.name if isinstance(b, BackendConfig) else b
        for b in _named(data, "backends", BackendConfig)
    ]
    storage = _salvaged(StorageConfig, data.get("storage", {}))
    mode = data.get("mode", "embedded")
    passthrough = data.get("passthrough_backend")
    token_rules = data.get("token_rules")
    return ConfigParts(
        backends=backends,
        deployments=_named(data, "deployments", DeploymentConfig),
        products=_entries(data, "products", ProductConfig),
        prices=_entries(data, "prices", PriceConfig),
        ptu=_entries(data, "ptu", PtuCostConfig),
        ptu_quotes=_entries(data, "ptu_quotes", PtuQuoteConfig),
        mode=mode if isinstance(mode, str) else "embedded",
        has_redis=data.get("redis") is not None,
        storage_url=storage.url if storage else None,
        passthrough_backend=passthrough if isinstance(passthrough, str) else None,
        has_token_rules=isinstance(token_rules, list) and bool(token_rules),
        has_oidc=data.get("oidc") is not None,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value silently, so a setting pasted twice (two ``limits:`` of a product) would change
    the configuration unseen. PyYAML has no option for it, hence this constructor."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in this mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a YAML file. Raises ``ConfigError`` (also for unreadable files and
    YAML syntax errors, with the line and column)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, [f"byte {exc.start}: not UTF-8 text ({exc.reason}); save the file as UTF-8"]
        ) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError(source, [f"{where}: {getattr(exc, 'problem', exc)}"]) from exc
    return parse_config(data, source)


def environment_problems(config: GatewayConfig, environ: dict[str, str]) -> list[str]:
    """Problems only visible at start: secrets named in the file but missing from the
    environment. ``config check`` reports them as warnings, ``serve`` refuses to start.
    (Whether a Key Vault secret can be read is found out when the gateway starts.)"""
    problems: list[str] = []
    # Content Safety services authenticate as backends do (docs/content-safety.md).
    authenticated = [(f"backends[{i}]", b.auth) for i, b in enumerate(config.backends)]
    authenticated += [(f"content_safety[{i}]", s.auth) for i, s in enumerate(config.content_safety)]
    for where, auth in authenticated:
        if auth.type == "api-key" and auth.key_env and auth.key_env not in environ:
            problems.append(f"{where}.auth.key_env: environment variable {auth.key_env} is not set")
        vault = auth.key_vault
        if (
            vault is not None
            and vault.credential == "service-principal"
            and vault.client_secret_env not in environ
        ):
            problems.append(
                f"{where}.auth.key_vault.client_secret_env: environment variable "
                f"{vault.client_secret_env} is not set"
            )
    for i, export in enumerate(config.exports):
        for field_name in ("sas_key_env", "secret_env"):
            env_name = getattr(export, field_name)
            if env_name and env_name not in environ:
                problems.append(
                    f"exports[{i}].{field_name}: environment variable {env_name} is not set"
                )
    secret_env = config.security.key_secret_env
    if config.mode == "cluster" and secret_env not in environ:
        problems.append(
            f"security.key_secret_env: cluster mode needs {secret_env} set "
            "(the same value on every instance)"
        )
    elif len(environ.get(secret_env, "").encode("utf-8")) in range(1, MIN_KEY_SECRET_BYTES):
        problems.append(
            f"security.key_secret_env: {secret_env} must hold at least {MIN_KEY_SECRET_BYTES} "
            "bytes (e.g. the output of: openssl rand -hex 32)"
        )
    return problems


#: The longest span of each quota period, in days (a month of 31, a leap year).
_QUOTA_PERIOD_DAYS: dict[str, float] = {
    "hourly": 1 / 24,
    "daily": 1,
    "weekly": 7,
    "monthly": 31,
    "yearly": 366,
}


def retention_warnings(config: GatewayConfig) -> list[str]:
    """Settings that work but weaken something: raw usage records kept for less than the
    longest token or request quota period of a product. A quota counter created after its
    period began (after a restart, or after Redis lost it) is seeded from the raw records of
    the period (docs/limits.md); records purged before it are missing from the seed.
    Products' policies only: a subscription's override is not known here."""
    days = config.retention.raw_records_days
    if days is None:
        return []
    longest: tuple[float, str, str] | None = None
    for product in config.products:
        limits = product.limits
        policies = limits if isinstance(limits, list) else [] if limits is None else [limits]
        for policy in policies:
            # The request quota is seeded from the same records (its count of them).
            for period, what in (
                (policy.token_quota_period, "token"),
                (policy.request_quota_period, "request"),
            ):
                if period is not None and (
                    longest is None or _QUOTA_PERIOD_DAYS[period] > longest[0]
                ):
                    longest = (_QUOTA_PERIOD_DAYS[period], f"{period} {what}", product.name)
    if longest is None or days >= longest[0]:
        return []
    return [
        f"retention.raw_records_days: {days:g} day(s) is shorter than the {longest[1]} "
        f"quota of product {longest[2]!r}: a quota counter seeded from the ledger after a "
        "restart (or a Redis loss) misses the usage of purged records"
    ]


def budget_price_warnings(config: GatewayConfig) -> list[str]:
    """A product with a budget that may use a deployment with no price at all (no price
    entry for it or its model, no PTU reservation covering it): its records are unpriced,
    and a budget does not count them as spent, so it never refuses for them. Products'
    budgets only: a subscription's override is not known here."""
    warnings: list[str] = []
    for product in config.products:
        if product.budget is None:
            continue
        names = set(product.deployments)
        unpriced = [
            d.name
            for d in config.deployments
            if ("*" in names or d.name in names) and not _priced(config, d)
        ]
        if unpriced:
            warnings.append(
                f"products[{product.name!r}].budget: deployment(s) "
                f"{', '.join(map(repr, unpriced))} have no price: their usage is not counted "
                "as spent, so the budget never refuses for it; add a price to prices"
            )
    return warnings


def _priced(config: GatewayConfig, deployment: DeploymentConfig) -> bool:
    """Whether any price entry or PTU reservation may price this deployment's records."""
    if any(
        p.deployment == deployment.name or (p.deployment is None and p.model == deployment.model)
        for p in config.prices
    ):
        return True
    backends = {m.backend for m in deployment.members()}
    return any(
        (e.deployment is None or e.deployment == deployment.name)
        and (e.backend is None or e.backend in backends)
        for e in config.ptu
    )


#: Memory a quota counter takes in the limit store, about (the counter, its origin, the
#: limiter's cached shape and the seeder's bookkeeping), for the warning below.
QUOTA_COUNTER_BYTES = 1_500


def header_quota_warnings(config: GatewayConfig) -> list[str]:
    """A product policy with ``counter_key: header`` and a ``token_quota`` (or a
    ``request_quota``): one quota counter per distinct header value, kept until the period
    ends (idle sweeping frees only TPM and RPM windows), so memory (or Redis) grows with
    every value clients send. Products' policies only: a subscription's override is not
    known here."""
    warnings: list[str] = []
    for product in config.products:
        for policy in product.limit_policies():
            if policy.counter_key != "header":
                continue
            # Each quota is a counter of its own per value, living until its own period ends.
            quotas = []
            if policy.token_quota is not None:
                quotas.append(f"{policy.token_quota_period} token_quota")
            if policy.request_quota is not None:
                quotas.append(f"{policy.request_quota_period} request_quota")
            if not quotas:
                continue
            keeps = (
                "keeps one quota counter per distinct header value until the period ends"
                if len(quotas) == 1
                else "keeps two quota counters per distinct header value, each until its "
                "period ends"
            )
            warnings.append(
                f"products[{product.name!r}]: a {' and a '.join(quotas)} with "
                f"counter_key: header ({policy.counter_header}) {keeps} (about "
                f"{QUOTA_COUNTER_BYTES:,} bytes of memory each; in cluster mode, Redis keys): "
                "a client sending "
                "many values grows it without bound; prefer tokens_per_minute for a header "
                "key (its counters are freed after a minute idle), or a header whose values "
                "are a bounded set of users"
            )
    return warnings
