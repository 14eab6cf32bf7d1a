"""The compiled configuration: what the request path reads, built once from ``GatewayConfig``.

Lookups the request path needs (deployment by name, product by name, allowed deployments) are
plain dicts and frozensets here, so a request does no parsing of configuration at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sluicegate.clock import Clock
from sluicegate.config.model import DeploymentConfig, GatewayConfig, ProductConfig
from sluicegate.limits.policy import LimitPolicy
from sluicegate.messages.config import MessageLogPolicy
from sluicegate.routing.pool import Member
from sluicegate.upstream.backend import Backend

if TYPE_CHECKING:
    from sluicegate.cache.semantic import SemanticCache
    from sluicegate.guardrails.content_safety import ContentSafetyGuard, ContentSafetyService


@dataclass(frozen=True, slots=True)
class Deployment:
    """A client-facing deployment. ``backend``/``upstream_name`` are its primary member; the
    request path routes over ``members`` (the pool; one member without ``pool:``)."""

    name: str
    backend: Backend
    upstream_name: str
    model: str | None
    config: DeploymentConfig
    members: tuple[Member, ...] = ()


@dataclass(frozen=True, slots=True)
class Product:
    name: str
    description: str
    #: None means every deployment.
    allowed: frozenset[str] | None
    limits: tuple[LimitPolicy, ...]
    config: ProductConfig
    #: The prompt check of ``config.content_safety`` (None: prompts are not checked).
    content_safety: ContentSafetyGuard | None = None
    #: What the product's message log keeps (None: no message log; then reading this is all
    #: the feature costs a request).
    message_log: MessageLogPolicy | None = None
    #: Chat completions answered from earlier answers (None: no cache; then reading this is
    #: all the feature costs a request).
    semantic_cache: SemanticCache | None = None

    def allows(self, deployment: str) -> bool:
        return self.allowed is None or deployment in self.allowed

    @property
    def passthrough(self) -> bool:
        """Whether the product's keys may use passthrough paths (``ProductConfig``)."""
        chosen = self.config.passthrough
        return self.allowed is None if chosen is None else chosen


@dataclass(slots=True)
class Runtime:
    config: GatewayConfig
    backends: dict[str, Backend]
    deployments: dict[str, Deployment]
    products: dict[str, Product]
    passthrough: Backend
    extra: dict[str, Any] = field(default_factory=dict)
    #: Content Safety services by name (opened and closed by the gateway with the backends).
    content_safety: dict[str, ContentSafetyService] = field(default_factory=dict)

    def secrets(self) -> list[str]:
        held = [s for b in self.backends.values() for s in b.secrets()]
        return held + [s for c in self.content_safety.values() for s in c.secrets()]


def compile_runtime(
    config: GatewayConfig, environ: dict[str, str] | None = None, clock: Clock | None = None
) -> Runtime:
    """Build the runtime objects. Reads the backends' secrets from the environment (once)."""
    env = dict(os.environ) if environ is None else environ
    backends = {b.name: Backend(b, env, clock) for b in config.backends}
    deployments = {d.name: _deployment(d, backends) for d in config.deployments}
    services = _content_safety_services(config, env, clock)
    products = {
        p.name: Product(
            p.name,
            p.description,
            None if "*" in p.deployments else frozenset(p.deployments),
            p.limit_policies(),
            p,
            content_safety=_guard(p, services),
            message_log=p.message_log,
            semantic_cache=_semantic_cache(p, clock),
        )
        for p in config.products
    }
    passthrough = backends[config.passthrough_backend or config.backends[0].name]
    return Runtime(config, backends, deployments, products, passthrough, content_safety=services)


def _content_safety_services(
    config: GatewayConfig, env: dict[str, str], clock: Clock | None
) -> dict[str, ContentSafetyService]:
    if not config.content_safety:
        return {}
    # Imported only when configured: a gateway without content safety loads nothing of it.
    from sluicegate.guardrails.content_safety import ContentSafetyService

    return {s.name: ContentSafetyService(s, env, clock) for s in config.content_safety}


def _guard(
    product: ProductConfig, services: dict[str, ContentSafetyService]
) -> ContentSafetyGuard | None:
    """The product's prompt check, if it has a ``content_safety`` policy."""
    if product.content_safety is None:
        return None
    from sluicegate.guardrails.content_safety import ContentSafetyGuard

    policy = product.content_safety
    return ContentSafetyGuard(product.name, policy, services[policy.service])


def _semantic_cache(product: ProductConfig, clock: Clock | None) -> SemanticCache | None:
    """The product's semantic cache (empty), if it has a ``semantic_cache`` policy."""
    if product.semantic_cache is None:
        return None
    from sluicegate.cache.semantic import SemanticCache
    from sluicegate.clock import SystemClock

    return SemanticCache(product.name, product.semantic_cache, clock or SystemClock())


def _deployment(d: DeploymentConfig, backends: dict[str, Backend]) -> Deployment:
    members = tuple(
        Member(
            backend=m.backend,
            deployment=m.backend_deployment or d.upstream_name,
            priority=m.priority,
            weight=m.weight,
            kind=backends[m.backend].kind,
        )
        for m in d.members()
    )
    primary = min(members, key=lambda m: m.priority)
    return Deployment(d.name, backends[primary.backend], primary.deployment, d.model, d, members)
