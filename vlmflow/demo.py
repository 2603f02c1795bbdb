"""The main job on the local stack, end to end: stack up, tiny model, a worker, a mix of good and bad image jobs,
live progress, every result, and one JSON summary line.

The worker runs as a child process under the engine environment's Python (vLLM lives there); its settings are
the user's, with a demo budget pool small enough that one job can never fit (so that case shows too).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from schemas.errors import VlmflowError
from schemas.jobs import JobResult
from schemas.settings import Settings
from vlmflow.job_mix import UNREACHABLE_HOST, JobMix, PlannedJob
from vlmflow.worker_process import EngineKind, WorkerProcess, engine_python

DEMO_POOL = "demo"
DEMO_CAPACITY = 4096
"""Vision tokens of the demo's budget pool: a few images at once, and a four-image job can never fit."""
DEMO_LEASE_TTL_S = 10.0
"""Short leases: after a fresh Redis start the budget holds grants back for one lease TTL (workers.budget)."""
WORKER_READY_TIMEOUT_S = 900.0
"""vLLM loads and profiles the model before the worker takes work: about half a minute to a few minutes on CPU."""

Progress = Callable[[str], None]


class DemoError(VlmflowError):
    """The demo could not run (no engine environment, a worker that would not start)."""


@dataclass(frozen=True)
class DemoSummary:
    jobs: int
    ok: int
    error: int
    lost: int
    """Jobs without a result when the wait ran out; 0 unless something is broken."""
    seconds: float

    def json_line(self) -> str:
        return json.dumps(asdict(self))


def demo_settings(settings: Settings) -> Settings:
    """The user's settings with the demo's budget pool and short leases, an inline-image limit that a test
    payload can exceed cheaply, quick retries, 127.0.0.1 allowed as an image host (a port nothing listens on shows
    retries and the dead-letter topic), metrics on a free port, and an absolute model path for the child process."""
    worker = settings.worker
    return settings.model_copy(
        update={
            "budget": settings.budget.model_copy(
                update={"pool": DEMO_POOL, "capacity": DEMO_CAPACITY, "lease_ttl_s": DEMO_LEASE_TTL_S}
            ),
            "worker": worker.model_copy(
                update={
                    "max_inline_image_bytes": 1024 * 1024,
                    "retry_backoff_s": 0.5,
                    "url_allow_list": [*worker.url_allow_list, UNREACHABLE_HOST],
                    "metrics_port": 0,
                }
            ),
            "model": settings.model.model_copy(update={"path": settings.model.path.resolve()}),
        }
    )


def ensure_stack(settings: Settings, progress: Progress) -> None:
    """Start what of the local stack is not running, and create the topics that are missing."""
    from vlmflow.kafka_admin import create_topics
    from vlmflow.stack import LocalStack

    LocalStack(settings).up(progress=progress)
    created = create_topics(settings)
    if created:
        progress(f"topics: created {len(created)}")


def ensure_model(settings: Settings, python: Path, progress: Progress) -> None:
    """Write the tiny random checkpoint where the settings point, unless a checkpoint is there."""
    path = settings.model.path
    if (path / "config.json").exists():
        progress(f"model: {path}")
        return
    progress(f"model: writing the tiny random Qwen2-VL to {path}")
    command = [str(python), "-m", "vlmflow.cli", "model", "tiny", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DemoError(f"writing the tiny model failed: {done.stderr.strip().splitlines()[-1:]}")


def _outcome(job: PlannedJob, result: JobResult | None) -> str:
    if result is None:
        return "LOST"
    if result.error is not None:
        shown = f"error {result.error.code}"
        if job.expected == result.error.code:
            return shown
        if job.expected is None and result.error.code == "output_invalid" and result.completion_tokens > 0:
            return f"{shown} (random weights: {result.error.message[:90]})"
        return f"{shown} (expected {job.expected or 'ok'})"
    text = json.dumps(result.output)
    shown = f"ok    {text[:70] + '...' if len(text) > 70 else text}"
    return shown if job.expected is None else f"{shown} (expected {job.expected})"


def print_results(plan: list[PlannedJob], results: dict[str, JobResult]) -> None:
    for job in plan:
        print(f"{job.job_id[:8]}  {job.task or '-':<8} {job.kind:<18} {_outcome(job, results.get(job.job_id))}")


async def _submit_and_collect(settings: Settings, plan: list[PlannedJob], timeout_s: float) -> dict[str, JobResult]:
    from workers.client import JobClient

    results: dict[str, JobResult] = {}
    statuses: Counter[str] = Counter()
    async with JobClient(settings) as client:
        for job in plan:
            await client.submit_raw(job.job_id, job.value)
        with tqdm(total=len(plan), desc="results", unit="job", file=sys.stderr) as bar:
            async for result in client.results([job.job_id for job in plan], timeout_s):
                results[result.job_id] = result
                statuses[result.status] += 1
                bar.set_postfix(ok=statuses["ok"], error=statuses["error"], refresh=False)
                bar.update()
    return results


def run_demo(
    settings: Settings,
    *,
    jobs: int,
    bad: int,
    engine: EngineKind,
    timeout_s: float,
    seed: int,
    max_output_tokens: int,
    progress: Progress,
) -> DemoSummary:
    """Everything `vlmflow demo` does; returns the summary (the caller prints it)."""
    started = time.monotonic()
    settings = demo_settings(settings)
    python = Path(sys.executable)
    if engine == "vllm":
        found = engine_python(settings)
        if found is None:
            raise DemoError("no engine environment: build it with scripts/engine-env.sh (or use --engine instant)")
        python = found
    ensure_stack(settings, progress)
    if engine == "vllm":
        ensure_model(settings, python, progress)
    log_path = settings.state_dir / "logs" / "demo-worker.log"
    progress(f"worker: starting ({engine} engine; log {log_path})")
    worker = WorkerProcess(settings, log_path, engine=engine, python=python).start()
    try:
        worker.wait_ready(WORKER_READY_TIMEOUT_S)
        waited = time.monotonic() - started
        progress(f"worker: ready after {waited:.0f} s; budget pool {DEMO_POOL!r}: {DEMO_CAPACITY:,} vision tokens")
        plan = JobMix(settings, seed=seed, max_output_tokens=max_output_tokens).plan(jobs, bad)
        progress(f"jobs: {jobs} ({bad} bad on purpose, of {len({job.kind for job in plan}) - 1} kinds)")
        results = asyncio.run(_submit_and_collect(settings, plan, timeout_s))
    finally:
        worker.stop()
    print_results(plan, results)
    statuses = Counter(result.status for result in results.values())
    return DemoSummary(
        len(plan), statuses["ok"], statuses["error"], len(plan) - len(results), round(time.monotonic() - started, 1)
    )
