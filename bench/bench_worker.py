"""Benchmark: jobs per second through the whole worker loop (decode, claim, load the image from S3, count its
tokens, lease, infer, publish result and log event, release, commit) with the instant engine, next to a bare
aiokafka consume -> produce -> commit loop over the same broker in the same run; then with vLLM on CPU and the
tiny random Qwen2-VL when the engine environment exists.

    python bench/bench_worker.py [--jobs 2000] [--vllm-jobs 200] [--max-in-flight 16]

Starts its own local stack (broker, S3 store, Valkey) on free ports and stops it at the end. Throughput is
taken from the broker timestamps of the output records (first to last), so start-up and group joins do not
count; the jobs are all on the topic before the consumer starts.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.connections import aiokafka_options, redis_client
from schemas.jobs import ImageJob
from schemas.settings import Settings, load_settings
from schemas.topics import Topic
from tests.conftest import free_port_block, start_broker
from tests.support.worker_harness import from_the_start
from vlmflow.job_mix import encoded_image
from vlmflow.kafka_admin import create_topics
from vlmflow.objectstore import put_image
from vlmflow.stack import S3_PORT_BLOCK, LocalStack
from vlmflow.worker_process import WorkerProcess, engine_python
from workers.budget import TokenBudget

BARE_IN, BARE_OUT = "bench.bare.in", "bench.bare.out"
PARTITIONS = 6
"""As vlm.jobs.image and vlm.jobs.result, so both loops see the same layout."""
WORKER_READY_TIMEOUT_S = 900.0


@contextmanager
def local_stack(state_dir: Path) -> Iterator[Settings]:
    settings = load_settings(
        state_dir=state_dir,
        kafka={"bootstrap_servers": f"127.0.0.1:{free_port_block()}", "session_timeout_ms": 6000},
        s3={"endpoint": f"127.0.0.1:{free_port_block(S3_PORT_BLOCK)}"},
        redis={"url": f"redis://127.0.0.1:{free_port_block()}/0"},
        budget={"pool": "bench", "capacity": 1_000_000, "lease_ttl_s": 10.0},
    )
    stack = LocalStack(settings)
    stack.up()
    try:
        create_topics(settings)
        yield settings
    finally:
        stack.down()


def job_values(settings: Settings, count: int, max_output_tokens: int) -> list[tuple[bytes, bytes]]:
    """`count` caption jobs over one 320x240 PNG in the S3 store: (key, value) pairs."""
    import random

    uri = put_image(settings, encoded_image((320, 240), "PNG", random.Random(0)), ".png")
    jobs = [
        ImageJob(job_id=uuid.uuid4().hex, task="caption", images=[uri], max_output_tokens=max_output_tokens)
        for _ in range(count)
    ]
    return [(job.job_id.encode(), job.model_dump_json().encode()) for job in jobs]


async def produce_all(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def output_rate(settings: Settings, topic: str, expected: int, timeout_s: float) -> float:
    """Records per second on `topic` between the first and the last of `expected` records (broker timestamps)."""
    async with from_the_start(settings, topic) as (consumer, _):
        stamps: list[int] = []
        ends_at = time.monotonic() + timeout_s
        while len(stamps) < expected:
            if time.monotonic() > ends_at:
                raise TimeoutError(f"{topic}: {len(stamps)} of {expected} records within {timeout_s:.0f} s")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                stamps.extend(record.timestamp for record in records)
    return (len(stamps) - 1) / max(1e-3, (max(stamps) - min(stamps)) / 1000)


async def bare_loop(settings: Settings, count: int) -> None:
    """The baseline: a consumer group member that produces one record per record consumed, waits for the acks of
    each batch and commits it. No decoding, no Redis, no S3, no engine."""
    options = aiokafka_options(settings.kafka)
    consumer = AIOKafkaConsumer(
        BARE_IN, **options, group_id=f"bench-{uuid.uuid4().hex[:6]}", enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=settings.kafka.session_timeout_ms,
    )  # fmt: skip
    producer = AIOKafkaProducer(**options, acks="all", linger_ms=2)
    await consumer.start()
    await producer.start()
    try:
        done = 0
        while done < count:
            batches = await consumer.getmany(timeout_ms=200, max_records=settings.worker.max_in_flight)
            sent = [
                await producer.send(BARE_OUT, record.value, key=record.key)
                for records in batches.values()
                for record in records
            ]
            await asyncio.gather(*sent)
            if sent:
                await consumer.commit()
            done += len(sent)
    finally:
        await producer.stop()
        await consumer.stop()


def create_bare_topics(settings: Settings) -> None:
    from kafka.admin import NewTopic

    from vlmflow.kafka_admin import admin_client

    with admin_client(settings) as admin:
        admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in (BARE_IN, BARE_OUT)])


def bench_bare(settings: Settings, count: int) -> float:
    create_bare_topics(settings)
    asyncio.run(produce_all(settings, BARE_IN, job_values(settings, count, 512)))

    async def run() -> float:
        await bare_loop(settings, count)
        return await output_rate(settings, BARE_OUT, count, timeout_s=60)

    return asyncio.run(run())


async def _wait_out_budget_recovery(settings: Settings) -> float:
    """Seconds waited until the budget grants again. A pool on a Redis that started less than a lease TTL ago
    holds grants back for the rest of that TTL (workers.budget); that start-up pause is not what is measured."""
    redis = redis_client(settings)
    try:
        budget = TokenBudget(redis, settings.budget.pool, settings.budget.capacity, settings.budget.lease_ttl_s)
        state = await budget.state()
        wait_s = max(0.0, (state.recovering_until_ms - state.server_time_ms) / 1000)
        await asyncio.sleep(wait_s)
    finally:
        await redis.aclose()
    return wait_s


def bench_worker(
    settings: Settings, count: int, log_path: Path, *, engine: str, python: Path | None, max_output_tokens: int
) -> float:
    """Jobs per second of one worker process over `count` jobs already on the topic."""
    asyncio.run(produce_all(settings, Topic.JOBS_IMAGE, job_values(settings, count, max_output_tokens)))
    asyncio.run(_wait_out_budget_recovery(settings))
    worker = WorkerProcess(settings, log_path, engine=engine, python=python).start()  # type: ignore[arg-type]
    try:
        worker.wait_ready(WORKER_READY_TIMEOUT_S)
        return asyncio.run(output_rate(settings, Topic.JOBS_RESULT, count, timeout_s=900))
    finally:
        worker.stop()


@contextmanager
def own_broker(settings: Settings, state_dir: Path) -> Iterator[Settings]:
    """A broker of its own for one measurement (the registry's topics, nothing from earlier runs)."""
    broker, with_broker = start_broker(state_dir, settings)
    try:
        yield with_broker
    finally:
        broker.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs for the bare loop and the instant engine")
    parser.add_argument("--vllm-jobs", type=int, default=200, help="jobs for the tiny vLLM model (0: skip)")
    parser.add_argument("--max-in-flight", type=int, default=16, help="worker.max_in_flight (and the bare batch)")
    parser.add_argument("--vllm-output-tokens", type=int, default=32, help="max_output_tokens of the vLLM jobs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state_dir, local_stack(Path(state_dir)) as settings:
        settings = settings.model_copy(
            update={
                "worker": settings.worker.model_copy(update={"max_in_flight": args.max_in_flight, "metrics_port": -1})
            }
        )
        print(
            f"jobs: {args.jobs}; worker.max_in_flight {args.max_in_flight}; one 320x240 PNG from S3 per job", flush=True
        )
        with own_broker(settings, Path(state_dir) / "bare") as bare_settings:
            bare = bench_bare(bare_settings, args.jobs)
        print(f"bare aiokafka consume->produce->commit  {bare:8.1f} jobs/s", flush=True)
        with own_broker(settings, Path(state_dir) / "instant") as instant_settings:
            instant = bench_worker(
                instant_settings, args.jobs, Path(state_dir) / "instant.log", engine="instant", python=None,
                max_output_tokens=512,
            )  # fmt: skip
        print(f"worker, instant engine                  {instant:8.1f} jobs/s", flush=True)
        print(f"ratio worker / bare                     {instant / bare:8.3f}", flush=True)
        python = engine_python(settings)
        if args.vllm_jobs <= 0 or python is None:
            print("worker, vLLM tiny model: skipped (no .venv-engine; scripts/engine-env.sh builds it)")
            return
        model = Path(state_dir) / "tiny-qwen2-vl"
        subprocess.run([str(python), "-m", "vlmflow.cli", "model", "tiny", str(model)], check=True, capture_output=True)
        with_model = settings.model_copy(update={"model": settings.model.model_copy(update={"path": model})})
        with own_broker(with_model, Path(state_dir) / "vllm") as vllm_settings:
            vllm = bench_worker(
                vllm_settings, args.vllm_jobs, Path(state_dir) / "vllm.log", engine="vllm", python=python,
                max_output_tokens=args.vllm_output_tokens,
            )  # fmt: skip
        print(
            f"worker, vLLM CPU tiny Qwen2-VL          {vllm:8.1f} jobs/s "
            f"({args.vllm_jobs} jobs of <= {args.vllm_output_tokens} output tokens)"
        )


if __name__ == "__main__":
    main()
