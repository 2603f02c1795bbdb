"""Benchmark: does the worker keep one H100 busy, and does admission keep it out of preemption under overload?
Real jobs (Kafka, Redis leases, images of 0.3-4 MP in S3, decoded and resized by the worker) go through a worker
process into the simulated H100 (`engine.kind=sim`, workers/engines/sim.py), and are compared with the same
simulated GPU fed the same requests directly, all at once, as vLLM's offline `LLM.generate` would be.

    python bench/bench_gpu_sim.py [--jobs 600] [--overload-s 60] [--time-scale 6] [--images 40]

Prints progress on stderr and ONE JSON line on stdout:
- `saturation`: jobs/s through the worker / jobs/s of the offline reference, both in simulated time over the
  engine's busy span (first request in, last answer out); the target is >= 0.95.
- `overload`: arrivals at 2x the offline rate for `--overload-s` simulated seconds, then drained: p50/p99 time
  from a job's production to its result (simulated seconds) and the simulated engine's preemptions, with
  admission on (the pool's capacity from the engine's KV cache) and off (a budget of 10^12 tokens).
- `cpu_ms_per_job`: the worker process's CPU time per job in the saturation run, less the CPU the simulation
  itself used; `cores_per_gpu` = that x the offline rate: the cores one H100's worker needs at full speed.
- `worst_case`: the budget where it binds, in simulated time only (no worker): 400 jobs of 4 images of 1,280
  tokens with 512-token answers given to the simulated H100 at once (admission off) and behind the pool's
  capacity (admission on, as `sim_model.run_offline` models it): preemptions and jobs/s of each.

The simulated GPU runs `--time-scale` times slower than an H100 (wall seconds per simulated second) so that this
machine's cores, not the benchmark, stay out of the way; every figure is in simulated time. Starts its own local
stack (broker, S3 store, Valkey) on free ports, a fresh broker per run, and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_worker import local_stack, own_broker
from schemas.base import utc_now
from schemas.codec import decode
from schemas.connections import aiokafka_options, redis_client
from schemas.jobs import ImageJob, JobResult
from schemas.settings import Settings
from schemas.tasks import MODEL_BOX_FIELD
from schemas.topics import Topic
from vlmflow.objectstore import put_image
from vlmflow.worker_process import WorkerProcess
from workers.capacity import pool_capacity
from workers.engines.sim import sim_hardware, sim_request
from workers.engines.sim_model import SimHardware, SimRequest, run_offline
from workers.limits import GPU_MAX_NUM_BATCHED_TOKENS, EngineLimits, derive_limits
from workers.prompts import task_prompt
from workers.tokens import resized_size

WORKER_READY_TIMEOUT_S = 120.0
ADMISSION_OFF_CAPACITY = 10**12
WORST_CASE = {"jobs": 400, "images": 4, "image_tokens": 1_280, "output_tokens": 512}
"""A budget that never binds: admission off."""
MAX_OUTPUT_TOKENS = 256
PROGRESS_INTERVAL_S = 15.0
STALL_S = 300.0
"""No new result for this long: the run is broken (a job lost in the worker), not slow."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class StoredImage:
    uri: str
    size: tuple[int, int]


