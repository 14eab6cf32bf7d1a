"""Prometheus metrics in one registry per gateway (never the process-global default one).

Label sets are bounded: at most ``max_subscription_labels`` subscriptions get their own label
value, the rest are counted under ``other``. Names follow the OpenTelemetry GenAI semantic
conventions where one exists (``gen_ai_client_token_usage``, ``gen_ai_server_time_to_first_token``),
translated to Prometheus style.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sluicegate.accounting.records import UsageRecord

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The gateway's metrics. ``observe`` is called once per usage record (thread-safe)."""

    def __init__(self, max_subscription_labels: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_subs = max_subscription_labels
        self._subs: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "sluicegate_requests",
            "Requests by status and outcome.",
            ["deployment", "status", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "gen_ai_client_token_usage",
            "Tokens used, by type (input/output).",
            ["subscription", "product", "deployment", "backend", "token_type"],
            registry=r,
        )
        self.ttfb = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first byte sent to the client.",
            ["deployment"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Total request time.",
            ["deployment"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "sluicegate_limit_rejections",
            "Requests refused by the limiter.",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "sluicegate_auth_failures",
            "Failed authentication attempts.",
            ["reason"],
            registry=r,
        )
        self.ledger_pending = Gauge(
            "sluicegate_ledger_pending_records",
            "Usage records waiting to be written.",
            registry=r,
        )
        self.ledger_written = Gauge(
            "sluicegate_ledger_written_records",
            "Usage records written since start.",
            registry=r,
        )
        self.ledger_failures = Gauge(
            "sluicegate_ledger_write_failures",
            "Failed ledger write attempts since start.",
            registry=r,
        )
        self.ledger_latency = Gauge(
            "sluicegate_ledger_last_write_seconds",
            "Duration of the last ledger write.",
            registry=r,
        )

    def _sub_label(self, subscription_id: str | None) -> str:
        if subscription_id is None:
            return "none"
        if subscription_id in self._subs:
            return subscription_id
        with self._lock:
            if len(self._subs) < self._max_subs:
                self._subs.add(subscription_id)
                return subscription_id
        return "other"

    def observe(self, record: UsageRecord) -> None:
        deployment = record.deployment or "none"
        self.requests.labels(deployment, str(record.status), record.outcome.value).inc()
        if record.prompt_tokens or record.completion_tokens:
            sub = self._sub_label(record.subscription_id)
            product, backend = record.product or "none", record.backend or "none"
            self.tokens.labels(sub, product, deployment, backend, "input").inc(record.prompt_tokens)
            self.tokens.labels(sub, product, deployment, backend, "output").inc(
                record.completion_tokens
            )
        if record.ttfb_ms is not None:
            self.ttfb.labels(deployment).observe(record.ttfb_ms / 1000)
        self.duration.labels(deployment).observe(record.duration_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
