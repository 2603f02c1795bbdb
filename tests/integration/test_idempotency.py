"""Redelivered jobs against real Redis and Kafka: each state a dead or live worker can leave a job's idempotency
record in, and what a worker then does, so that a consumer of vlm.jobs.result sees one result per job."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from schemas.codec import encode
from schemas.connections import aiokafka_options, redis_client
from schemas.jobs import JobResult
from schemas.settings import Settings
from schemas.topics import Topic
from tests.support.worker_harness import ResultReader, submit, worker_settings
from vlmflow.job_mix import JobMix, PlannedJob
from workers.engines.instant import InstantEngine
from workers.idempotency import IdempotencyRecords
from workers.metrics import JOBS_DUPLICATE
from workers.worker import Worker


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker in this process (the instant engine, no metrics server), stopped after the test."""
    running = Worker(worker_settings(settings, metrics_port=-1), InstantEngine())
    ready = asyncio.Event()
    task = asyncio.create_task(running.run(ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    yield running
    running.stop()
    await asyncio.wait_for(task, 30)


def duplicates(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value(JOBS_DUPLICATE) or 0.0


async def leave_record(settings: Settings, job_id: str, **fields: str | int) -> None:
    """Write a job's idempotency record as a worker would have left it."""
    redis = redis_client(settings)
    try:
        await redis.hset(IdempotencyRecords.key(job_id), mapping={name: str(value) for name, value in fields.items()})
    finally:
        await redis.aclose()


async def record_state(settings: Settings, job_id: str) -> str | None:
    redis = redis_client(settings)
    try:
        state = await redis.hget(IdempotencyRecords.key(job_id), "state")
    finally:
        await redis.aclose()
    return state.decode() if isinstance(state, bytes) else state


async def publish_result(settings: Settings, job: PlannedJob) -> int:
    """A result for `job` on the result topic, as a worker killed after publishing left it; returns its partition."""
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka))
    await producer.start()
    try:
        result = JobResult(job_id=job.job_id, status="ok", task=job.task, output={"caption": "earlier"})
        metadata = await producer.send_and_wait(Topic.JOBS_RESULT, encode(result), key=job.job_id.encode())
    finally:
        await producer.stop()
    return metadata.partition


async def test_in_doubt_job_whose_result_landed_is_not_answered_again(settings: Settings, worker: Worker) -> None:
    job = JobMix(settings).good()
    partition = await publish_result(settings, job)
    await leave_record(settings, job.job_id, state="publishing", owner="dead", until=0, partition=partition, offset=0)
    async with ResultReader(settings) as reader:
        await submit(settings, [job])
        async with asyncio.timeout(20):
            while duplicates(worker) < 1:
                await asyncio.sleep(0.05)
        log = await reader.wait_for({job.job_id}, timeout_s=10, settle_s=1.0)
    assert [result.output for result in log.records] == [{"caption": "earlier"}]
    assert await record_state(settings, job.job_id) == "done"


async def test_in_doubt_job_whose_result_never_landed_is_served(settings: Settings, worker: Worker) -> None:
    job = JobMix(settings).good()
    await leave_record(settings, job.job_id, state="publishing", owner="dead", until=0, partition=0, offset=0)
    async with ResultReader(settings) as reader:
        await submit(settings, [job])
        log = await reader.wait_for({job.job_id}, timeout_s=20, settle_s=1.0)
    assert [(result.job_id, result.status) for result in log.records] == [(job.job_id, "ok")]
    assert await record_state(settings, job.job_id) == "done"


async def test_job_answered_before_is_skipped(settings: Settings, worker: Worker) -> None:
    answered, fresh = JobMix(settings).good(), JobMix(settings, seed=1).good()
    await leave_record(settings, answered.job_id, state="done", owner="earlier")
    async with ResultReader(settings) as reader:
        await submit(settings, [answered, fresh])
        log = await reader.wait_for({fresh.job_id}, timeout_s=20, settle_s=1.0)
    assert [result.job_id for result in log.records] == [fresh.job_id]
    assert duplicates(worker) == 1


async def test_job_claimed_by_a_live_worker_is_waited_for_then_taken_over(settings: Settings, worker: Worker) -> None:
    job = JobMix(settings).good()
    redis = redis_client(settings)
    try:
        server_s, micros = await redis.time()
    finally:
        await redis.aclose()
    until_ms = server_s * 1000 + micros // 1000 + 2_000
    await leave_record(settings, job.job_id, state="serving", owner="alive-for-2s", until=until_ms)
    async with ResultReader(settings) as reader:
        started = time.monotonic()
        await submit(settings, [job])
        log = await reader.wait_for({job.job_id}, timeout_s=20, settle_s=1.0)
    assert time.monotonic() - started >= 1.5, "the worker waited for the other claim to run out"
    assert [(result.job_id, result.status) for result in log.records] == [(job.job_id, "ok")]


async def never_read_back(job_id: str, partition: int, from_offset: int | None) -> bool:
    raise AssertionError("no job here is in doubt")


async def test_a_claim_is_renewed_while_held_and_released_on_exit(settings: Settings) -> None:
    redis = redis_client(settings)
    records = IdempotencyRecords(redis, claim_ttl_s=0.6, record_ttl_s=60)
    try:
        async with records.hold("held-job", "me", read_back=never_read_back) as claim:
            assert not claim.answered
            await asyncio.sleep(1.5)
            assert (await records.claim("held-job", "other")).state == "busy", "renewals keep it past its TTL"
        assert await record_state(settings, "held-job") is None, "a claim that published nothing is released"
    finally:
        await redis.aclose()


async def test_leaving_a_claim_during_a_renewal_never_hangs(settings: Settings) -> None:
    """redis-py lets a command in flight finish and may drop a cancellation that came meanwhile; a renewal loop
    that relied on being cancelled then went on forever, and the job leaving its claim waited for it. A 3 ms claim
    is renewed every millisecond, so leaving it hundreds of times meets renewals in flight."""
    redis = redis_client(settings)
    records = IdempotencyRecords(redis, claim_ttl_s=0.003, record_ttl_s=60)
    rng = random.Random(5)
    try:
        for n in range(1_000):
            async with asyncio.timeout(5):
                async with records.hold(f"renewed-{n}", "me", read_back=never_read_back):
                    await asyncio.sleep(rng.random() * 0.004)
    finally:
        await redis.aclose()
