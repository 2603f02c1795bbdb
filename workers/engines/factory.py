"""The one place an engine is built from settings, so the worker, `review suggest` and the GPU benchmark run the
model exactly alike (same pixels as the token estimator, same KV cache sizing, same CUDA-graph choice)."""

from __future__ import annotations

import os

from schemas.settings import EngineKind, Settings
from workers.engines.base import Engine

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""Set before vLLM is imported: nothing is ever downloaded, and nothing reports usage."""
CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of the CPU engine when the settings name none: ample for the tiny model's 4,096-token context.
Without it vLLM on CPU takes `gpu_memory_utilization` of the machine's RAM."""


def build_engine(settings: Settings, kind: EngineKind | None = None) -> Engine:
    """The engine the settings ask for (`kind` overrides `settings.engine.kind`)."""
    if (kind or settings.engine.kind) == "instant":
        from workers.engines.instant import InstantEngine

        return InstantEngine()
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    from workers.engines.vllm_engine import VllmEngine
    from workers.tokens import vision_spec

    model, engine = settings.model, settings.engine
    spec = vision_spec(model.family)
    kv_cache_bytes = engine.kv_cache_memory_bytes
    if kv_cache_bytes is None and engine.device == "cpu":
        kv_cache_bytes = CPU_KV_CACHE_BYTES
    return VllmEngine(
        str(model.path),
        min_pixels=spec.min_pixels if model.min_pixels is None else model.min_pixels,
        max_pixels=spec.max_pixels if model.max_pixels is None else model.max_pixels,
        max_images_per_prompt=engine.limit_images_per_prompt,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_cache_bytes,
        load_format=engine.load_format,
        dtype=engine.dtype,
        cudagraph_mm_encoder=engine.cudagraph_mm_encoder,
    )
