"""Everything the worker produces: results (with their `reply_to` copy and log event), retries and dead letters,
and the partition bookkeeping they need.

A result is produced to a partition fixed beforehand (the default partitioner's choice for its key), so the
job's claim can record where it goes and a lower bound of that partition's end: a worker taking over a job left
in doubt reads back from there (`workers.idempotency`). The `reply_to` copy, then the log event go out first, the
result on `vlm.jobs.result` last, so a result found there proves the rest went out (or was refused for good).

Failure policy: a refusal that is about one record (`REFUSED_RECORD`: too large, a topic the worker may not or
cannot write, a policy) is that job's: a refused `reply_to` copy or result becomes the job's error result, a
refused log event is left out with a warning (events are bounded, `workers.serving.log_event`, so only a broker
limit far below Kafka's default refuses one). A result that cannot even be encoded (a defect) becomes an
`internal_error` result. Any other Kafka error is the cluster's, and raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner
from pydantic import BaseModel

from schemas.codec import encode, key_of
from schemas.connections import aiokafka_options
from schemas.jobs import ImageJob, JobResult
from schemas.settings import Settings
from schemas.topics import Topic
from workers.idempotency import ClaimHold, published_before
from workers.metrics import WorkerMetrics
from workers.serving import error_result, log_event

log = logging.getLogger("vlmflow.worker")

MISSING_TOPIC_MEMORY_S = 60.0
"""A `reply_to` topic found missing counts as missing for this long before the cluster is asked again."""

PublishOutcome = Literal["published", "claim_lost"]
"""published: the result (and its copies) went out and the claim is done; claim_lost: Redis answered that
another owner took the job's claim over, so this worker published nothing."""

REFUSED_RECORD: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
    PolicyViolationError,
    InvalidMessageError,
    CorruptRecordException,
    InvalidTimestampError,
)
"""Kafka refusals of one record rather than failures of the cluster."""
REFUSED_REPLY = (*REFUSED_RECORD, UnknownTopicOrPartitionError, KafkaTimeoutError)
"""For a `reply_to` copy also a topic that went away after the check (the producer times out on its metadata);
a cluster that is down fails the result right after."""


