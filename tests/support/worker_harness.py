"""What the worker tests share: settings for a worker under test, a worker running in the test's process,
submitting planned jobs, collecting every result record (duplicates included), checking results against their
plan, sampling the budget, and an in-memory producer for driving the serving path of many jobs without a broker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import RecordMetadata

from schemas.codec import decode
from schemas.connections import aiokafka_options, cancel_and_wait, redis_client
from schemas.jobs import JobResult
from schemas.settings import Settings
from schemas.tasks import MODEL_BOX_FIELD, validate_answer
from schemas.topics import TOPICS, Topic
from tests.conftest import free_port_block
from vlmflow.job_mix import UNREACHABLE_HOST, PlannedJob
from workers.budget import TokenBudget
from workers.engines.base import Engine
from workers.publisher import Producer
from workers.worker import Worker


def worker_settings(settings: Settings, **worker: object) -> Settings:
    """A small budget (so admission binds and a job can exceed it), short leases, a metrics port of its own."""
    return settings.model_copy(
        update={
            "budget": settings.budget.model_copy(update={"capacity": 4096, "lease_ttl_s": 3.0, "wait_timeout_s": 60.0}),
            "worker": settings.worker.model_copy(
                update={
                    "metrics_port": free_port_block(),
                    "max_inline_image_bytes": 64 * 1024,
                    "retry_backoff_s": 0.2,
                    "url_allow_list": [UNREACHABLE_HOST],
                    **worker,
                }
            ),
        }
    )


@dataclass(frozen=True)
class SentRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class MemoryProducer:
    """A `workers.publisher.Producer` that keeps every record in memory, with the checks aiokafka's producer makes
    before sending: a record over `max_request_size` is refused (`MessageSizeTooLargeError`), a topic nobody
    created never gets metadata (`KafkaTimeoutError`), and keys are partitioned as aiokafka does. For the fuzz
    test's thousands of jobs in-process; what the broker itself does is covered by the tests against it."""

    def __init__(self, *, max_request_size: int, extra_topics: dict[str, int] | None = None):
        self.max_request_size = max_request_size
        self.partitions = {name: spec.partitions for name, spec in TOPICS.items()} | (extra_topics or {})
        self.sent: list[SentRecord] = []
        self._ends: Counter[tuple[str, int]] = Counter()
        self._partitioner = DefaultPartitioner()

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def partitions_for(self, topic: str) -> set[int]:
        if topic not in self.partitions:
            raise KafkaTimeoutError(f"no metadata for topic {topic!r}")
        return set(range(self.partitions[topic]))

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> RecordMetadata:
        assert value is not None
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        every = sorted(await self.partitions_for(topic))
        chosen = partition if partition is not None else int(self._partitioner(key, every, every))
        offset = self._ends[topic, chosen]
        self._ends[topic, chosen] += 1
        self.sent.append(SentRecord(topic, chosen, offset, key, value))
        return RecordMetadata(topic, chosen, TopicPartition(topic, chosen), offset, -1, 0, 0)

    def on(self, topic: str) -> list[SentRecord]:
        return [record for record in self.sent if record.topic == topic]


@asynccontextmanager
async def running_worker(
    settings: Settings, engine: Engine, *, producer: Producer | None = None, ready_timeout_s: float = 60.0
) -> AsyncIterator[Worker]:
    """A worker serving in this process (`Worker.run`) for the block; stopped after it, and the block fails if
    the worker stopped by itself (a job took it down)."""
    worker = Worker(settings, engine, producer=producer)
    ready = asyncio.Event()
    running = asyncio.create_task(worker.run(ready=ready))
    started = asyncio.create_task(ready.wait())
    await asyncio.wait({running, started}, timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if running.done():
        running.result()
    assert ready.is_set(), f"the worker was not ready within {ready_timeout_s} s"
    try:
        yield worker
        assert not running.done(), f"the worker stopped by itself: {running.exception()!r}"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)


