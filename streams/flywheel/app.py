"""The flywheel's Faust app: agents that wire topics and Redis to the pure functions of `streams`.

    vlm.logs.raw ──normalize──▶ screen (normalize, rules, redact) ──▶ dedupe (Redis) ──▶ vlm.logs.normalized
                                 └─ rejected with code/rule ──────────────┴─ duplicate ──▶ vlm.logs.rejected
    vlm.logs.normalized ──mine──▶ signals, score ──▶ vlm.cases.hard (when the score reaches the threshold)
    vlm.cases.hard ──enqueue──▶ the correction queue (Redis), at the case's priority
    vlm.corrections.done ──golden──▶ vlm.golden (next version per case; the leader snapshots it to S3 hourly)

Each agent decodes a record, calls pure functions and sends; Faust owns the offsets (it flushes the producer
before it commits, so delivery is at least once). A bad record never stops an agent: it becomes a rejection
(raw logs) or an error line (our own topics). Scale-out is Kafka's: start more `vlmflow streams` members.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faust
from faust.types import EventT, StreamT
from faust.types.auth import CredentialsT

from schemas.cases import Correction, GoldenRecord, HardCase
from schemas.codec import decode, encode, key_of
from schemas.connections import redis_client
from schemas.errors import InvalidMessage
from schemas.logs import Lineage, NormalizedLog, RejectedLog
from schemas.settings import KafkaSettings, Settings
from schemas.topics import Topic, topic
from streams.flywheel.dedupe import SeenStore, Sighting, retrying
from streams.flywheel.golden import golden_record, snapshot
from streams.flywheel.mining import hard_case
from streams.flywheel.screen import ScreenConfig, rejection, screen
from streams.review.queue import CorrectionQueue

log = logging.getLogger(__name__)


BATCH_MAX = 500
BATCH_WITHIN_S = 0.05
"""Agents take up to BATCH_MAX records at once (or what arrived within BATCH_WITHIN_S), so the dedupe state costs
one Redis round trip per batch rather than per log. Faust acks a batch once the agent asks for the next one, so
handling never raises: defects become rejections, Redis failures are retried until Redis answers."""
PRODUCER_LINGER_S = 0.005
"""Batches outputs per partition; Faust's default (0) sends a produce request per record (docs/flywheel.md)."""
MAX_REQUEST_BYTES = 1_000_000
"""The producer's request limit (Kafka's default `max.request.size`); a record over it could never be sent."""
MAX_RECORD_BYTES = 900_000
"""Normalized logs above this are rejected as `too_large` (room left for the key, headers and the hard case's
extra fields), instead of failing the send and with it the whole batch."""
ENQUEUE_CONCURRENCY = 16
"""Hard cases queued at once (one Redis connection each; the queue has one script call per case)."""


@dataclass
class Counts:
    """What this worker did since it started, for the progress line."""

    normalized: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    hard_cases: int = 0
    queued: int = 0
    skipped: int = 0

    def line(self) -> str:
        reasons = ", ".join(f"{code} {count}" for code, count in self.rejected.most_common())
        return (
            f"normalized {self.normalized}, rejected {sum(self.rejected.values())}"
            f"{f' ({reasons})' if reasons else ''}, hard cases {self.hard_cases} ({self.queued} queued), "
            f"undecodable skipped {self.skipped}"
        )


