"""One bad job, one lost Redis write: each case of issue 12 that reaches the worker, reproduced against the real
broker and Redis with a worker in the test's process. Every case must end as exactly one result for the job,
and the worker must go on serving (`running_worker` fails the test if it stopped)."""

from __future__ import annotations

import asyncio
import io
import random
from typing import Any

from aiokafka import AIOKafkaProducer
from PIL import Image
from redis.asyncio import Redis

from schemas.codec import decode, encode
from schemas.connections import aiokafka_options, redis_client
from schemas.jobs import ImageJob, JobResult
from schemas.settings import Settings
from schemas.topics import Topic, TopicSpec
from tests.support.worker_harness import ResultReader, from_the_start, running_worker, submit, worker_settings
from vlmflow.job_mix import JobMix, PlannedJob, data_uri, encoded_image
from vlmflow.kafka_admin import create_topics
from workers.budget import Lease, TokenBudget
from workers.budget_scripts import key_prefix
from workers.engines.base import EngineOutput, EngineRequest
from workers.engines.instant import InstantEngine
from workers.idempotency import IdempotencyRecords

REPLY_TOPIC = "reply.hardening"
RESULT_TIMEOUT_S = 60.0


def planned(job: ImageJob, kind: str) -> PlannedJob:
    return PlannedJob(job.job_id, job.task, None, kind, encode(job), job)


def inline_job(settings: Settings, job_id: str, **fields: Any) -> ImageJob:
    image = data_uri(encoded_image((64, 48), "PNG", random.Random(job_id)), "image/png")
    options: dict[str, Any] = {"task": "caption", "images": [image], **fields}
    return ImageJob(job_id=job_id, **options)


async def results_of(settings: Settings, jobs: list[PlannedJob]) -> dict[str, JobResult]:
    """Submits `jobs` and waits for a result of each; fails on a missing or a second result."""
    async with ResultReader(settings) as reader:
        await submit(settings, jobs)
        log = await reader.wait_for({job.job_id for job in jobs}, timeout_s=RESULT_TIMEOUT_S)
    assert log.duplicates() == {}
    by_job = log.by_job()
    assert {job.job_id for job in jobs} <= by_job.keys(), "every job has a result"
    return by_job


async def raw_values(settings: Settings, topic: str) -> list[tuple[bytes, bytes]]:
    """(key, value) of every record of `topic` up to its end."""
    async with from_the_start(settings, topic) as (consumer, tps):
        ends = await consumer.end_offsets(tps)
        records: list[tuple[bytes, bytes]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend((record.key, record.value) for record in batch)
        return records


def chained_refs(hops: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    defs[f"d{hops}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "required": ["x"], "$defs": defs}


async def test_a_schema_that_overflows_the_validator_gets_an_error_and_the_worker_goes_on(settings: Settings) -> None:
    """Issue 12 item 1: 500 chained `$ref`s pass the size and depth checks; the instant engine answers, and the
    second validation raised `RecursionError`, which stopped the worker (and the redelivery the next one)."""
    settings = worker_settings(settings, metrics_port=-1)
    poison = planned(inline_job(settings, "poison-refs", task="extract", output_schema=chained_refs(500)), "poison")
    good = planned(inline_job(settings, "after-poison"), "good")
    async with running_worker(settings, InstantEngine()):
        results = await results_of(settings, [poison, good])
    error = results[poison.job_id].error
    assert error is not None and error.code == "invalid_output_schema" and "$refs followed" in error.message
    assert results[good.job_id].status == "ok"


async def test_reply_to_is_limited_to_the_allowed_prefixes(settings: Settings) -> None:
    """Issue 12 item 3: a job could make the worker write to any topic that exists (`__consumer_offsets`, a Faust
    changelog, another system's topic); only topics under `worker.reply_to_prefixes` are written now."""
    settings = worker_settings(settings, metrics_port=-1)
    create_topics(settings, [TopicSpec(REPLY_TOPIC, "job_id", JobResult, 1), TopicSpec("other.system", "id", None, 1)])
    hostile = [
        planned(inline_job(settings, f"reply-{n}", reply_to=topic), topic)
        for n, topic in enumerate(["__consumer_offsets", "vlmflow-flywheel-golden-changelog", "other.system"])
    ]
    allowed = planned(inline_job(settings, "reply-allowed", reply_to=REPLY_TOPIC), "allowed")
    async with running_worker(settings, InstantEngine()):
        results = await results_of(settings, [*hostile, allowed])
    for job in hostile:
        error = results[job.job_id].error
        assert error is not None and error.code == "invalid_message" and "allowed prefix" in error.message, job.kind
    assert results[allowed.job_id].status == "ok"
    assert [key for key, _ in await raw_values(settings, REPLY_TOPIC)] == [b"reply-allowed"]
    assert await raw_values(settings, "other.system") == []


async def test_the_log_event_of_a_1_mb_job_references_its_image(settings: Settings) -> None:
    """Issue 12 item 3: the event carried the whole job, so a job just under 1 MB (an inline image) gave an event
    over Kafka's default message size; it now names the image by digest and stays small."""
    settings = worker_settings(settings, metrics_port=-1, max_inline_image_bytes=2 * 2**20)
    picture = Image.frombytes("RGB", (720, 480), random.Random(3).randbytes(720 * 480 * 3))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    job = ImageJob(job_id="big-inline", task="caption", images=[data_uri(buffer.getvalue(), "image/png")])
    assert len(encode(job)) > 1_000_000
    async with running_worker(settings, InstantEngine()):
        results = await results_of(settings, [planned(job, "big")])
    assert results[job.job_id].status == "ok"
    events = [value for key, value in await raw_values(settings, Topic.LOGS_RAW) if key == b"big-inline"]
    assert len(events) == 1 and len(events[0]) < 16_384
    assert decode(Topic.LOGS_RAW, events[0]).job.images[0].startswith("data:image/png;sha256=")


async def test_a_record_the_producer_refuses_becomes_that_jobs_error_result(settings: Settings) -> None:
    """Issue 12 item 3: a refusal of one job's record (here the producer's own size limit, as a broker's
    `message.max.bytes` refuses) stopped the worker in a loop; the job now gets an error result instead."""
    settings = worker_settings(settings, metrics_port=-1)
    create_topics(settings, [TopicSpec(REPLY_TOPIC, "job_id", JobResult, 1)])
    limit = 256 * 1024
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all", max_request_size=limit)
    huge = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2 * limit}}, "required": ["text"]}
    to_reply = planned(
        inline_job(settings, "huge-reply", task="extract", output_schema=huge, reply_to=REPLY_TOPIC), "r"
    )
    to_result = planned(inline_job(settings, "huge-result", task="extract", output_schema=huge), "result")
    good = planned(inline_job(settings, "after-refusals"), "good")
    async with running_worker(settings, InstantEngine(), producer=producer):
        results = await results_of(settings, [to_reply, to_result, good])
    reply_error, result_error = results[to_reply.job_id].error, results[to_result.job_id].error
    assert reply_error is not None and reply_error.code == "invalid_message" and "refused" in reply_error.message
    assert result_error is not None and result_error.code == "internal_error" and "refused" in result_error.message
    assert results[good.job_id].status == "ok"


