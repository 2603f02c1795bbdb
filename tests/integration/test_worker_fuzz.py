"""Thousands of generated hostile jobs (`tests.support.hostile_jobs`) through the worker's real serving path: every
record must end as exactly one result for its job id, and the worker must never stop.

The large run drives `Worker.handle` (the same `_handle` the consume loop runs) with the instant engine, the real
Redis (claims, leases) and S3, and an in-memory producer, feeding what goes to `vlm.jobs.retry` back until every
attempt has ended. The small run sends hostile jobs through the real broker to a worker running as usual.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from schemas.codec import decode
from schemas.connections import aiokafka_options
from schemas.jobs import JobResult
from schemas.settings import Settings
from schemas.topics import Topic
from tests.support.hostile_jobs import HostileAnswers, HostileJobs, HostileRecord
from tests.support.worker_harness import MemoryProducer, ResultReader, running_worker, worker_settings
from vlmflow.job_mix import UNREACHABLE_HOST
from workers.worker import Worker

FUZZ_JOBS = 10_000
BROKER_JOBS = 300
BATCH = 64
"""Records served at once, as a consume batch would put them in flight."""
MAX_MESSAGE_BYTES = 1_048_576


def fuzz_settings(settings: Settings) -> Settings:
    return worker_settings(
        settings,
        metrics_port=-1,
        retry_backoff_s=0.0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_inline_image_bytes=256 * 1024,
        url_allow_list=[UNREACHABLE_HOST],
        reply_to_prefixes=["reply."],
    )


def consumer_record(topic: str, offset: int, key: bytes | None, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, offset, 0, 0, key, value, None, len(key or b""), len(value), [])


async def serve(worker: Worker, records: list[ConsumerRecord]) -> None:
    for start in range(0, len(records), BATCH):
        await asyncio.gather(*(worker.handle(record) for record in records[start : start + BATCH]))


async def test_10000_hostile_jobs_each_end_as_exactly_one_result(settings: Settings) -> None:
    settings = fuzz_settings(settings)
    producer = MemoryProducer(max_request_size=MAX_MESSAGE_BYTES + 65_536)
    engine = HostileAnswers()
    worker = Worker(settings, engine, producer=producer)
    await engine.start()
    worker.budget = await worker.open_budget()
    hostile = list(HostileJobs(seed=12, max_bytes=MAX_MESSAGE_BYTES).records(FUZZ_JOBS))
    kinds = Counter(record.kind.split(":")[0] for record in hostile)
    started = time.monotonic()
    try:
        await serve(worker, [consumer_record(Topic.JOBS_IMAGE, n, r.key, r.value) for n, r in enumerate(hostile)])
        fed_back = 0
        while len(retries := producer.on(Topic.JOBS_RETRY)) > fed_back:
            batch = [
                consumer_record(Topic.JOBS_RETRY, fed_back + n, r.key, r.value)
                for n, r in enumerate(retries[fed_back:])
            ]
            fed_back = len(retries)
            await serve(worker, batch)
    finally:
        await worker.redis.aclose()
        await engine.close()
    elapsed_s = time.monotonic() - started

    results = [decode(Topic.JOBS_RESULT, record.value) for record in producer.on(Topic.JOBS_RESULT)]
    per_job = Counter(result.job_id for result in results)
    expected = {record.key.decode() for record in hostile}
    assert set(per_job) == expected, f"{len(expected - set(per_job))} jobs without a result"
    assert max(per_job.values()) == 1, [job for job, n in per_job.items() if n > 1][:5]
    codes = Counter(result.error.code if result.error else "ok" for result in results)
    print(f"\n{FUZZ_JOBS} hostile jobs in {elapsed_s:.0f} s, {fed_back} retries fed back")
    print(f"kinds {dict(kinds)}\nresults {dict(codes)}")
    assert kinds["raw"] and kinds["schema"] and kinds["uri"] and kinds["answer"] and kinds["field"]
    assert codes["ok"] > 0 and codes["invalid_output_schema"] > 0 and codes["output_invalid"] > 0
    assert defects(results) == []


def defects(results: list[JobResult]) -> list[str]:
    """Results that say a defect of vlmflow met the job (an `internal_error`, final or as the last attempt's
    failure), other than a record the producer refused."""
    return [
        f"{result.job_id}: {result.error.message[:300]}"
        for result in results
        if result.error is not None
        and "internal_error" in f"{result.error.code} {result.error.message}"
        and "refused" not in result.error.message
    ]


async def test_hostile_jobs_through_the_broker_each_end_as_exactly_one_result(settings: Settings) -> None:
    settings = fuzz_settings(settings)
    hostile = [
        record
        for record in HostileJobs(seed=7, max_bytes=MAX_MESSAGE_BYTES).records(BROKER_JOBS)
        if len(record.value) < MAX_MESSAGE_BYTES  # NOTE: the oversized record is the large run's (the broker's limit)
    ]
    async with running_worker(settings, HostileAnswers()), ResultReader(settings) as reader:
        await send_records(settings, hostile)
        log = await reader.wait_for({record.key.decode() for record in hostile}, timeout_s=300)
    assert log.duplicates() == {}
    assert set(log.by_job()) == {record.key.decode() for record in hostile}
    assert defects(log.records) == []


async def send_records(settings: Settings, records: list[HostileRecord]) -> None:
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all", max_request_size=2 * MAX_MESSAGE_BYTES)
    await producer.start()
    try:
        sent = [await producer.send(Topic.JOBS_IMAGE, record.value, key=record.key) for record in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