def create_app(settings: Settings) -> faust.App:
    """The Faust app with every flywheel agent. Reads the rules now, so a bad rules file fails before start."""
    streams = settings.streams
    screen_config = ScreenConfig.from_settings(streams)
    datadir = settings.state_dir / "streams" / streams.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        streams.app_id,
        broker=[f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings.kafka),
        broker_client_id=settings.kafka.client_id,
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.kafka.session_timeout_ms / 1000 / 3,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=PRODUCER_LINGER_S,
        producer_max_request_size=MAX_REQUEST_BYTES,
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_replication_factor=settings.kafka.replication_factor,
        topic_partitions=1,
        key_serializer="raw",
        value_serializer="raw",
    )
    counts = Counts()
    raw_topic = app.topic(Topic.LOGS_RAW)
    normalized_topic = app.topic(Topic.LOGS_NORMALIZED)
    rejected_topic = app.topic(Topic.LOGS_REJECTED)
    hard_topic = app.topic(Topic.CASES_HARD)

    async def publish(outcome: NormalizedLog | RejectedLog, raw: bytes | None) -> None:
        value = encode(outcome)
        if isinstance(outcome, NormalizedLog) and len(value) > MAX_RECORD_BYTES:
            detail = f"the normalized record has {len(value)} bytes, more than {MAX_RECORD_BYTES}"
            outcome = rejection(raw or b"", _lineage_of(outcome), code="too_large", detail=detail, config=screen_config)
            value = encode(outcome)
        if isinstance(outcome, NormalizedLog):
            await normalized_topic.send(key=key_of(Topic.LOGS_NORMALIZED, outcome), value=value)
            counts.normalized += 1
        else:
            await rejected_topic.send(key=key_of(Topic.LOGS_REJECTED, outcome), value=value)
            counts.rejected[outcome.code] += 1

    @app.agent(raw_topic, name="vlmflow.normalize")
    async def normalize_logs(stream: StreamT) -> None:
        """raw → screen → dedupe → normalized | rejected."""
        redis = redis_client(settings)
        seen = SeenStore(
            redis,
            prefix=f"vlmflow:streams:{streams.app_id}",
            dedupe_ttl_s=streams.dedupe_ttl_s,
            retry_window_s=streams.retry_window_s,
        )
        try:
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):  # type: ignore[attr-defined]
                lineages = [_lineage(event) for event in events]
                outcomes: list[NormalizedLog | RejectedLog] = [_screen_or_reject(event.value, lineage, screen_config)
                            for event, lineage in zip(events, lineages, strict=True)]  # fmt: skip
                passed = [(i, outcome) for i, outcome in enumerate(outcomes) if isinstance(outcome, NormalizedLog)]
                sightings = await seen.sight([(outcome, lineages[i]) for i, outcome in passed])
                for (i, passed_log), sighting in zip(passed, sightings, strict=True):
                    outcomes[i] = _dedupe(passed_log, sighting, events[i].value, screen_config)
                for event, outcome in zip(events, outcomes, strict=True):
                    await publish(outcome, event.value)
        finally:
            await redis.aclose()

    @app.agent(normalized_topic, name="vlmflow.mine")
    async def mine_logs(stream: StreamT) -> None:
        """normalized → signals → hard case (over the threshold)."""
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):  # type: ignore[attr-defined]
            for event in events:
                normalized = _decoded(Topic.LOGS_NORMALIZED, event, counts)
                if normalized is None:
                    continue
                case = hard_case(normalized, streams.mining, threshold=streams.hard_case_threshold)
                if case is not None:
                    await hard_topic.send(key=key_of(Topic.CASES_HARD, case), value=encode(case))
                    counts.hard_cases += 1

    @app.agent(hard_topic, name="vlmflow.enqueue")
    async def enqueue_cases(stream: StreamT) -> None:
        """hard case → the correction queue at its priority (a case already submitted stays out). Enqueueing is
        idempotent, so a batch is simply sent again after a Redis failure."""
        redis = redis_client(settings)
        queue = CorrectionQueue(redis, streams.review_queue)
        try:
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):  # type: ignore[attr-defined]
                cases = [
                    case for case in (_decoded(Topic.CASES_HARD, event, counts) for event in events) if case is not None
                ]
                await retrying(partial(_enqueue, queue, cases), "Redis (correction queue)")
                counts.queued += len(cases)
        finally:
            await redis.aclose()

    @app.timer(interval=streams.progress_interval_s)
    async def progress() -> None:
        log.info("flywheel: %s", counts.line())

    add_golden_agent(app, settings)
    return app