class ClaimLosingEngine(InstantEngine):
    """The instant engine, but Redis loses the job's claim while it infers (a flush, a restart that dropped the
    last second, a failover to a replica that lagged)."""

    def __init__(self, redis: Redis, job_ids: set[str]):
        self.redis, self.job_ids = redis, job_ids

    async def generate(self, request: EngineRequest) -> EngineOutput:
        await self.redis.delete(*(IdempotencyRecords.key(job_id) for job_id in self.job_ids))
        return await super().generate(request)


async def test_a_claim_redis_loses_while_the_job_is_served_still_gets_its_result(settings: Settings) -> None:
    """Issue 12 item 5: `publishing` answered "lost" for a record Redis no longer had, and the job was committed
    without a result. The owner now writes the record again and publishes."""
    settings = worker_settings(settings, metrics_port=-1)
    job = JobMix(settings).good()
    redis = redis_client(settings)
    try:
        async with running_worker(settings, ClaimLosingEngine(redis, {job.job_id})):
            results = await results_of(settings, [job])
        state = await redis.hget(IdempotencyRecords.key(job.job_id), "state")
    finally:
        await redis.aclose()
    assert results[job.job_id].status == "ok"
    assert state == b"done"


class LeaseLosingEngine(InstantEngine):
    """The instant engine, but on its first call Redis loses the job's lease and lends the whole pool to a hog (one
    transaction: the job's grant undone as a replica that lagged would, the hog's lease granted); the call then
    runs until cancelled. The hog leaves once the call was cancelled, so the job's next attempt is served."""

    def __init__(self, redis: Redis, settings: Settings):
        self.redis, self.settings = redis, settings
        self.cancelled = asyncio.Event()
        self.calls = 0

    async def generate(self, request: EngineRequest) -> EngineOutput:
        self.calls += 1
        if self.calls > 1:
            return await super().generate(request)
        pool, capacity = self.settings.budget.pool, self.settings.budget.capacity
        assert pool is not None and capacity is not None
        prefix = key_prefix(pool)
        (member,) = await self.redis.zrange(f"{prefix}leases", 0, -1)
        seconds, _ = await self.redis.time()
        hog = Lease("hog", pool, "hog", capacity, (seconds + 300) * 1000, "")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{prefix}leases", member)
            pipe.zadd(f"{prefix}leases", {f"hog|{capacity}|hog": hog.expires_at_ms})
            pipe.hincrby(f"{prefix}meta", "used", capacity - int(member.split(b"|")[1]))
            await pipe.execute()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            await TokenBudget(self.redis, pool, capacity, self.settings.budget.lease_ttl_s).release(hog)
            raise
        raise AssertionError("the inference went on without a lease")


async def test_a_job_whose_lease_is_lost_stops_inferring_and_is_retried(settings: Settings) -> None:
    """Issue 12 items 6 and 7: a job whose lease Redis lost, and whose tokens were lent since, must not go on using
    the GPU: its inference is cancelled, the attempt fails with `lease_lost` (retried), the retry is served."""
    settings = worker_settings(settings, metrics_port=-1)
    job = planned(inline_job(settings, "lease-lost"), "lease")
    redis = redis_client(settings)
    engine = LeaseLosingEngine(redis, settings)
    try:
        async with running_worker(settings, engine):
            results = await results_of(settings, [job])
    finally:
        await redis.aclose()
    assert engine.cancelled.is_set()
    result = results[job.job_id]
    assert result.status == "ok" and result.attempt == 1
