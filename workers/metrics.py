"""The worker's Prometheus metrics. Every exposed name is a constant here, so dashboards have one place to read.

Each worker has its own registry (several workers can share a process in tests); `serve` exposes it on
`settings.worker.metrics_port` (0 picks a free port).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.metrics_http import MetricsServer, serve_metrics

BUDGET_CAPACITY = "vlmflow_budget_capacity_tokens"
"""Gauge {pool}: vision tokens the pool may hold in flight."""
BUDGET_IN_USE = "vlmflow_budget_in_use_tokens"
"""Gauge {pool}: vision tokens leased right now across the pool (every worker), sampled from Redis."""
JOBS_IN_FLIGHT = "vlmflow_jobs_in_flight"
"""Gauge: jobs this worker took from Kafka and has not finished."""
JOBS_WAITING = "vlmflow_jobs_waiting"
"""Gauge: jobs of this worker waiting for a budget lease."""
JOBS_ADMITTED = "vlmflow_jobs_admitted_total"
"""Counter: jobs that got a lease and went to the engine."""
JOBS_REJECTED = "vlmflow_jobs_rejected_total"
"""Counter {code}: jobs answered without inference at admission (too_many_tokens, budget_timeout, deadline_exceeded)."""
JOBS_COMPLETED = "vlmflow_jobs_completed_total"
"""Counter {status}: results published, `ok` or `error`."""
JOBS_DUPLICATE = "vlmflow_jobs_duplicate_total"
"""Counter: redelivered jobs whose result was already published, skipped."""
JOBS_RETRIED = "vlmflow_jobs_retried_total"
"""Counter: jobs sent to the retry topic."""
JOBS_DEAD_LETTERED = "vlmflow_jobs_dead_lettered_total"
"""Counter: jobs sent to the dead-letter topic (each also gets a `retries_exhausted` result)."""
ERRORS = "vlmflow_job_errors_total"
"""Counter {code}: error results by error code, and undecodable records that got no result (`invalid_message`)."""
QUEUE_SECONDS = "vlmflow_queue_seconds"
"""Histogram: from the job's `submitted_at` to this worker taking it."""
ADMISSION_SECONDS = "vlmflow_admission_seconds"
"""Histogram: waiting for a budget lease."""
INFERENCE_SECONDS = "vlmflow_inference_seconds"
"""Histogram: the engine call."""
VISION_TOKENS = "vlmflow_job_vision_tokens"
"""Histogram: vision tokens per job (the lease size), for budget calibration."""
CONSUMER_LAG = "vlmflow_consumer_lag_records"
"""Gauge {topic, partition}: records of an assigned partition not yet fully handled (high watermark - position)."""

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class WorkerMetrics:
    """The metric objects of one worker, on a registry of its own."""

    def __init__(self, pool: str) -> None:
        self.registry = CollectorRegistry()
        self.pool = pool
        r = self.registry
        self.budget_capacity = Gauge(BUDGET_CAPACITY, "vision-token capacity of the pool", ["pool"], registry=r)
        self.budget_in_use = Gauge(BUDGET_IN_USE, "vision tokens leased across the pool", ["pool"], registry=r)
        self.in_flight = Gauge(JOBS_IN_FLIGHT, "jobs taken and not finished", registry=r)
        self.waiting = Gauge(JOBS_WAITING, "jobs waiting for a budget lease", registry=r)
        self.admitted = Counter(JOBS_ADMITTED, "jobs that got a lease", registry=r)
        self.rejected = Counter(JOBS_REJECTED, "jobs refused at admission", ["code"], registry=r)
        self.completed = Counter(JOBS_COMPLETED, "results published", ["status"], registry=r)
        self.duplicate = Counter(JOBS_DUPLICATE, "redelivered jobs already answered", registry=r)
        self.retried = Counter(JOBS_RETRIED, "jobs sent to the retry topic", registry=r)
        self.dead_lettered = Counter(JOBS_DEAD_LETTERED, "jobs sent to the dead-letter topic", registry=r)
        self.errors = Counter(ERRORS, "errors by code", ["code"], registry=r)
        self.queue_seconds = Histogram(QUEUE_SECONDS, "submit to pick-up", buckets=_SECONDS_BUCKETS, registry=r)
        self.admission_seconds = Histogram(
            ADMISSION_SECONDS, "waiting for a lease", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(INFERENCE_SECONDS, "engine call", buckets=_SECONDS_BUCKETS, registry=r)
        self.vision_tokens = Histogram(VISION_TOKENS, "vision tokens per job", buckets=_TOKEN_BUCKETS, registry=r)
        self.lag = Gauge(CONSUMER_LAG, "records not yet handled", ["topic", "partition"], registry=r)

    def set_budget(self, capacity: int, in_use: int) -> None:
        self.budget_capacity.labels(self.pool).set(capacity)
        self.budget_in_use.labels(self.pool).set(in_use)

    def serve(self, port: int) -> MetricsServer:
        """Expose `/metrics` over HTTP on 0.0.0.0:`port` (0: a free port, reported in the result)."""
        return serve_metrics(self.registry, port)
