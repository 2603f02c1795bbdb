"""The worker end to end on the local stack with the instant engine, as a child process like in production:
real broker, Redis and S3 store; good and bad jobs; a SIGKILL in the middle of a run."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from pathlib import Path

from schemas.settings import Settings
from schemas.topics import Topic
from tests.support.worker_harness import (
    BudgetSampler,
    ResultReader,
    mismatches,
    read_topic,
    submit,
    worker_settings,
)
from vlmflow.job_mix import JobMix
from vlmflow.worker_process import WorkerProcess

READY_TIMEOUT_S = 60.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_200_jobs_get_exactly_200_results_each_as_planned(settings: Settings, tmp_path: Path) -> None:
    settings = worker_settings(settings)
    mix = JobMix(settings, seed=1)
    plan = mix.plan(200, bad=24)
    assert {job.kind for job in plan} - {"good"} == set(mix.bad_kinds()), "every kind of bad input is in the run"
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        worker.wait_ready(READY_TIMEOUT_S)
        async with ResultReader(settings) as reader, BudgetSampler(settings) as sampler:
            await submit(settings, plan)
            log = await reader.wait_for({job.job_id for job in plan}, timeout_s=120)

            assert log.duplicates() == {}
            assert len(log.records) == 200
            assert mismatches(plan, log.by_job(), settings) == []
            never_fits = [log.by_job()[job.job_id] for job in plan if job.kind == "never_fits"]
            assert all(result.timings.admission_ms < 1_000 for result in never_fits), "answered at once"
            retried = {job.job_id for job in plan if job.kind == "fetch_fails"}
            dead_letters = await read_topic(settings, Topic.JOBS_DLQ)
            assert {record.job.job_id for record in dead_letters} == retried
            assert {record.attempt for record in dead_letters} == {settings.worker.max_attempts}
            assert {log.by_job()[job_id].attempt for job_id in retried} == {settings.worker.max_attempts - 1}
            assert len(sampler.samples) > 50
            assert max(sampler.samples) <= settings.budget.capacity
            assert max(sampler.samples) > 0, "the sampler saw leases held"

            # Still healthy: alive, metrics served, and one more job answered.
            assert worker.alive(), worker.log_tail()
            metrics = scrape(settings.worker.metrics_port)
            assert 'vlmflow_jobs_completed_total{status="ok"}' in metrics
            assert 'vlmflow_job_errors_total{code="image_truncated"}' in metrics
            extra = mix.good()
            await submit(settings, [extra])
            log = await reader.wait_for({extra.job_id}, timeout_s=30, settle_s=0)
            assert log.by_job()[extra.job_id].status == "ok"
    finally:
        assert worker.stop() == 0, worker.log_tail()


async def test_sigkill_mid_run_loses_no_job_and_shows_no_duplicate(settings: Settings, tmp_path: Path) -> None:
    settings = worker_settings(settings)
    plan = JobMix(settings, seed=2).plan(300, bad=12)
    job_ids = {job.job_id for job in plan}
    log_path = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log_path).start()
    try:
        worker.wait_ready(READY_TIMEOUT_S)
        async with ResultReader(settings) as reader, BudgetSampler(settings) as sampler:
            await submit(settings, plan)
            await reader.wait_for_count(job_ids, 60, timeout_s=60)
            worker.kill()
            answered_at_kill = reader.count(job_ids)
            assert answered_at_kill < len(plan), "the kill came in the middle of the run"

            await asyncio.sleep(settings.budget.lease_ttl_s + 1.0)
            assert await sampler.budget.in_use() == 0, "the dead worker's leases lapsed by themselves"

            worker = WorkerProcess(settings, log_path).start()
            worker.wait_ready(READY_TIMEOUT_S)
            log = await reader.wait_for(job_ids, timeout_s=120, settle_s=3.0)

            assert log.duplicates() == {}
            assert len(log.records) == len(plan)
            assert mismatches(plan, log.by_job(), settings) == []
            assert max(sampler.samples) <= settings.budget.capacity
    finally:
        status = worker.stop()
    assert status == 0, worker.log_tail()


async def test_sigterm_hands_back_what_it_cannot_finish(settings: Settings, tmp_path: Path) -> None:
    settings = worker_settings(settings)
    plan = JobMix(settings, seed=3).plan(120, bad=0)
    job_ids = {job.job_id for job in plan}
    log_path = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log_path).start()
    worker.wait_ready(READY_TIMEOUT_S)
    async with ResultReader(settings) as reader:
        await submit(settings, plan)
        await reader.wait_for_count(job_ids, 20, timeout_s=60)
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        assert worker.stop() == 0, worker.log_tail()

        worker = WorkerProcess(settings, log_path).start()
        try:
            worker.wait_ready(READY_TIMEOUT_S)
            log = await reader.wait_for(job_ids, timeout_s=120)
        finally:
            assert worker.stop() == 0, worker.log_tail()
    assert log.duplicates() == {}
    assert mismatches(plan, log.by_job(), settings) == []
