"""``sluicegate backends``: every deployment's pool as configured, with live state.

Where the live state comes from:

* ``--url`` of a running gateway: its ``/metrics`` (no token needed), which carries the
  router's view per backend deployment — circuit state, seconds until an open circuit is
  probed, headroom tokens and requests — and each backend's in-flight requests;
* otherwise, in cluster mode: the state the instances share in Redis (trips and the latest
  headroom reports; in-flight counts are per instance and not shared);
* otherwise only the configuration (an embedded gateway keeps its state in its process).

The running gateway's own view, with last errors, is ``Gateway.backend_states()`` (the admin
API's source).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sluicegate.config.model import GatewayConfig
from sluicegate.routing.pool import target_key


@dataclass(slots=True)
class Row:
    deployment: str
    backend: str
    backend_deployment: str
    priority: int
    weight: int
    kind: str
    state: str = "unknown"
    open_seconds: float | None = None
    open_reason: str | None = None
    headroom_tokens: int | None = None
    headroom_requests: int | None = None
    headroom_age_seconds: float | None = None
    in_flight: int | None = None
    #: The rule the backend's breakers follow (``breaker_rule``; the JSON output shows it).
    circuit_breaker: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return target_key(self.backend, self.backend_deployment)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def breaker_rule(config: GatewayConfig, backend: str) -> dict[str, Any] | None:
    """The rule ``backend``'s breakers follow, from the configuration, as
    ``Router.breaker_rule`` gives it for a running gateway (None: no such backend)."""
    from sluicegate.routing.build import breaker_settings

    for b in config.backends:
        if b.name == backend:
            rule: dict[str, Any] = breaker_settings(
                b.breaker(config.routing.circuit_breaker)
            ).as_config()
            rule["source"] = "routing" if b.circuit_breaker is None else "backend"
            return rule
    return None


def configured_rows(config: GatewayConfig) -> list[Row]:
    kinds = {b.name: b.kind for b in config.backends}
    rules = {b.name: breaker_rule(config, b.name) for b in config.backends}
    rows: list[Row] = []
    for dep in config.deployments:
        for m in sorted(dep.members(), key=lambda m: m.priority):
            rows.append(
                Row(
                    dep.name,
                    m.backend,
                    m.backend_deployment or dep.upstream_name,
                    m.priority,
                    m.weight,
                    kinds.get(m.backend, "?"),
                    circuit_breaker=rules.get(m.backend),
                )
            )
    return rows


def merge_metrics(rows: list[Row], text: str) -> None:
    """Fill in the live columns from a gateway's ``/metrics`` text."""
    by_key: dict[str, list[Row]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).append(row)
        row.state = "closed"  # a target the router knows and exports no state for is closed
    in_flight: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "sluicegate_backend_in_flight":
                in_flight[labels["backend"]] = int(sample.value)
                continue
            if "deployment" not in labels or "backend" not in labels:
                continue
            for row in by_key.get(target_key(labels["backend"], labels["deployment"]), []):
                if sample.name == "sluicegate_routing_circuit_state" and sample.value:
                    row.state = labels["state"]
                elif sample.name == "sluicegate_routing_headroom_tokens":
                    row.headroom_tokens = int(sample.value)
                elif sample.name == "sluicegate_routing_headroom_requests":
                    row.headroom_requests = int(sample.value)
                elif sample.name == "sluicegate_routing_open_seconds":
                    row.open_seconds = sample.value
    for row in rows:
        row.in_flight = in_flight.get(row.backend)


def merge_shared(rows: list[Row], shared: dict[bytes, bytes], now: float) -> None:
    """Fill in the live columns from the cluster's shared state (the Redis hash)."""
    from sluicegate.routing.redis_state import decode_field

    by_key: dict[str, list[Row]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).append(row)
        row.state = "closed"
    for raw_field, value in shared.items():
        update = decode_field(raw_field.decode("utf-8", "replace"), value)
        if update is None:
            continue
        for row in by_key.get(update.key, []):
            if update.trip is not None and update.trip.open_until > now:
                row.state = "open"
                row.open_seconds = round(update.trip.open_until - now, 3)
                row.open_reason = update.trip.reason
            if update.headroom is not None:
                row.headroom_tokens = update.headroom.report.remaining_tokens
                row.headroom_requests = update.headroom.report.remaining_requests
                row.headroom_age_seconds = round(now - update.headroom.reported_at, 3)


def read_shared(config: GatewayConfig) -> dict[bytes, bytes]:
    """The cluster's shared routing hash (cluster mode only)."""
    import redis

    assert config.redis is not None
    client = redis.Redis.from_url(config.redis.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw: dict[bytes, bytes] = client.hgetall(f"{config.redis.prefix}:routing:targets")  # type: ignore[assignment]
        return raw
    finally:
        client.close()


def collect(config: GatewayConfig, url: str | None) -> tuple[list[Row], str]:
    """Rows and a note saying where the live state came from."""
    rows = configured_rows(config)
    if url is not None:
        import httpx

        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10)
        response.raise_for_status()
        merge_metrics(rows, response.text)
        return rows, f"live state from {url}/metrics"
    if config.mode == "cluster" and config.redis is not None:
        merge_shared(rows, read_shared(config), time.time())
        return rows, "shared cluster state from Redis (trips and headroom)"
    return rows, "configuration only: pass --url of a running gateway for its live state"
