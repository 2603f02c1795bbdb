"""Fixtures for tests that need the engine environment (built by scripts/engine-env.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
