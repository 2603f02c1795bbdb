"""The flywheel's worker (`vlmflow streams`): the raw-log stage, the golden agent and their timers in one Faust app.

    vlm.logs.raw ──raw-log stage (streams/flywheel/stage.py)──▶ vlm.logs.normalized | vlm.logs.rejected
                                                                 + vlm.cases.hard and the correction queue (Redis)
    vlm.corrections.done ──golden agent──▶ vlm.golden (next version per case; the leader snapshots it to S3)

The raw-log stage is a `mode.Service` of this app with a consumer group of its own (`<app_id>`); the golden agent
is a Faust agent (group `<app_id>-golden`). Scale-out is Kafka's: start more `vlmflow streams` members with the
same app id. Each raw log's outputs are written once (the stage's ledger); a correction writes a golden version
at most once (the golden store). Failure policy: a bad record never stops the worker (a rejection, or an error
line for our own topics); Redis and Kafka errors are retried with backoff; a failed snapshot is logged and the next
interval tries again. Prometheus metrics (`streams/flywheel/metrics.py`) are served on `streams.metrics_port`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import faust
from aiokafka.errors import KafkaError
from faust.types import StreamT
from faust.types.auth import CredentialsT
from kafka.errors import KafkaError as SyncKafkaError
from redis.exceptions import RedisError

from schemas.cases import Correction
from schemas.codec import decode, encode
from schemas.connections import redis_client
from schemas.errors import InvalidMessage, VlmflowError
from schemas.settings import KafkaSettings, Settings
from schemas.topics import Topic
from streams.flywheel.dedupe import RETRY_BACKOFF_S, retrying
from streams.flywheel.golden import GoldenState, GoldenStore, decide, golden_record, read_golden, snapshot, stamp_of
from streams.flywheel.metrics import StreamsMetrics
from streams.flywheel.rules import load_rules
from streams.flywheel.stage import Counts, RawLogStage
from streams.review.queue import CorrectionQueue

log = logging.getLogger(__name__)
T = TypeVar("T")

GOLDEN_GROUP_SUFFIX = "-golden"
"""The golden agent's Faust app id (and consumer group) is the streams app id with this suffix; the raw-log stage's
group is the app id itself."""


def create_app(settings: Settings) -> faust.App:
    """The Faust app of the flywheel worker. Reads the rules now, so a bad rules file fails before start."""
    streams = settings.streams
    load_rules(streams.rules_path)
    datadir = settings.state_dir / "streams" / streams.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust_app(settings, app_id=streams.app_id + GOLDEN_GROUP_SUFFIX, datadir=str(datadir))
    counts = Counts()
    metrics = StreamsMetrics()

    @app.task
    async def start() -> None:
        """The metrics endpoint and the raw-log stage start with the worker (and stop with it)."""
        endpoint = metrics.serve(streams.metrics_port)
        log.info("flywheel metrics on port %d", endpoint.port)
        await app.add_runtime_dependency(RawLogStage(settings, counts, metrics, beacon=app.beacon))

    @app.timer(interval=streams.progress_interval_s)
    async def progress() -> None:
        log.info("flywheel: %s", counts.line())

    @app.timer(interval=streams.progress_interval_s)
    async def queue_depth() -> None:
        await sample_queue(settings, metrics)

    add_golden_agent(app, settings, counts, metrics)
    return app


def faust_app(settings: Settings, *, app_id: str, datadir: str) -> faust.App:
    """A Faust app on the configured Kafka, with raw keys and values (every agent decodes with `schemas.codec`)."""
    session_s = settings.kafka.session_timeout_ms / 1000
    return faust.App(
        app_id,
        broker=[f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings.kafka),
        broker_client_id=settings.kafka.client_id,
        broker_session_timeout=session_s,
        broker_heartbeat_interval=session_s / 3,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_replication_factor=settings.kafka.replication_factor,
        topic_partitions=1,
        key_serializer="raw",
        value_serializer="raw",
    )


async def sample_queue(settings: Settings, metrics: StreamsMetrics) -> None:
    """The correction queue's depth into the metrics (a Redis error leaves the last sample and is logged)."""
    redis = redis_client(settings)
    try:
        stats = await CorrectionQueue(redis, settings.streams.review_queue).stats()
        metrics.queue_pending.set(stats.pending)
        metrics.queue_oldest_age.set(stats.oldest_pending_age_s or 0.0)
    except (RedisError, OSError) as exc:
        log.warning("correction queue not sampled: %s", exc)
    finally:
        await redis.aclose()


