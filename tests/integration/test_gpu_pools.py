"""Admission per GPU: two workers, each naming the pool of its own engine (host + device index) and sizing it from
its engine's KV cache at start, on the local stack with the simulated H100 engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

from schemas.settings import Settings
from tests.support.worker_harness import BudgetSampler, ResultReader, mismatches, submit, worker_settings
from vlmflow.job_mix import JobMix
from vlmflow.worker_process import WorkerProcess
from workers.capacity import pool_name

READY_TIMEOUT_S = 120.0
CAPACITY = 2_500
"""Each pool's capacity, below what the simulated KV cache holds, so that admission binds in a short test."""


def gpu_worker_settings(settings: Settings, node: str, device: int, tmp_path: Path) -> Settings:
    """A worker of GPU `device` on machine `node`: its pool is named by the worker, not configured."""
    base = worker_settings(settings)
    return base.model_copy(
        update={
            "engine": base.engine.model_copy(
                update={
                    "kind": "sim",
                    "device_index": device,
                    "sim": base.engine.sim.model_copy(
                        update={"time_scale": 0.3, "stats_path": tmp_path / f"sim-{device}.json"}
                    ),
                }
            ),
            "budget": base.budget.model_copy(update={"pool": None, "node": node, "capacity": CAPACITY}),
        }
    )


def status(settings: Settings) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLMFLOW_REDIS__URL": settings.redis.url}
    return subprocess.run(
        [sys.executable, "-m", "vlmflow.cli", "budget", "status"], env=env, capture_output=True, text=True, timeout=60
    )


async def test_two_workers_lease_from_two_pools_each_within_its_own_capacity(
    settings: Settings, tmp_path: Path
) -> None:
    node = f"node-{uuid.uuid4().hex[:6]}"
    gpus = [gpu_worker_settings(settings, node, device, tmp_path) for device in (0, 1)]
    pools = [pool_name(gpu) for gpu in gpus]
    assert pools == [f"{node}:gpu0", f"{node}:gpu1"]
    plan = JobMix(gpus[0], seed=3).plan(80, bad=0)
    workers = [
        WorkerProcess(gpu, tmp_path / f"worker-{index}.log", engine="sim").start() for index, gpu in enumerate(gpus)
    ]
    try:
        for worker in workers:
            worker.wait_ready(READY_TIMEOUT_S)
        # NOTE: the sampler reads each pool by the name its worker gave it, with the worker's capacity.
        samplers = [BudgetSampler(gpu.model_copy(update={"budget": gpu.budget.model_copy(update={"pool": pool})}))
                    for gpu, pool in zip(gpus, pools, strict=True)]  # fmt: skip
        async with ResultReader(gpus[0]) as reader, samplers[0] as first, samplers[1] as second:
            await submit(gpus[0], plan)
            log = await reader.wait_for({job.job_id for job in plan}, timeout_s=300)
            listed = await asyncio.to_thread(status, gpus[0])

        assert mismatches(plan, log.by_job(), gpus[0]) == []
        assert log.duplicates() == {}
        for sampler in (first, second):
            assert len(sampler.samples) > 50
            assert max(sampler.samples) <= CAPACITY
            assert max(sampler.samples) > 0, "both GPUs took part: each worker holds half the partitions"
        assert {result.worker for result in log.records} and len({r.worker for r in log.records}) == 2
        assert listed.returncode == 0, listed.stderr
        rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
        for pool in pools:
            assert rows[pool][0] == f"{CAPACITY:,}", listed.stdout
    finally:
        for worker in workers:
            worker.stop()
