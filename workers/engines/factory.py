"""The one place an engine is built from settings, so the worker, `review suggest` and the GPU benchmark run the
model exactly alike (same pixels as the token estimator, same limits, same KV cache sizing, same CUDA-graph choice).

The limits come from workers.limits, checked against each other before anything loads: a worker whose settings
conflict stops with one line instead of serving jobs the engine would refuse. `max_num_seqs`, when the settings
leave it open, is sized from the KV cache the engine is expected to get, planned as `vlmflow budget plan` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from schemas.settings import EngineKind, Settings
from workers.capacity import CPU_KV_CACHE_BYTES, DEFAULT_OVERHEAD_GIB, GIB, PlanError, kv_shape_from_config
from workers.engines.base import Engine
from workers.limits import EngineLimits, derive_limits

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""Set before vLLM is imported: nothing is ever downloaded, and nothing reports usage."""


def build_engine(settings: Settings, kind: EngineKind | None = None) -> Engine:
    """The engine the settings ask for (`kind` overrides `settings.engine.kind`). Raises `LimitsConflict`."""
    kind = kind or settings.engine.kind
    if kind == "instant":
        from workers.engines.instant import InstantEngine

        return InstantEngine()
    if kind == "sim":
        from workers.engines.sim import SIM_H100, SimEngine

        return SimEngine(settings, derive_limits(settings, SIM_H100.kv_tokens))
    return _vllm_engine(settings)


def _vllm_engine(settings: Settings) -> Engine:
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    from workers.engines.vllm_engine import VllmEngine
    from workers.tokens import vision_spec

    model, engine = settings.model, settings.engine
    limits: EngineLimits = derive_limits(settings, planned_kv_tokens(settings))
    spec = vision_spec(model.family)
    kv_cache_bytes = engine.kv_cache_memory_bytes
    if kv_cache_bytes is None and engine.device == "cpu":
        kv_cache_bytes = CPU_KV_CACHE_BYTES
    return VllmEngine(
        str(model.path),
        min_pixels=spec.min_pixels if model.min_pixels is None else model.min_pixels,
        max_pixels=spec.max_pixels if model.max_pixels is None else model.max_pixels,
        max_images_per_prompt=engine.limit_images_per_prompt,
        max_model_len=limits.max_model_len,
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_cache_bytes,
        load_format=engine.load_format,
        dtype=engine.dtype,
        cudagraph_mm_encoder=engine.cudagraph_mm_encoder,
    )


def planned_kv_tokens(settings: Settings) -> int | None:
    """The KV tokens vLLM is expected to allocate, before it starts: the configured KV bytes (on CPU 256 MiB by
    default), else `gpu_memory_utilization` of the GPU's memory less the weights on disk and vLLM's usual
    overhead. None when the model config or the GPU cannot be read."""
    try:
        config = json.loads((settings.model.path / "config.json").read_text())
        shape = kv_shape_from_config(config)
    except (OSError, ValueError, PlanError):
        return None
    engine = settings.engine
    kv_bytes = engine.kv_cache_memory_bytes
    if kv_bytes is None and engine.device == "cpu":
        kv_bytes = CPU_KV_CACHE_BYTES
    if kv_bytes is None:
        total = _gpu_memory_bytes()
        if total is None:
            return None
        weights = sum(path.stat().st_size for path in Path(settings.model.path).glob("*.safetensors"))
        kv_bytes = int(total * engine.gpu_memory_utilization - weights - DEFAULT_OVERHEAD_GIB * GIB)
    return max(0, kv_bytes) // shape.bytes_per_token


def _gpu_memory_bytes() -> int | None:
    """The memory of this process's GPU, read through NVML as vLLM does (it does not initialize CUDA here)."""
    try:
        from vllm.platforms import current_platform

        return int(current_platform.get_device_total_memory(0))
    except Exception:
        return None
