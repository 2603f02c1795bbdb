"""`vlmflow worker`: one member of the inference worker group, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import get_args

from schemas.errors import VlmflowError
from schemas.settings import EngineKind, Settings
from schemas.topics import Topic
from workers.engines.base import Engine
from workers.engines.factory import build_engine


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("worker", help=f"serve image jobs from {Topic.JOBS_IMAGE} until stopped")
    parser.add_argument("--engine", choices=get_args(EngineKind), help="engine (default: VLMFLOW_ENGINE__KIND, vllm)")
    parser.add_argument("--model", help="checkpoint directory (default: VLMFLOW_MODEL__PATH)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port; 0 picks a free one, -1 serves none")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


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
        raise VlmflowError(f"no model at {settings.model.path}; write the tiny one with `vlmflow model tiny DIR`")
    asyncio.run(_serve(settings, build_engine(settings, kind)))
    return 0
