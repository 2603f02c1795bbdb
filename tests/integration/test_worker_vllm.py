"""The worker end to end with vLLM on CPU and the tiny random Qwen2-VL: the instant engine's checks on the same
200 jobs with 24 bad inputs, plus exact vision tokens. The worker runs under the engine environment's Python
(scripts/engine-env.sh). The model's weights are random, so a good job may be answered `output_invalid` (see
`mismatches`); every other expectation is the instant engine's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from schemas.settings import Settings
from tests.support.worker_harness import BudgetSampler, ResultReader, mismatches, submit, worker_settings
from vlmflow.job_mix import JobMix
from vlmflow.worker_process import WorkerProcess, engine_python
from workers.tokens import image_tokens

pytestmark = pytest.mark.engine

ENGINE_READY_TIMEOUT_S = 300.0
MAX_OUTPUT_TOKENS = 48


@pytest.fixture(scope="module")
def engine_env() -> Path:
    python = engine_python(Settings())
    if python is None:
        pytest.skip("no engine environment (.venv-engine): build it with scripts/engine-env.sh")
    return python


@pytest.fixture(scope="module")
def tiny_model(engine_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("tiny-qwen2-vl")
    command = [str(engine_env), "-m", "vlmflow.cli", "model", "tiny", str(target)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return target


async def test_jobs_through_vllm_get_one_result_each_as_planned(
    settings: Settings, engine_env: Path, tiny_model: Path, tmp_path: Path
) -> None:
    settings = worker_settings(settings)
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"path": tiny_model})})
    plan = JobMix(settings, seed=4, max_output_tokens=MAX_OUTPUT_TOKENS).plan(200, bad=24)
    worker = WorkerProcess(settings, tmp_path / "worker.log", engine="vllm", python=engine_env).start()
    try:
        worker.wait_ready(ENGINE_READY_TIMEOUT_S)
        async with ResultReader(settings) as reader, BudgetSampler(settings) as sampler:
            await submit(settings, plan)
            log = await reader.wait_for({job.job_id for job in plan}, timeout_s=600)

            assert log.duplicates() == {}
            assert len(log.records) == len(plan)
            assert mismatches(plan, log.by_job(), settings, random_weights=True) == []
            good = [log.by_job()[job.job_id] for job in plan if job.expected is None]
            assert any(result.status == "ok" for result in good), "some answers of the random model fit their schema"
            assert max(sampler.samples) <= settings.budget.capacity
            for job in plan:
                result = log.by_job()[job.job_id]
                if job.expected is None:
                    assert job.job is not None
                    model = settings.model
                    sizes = [size_of(uri, settings) for uri in job.job.images]
                    assert result.vision_tokens == sum(
                        image_tokens(
                            w, h, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels
                        )
                        for w, h in sizes
                    )
                    assert result.prompt_tokens > result.vision_tokens
            assert worker.alive(), worker.log_tail()
    finally:
        assert worker.stop() == 0, worker.log_tail()


def size_of(uri: str, settings: Settings) -> tuple[int, int]:
    from schemas.connections import object_store
    from workers.images import load_image

    return load_image(uri, settings, object_store(settings)).size
