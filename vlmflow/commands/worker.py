"""`vlmflow worker`: one member of the inference worker group, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Literal

from schemas.settings import Settings
from workers.engines.base import Engine

EngineKind = Literal["vllm", "instant"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""Set before vLLM is imported: nothing is ever downloaded, and nothing reports usage."""
CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of the CPU engine when the settings name none: ample for the tiny model's 4,096-token context."""


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("worker", help="serve image jobs from vlm.jobs.image until stopped")
    parser.add_argument("--engine", choices=["vllm", "instant"], help="engine (default: VLMFLOW_ENGINE__KIND, vllm)")
    parser.add_argument("--model", help="checkpoint directory (default: VLMFLOW_MODEL__PATH)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port; 0 picks a free one, -1 serves none")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def build_engine(settings: Settings, kind: EngineKind) -> Engine:
    """The engine the settings ask for; vLLM's at the same `min_pixels`/`max_pixels` as the token estimator."""
    if kind == "instant":
        from workers.engines.instant import InstantEngine

        return InstantEngine()
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    from workers.engines.vllm_engine import VllmEngine
    from workers.tokens import vision_spec

    model, engine = settings.model, settings.engine
    spec = vision_spec(model.family)
    vllm_engine = VllmEngine(
        str(model.path),
        min_pixels=spec.min_pixels if model.min_pixels is None else model.min_pixels,
        max_pixels=spec.max_pixels if model.max_pixels is None else model.max_pixels,
        max_images_per_prompt=engine.limit_images_per_prompt,
        max_model_len=engine.max_model_len,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_memory_bytes=(
            CPU_KV_CACHE_BYTES
            if engine.kv_cache_memory_bytes is None and engine.device == "cpu"
            else engine.kv_cache_memory_bytes
        ),
        load_format=engine.load_format,
        dtype=engine.dtype,
    )
    vllm_engine.engine_args.max_num_seqs = engine.max_num_seqs
    return vllm_engine


async def _serve(settings: Settings, engine: Engine) -> None:
    from workers.worker import Worker

    worker = Worker(settings, engine)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    await worker.run()


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    updates: dict[str, object] = {}
    if args.model:
        updates["model"] = settings.model.model_copy(update={"path": args.model})
    if args.metrics_port is not None:
        updates["worker"] = settings.worker.model_copy(update={"metrics_port": args.metrics_port})
    settings = settings.model_copy(update=updates)
    kind: EngineKind = args.engine or settings.engine.kind
    if kind == "vllm" and not (settings.model.path / "config.json").exists():
        from schemas.errors import VlmflowError

        raise VlmflowError(f"no model at {settings.model.path}; write the tiny one with `vlmflow model tiny DIR`")
    asyncio.run(_serve(settings, build_engine(settings, kind)))
    return 0
