"""The flywheel worker's Prometheus metrics (`vlmflow streams`). Every exposed name is a constant here, so the
dashboard and the alerts have one place to read (tests/unit/test_compose.py checks them against this registry).

Each worker has its own registry; `serve` exposes it on `settings.streams.metrics_port` (0 picks a free port).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.metrics_http import MetricsServer, serve_metrics

RECORDS_IN = "vlmflow_streams_records_in_total"
"""Counter {agent}: records an agent took from its topic (redeliveries included)."""
RECORDS_OUT = "vlmflow_streams_records_out_total"
"""Counter {agent, topic}: records an agent wrote, by topic."""
REDELIVERED = "vlmflow_streams_redelivered_total"
"""Counter {agent}: records taken again after a crash or rebalance whose outputs were already written (skipped)."""
REJECTIONS = "vlmflow_streams_rejections_total"
"""Counter {code, rule}: raw logs rejected, by reject code and rule (`rule` is empty unless code is `rule` or
`duplicate`)."""
HARD_CASES = "vlmflow_streams_hard_cases_total"
"""Counter: hard cases mined and queued."""
GOLDEN_VERSIONS = "vlmflow_streams_golden_versions_total"
"""Counter {step}: corrections by what they did to the golden set (`write`, `rewrite`, `redelivered`, `older`,
`unchanged`)."""
QUEUE_PENDING = "vlmflow_streams_queue_pending_cases"
"""Gauge: hard cases waiting in the correction queue (not claimed)."""
QUEUE_OLDEST_AGE = "vlmflow_streams_queue_oldest_pending_age_seconds"
"""Gauge: how long the oldest pending case has waited since it was first queued (0 when none waits)."""
CONSUMER_LAG = "vlmflow_streams_consumer_lag_records"
"""Gauge {topic, partition}: records of an assigned partition not yet handled (high watermark - position)."""
REDIS_RETRIES = "vlmflow_streams_redis_retries_total"
"""Counter {operation}: Redis calls that failed and were retried (the stage pauses meanwhile)."""
KAFKA_RETRIES = "vlmflow_streams_kafka_retries_total"
"""Counter: batches whose produce failed and were taken again (what was written is found, not written twice)."""
CONSUMER_REPLACED = "vlmflow_streams_consumer_replaced_total"
"""Counter: raw-log consumers replaced because their fetches stopped answering (a stuck fetcher)."""
BATCH_SECONDS = "vlmflow_streams_batch_seconds"
"""Histogram: handling one batch of raw logs, from fetch to commit."""
ERRORS = "vlmflow_streams_errors_total"
"""Counter {where}: defects met and survived (`screen`, `golden_snapshot`, `undecodable`)."""

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class StreamsMetrics:
    """The metric objects of one flywheel worker, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter(RECORDS_IN, "records taken", ["agent"], registry=r)
        self.records_out = Counter(RECORDS_OUT, "records written", ["agent", "topic"], registry=r)
        self.redelivered = Counter(REDELIVERED, "records already handled, skipped", ["agent"], registry=r)
        self.rejections = Counter(REJECTIONS, "raw logs rejected", ["code", "rule"], registry=r)
        self.hard_cases = Counter(HARD_CASES, "hard cases mined and queued", registry=r)
        self.golden_versions = Counter(GOLDEN_VERSIONS, "corrections by outcome", ["step"], registry=r)
        self.queue_pending = Gauge(QUEUE_PENDING, "cases waiting in the correction queue", registry=r)
        self.queue_oldest_age = Gauge(QUEUE_OLDEST_AGE, "age of the oldest pending case", registry=r)
        self.lag = Gauge(CONSUMER_LAG, "records not yet handled", ["topic", "partition"], registry=r)
        self.redis_retries = Counter(REDIS_RETRIES, "Redis calls retried", ["operation"], registry=r)
        self.kafka_retries = Counter(KAFKA_RETRIES, "batches taken again after a produce failure", registry=r)
        self.consumer_replaced = Counter(CONSUMER_REPLACED, "stuck raw-log consumers replaced", registry=r)
        self.batch_seconds = Histogram(BATCH_SECONDS, "one raw batch", buckets=_SECONDS_BUCKETS, registry=r)
        self.errors = Counter(ERRORS, "defects survived", ["where"], registry=r)

    def serve(self, port: int) -> MetricsServer:
        """Expose `/metrics` over HTTP on 0.0.0.0:`port` (0: a free port, reported in the result)."""
        return serve_metrics(self.registry, port)
