"""Fixtures for tests that need the engine environment (built by scripts/engine-env.sh)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from schemas.settings import Settings, load_settings

if TYPE_CHECKING:
    from workers.engines.vllm_engine import VllmEngine

# NOTE: set before vLLM or huggingface_hub is imported (the hub reads its flags at import): no network, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# vLLM runs its engine core in a child process: spawn it rather than fork pytest with its threads.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tiny random Qwen2-VL checkpoint, written once per session."""
    pytest.importorskip("torchvision", reason="needs the engine env (scripts/engine-env.sh)")
    from workers.tiny_model import write_tiny_qwen2_vl

    return write_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def engine_settings(tiny_model_dir: Path) -> Settings:
    """The worker's default engine settings (CPU, 256 MiB of KV cache, max_pixels 1,003,520) on the tiny model."""
    base = load_settings()
    return base.model_copy(update={"model": base.model.model_copy(update={"path": tiny_model_dir})})


@pytest.fixture(scope="session")
async def engine(engine_settings: Settings) -> AsyncIterator[VllmEngine]:
    """One engine for the session, built as the worker builds it: starting vLLM takes about half a minute on
    2 cores."""
    pytest.importorskip("vllm", reason="needs the engine env (scripts/engine-env.sh)")
    from workers.engines.factory import build_engine
    from workers.engines.vllm_engine import VllmEngine

    built = build_engine(engine_settings, "vllm")
    assert isinstance(built, VllmEngine)
    await built.start()
    yield built
    await built.close()