def add_golden_agent(app: faust.App, settings: Settings, counts: Counts, metrics: StreamsMetrics) -> None:
    """Add the golden agent (corrections → versioned golden records) and the leader's snapshot timer to `app`."""
    corrections_topic = app.topic(Topic.CORRECTIONS_DONE, key_serializer="raw", value_serializer="raw")
    golden_topic = app.topic(Topic.GOLDEN, key_serializer="raw", value_serializer="raw")

    @app.agent(corrections_topic, name="vlmflow.golden")
    async def corrections_to_golden(stream: StreamT) -> None:
        """correction → the decision of the golden store → at most one golden version written."""
        redis = redis_client(settings)
        store = GoldenStore(redis, settings.streams.app_id)
        try:
            async for event in stream.events():
                message = event.message
                metrics.records_in.labels("golden").inc()
                try:
                    correction: Correction = decode(Topic.CORRECTIONS_DONE, event.value)
                except InvalidMessage as exc:
                    log.error("skipped %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
                    counts.skipped += 1
                    metrics.errors.labels("undecodable").inc()
                    continue
                if correction.case is None:
                    log.error("skipped %s[%d]@%d: correction %s carries no case", message.topic, message.partition,
                              message.offset, correction.case_id)  # fmt: skip
                    counts.skipped += 1
                    continue
                await apply_correction(correction, store, golden_topic, settings, counts, metrics)
        finally:
            await redis.aclose()

    @app.timer(interval=settings.streams.golden_snapshot_interval_s, on_leader=True)
    async def golden_snapshot() -> None:
        try:
            uri, records = await asyncio.to_thread(snapshot, settings)
        except Exception as exc:  # NOTE: whatever fails (S3, Kafka, a defect), a timer must never stop the worker
            log.error("golden snapshot failed, the next interval tries again: %s: %s", type(exc).__name__, exc)
            metrics.errors.labels("golden_snapshot").inc()
            return
        log.info("golden snapshot: %d records to %s", records, uri)


async def apply_correction(
    correction: Correction,
    store: GoldenStore,
    golden_topic: faust.types.TopicT,
    settings: Settings,
    counts: Counts,
    metrics: StreamsMetrics,
) -> None:
    """Write the golden version `correction` calls for, if any (`streams.flywheel.golden.decide`)."""
    assert correction.case is not None
    record_id = correction.case.case_id
    state = await _state(store, record_id, settings, metrics)
    stamp = stamp_of(correction.submitted_at, correction.output)
    decision = decide(state, stamp)
    counts.golden[decision.step] += 1
    metrics.golden_versions.labels(decision.step).inc()
    if not decision.writes:
        return
    record = golden_record(correction, correction.case, decision.version)
    await _redis(lambda: store.put(record_id, GoldenState(decision.version, stamp, sent=False)), metrics)
    for attempt in itertools.count(1):
        try:
            sent = await golden_topic.send(key=record.record_id.encode(), value=encode(record))
            await sent
            break
        except KafkaError as exc:
            wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1]
            log.warning("golden record %s v%d not sent (try %d): %s", record_id, decision.version, attempt, exc)
            await asyncio.sleep(wait)
    metrics.records_out.labels("golden", Topic.GOLDEN).inc()
    await _redis(lambda: store.put(record_id, GoldenState(decision.version, stamp, sent=True)), metrics)


async def _state(store: GoldenStore, record_id: str, settings: Settings, metrics: StreamsMetrics) -> GoldenState | None:
    """The record's state, rebuilding the store from vlm.golden first when Redis lost it (or never had it)."""
    for attempt in itertools.count(1):
        state = await _redis(lambda: store.state(record_id), metrics)
        if state != "unbuilt":
            return state
        try:
            records = await asyncio.to_thread(read_golden, settings)
        except (VlmflowError, SyncKafkaError, OSError) as exc:
            wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1]
            log.warning("golden store not rebuilt from %s (try %d): %s", Topic.GOLDEN, attempt, exc)
            await asyncio.sleep(wait)
            continue
        await _redis(partial(store.rebuild, records), metrics)
        log.info("golden store rebuilt from %s: %d records", Topic.GOLDEN, len(records))
    raise AssertionError("itertools.count never ends")


async def _redis(operation: Callable[[], Awaitable[T]], metrics: StreamsMetrics) -> T:
    return await retrying(
        operation, "Redis (golden store)", on_retry=lambda: metrics.redis_retries.labels("golden").inc()
    )


def _credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """Faust's spelling of the connection security in `KafkaSettings`."""
    context: ssl.SSLContext | None = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
        if kafka.ssl_certfile:
            context.load_cert_chain(str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None)
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context is not None else None
