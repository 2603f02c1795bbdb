"""`vlmflow budget plan | status | set`: the shared vision-token budget of the configured pool."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.settings import Settings

if TYPE_CHECKING:
    from workers.budget import TokenBudget
    from workers.capacity import KvShape

MODEL_ARGS = ("layers", "kv_heads", "head_dim")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subcommands: argparse._SubParsersAction) -> None:
    budget = subcommands.add_parser("budget", help="the shared vision-token budget of the GPU pool")
    actions = budget.add_subparsers(dest="action", required=True, metavar="ACTION")

    plan = actions.add_parser(
        "plan",
        help="derive the capacity from the model and GPU memory, or correct it from vLLM's KV-cache usage",
        description="Prints each step of the derivation (--gpu-memory-gib), or of the correction from the "
        "engines' vllm:kv_cache_usage_perc against the tokens leased at the same moment (--metrics); with both, "
        "the correction wins. --apply sets the result as the live capacity of the pool.",
    )
    model = plan.add_argument_group("model (read from config.json unless all three numbers are given)")
    model.add_argument("--config", type=Path, help="the model's config.json (default: <model.path>/config.json)")
    model.add_argument("--layers", type=_positive_int)
    model.add_argument("--kv-heads", type=_positive_int)
    model.add_argument("--head-dim", type=_positive_int)
    model.add_argument(
        "--kv-cache-dtype", help="vLLM's kv_cache_dtype, e.g. fp8 (default: the model's; bfloat16 with --layers)"
    )
    gpu = plan.add_argument_group("GPU")
    gpu.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU, e.g. 80 for an H100")
    gpu.add_argument("--gpu-memory-utilization", type=float, help="default: engine.gpu_memory_utilization")
    gpu.add_argument("--weights-gib", type=float, help="default: the *.safetensors next to the model config")
    gpu.add_argument("--overhead-gib", type=float, help="vLLM's profiled peak beside weights and KV cache (default 2)")
    gpu.add_argument("--max-num-seqs", type=_positive_int, help="default: engine.max_num_seqs")
    gpu.add_argument("--text-tokens", type=int, default=1024, help="prompt text + output tokens per sequence")
    gpu.add_argument("--gpus", type=_positive_int, default=1, help="engines sharing the pool")
    live = plan.add_argument_group("correction from the running pool")
    live.add_argument("--metrics", action="append", default=[], metavar="URL", help="an engine's /metrics (repeat)")
    live.add_argument("--target-usage", type=float, default=0.9, help="KV-cache fraction a full budget may fill")
    live.add_argument("--samples", type=_positive_int, default=5)
    live.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    plan.add_argument("--apply", action="store_true", help="set the result as the pool's capacity")

    actions.add_parser("status", help="capacity, tokens in use, leases and waiters of the pool")
    set_capacity = actions.add_parser("set", help="set the pool's capacity for every worker")
    set_capacity.add_argument("capacity", type=_positive_int)
    budget.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "plan":
        return asyncio.run(_plan(args, settings))
    return asyncio.run(_status_or_set(args, settings))


@asynccontextmanager
async def _budget(settings: Settings) -> AsyncIterator[TokenBudget]:
    from schemas.connections import redis_client
    from workers.budget import TokenBudget

    redis = redis_client(settings)
    try:
        budget = settings.budget
        yield TokenBudget(redis, budget.pool, budget.capacity, budget.lease_ttl_s)
    finally:
        await redis.aclose()


async def _status_or_set(args: argparse.Namespace, settings: Settings) -> int:
    async with _budget(settings) as budget:
        if args.action == "set":
            await budget.set_capacity(args.capacity)
        state = await budget.state()
    print(f"pool        {settings.budget.pool}")
    print(f"capacity    {state.capacity:,} vision tokens")
    print(f"in use      {state.in_use:,} ({state.in_use / state.capacity:.0%}) in {state.leases} leases")
    print(f"waiting     {state.waiting}")
    recovering_ms = state.recovering_until_ms - state.server_time_ms
    if recovering_ms > 0:
        print(f"recovering  grants resume in {recovering_ms / 1000:.1f} s (Redis may have lost leases)")
    return 0


async def _plan(args: argparse.Namespace, settings: Settings) -> int:
    from workers.capacity import PlanError

    if args.gpu_memory_gib is None and not args.metrics:
        raise PlanError("give --gpu-memory-gib to derive a capacity, or --metrics URL to correct the live one")
    capacity = 0
    if args.gpu_memory_gib is not None:
        capacity = _derived(args, settings)
    if args.metrics:
        capacity = await _corrected(args, settings)
    print(f"capacity            {capacity:,}")
    if args.apply:
        async with _budget(settings) as budget:
            await budget.set_capacity(capacity)
        print(f"applied to pool {settings.budget.pool!r}")
    return 0


def _kv_shape(args: argparse.Namespace, settings: Settings) -> tuple[KvShape, Path | None]:
    """The shape from the command line when it gives all three numbers, else from config.json (and its path)."""
    from workers.capacity import KvShape, PlanError, kv_shape_from_config

    given = [name for name in MODEL_ARGS if getattr(args, name) is not None]
    if len(given) == len(MODEL_ARGS):
        dtype = args.kv_cache_dtype or "bfloat16"
        return KvShape(layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=dtype), None
    if given:
        raise PlanError("give all of --layers, --kv-heads and --head-dim, or none to read the model config")
    config_path = args.config or settings.model.path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise PlanError(f"no model config at {config_path}; give --config or --layers/--kv-heads/--head-dim") from None
    return kv_shape_from_config(config, kv_cache_dtype=args.kv_cache_dtype), config_path


def _derived(args: argparse.Namespace, settings: Settings) -> int:
    from workers.capacity import DEFAULT_OVERHEAD_GIB, GpuPlanInputs, PlanError, plan_budget
    from workers.tokens import vision_spec

    shape, config_path = _kv_shape(args, settings)
    weights_gib = args.weights_gib
    if weights_gib is None:
        weights = list((config_path or settings.model.path / "config.json").parent.glob("*.safetensors"))
        if not weights:
            raise PlanError("no *.safetensors next to the model config; give --weights-gib")
        weights_gib = sum(path.stat().st_size for path in weights) / 1024**3
    plan = plan_budget(
        shape,
        GpuPlanInputs(
            gpu_memory_gib=args.gpu_memory_gib,
            gpu_memory_utilization=args.gpu_memory_utilization or settings.engine.gpu_memory_utilization,
            weights_gib=weights_gib,
            overhead_gib=DEFAULT_OVERHEAD_GIB if args.overhead_gib is None else args.overhead_gib,
            max_num_seqs=args.max_num_seqs or settings.engine.max_num_seqs,
            text_tokens_per_seq=args.text_tokens,
            gpus=args.gpus,
        ),
    )
    print(f"model               {config_path or 'from the command line'}")
    for line in plan.lines:
        print(line)
    spec = vision_spec(settings.model.family)
    max_pixels = settings.model.max_pixels or spec.max_pixels
    largest = max_pixels // spec.factor**2
    at_once = plan.capacity // largest
    print(f"largest image       {largest:,} tokens at most (max_pixels {max_pixels:,}) -> {at_once:,} at once")
    return plan.capacity


async def _corrected(args: argparse.Namespace, settings: Settings) -> int:
    """Sample the leased tokens (Redis) and the engines' KV usage (/metrics) together, then correct."""
    from urllib.request import urlopen

    from workers.capacity import PlanError, UsageSample, corrected_capacity, kv_cache_usage

    def scrape(url: str) -> list[float]:
        with urlopen(url, timeout=5) as response:
            values = kv_cache_usage(response.read().decode())
        if not values:
            raise PlanError(f"{url} has no vllm:kv_cache_usage_perc; is it a vLLM engine's /metrics?")
        return values

    samples: list[UsageSample] = []
    async with _budget(settings) as budget:
        for index in range(args.samples):
            in_use = await budget.in_use()
            usages = [value for url in args.metrics for value in await asyncio.to_thread(scrape, url)]
            samples.append(UsageSample(in_use=in_use, kv_usage=sum(usages) / len(usages)))
            usage = samples[-1].kv_usage
            print(f"sample {index + 1}/{args.samples}  leased {in_use:,}  KV usage {usage:.1%}", flush=True)
            if index + 1 < args.samples:
                await asyncio.sleep(args.interval)
    capacity, reason = corrected_capacity(samples, args.target_usage)
    print(f"correction          {reason}")
    return capacity