@asynccontextmanager
async def from_the_start(
    settings: Settings, topic: str
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer outside any group, assigned every partition of `topic` at its beginning (and the partitions)."""
    consumer = AIOKafkaConsumer(**aiokafka_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        yield consumer, tps
    finally:
        await consumer.stop()


async def submit(settings: Settings, jobs: Iterable[PlannedJob]) -> None:
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all", max_request_size=4 * 2**20)
    await producer.start()
    try:
        sent = [await producer.send(Topic.JOBS_IMAGE, job.value, key=job.job_id.encode()) for job in jobs]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


@dataclass
class ResultLog:
    """Every record of the result topic, in arrival order."""

    records: list[JobResult] = field(default_factory=list)

    def by_job(self) -> dict[str, JobResult]:
        return {result.job_id: result for result in self.records}

    def duplicates(self) -> dict[str, int]:
        return {job_id: n for job_id, n in Counter(r.job_id for r in self.records).items() if n > 1}


class ResultReader:
    """Reads `vlm.jobs.result` from the beginning in the background, keeping every record."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.log = ResultLog()
        self._consumer = AIOKafkaConsumer(**aiokafka_options(settings.kafka), enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResultReader:
        await self._consumer.start()
        await self._consumer.topics()
        tps = [
            TopicPartition(Topic.JOBS_RESULT, p)
            for p in sorted(self._consumer.partitions_for_topic(Topic.JOBS_RESULT) or [])
        ]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await cancel_and_wait(self._task)
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                self.log.records.extend(decode(Topic.JOBS_RESULT, record.value) for record in records)

    async def wait_for(self, job_ids: set[str], timeout_s: float, *, settle_s: float = 2.0) -> ResultLog:
        """Until every job in `job_ids` has a result (then `settle_s` more, so late duplicates show up)."""
        deadline = time.monotonic() + timeout_s
        while not job_ids <= self.log.by_job().keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(settle_s)
        return self.log

    def count(self, job_ids: set[str]) -> int:
        return len(job_ids & self.log.by_job().keys())

    async def wait_for_count(self, job_ids: set[str], count: int, timeout_s: float) -> None:
        """Until `count` of `job_ids` have a result."""
        async with asyncio.timeout(timeout_s):
            while self.count(job_ids) < count:
                await asyncio.sleep(0.01)


def mismatches(
    plan: list[PlannedJob], results: dict[str, JobResult], settings: Settings, *, random_weights: bool = False
) -> list[str]:
    """Each planned job whose result is missing or not what it must be, described in one line.

    `random_weights`: the model's answers follow the schema's shape (constrained decoding) but may be cut off at
    max_output_tokens or break a rule no JSON Schema can state (a box with x1 > x2); the worker must then answer
    `output_invalid` after running the engine, which is what a good job may get instead of `ok`."""
    box_field = MODEL_BOX_FIELD[settings.model.family]
    problems = []
    for job in plan:
        result = results.get(job.job_id)
        if result is None:
            problems.append(f"{job.kind} {job.job_id}: no result")
        elif job.expected is None:
            model_erred = result.error is not None and result.error.code == "output_invalid"
            if random_weights and model_erred and result.completion_tokens > 0:
                continue
            if result.status != "ok":
                problems.append(f"{job.kind} {job.job_id}: {result.error}")
            else:
                assert job.job is not None
                validate_answer(job.job.task, result.output, job.job.output_schema, box_field=box_field)
        elif result.error is None or result.error.code != job.expected:
            problems.append(f"{job.kind} {job.job_id}: expected {job.expected}, got {result.status} {result.error}")
    return problems


async def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every value of `topic` up to its high watermark, decoded with the topic's model."""
    async with from_the_start(settings, topic) as (consumer, tps):
        values: list[Any] = []
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                values.extend(decode(topic, record.value) for record in records)
            highwaters = [consumer.highwater(tp) for tp in tps]
            positions = [await consumer.position(tp) for tp in tps]
            if all(hw is not None and pos >= hw for hw, pos in zip(highwaters, positions, strict=True)):
                return values


class BudgetSampler:
    """Samples the pool's leased tokens every few milliseconds while the test runs."""

    def __init__(self, settings: Settings, interval_s: float = 0.02):
        self.settings = settings
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._redis = redis_client(settings)
        self.budget = TokenBudget(
            self._redis, settings.budget.pool, settings.budget.capacity, settings.budget.lease_ttl_s
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BudgetSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await cancel_and_wait(self._task)
        await self._redis.aclose()

    async def _sample(self) -> None:
        while True:
            self.samples.append((await self.budget.state()).in_use)
            await asyncio.sleep(self.interval_s)
