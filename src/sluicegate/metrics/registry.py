"""Prometheus metrics in one registry per gateway (never the process-global default one).

Everything per request is derived from the same ``UsageRecord`` the ledger stores (``observe``
is a sink beside the ledger), so after any run the token and request counters equal the
ledger's totals (tests/admin/test_metrics_ledger.py proves it).

Label sets are bounded: at most ``max_subscription_labels`` subscriptions get their own label
value, the rest are counted under ``other``; products, deployments and backends come from the
configuration, statuses and error codes from small fixed sets. Names follow the OpenTelemetry
GenAI semantic conventions where one exists (``gen_ai.client.token.usage`` with
``gen_ai.token.type`` = input/output, ``gen_ai.server.time_to_first_token``,
``gen_ai.server.request.duration``), translated to Prometheus style; the rest are
``sluicegate_*``. See docs/grafana-dashboard.json for a dashboard over them.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.clock import Clock, SystemClock

if TYPE_CHECKING:
    from sluicegate.messages.sink import MessageLogStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WINDOW_SLOTS = 30
#: Error codes of limiter refusals (see limits/admission.py); other refusals are not counted.
_LIMIT_CODES = frozenset(
    {
        "TokenRateLimitExceeded",
        "RequestRateLimitExceeded",
        "TokenQuotaExceeded",
        "RequestQuotaExceeded",
        "TokenRequestTooLarge",
        "LimitStoreUnavailable",
        "MaxTokensCeilingExceeded",
        "BudgetExceeded",
    }
)
_SLOT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class BackendSample:
    """What a backend looks like right now (for ``/metrics`` and the admin API)."""

    name: str
    state: str  # healthy | degraded | throttled | down | idle | open/half-open (routing)
    in_flight: int
    headroom_tokens: int | None = None


class BackendHealth:
    """Recent outcomes per backend over the last five minutes (30 slots of 10 s).

    Fed from usage records; thread-safe. It is what the records can tell (answers, errors,
    throttling); a circuit breaker's own state, where routing provides one, takes precedence.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # backend → slot → [slot id, attempts, errors, throttled]
        self._slots: dict[str, list[list[int]]] = {}
        self._last: dict[str, tuple[int, float]] = {}  # backend → (status, monotonic time)

    def observe(self, backend: str, status: int, outcome: Outcome) -> None:
        now = self._clock.monotonic()
        slot_id = int(now // _SLOT_SECONDS)
        with self._lock:
            slots = self._slots.setdefault(backend, [[-1, 0, 0, 0] for _ in range(_WINDOW_SLOTS)])
            slot = slots[slot_id % _WINDOW_SLOTS]
            if slot[0] != slot_id:
                slot[:] = [slot_id, 0, 0, 0]
            slot[1] += 1
            if outcome is Outcome.BACKEND_ERROR:
                slot[2] += 1
            if status == 429:
                slot[3] += 1
            self._last[backend] = (status, now)

    def recent(self, backend: str) -> dict[str, float | int | None]:
        """Attempts, errors and 429s in the window, and the last status and its age (s)."""
        now = self._clock.monotonic()
        oldest = int(now // _SLOT_SECONDS) - _WINDOW_SLOTS + 1
        attempts = errors = throttled = 0
        with self._lock:
            for slot_id, a, e, t in self._slots.get(backend, []):
                if slot_id >= oldest:
                    attempts, errors, throttled = attempts + a, errors + e, throttled + t
            last = self._last.get(backend)
        return {
            "attempts": attempts,
            "errors": errors,
            "throttled": throttled,
            "last_status": last[0] if last else None,
            "last_seen_seconds_ago": round(now - last[1], 3) if last else None,
        }

    def state(self, backend: str) -> str:
        r = self.recent(backend)
        attempts, errors = int(r["attempts"] or 0), int(r["errors"] or 0)
        if attempts == 0:
            return "idle"
        if r["last_status"] == 429 and (r["last_seen_seconds_ago"] or 0) < 60:
            return "throttled"
        if errors == attempts and attempts >= 3:
            return "down"
        if errors / attempts > 0.2:
            return "degraded"
        return "healthy"


@dataclass(frozen=True, slots=True)
class RoutingSample:
    """One backend deployment as routing sees it (see routing.router.TargetView)."""

    backend: str
    deployment: str
    state: str  # closed | open | half-open
    headroom_tokens: int | None
    headroom_requests: int | None
    open_seconds: float | None = None  # open: seconds until it is probed again


class _RoutingCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[RoutingSample]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["backend", "deployment"]
        circuit = GaugeMetricFamily(
            "sluicegate_routing_circuit_state",
            "1 for the circuit state of each backend deployment (closed, open, half-open).",
            labels=[*labels, "state"],
        )
        tokens = GaugeMetricFamily(
            "sluicegate_routing_headroom_tokens",
            "x-ratelimit-remaining-tokens as last reported, less what was sent since.",
            labels=labels,
        )
        requests = GaugeMetricFamily(
            "sluicegate_routing_headroom_requests",
            "x-ratelimit-remaining-requests as last reported, less what was sent since.",
            labels=labels,
        )
        open_for = GaugeMetricFamily(
            "sluicegate_routing_open_seconds",
            "Seconds until an open circuit is probed again (only for open circuits).",
            labels=labels,
        )
        for s in self.source():
            circuit.add_metric([s.backend, s.deployment, s.state], 1)
            if s.open_seconds is not None:
                open_for.add_metric([s.backend, s.deployment], s.open_seconds)
            if s.headroom_tokens is not None:
                tokens.add_metric([s.backend, s.deployment], s.headroom_tokens)
            if s.headroom_requests is not None:
                requests.add_metric([s.backend, s.deployment], s.headroom_requests)
        yield circuit
        yield tokens
        yield requests
        yield open_for

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class _BackendCollector(Collector):
    """Backend state, in-flight requests and headroom, read at scrape time."""

    def __init__(self, source: Callable[[], Iterable[BackendSample]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily(
            "sluicegate_backend_state",
            "1 for the backend's current state (healthy, degraded, throttled, down, idle, ...).",
            labels=["backend", "state"],
        )
        in_flight = GaugeMetricFamily(
            "sluicegate_backend_in_flight", "Requests in flight to the backend.", labels=["backend"]
        )
        headroom = GaugeMetricFamily(
            "sluicegate_backend_headroom_tokens",
            "Tokens the backend said it still accepts in its current window.",
            labels=["backend"],
        )
        for sample in self.source():
            states.add_metric([sample.name, sample.state], 1)
            in_flight.add_metric([sample.name], sample.in_flight)
            if sample.headroom_tokens is not None:
                headroom.add_metric([sample.name], sample.headroom_tokens)
        yield states
        yield in_flight
        yield headroom

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class _BudgetCollector(Collector):
    """``sluicegate_budget_spent_ratio{subscription}`` (spent / budget in the current period,
    at the budget job's last run) for at most ``limit`` subscriptions, the highest ratios
    first (those are the ones to watch), and how many budgets exist and refuse."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, float]]], limit: int) -> None:
        self.source = source
        self.limit = limit

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ratios = sorted(self.source(), key=lambda item: (-item[1], item[0]))
        spent = GaugeMetricFamily(
            "sluicegate_budget_spent_ratio",
            "Spent / budget of a subscription in its current budget period (1 = all spent), "
            "as of the budget job's last run; the highest max_subscription_labels only.",
            labels=["subscription"],
        )
        for subscription, ratio in ratios[: self.limit]:
            spent.add_metric([subscription], ratio)
        yield spent
        yield GaugeMetricFamily(
            "sluicegate_budgets_over",
            "Subscriptions whose spending has reached their budget this period.",
            sum(1 for _, ratio in ratios if ratio >= 1.0),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class LimitStoreStats(Protocol):
    """The adjustment counters of ``limits.redis_store.RedisStoreStats``."""

    @property
    def failed_adjustments(self) -> int: ...

    @property
    def replayed_adjustments(self) -> int: ...

    @property
    def dropped_adjustments(self) -> int: ...


class LimitStoreSource(Protocol):
    """The cluster mode's limit store (``limits.redis_store.RedisStore``)."""

    @property
    def clock_skew_s(self) -> float | None: ...

    @property
    def queued_adjustments(self) -> int: ...

    @property
    def stats(self) -> LimitStoreStats: ...


class _LimitStoreCollector(Collector):
    """Redis's clock skew and the limit store's failed settles (docs/limits.md)."""

    def __init__(self, source: LimitStoreSource) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        store = self.source
        skew = store.clock_skew_s
        if skew is not None:  # none before the first admission in Redis
            yield GaugeMetricFamily(
                "sluicegate_redis_clock_skew_seconds",
                "Redis's clock minus this instance's, at the last admission counted in Redis.",
                skew,
            )
        yield GaugeMetricFamily(
            "sluicegate_limit_adjustments_queued",
            "Settles and releases that failed to reach Redis, waiting to be replayed.",
            store.queued_adjustments,
        )
        stats = store.stats
        for name, text, value in (
            ("failed", "that failed to reach Redis (then queued)", stats.failed_adjustments),
            ("replayed", "replayed after a failure", stats.replayed_adjustments),
            (
                "dropped",
                "given up (queue full, window over before Redis answered, script error)",
                stats.dropped_adjustments,
            ),
        ):
            yield CounterMetricFamily(
                f"sluicegate_limit_adjustments_{name}",
                f"Settles and releases of Redis reservations {text}.",
                value,
            )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class ConnectionSource(Protocol):
    """Client connections as the server counts them (``server.ConnectionCounts``)."""

    @property
    def open(self) -> int: ...

    @property
    def refused(self) -> int: ...


class _ConnectionCollector(Collector):
    """Open client connections and refusals for ``listen.max_connections``, read at scrape
    time (the server counts them per connection; nothing is done per request)."""

    def __init__(self, source: ConnectionSource) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "sluicegate_client_connections",
            "Client connections open on this instance.",
            value=self.source.open,
        )
        yield CounterMetricFamily(
            "sluicegate_client_connections_refused",
            "Client connections refused (503 TooManyConnections) for listen.max_connections.",
            value=self.source.refused,
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class _MessageLogCollector(Collector):
    """The message log's counts (``messages.sink.MessageLogStats``), read at scrape time:
    nothing is counted per request here."""

    def __init__(self, source: Callable[[], MessageLogStats]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.source()
        for name, text, value in (
            ("requests", "Requests whose prompt/completion entries were written.", s.requests),
            ("entries", "Prompt/completion entries (lines) written.", s.entries),
            ("dropped", "Requests not logged: the message log's queue was full.", s.dropped),
            (
                "streams_cut",
                "Streams logged without some of their text (the log's memory budget, "
                "max_pending_bytes, was spent mid-stream).",
                s.streams_cut,
            ),
            (
                "answers_cut",
                "Whole answers logged from the beginning that fitted (the log's memory budget, "
                "max_pending_bytes, was spent when they came).",
                s.answers_cut,
            ),
            ("write_failures", "Failed writes of the message log.", s.write_failures),
        ):
            yield CounterMetricFamily(f"sluicegate_message_log_{name}", text, value=value)
        yield GaugeMetricFamily(
            "sluicegate_message_log_pending",
            "Requests waiting to be written to the message log.",
            value=s.pending,
        )
        yield GaugeMetricFamily(
            "sluicegate_message_log_pending_bytes",
            "Bytes held for the message log: queued entries, the events and text of streams in "
            "flight and the answers of requests running (bounded by max_pending_bytes).",
            value=s.pending_bytes,
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


#: deployment → (count per bucket, +Inf last; [sum])
_Histogram = dict[str, tuple[list[int], list[float]]]


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _RequestCounters(Collector):
    """The per-request counters and histograms, kept as plain numbers in dicts and turned
    into Prometheus families at scrape time.

    Why not ``prometheus_client.Counter``/``Histogram``: each ``inc``/``observe`` takes a
    lock and runs several checks, and a request updates five of them: a few percent of the
    gateway's CPU. Increments here are single dict/list operations made from the event loop
    (atomic under the GIL); a scrape copies the dicts first. Names, labels and buckets are
    what the ``prometheus_client`` metrics exported before.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str, str, str, str], int] = {}
        self.ttfb: _Histogram = {}
        self.duration: _Histogram = {}

    def observe(
        self, histogram: dict[str, tuple[list[int], list[float]]], key: str, v: float
    ) -> None:
        entry = histogram.get(key)
        if entry is None:
            entry = histogram[key] = ([0] * (len(self.buckets) + 1), [0.0])
        entry[0][bisect.bisect_left(self.buckets, v)] += 1
        entry[1][0] += v

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "sluicegate_requests",
            "Upstream attempts and refused requests, by status and outcome.",
            labels=["deployment", "status", "outcome"],
        )
        for labels, value in list(self.requests.items()):
            requests.add_metric(list(labels), value)
        yield requests
        tokens = CounterMetricFamily(
            "gen_ai_client_token_usage",
            "Tokens used, by type (input/output).",
            labels=["subscription", "product", "deployment", "backend", "token_type"],
        )
        for token_labels, value in list(self.tokens.items()):
            tokens.add_metric(list(token_labels), value)
        yield tokens
        for name, doc, data in (
            (
                "gen_ai_server_time_to_first_token_seconds",
                "Time to the first byte sent to the client.",
                self.ttfb,
            ),
            ("gen_ai_server_request_duration_seconds", "Total request time.", self.duration),
        ):
            family = HistogramMetricFamily(name, doc, labels=["deployment"])
            for deployment, (counts, total) in list(data.items()):
                cumulative, running = [], 0
                for bound, count in zip((*self.buckets, math.inf), list(counts), strict=True):
                    running += count
                    cumulative.append((_le(bound), running))
                family.add_metric([deployment], cumulative, sum_value=total[0])
            yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())


class GatewayMetrics:
    """The gateway's metrics. ``observe`` is called once per usage record, from the event
    loop's thread (the per-request counters take no lock; see ``_RequestCounters``)."""

    def __init__(self, max_subscription_labels: int = 200, clock: Clock | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_subs = max_subscription_labels
        self._subs: set[str] = set()
        self._lock = threading.Lock()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.health = BackendHealth(clock or SystemClock())
        r = self.registry
        self.counters = _RequestCounters(_LATENCY_BUCKETS)
        r.register(self.counters)
        self.cached_tokens = Counter(
            "sluicegate_cached_input_tokens",
            "Prompt tokens served from the backend's prompt cache (part of input).",
            ["product", "deployment", "backend"],
            registry=r,
        )
        self.rejections = Counter(
            "sluicegate_limit_rejections",
            "Requests refused by the limiter, by error code.",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "sluicegate_auth_failures",
            "Failed authentication attempts.",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "sluicegate_upstream_retries",
            "Upstream attempts after the first (retries), by the backend retried on.",
            ["deployment", "backend"],
            registry=r,
        )
        self.spillover = Counter(
            "sluicegate_spillover",
            "Requests moved from one backend to another (failover or priority spill-over).",
            ["deployment", "from_backend", "to_backend"],
            registry=r,
        )
        self.circuit_trips = Counter(
            "sluicegate_circuit_trips",
            "Circuit breaker trips on this instance, by backend and reason (429, 5xx, timeout, "
            "connection, ...).",
            ["backend", "reason"],
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
        self.budget_thresholds = Counter(
            "sluicegate_budget_thresholds_crossed",
            "Budget thresholds (warn_at fractions and the whole budget) crossed, once per "
            "threshold, subscription and period, by the budget's action (refuse / warn).",
            ["action"],
            registry=r,
        )
        self.budget_unpriced_records = Gauge(
            "sluicegate_budget_unpriced_records",
            "Usage records without a price in budgeted subscriptions' current budget periods "
            "(all of them together), as of the budget job's last run: budgets do not count "
            "them as spent.",
            registry=r,
        )
        self.content_safety_refusals = Counter(
            "sluicegate_content_safety_refusals",
            "Prompts refused by a product's content safety policy, by product and reason "
            "(PromptAttack, IndirectAttack, Blocklist, Hate, SelfHarm, Sexual, Violence: the "
            "first that applied).",
            ["product", "reason"],
            registry=r,
        )
        self.content_safety_failures = Counter(
            "sluicegate_content_safety_failures",
            "Content safety checks that could not be completed (service unreachable, failing "
            "or too slow), by product and what on_error did with the request (block, allow).",
            ["product", "action"],
            registry=r,
        )
        self.semantic_cache_lookups = Counter(
            "sluicegate_semantic_cache_lookups",
            "Semantic cache lookups of chat completions, by product and result (hit, miss, "
            "error: the embeddings call failed and the request went on without the cache, "
            "skipped: not looked up, a stream or a dialog too long or not all text).",
            ["product", "result"],
            registry=r,
        )
        self.export_events = Counter(
            "sluicegate_export_events",
            "Usage events an export delivered (accepted by its Event Hub or webhook).",
            ["export"],
            registry=r,
        )
        self.export_failures = Counter(
            "sluicegate_export_failures",
            "Failed export cycles, by reason (auth, quota, not_found, too_large, throttled, "
            "busy, server_error, rejected, timeout, connection, credential, database).",
            ["export", "reason"],
            registry=r,
        )
        self.export_lost_records = Counter(
            "sluicegate_export_lost_records",
            "Record ids an export gave up on: records purged by retention before export (on "
            "PostgreSQL, also ids no record ever committed for).",
            ["export"],
            registry=r,
        )
        self.export_lag_records = Gauge(
            "sluicegate_export_lag_records",
            "Record ids above the export's cursor (records not yet delivered, at most).",
            ["export"],
            registry=r,
        )
        self.export_lag_seconds = Gauge(
            "sluicegate_export_lag_seconds",
            "Age of the oldest record read but not yet delivered (0: caught up).",
            ["export"],
            registry=r,
        )
        self._backend_collector: _BackendCollector | None = None
        self._connection_collector: _ConnectionCollector | None = None

    def watch_backends(self, source: Callable[[], Iterable[BackendSample]]) -> None:
        """Export backend state from ``source`` at every scrape (a later call replaces it)."""
        if self._backend_collector is not None:
            self._backend_collector.source = source
            return
        self._backend_collector = _BackendCollector(source)
        self.registry.register(self._backend_collector)

    def watch_connections(self, source: ConnectionSource) -> None:
        """Export ``source``'s client connection counts at every scrape (a later call
        replaces it: one server per gateway)."""
        if self._connection_collector is not None:
            self._connection_collector.source = source
            return
        self._connection_collector = _ConnectionCollector(source)
        self.registry.register(self._connection_collector)

    def watch_limit_store(self, source: LimitStoreSource) -> None:
        """Export the Redis limit store's clock skew and failed settles at every scrape."""
        self.registry.register(_LimitStoreCollector(source))

    def watch_budgets(self, source: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Export ``(subscription, spent ratio)`` pairs from ``source`` at every scrape
        (bounded to ``max_subscription_labels`` series)."""
        self.registry.register(_BudgetCollector(source, self._max_subs))

    def budget_threshold(self, action: str) -> None:
        """For the budgets: a threshold was crossed (``accounting.budgets.BudgetObserver``)."""
        self._child(self.budget_thresholds, action).inc()

    def budget_unpriced(self, records: int) -> None:
        """For the budgets: unpriced records in budgeted periods (``BudgetObserver``)."""
        self.budget_unpriced_records.set(records)

    def content_safety_refused(self, product: str, reason: str) -> None:
        """For content safety (``guardrails.content_safety.ContentSafetyObserver``)."""
        self._child(self.content_safety_refusals, product, reason).inc()

    def content_safety_failed(self, product: str, action: str) -> None:
        """For content safety: a check failed; ``action`` is the product's ``on_error``."""
        self._child(self.content_safety_failures, product, action).inc()

    def semantic_cache_lookup(self, product: str, result: str) -> None:
        """For the semantic cache (``cache.semantic.SemanticCacheObserver``)."""
        self._child(self.semantic_cache_lookups, product, result).inc()

    def export_sent(self, export: str, events: int) -> None:
        """For exports (``accounting.export.ExportObserver``); from the export worker."""
        self.export_events.labels(export).inc(events)

    def export_failed(self, export: str, reason: str) -> None:
        self.export_failures.labels(export, reason).inc()

    def export_lost(self, export: str, records: int) -> None:
        self.export_lost_records.labels(export).inc(records)

    def export_lag(self, export: str, records: int, seconds: float) -> None:
        self.export_lag_records.labels(export).set(records)
        self.export_lag_seconds.labels(export).set(round(seconds, 3))

    def export_lag_unknown(self, export: str) -> None:
        """No lag seen (another instance held the cursor): the series go, not stay stale."""
        self.export_lag_records.remove(export)
        self.export_lag_seconds.remove(export)

    def count_spillover(self, deployment: str, from_backend: str, to_backend: str) -> None:
        """For routing: a request left ``from_backend`` for ``to_backend``."""
        self._child(self.spillover, deployment, from_backend, to_backend).inc()

    def count_trip(self, backend: str, reason: str) -> None:
        """For routing: a breaker opened on ``backend``."""
        self._child(self.circuit_trips, backend, reason).inc()

    def watch_routing(self, source: Callable[[], Iterable[RoutingSample]]) -> None:
        """Export per backend deployment state and headroom from ``source`` at every scrape."""
        self.registry.register(_RoutingCollector(source))

    def watch_message_log(self, source: Callable[[], MessageLogStats]) -> None:
        """Export the message log's counts from ``source`` at every scrape."""
        self.registry.register(_MessageLogCollector(source))

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

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: label validation and lookup cost more than the
        increment itself, and the label sets are bounded."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: UsageRecord) -> None:
        deployment = record.deployment or "none"
        counters = self.counters
        key = (deployment, str(record.status), record.outcome.value)
        counters.requests[key] = counters.requests.get(key, 0) + 1
        product, backend = record.product or "none", record.backend or "none"
        if record.prompt_tokens or record.completion_tokens:
            sub = self._sub_label(record.subscription_id)
            tokens = counters.tokens
            into = (sub, product, deployment, backend, "input")
            out = (sub, product, deployment, backend, "output")
            tokens[into] = tokens.get(into, 0) + record.prompt_tokens
            tokens[out] = tokens.get(out, 0) + record.completion_tokens
        child = self._child
        if record.cached_tokens:
            child(self.cached_tokens, product, deployment, backend).inc(record.cached_tokens)
        if record.outcome is Outcome.REJECTED:
            code = record.error_code or str(record.status)
            if record.status == 401:
                child(self.auth_failures, code).inc()
            elif code in _LIMIT_CODES:
                child(self.rejections, code).inc()
        if record.attempt > 1:
            child(self.retries, deployment, backend).inc()
        if record.backend is not None and record.outcome is not Outcome.REJECTED:
            self.health.observe(record.backend, record.status, record.outcome)
        if record.ttfb_ms is not None:
            counters.observe(counters.ttfb, deployment, record.ttfb_ms / 1000)
        counters.observe(counters.duration, deployment, record.duration_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