def photo_like(size: tuple[int, int], fmt: str, rng: random.Random) -> bytes:
    """Shapes over a gradient under sensor-like noise, so that JPEG and PNG files have photos' sizes."""
    width, height = size
    base = Image.linear_gradient("L").resize(size).convert("RGB")
    tint = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    image = Image.blend(base, tint, 0.6)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x1, y1 = rng.randrange(width), rng.randrange(height)
        x2, y2 = min(width, x1 + rng.randint(8, width // 2)), min(height, y1 + rng.randint(8, height // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x1, y1, x2, y2), fill=fill)
    noise = Image.effect_noise(size, 32).convert("RGB")
    image = Image.blend(image, noise, 0.12)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def store_images(settings: Settings, count: int, rng: random.Random) -> list[StoredImage]:
    """`count` images of 0.3-4 megapixels, aspect ratios 1:2 to 2:1, two JPEGs for each PNG, in the S3 store."""
    images = []
    for index in range(count):
        pixels, aspect = rng.uniform(0.3e6, 4.0e6), rng.uniform(0.5, 2.0)
        size = (round((pixels * aspect) ** 0.5), round((pixels / aspect) ** 0.5))
        fmt = "PNG" if index % 3 == 2 else "JPEG"
        images.append(StoredImage(put_image(settings, photo_like(size, fmt, rng), f".{fmt.lower()}"), size))
    return images


def make_jobs(images: list[StoredImage], count: int, rng: random.Random) -> list[ImageJob]:
    """Caption and detect jobs of one image (four in five) or two."""
    jobs = []
    for _ in range(count):
        chosen = rng.sample(images, 1 if rng.random() < 0.8 else 2)
        jobs.append(
            ImageJob(
                job_id=uuid.uuid4().hex,
                task=rng.choice(("caption", "detect")),
                images=[image.uri for image in chosen],
                max_output_tokens=MAX_OUTPUT_TOKENS,
            )
        )
    return jobs


def simulated(jobs: list[ImageJob], sizes: dict[str, tuple[int, int]], settings: Settings) -> list[SimRequest]:
    """The requests the worker's engine will see: the task prompt, the images at their final size."""
    model, box_field = settings.model, MODEL_BOX_FIELD[settings.model.family]
    requests = []
    for job in jobs:
        final = [
            resized_size(*sizes[uri], family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels)
            for uri in job.images
        ]
        requests.append(sim_request(job.job_id, task_prompt(job, box_field), final, job.max_output_tokens, settings))
    return requests


def sim_settings(base: Settings, time_scale: float) -> Settings:
    return base.model_copy(
        update={
            "engine": base.engine.model_copy(
                update={
                    "kind": "sim",
                    "device": "cuda",  # NOTE: the sim is an H100: the worker derives its limits for CUDA
                    "sim": base.engine.sim.model_copy(update={"time_scale": time_scale}),
                }
            )
        }
    )


def run_settings(base: Settings, stats: Path, capacity: int | None) -> Settings:
    """A worker of its own: pool, consumer group, sim counters file; the pool's capacity from the engine (None), as
    in production, or given."""
    unique = uuid.uuid4().hex[:8]
    return base.model_copy(
        update={
            "engine": base.engine.model_copy(update={"sim": base.engine.sim.model_copy(update={"stats_path": stats})}),
            "budget": base.budget.model_copy(update={"pool": f"bench-gpu-{unique}", "capacity": capacity}),
            "worker": base.worker.model_copy(update={"group_id": f"bench-gpu-{unique}", "metrics_port": -1}),
        }
    )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_out_budget_recovery(settings: Settings) -> None:
    """A pool on a Redis younger than one lease TTL holds grants back (workers.budget): not what is measured."""
    redis = redis_client(settings)
    try:
        uptime_s = (await redis.info("server"))["uptime_in_seconds"]
    finally:
        await redis.aclose()
    await asyncio.sleep(max(0.0, settings.budget.lease_ttl_s + 1 - uptime_s))


async def collect(
    settings: Settings, expected: set[str], worker: WorkerProcess, timeout_s: float
) -> dict[str, JobResult]:
    """The results of `expected` job ids, read from the result topic's beginning while the worker lives."""
    consumer = AIOKafkaConsumer(**aiokafka_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    results: dict[str, JobResult] = {}
    try:
        await consumer.topics()
        tps = [TopicPartition(Topic.JOBS_RESULT, p) for p in sorted(consumer.partitions_for_topic(Topic.JOBS_RESULT))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends_at = time.monotonic() + timeout_s
        next_report = progressed_at = time.monotonic()
        while len(results) < len(expected):
            now = time.monotonic()
            if now > next_report:
                log(f"  {len(results)} of {len(expected)} results")
                next_report = now + PROGRESS_INTERVAL_S
            if now > ends_at or now > progressed_at + STALL_S:
                raise TimeoutError(
                    f"{len(results)} of {len(expected)} results, none for {now - progressed_at:.0f} s:\n"
                    f"{worker.log_tail()}"
                )
            if not worker.alive():
                raise RuntimeError(f"the worker died after {len(results)} results:\n{worker.log_tail()}")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    result: JobResult = decode(Topic.JOBS_RESULT, record.value)
                    if result.job_id in expected and result.job_id not in results:
                        results[result.job_id] = result
                        progressed_at = time.monotonic()
    finally:
        await consumer.stop()
    return results


async def produce(settings: Settings, jobs: list[ImageJob], interval_s: float, produced: dict[str, ImageJob]) -> None:
    """Each job stamped as it is produced (into `produced`), `interval_s` apart (0: all at once)."""
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all", linger_ms=5)
    await producer.start()
    try:
        started, sent = time.monotonic(), []
        for index, job in enumerate(jobs):
            if interval_s:
                await asyncio.sleep(max(0.0, started + index * interval_s - time.monotonic()))
            stamped = job.model_copy(update={"submitted_at": utc_now()})
            produced[job.job_id] = stamped
            value = stamped.model_dump_json().encode()
            sent.append(await producer.send(Topic.JOBS_IMAGE, value, key=job.job_id.encode()))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


@dataclass(frozen=True)
class Run:
    produced: dict[str, ImageJob]
    results: dict[str, JobResult]
    stats: dict[str, float]
    cpu_s: float


def serve(settings: Settings, state_dir: Path, jobs: list[ImageJob], interval_s: float, name: str) -> Run:
    """One worker process on a fresh broker serving `jobs` produced `interval_s` apart; its CPU, results and the
    simulated engine's counters."""
    with own_broker(settings, state_dir / name) as with_broker:
        asyncio.run(wait_out_budget_recovery(with_broker))
        worker = WorkerProcess(with_broker, state_dir / f"{name}.log", engine="sim").start()
        try:
            worker.wait_ready(WORKER_READY_TIMEOUT_S)
            assert worker.process is not None
            cpu_started = process_cpu_s(worker.process.pid)

            async def both() -> dict[str, JobResult]:
                expected = {job.job_id for job in jobs}
                collecting = asyncio.create_task(collect(with_broker, expected, worker, timeout_s=3_600))
                await produce(with_broker, jobs, interval_s, produced)
                return await collecting

            produced: dict[str, ImageJob] = {}

            results = asyncio.run(both())
            cpu_s = process_cpu_s(worker.process.pid) - cpu_started
        finally:
            status = worker.stop()
        if status != 0:
            raise RuntimeError(f"{name}: worker exited with {status}:\n{worker.log_tail()}")
    stats = json.loads(Path(settings.engine.sim.stats_path or "").read_text())
    errors = [result.error.code for result in results.values() if result.error is not None]
    if errors:
        log(f"{name}: {len(errors)} error results: {sorted(set(errors))}")
    return Run(produced, results, stats, cpu_s)


def latencies_s(run: Run, time_scale: float) -> list[float]:
    """Production to result of each job, in simulated seconds."""
    return sorted(
        (result.finished_at - run.produced[job_id].submitted_at).total_seconds() / time_scale
        for job_id, result in run.results.items()
    )


def worst_case(hardware: SimHardware, limits: EngineLimits, capacity: int) -> dict[str, object]:
    """Image-heavy jobs with long answers, at once and behind the budget, in simulated time only."""
    jobs = [
        SimRequest(f"w{index}", (WORST_CASE["image_tokens"],) * WORST_CASE["images"], 80, WORST_CASE["output_tokens"])
        for index in range(WORST_CASE["jobs"])
    ]
    batched = limits.max_num_batched_tokens or GPU_MAX_NUM_BATCHED_TOKENS
    figures: dict[str, object] = dict(WORST_CASE)
    for mode, budget in (("admission_off", None), ("admission_on", capacity)):
        run = run_offline(
            jobs, hardware, max_num_seqs=limits.max_num_seqs, max_num_batched_tokens=batched,
            max_image_tokens=limits.image_tokens, capacity=budget,
        )  # fmt: skip
        figures[mode] = {"preemptions": run.preemptions, "jobs_per_s": round(len(run.finishes) / run.seconds, 2)}
    return figures


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    # NOTE: SIGTERM unwinds like Ctrl-C, so the worker processes and the local stack are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=600, help="jobs of the saturation run")
    parser.add_argument("--overload-s", type=float, default=60.0, help="simulated seconds of arrivals at 2x capacity")
    parser.add_argument("--time-scale", type=float, default=6.0, help="wall seconds per simulated second")
    parser.add_argument("--images", type=int, default=40, help="distinct images in the store")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp, local_stack(Path(tmp)) as stack:
        state_dir = Path(tmp)
        base = sim_settings(stack, args.time_scale)
        hardware = sim_hardware(base)
        limits = derive_limits(base, hardware.kv_tokens)
        pool = pool_capacity(
            hardware.kv_tokens // hardware.block_size * hardware.block_size, block_size=hardware.block_size,
            max_num_seqs=limits.max_num_seqs, text_tokens_per_seq=limits.text_reserve,
        )  # fmt: skip
        log(f"storing {args.images} images of 0.3-4 MP")
        images = store_images(base, args.images, rng)
        sizes = {image.uri: image.size for image in images}

        saturation_jobs = make_jobs(images, args.jobs, rng)
        batched = limits.max_num_batched_tokens or GPU_MAX_NUM_BATCHED_TOKENS
        offline = run_offline(
            simulated(saturation_jobs, sizes, base), hardware, max_num_seqs=limits.max_num_seqs,
            max_num_batched_tokens=batched, max_image_tokens=limits.image_tokens,
        )  # fmt: skip
        offline_rate = len(offline.finishes) / offline.seconds
        log(f"offline reference: {offline_rate:.2f} jobs/s over {offline.seconds:.1f} simulated s")

        stats_path = state_dir / "saturation-stats.json"
        saturated = serve(run_settings(base, stats_path, None), state_dir, saturation_jobs, 0.0, "saturation")
        span_s = saturated.stats["last_finish_s"] - saturated.stats["first_arrival_s"]
        worker_rate = len(saturated.results) / span_s
        cpu_ms = 1000 * (saturated.cpu_s - saturated.stats["model_cpu_s"]) / len(saturated.results)
        log(f"through the worker: {worker_rate:.2f} jobs/s ({worker_rate / offline_rate:.3f}), {cpu_ms:.1f} ms CPU/job")

        arrivals = round(2 * offline_rate * args.overload_s)
        interval_s = args.overload_s * args.time_scale / arrivals
        overload: dict[str, object] = {"arrivals_per_s": round(2 * offline_rate, 2), "seconds": args.overload_s,
                                       "jobs": arrivals}  # fmt: skip
        for mode, capacity in (("admission_on", None), ("admission_off", ADMISSION_OFF_CAPACITY)):
            jobs = make_jobs(images, arrivals, rng)
            log(f"overload, {mode}: {arrivals} jobs over {args.overload_s:.0f} simulated s")
            run = serve(run_settings(base, state_dir / f"{mode}.json", capacity), state_dir, jobs, interval_s, mode)
            waits = latencies_s(run, args.time_scale)
            overload[mode] = {
                "p50_s": round(percentile(waits, 50), 2),
                "p99_s": round(percentile(waits, 99), 2),
                "preemptions": int(run.stats["preemptions"]),
                "errors": sum(result.status == "error" for result in run.results.values()),
            }
            log(f"  {overload[mode]}")

    worst = worst_case(hardware, limits, pool.capacity)
    log(f"worst case: {worst}")
    print(
        json.dumps(
            {
                "saturation": round(worker_rate / offline_rate, 3),
                "jobs_per_s": {"worker": round(worker_rate, 2), "offline": round(offline_rate, 2)},
                "overload": overload,
                "cpu_ms_per_job": round(cpu_ms, 1),
                "cores_per_gpu": round(cpu_ms * offline_rate / 1000, 2),
                "worst_case": worst,
                "jobs": args.jobs,
                "time_scale": args.time_scale,
                "engine": {
                    "kv_tokens": pool.kv_tokens,
                    "max_num_seqs": limits.max_num_seqs,
                    "max_num_batched_tokens": batched,
                    "pool_capacity": pool.capacity,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