class Producer(Protocol):
    """What the publisher needs of aiokafka's `AIOKafkaProducer`."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> Any: ...


class ResultPublisher:
    """Produces for one worker; owns the producer's partition map and the result partitions' known ends."""

    def __init__(self, settings: Settings, producer: Producer, metrics: WorkerMetrics):
        self.settings = settings
        self.producer = producer
        self.metrics = metrics
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}  # topic -> its partitions, for topics this worker produces to
        self._missing_topics: dict[str, float] = {}  # reply_to topic -> monotonic time until which it counts as missing
        self._result_ends: dict[int, int] = {}  # result partition -> an offset at or below its end

    async def learn_result_ends(self) -> None:
        """A lower bound of each result partition's end, for in-doubt read-back (`workers.idempotency`). Call
        once the producer has started.

        NOTE: ListOffsets "latest" of the local broker can answer below the true end, never above it, which is
        all a lower bound needs; produce acknowledgements raise the bounds from then on.
        """
        partitions = await self._topic_partitions(Topic.JOBS_RESULT)
        probe = AIOKafkaConsumer(**aiokafka_options(self.settings.kafka), enable_auto_commit=False)
        try:
            await probe.start()
            ends = await probe.end_offsets([TopicPartition(Topic.JOBS_RESULT, p) for p in partitions])
        finally:
            await probe.stop()
        self._result_ends = {tp.partition: offset for tp, offset in ends.items()}

    async def topic_exists(self, topic: str) -> bool:
        """Whether the cluster has `topic` (a cluster that creates topics on first use always says yes). A no is
        remembered for a minute, so a stream of jobs naming a missing topic does not wait for metadata each."""
        if self._missing_topics.get(topic, 0.0) > time.monotonic():
            return False
        try:
            async with asyncio.timeout(self.settings.kafka.request_timeout_ms / 1000):
                await self._topic_partitions(topic)
        except (TimeoutError, KafkaError):
            self._missing_topics[topic] = time.monotonic() + MISSING_TOPIC_MEMORY_S
            return False
        return True

    async def published_before(self, job_id: str, partition: int, from_offset: int | None) -> bool:
        """Whether `job_id`'s result lies on its result partition from `from_offset` on (`workers.idempotency`)."""
        return await published_before(self.settings, Topic.JOBS_RESULT, partition, from_offset, job_id.encode())

    async def publish(
        self,
        claim: ClaimHold,
        result: JobResult,
        *,
        job: ImageJob | None,
        reply_to: str | None,
        image_sizes: list[tuple[int, int]],
    ) -> PublishOutcome:
        """Publish one result: the copy to `reply_to` (a topic the worker accepted, or None), then the log event
        (when the job is known), the result on `vlm.jobs.result` last; then mark the claim done."""
        result = _encodable(result)
        key = key_of(Topic.JOBS_RESULT, result)
        partition = await self._partition_of(Topic.JOBS_RESULT, key)
        if not await claim.publishing(partition, self._result_ends.get(partition)):
            log.warning("job %s: claim lost before publishing; the worker that took it over answers it", result.job_id)
            return "claim_lost"
        if job is not None:
            result = await self._send_copies(job, result, reply_to, image_sizes, key)
        try:
            metadata = await self.send(Topic.JOBS_RESULT, result, key=key, partition=partition)
        except REFUSED_RECORD as exc:
            log.warning("job %s: the broker refused its result (%r); an error result goes instead", result.job_id, exc)
            result = error_result(result, "internal_error", f"the broker refused the result: {exc!r}")
            metadata = await self.send(Topic.JOBS_RESULT, result, key=key, partition=partition)
        self._result_ends[partition] = max(self._result_ends.get(partition, 0), metadata.offset + 1)
        await claim.done()
        self.metrics.completed.labels(result.status).inc()
        if result.error is not None:
            self.metrics.errors.labels(result.error.code).inc()
        return "published"

    async def _send_copies(
        self, job: ImageJob, result: JobResult, reply_to: str | None, image_sizes: list[tuple[int, int]], key: bytes
    ) -> JobResult:
        """The `reply_to` copy and the log event; returns the result to publish (an error when the copy was
        refused)."""
        if reply_to is not None:
            try:
                await self.send(reply_to, result, key=key)
            except REFUSED_REPLY as exc:
                log.warning("job %s: reply_to %r refused its result (%r)", job.job_id, reply_to, exc)
                message = f"reply_to topic {reply_to!r} refused the result: {exc!r}"
                result = error_result(result, "invalid_message", message)
        try:
            event = encode(log_event(job, result, image_sizes))
        except Exception:
            log.exception("job %s: its log event cannot be encoded; it is left out", job.job_id)
            return result
        try:
            await self.send(Topic.LOGS_RAW, event, key=key)
        except REFUSED_RECORD as exc:
            log.warning("job %s: the broker refused its log event (%r); it is left out", job.job_id, exc)
        return result

    async def send(self, topic: str, value: BaseModel | bytes, *, key: bytes, partition: int | None = None) -> Any:
        """Produce one record (a model, or its encoding) and wait for the broker's acknowledgement (its
        `RecordMetadata`)."""
        encoded = value if isinstance(value, bytes) else encode(value)
        return await self.producer.send_and_wait(topic, encoded, key=key, partition=partition)

    async def _topic_partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return self._partitions[topic]

    async def _partition_of(self, topic: str, key: bytes) -> int:
        """The partition the default partitioner picks for `key`, fixed before producing so the claim can say
        where the result will be."""
        partitions = await self._topic_partitions(topic)
        return int(self._partitioner(key, partitions, partitions))


def _encodable(result: JobResult) -> JobResult:
    """`result`, or an `internal_error` result when it cannot be encoded (a defect: answers are bounded before)."""
    try:
        encode(result)
    except Exception as exc:
        log.exception("job %s: its result cannot be encoded", result.job_id)
        return error_result(result, "internal_error", f"the result could not be encoded: {type(exc).__name__}")
    return result