def add_golden_agent(app: faust.App, settings: Settings) -> None:
    """Add the golden agent (corrections → versioned golden records) and the leader's snapshot timer to `app`."""
    corrections_topic = app.topic(Topic.CORRECTIONS_DONE, key_serializer="raw", value_serializer="raw")
    golden_topic = app.topic(Topic.GOLDEN, key_serializer="raw", value_serializer="raw")
    # NOTE: a table's partitions follow its source topic's: the agent reads it keyed by case id, the table's key.
    latest = app.Table(
        "golden-latest",
        default=None,
        partitions=topic(Topic.CORRECTIONS_DONE).partitions,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )

    @app.agent(corrections_topic, name="vlmflow.golden")
    async def corrections_to_golden(stream: StreamT) -> None:
        """correction → next version of the case's golden record (none when nothing changed)."""
        async for event in stream.events():
            message = event.message
            try:
                correction: Correction = decode(Topic.CORRECTIONS_DONE, event.value)
            except InvalidMessage as exc:
                log.error("skipped %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
                continue
            if correction.case is None:
                log.error(
                    "skipped %s[%d]@%d: correction %s carries no case",
                    message.topic,
                    message.partition,
                    message.offset,
                    correction.case_id,
                )
                continue
            key = correction.case.case_id.encode()
            previous_value = latest.get(key)
            previous = GoldenRecord.model_validate_json(previous_value) if previous_value is not None else None
            record = golden_record(correction, correction.case, previous)
            if record is None:
                continue
            await golden_topic.send(key=record.record_id.encode(), value=encode(record))
            latest[key] = encode(record)

    @app.timer(interval=settings.streams.golden_snapshot_interval_s, on_leader=True)
    async def golden_snapshot() -> None:
        uri, count = await asyncio.to_thread(snapshot, settings)
        log.info("golden snapshot: %d records to %s", count, uri)


def _decoded(topic_name: str, event: EventT, counts: Counts) -> Any:
    """The event's value as its topic's model; None (logged and counted) when it does not decode."""
    try:
        return decode(topic_name, event.value)
    except InvalidMessage as exc:
        counts.skipped += 1
        message = event.message
        log.error("skipped %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
        return None


def _screen_or_reject(raw: bytes | None, lineage: Lineage, config: ScreenConfig) -> NormalizedLog | RejectedLog:
    """`screen`, with a defect in vlmflow turned into an `internal_error` rejection instead of a dead agent."""
    try:
        return screen(raw, lineage=lineage, config=config)
    except Exception as exc:
        log.exception("defect while screening %s[%d]@%d", lineage.topic, lineage.partition, lineage.offset)
        return rejection(raw or b"", lineage, code="internal_error", detail=f"{type(exc).__name__}", config=config)


async def _enqueue(queue: CorrectionQueue, cases: list[HardCase]) -> None:
    for start in range(0, len(cases), ENQUEUE_CONCURRENCY):
        await asyncio.gather(*(queue.enqueue(case) for case in cases[start : start + ENQUEUE_CONCURRENCY]))


def _lineage(event: EventT) -> Lineage:
    message = event.message
    return Lineage(topic=message.topic, partition=message.partition, offset=message.offset)


def _lineage_of(normalized: NormalizedLog) -> Lineage:
    assert normalized.lineage is not None, "the normalize agent gives every log its lineage"
    return normalized.lineage


def _dedupe(
    normalized: NormalizedLog, sighting: Sighting, raw: bytes, config: ScreenConfig
) -> NormalizedLog | RejectedLog:
    """A duplicate becomes a rejection naming the first copy; a repeat of the request counts as an attempt."""
    lineage = _lineage_of(normalized)
    if sighting.is_duplicate_of(lineage):
        detail = f"same images, prompt and answer as {sighting.first_lineage}"
        return rejection(raw, lineage, code="duplicate", rule="dedupe", detail=detail, config=config)
    if sighting.earlier_tries > normalized.attempt:
        return normalized.model_copy(update={"attempt": sighting.earlier_tries})
    return normalized


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
