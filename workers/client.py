"""The producer side, for upstream services: submit image jobs, await each one's result by job_id.

    async with JobClient(settings) as client:
        job_id = await client.submit(ImageJob(job_id="a1", task="caption", images=["s3://vlm-images/cat.jpg"]))
        result = await client.result(job_id, timeout_s=60)

The client reads the result topic (`vlm.jobs.result`, or the topic the jobs name as `reply_to`) from its end at
start-up, without a consumer group, and matches results to the jobs it submitted or was asked about. A result
that comes twice is handed out once (workers already suppress duplicates; `duplicates` counts any that get
through).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.codec import decode, encode, key_of
from schemas.connections import aiokafka_options
from schemas.errors import InvalidMessage, VlmflowError
from schemas.jobs import ImageJob, JobResult
from schemas.settings import Settings
from schemas.topics import Topic

log = logging.getLogger("vlmflow.client")

POLL_MS = 200


class ResultTimeout(VlmflowError):
    """No result for a job within the wait."""


class JobClient:
    """Submit jobs and await their results. Use as `async with`, or call `start()` and `stop()`."""

    def __init__(self, settings: Settings, *, results_topic: str = Topic.JOBS_RESULT):
        self.settings = settings
        self.results_topic = results_topic
        options = aiokafka_options(settings.kafka)
        self._producer = AIOKafkaProducer(**options, acks="all", max_request_size=settings.worker.max_message_bytes)
        self._consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
        self._waiting: dict[str, asyncio.Future[JobResult]] = {}  # job_id -> its result, once it comes
        self._reader: asyncio.Task[None] | None = None
        self.duplicates = 0
        """Results seen for a job that already had one."""

    async def __aenter__(self) -> JobClient:
        await self.start()
        return self

    async def __aexit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, and position the result reader at the end of every partition before anything is submitted.

        NOTE: the local broker's ListOffsets "latest" can answer below the true end, never above it, so at worst
        a few older results are read and ignored; none of ours can be missed.
        """
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self.results_topic)
        tps = [TopicPartition(self.results_topic, partition) for partition in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="job-client results")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def submit(self, job: ImageJob) -> str:
        """Publish `job` (acknowledged by the broker) and start watching for its result; returns its job_id."""
        return await self.submit_raw(key_of(Topic.JOBS_IMAGE, job).decode(), encode(job))

    async def submit_raw(self, job_id: str, value: bytes) -> str:
        """Publish a record value as it is, keyed by `job_id`: how the demo and tests send records that are no
        valid job (workers answer those with `invalid_message` under the key)."""
        self._future(job_id)
        await self._producer.send_and_wait(Topic.JOBS_IMAGE, value, key=job_id.encode())
        return job_id

    async def result(self, job_id: str, timeout_s: float) -> JobResult:
        """The result of `job_id`, waiting up to `timeout_s`; raises `ResultTimeout`."""
        future = self._future(job_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise ResultTimeout(f"no result for job {job_id!r} within {timeout_s:.0f} s") from None

    async def results(self, job_ids: list[str], timeout_s: float) -> AsyncIterator[JobResult]:
        """Results of `job_ids` in the order they arrive, until all came or `timeout_s` ran out (then it stops;
        the caller sees which are missing)."""
        pending = {self._future(job_id) for job_id in job_ids}
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + timeout_s
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, ends_at - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return
            for future in done:
                yield future.result()

    def _future(self, job_id: str) -> asyncio.Future[JobResult]:
        if job_id not in self._waiting:
            self._waiting[job_id] = asyncio.get_running_loop().create_future()
        return self._waiting[job_id]

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=POLL_MS)
            for records in batches.values():
                for record in records:
                    self._take(record.value)

    def _take(self, value: bytes | None) -> None:
        try:
            result: JobResult = decode(Topic.JOBS_RESULT, value)
        except InvalidMessage as exc:
            log.warning("skipping a record of %s: %s", self.results_topic, exc)
            return
        future = self._waiting.get(result.job_id)
        if future is None:
            return
        if future.done():
            self.duplicates += 1
            return
        future.set_result(result)


async def read_results(settings: Settings, *, follow: bool, topic: str = Topic.JOBS_RESULT) -> AsyncIterator[JobResult]:
    """Every result on `topic` from the beginning, partition by partition as fetched; without `follow` it stops
    at the high watermark of every partition (which fetch responses report correctly on any broker)."""
    consumer = AIOKafkaConsumer(**aiokafka_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            raise VlmflowError(f"topic {topic!r} does not exist on {settings.kafka.bootstrap_servers}")
        tps = [TopicPartition(topic, partition) for partition in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batches = await consumer.getmany(timeout_ms=POLL_MS)
            for records in batches.values():
                for record in records:
                    try:
                        yield decode(Topic.JOBS_RESULT, record.value)
                    except InvalidMessage as exc:
                        log.warning("skipping %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            if not follow and await _at_end(consumer, tps):
                return
    finally:
        await consumer.stop()


async def _at_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    for tp in tps:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True
