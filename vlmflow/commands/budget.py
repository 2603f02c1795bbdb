"""`vlmflow budget plan | status | set`: the vision-token budget pools, one per GPU.

Each worker names its engine's pool (workers.capacity.pool_name) and stores the capacity it took from the
engine's KV cache in it at start; `status` lists every pool Redis holds, so it needs no list of workers.
`plan` is the offline calculator of the same capacity (workers.capacity.plan_budget), from the GPU's memory
or the KV cache bytes, with the limits the worker would derive (workers.limits).
"""

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
    from redis.asyncio import Redis

    from workers.budget import TokenBudget
    from workers.capacity import KvShape

MODEL_ARGS = ("layers", "kv_heads", "head_dim")
POOL_PATTERN = "vlmflow:{*}:v*:meta"
"""The meta key of every pool (workers.budget_scripts.key_prefix): the pool name is between the braces."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subcommands: argparse._SubParsersAction) -> None:
    budget = subcommands.add_parser("budget", help="the vision-token budget pools, one per GPU")
    actions = budget.add_subparsers(dest="action", required=True, metavar="ACTION")

    plan = actions.add_parser(
        "plan",
        help="derive a GPU's capacity from the model and its memory, or correct it from vLLM's KV-cache usage",
        description="Prints each step of the derivation, from the GPU's memory (--gpu-memory-gib) or from the KV "
        "cache bytes (--kv-cache-bytes; on CPU engine.kv_cache_memory_bytes or 256 MiB), with the max_num_seqs "
        "and text room the worker derives; or the correction from the engines' vllm:kv_cache_usage_perc against "
        "the tokens leased at the same moment (--metrics); with both, the correction wins. --apply sets the result "
        "as the live capacity of the pool (until its worker restarts and takes the engine's figure again).",
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
    gpu.add_argument("--kv-cache-bytes", type=_positive_int, help="the KV cache itself (vLLM's kv_cache_memory_bytes)")
    gpu.add_argument("--gpu-memory-utilization", type=float, help="default: engine.gpu_memory_utilization")
    gpu.add_argument("--weights-gib", type=float, help="default: the *.safetensors next to the model config")
    gpu.add_argument("--overhead-gib", type=float, help="vLLM's profiled peak beside weights and KV cache (default 2)")
    gpu.add_argument("--max-num-seqs", type=_positive_int, help="default: what the worker derives (workers.limits)")
    gpu.add_argument(
        "--text-tokens", type=int, help="text room per sequence (default: the worker's, from the settings)"
    )
    gpu.add_argument("--block-size", type=_positive_int, default=16, help="vLLM's KV block (16 on CUDA)")
    gpu.add_argument("--gpus", type=_positive_int, default=1, help="GPUs to total (each has its own pool)")
    live = plan.add_argument_group("correction from the running pool")
    live.add_argument("--metrics", action="append", default=[], metavar="URL", help="the engine's /metrics (repeat)")
    live.add_argument("--target-usage", type=float, default=0.9, help="KV-cache fraction a full budget may fill")
    live.add_argument("--samples", type=_positive_int, default=5)
    live.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    plan.add_argument("--apply", action="store_true", help="set the result as the pool's capacity")
    plan.add_argument("--pool", help="the pool to correct or apply to (default: this machine's, from the settings)")

    actions.add_parser("status", help="capacity, tokens in use, leases and waiters of every pool")
    set_capacity = actions.add_parser("set", help="set a pool's capacity until its worker restarts")
    set_capacity.add_argument("capacity", type=_positive_int)
    set_capacity.add_argument("--pool", help="default: this machine's pool, from the settings")
    budget.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "plan":
        return asyncio.run(_plan(args, settings))
    if args.action == "set":
        return asyncio.run(_set(args, settings))
    return asyncio.run(_status(settings))


def _pool(args: argparse.Namespace, settings: Settings) -> str:
    from workers.capacity import pool_name

    return str(args.pool) if args.pool else pool_name(settings)


@asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Redis]:
    from schemas.connections import redis_client

    redis = redis_client(settings)
    try:
        yield redis
    finally:
        await redis.aclose()


async def _budget(redis: Redis, settings: Settings, pool: str) -> TokenBudget:
    """The pool's budget, with the capacity its worker stored (1 where none is stored: then it lends nothing)."""
    from workers.budget import TokenBudget
    from workers.budget_scripts import keys

    stored = await redis.hget(keys(pool)[0], "capacity")
    return TokenBudget(redis, pool, int(stored) if stored else 1, settings.budget.lease_ttl_s)


async def pool_names(redis: Redis) -> list[str]:
    """Every pool that has books in Redis, by name."""
    names = set()
    async for key in redis.scan_iter(match=POOL_PATTERN, count=1_000):
        text = key.decode() if isinstance(key, bytes) else key
        names.add(text[text.index("{") + 1 : text.rindex("}")])
    return sorted(names)


async def _status(settings: Settings) -> int:
    from workers.budget_scripts import keys

    async with _redis(settings) as redis:
        pools = await pool_names(redis)
        rows = []
        for pool in pools:
            stored = await redis.hget(keys(pool)[0], "capacity")
            state = await (await _budget(redis, settings, pool)).state()
            rows.append((pool, int(stored) if stored else None, state))
    if not rows:
        print("no budget pools in Redis: no worker has started against it")
        return 0
    width = max(len("pool"), *(len(pool) for pool, _, _ in rows))
    print(f"{'pool':<{width}}  {'capacity':>12}  {'in use':>12}  {'used':>5}  {'leases':>6}  {'waiting':>7}")
    for pool, capacity, state in rows:
        shown = "unknown" if capacity is None else f"{state.capacity:,}"
        used = "" if capacity is None else f"{state.in_use / state.capacity:.0%}"
        line = f"{pool:<{width}}  {shown:>12}  {state.in_use:>12,}  {used:>5}  {state.leases:>6}  {state.waiting:>7}"
        recovering_ms = state.recovering_until_ms - state.server_time_ms
        if recovering_ms > 0:
            line += f"  recovering: grants resume in {recovering_ms / 1000:.1f} s"
        print(line)
    return 0


async def _set(args: argparse.Namespace, settings: Settings) -> int:
    pool = _pool(args, settings)
    async with _redis(settings) as redis:
        budget = await _budget(redis, settings, pool)
        await budget.set_capacity(args.capacity)
        state = await budget.state()
    print(f"pool {pool}: capacity {state.capacity:,} vision tokens, {state.in_use:,} in use in {state.leases} leases")
    return 0


async def _plan(args: argparse.Namespace, settings: Settings) -> int:
    from workers.capacity import PlanError

    memory_given = args.gpu_memory_gib is not None or args.kv_cache_bytes is not None
    if not (memory_given or args.metrics or _cpu_kv_bytes(settings)):
        raise PlanError(
            "give --gpu-memory-gib or --kv-cache-bytes to derive a capacity, or --metrics URL to correct it"
        )
    capacity = 0
    if memory_given or not args.metrics:
        capacity = _derived(args, settings)
    if args.metrics:
        capacity = await _corrected(args, settings)
    print(f"capacity            {capacity:,}")
    if args.apply:
        pool = _pool(args, settings)
        async with _redis(settings) as redis:
            await (await _budget(redis, settings, pool)).set_capacity(capacity)
        print(f"applied to pool {pool!r}")
    return 0


def _cpu_kv_bytes(settings: Settings) -> int | None:
    """The KV cache bytes the engine is given outright: configured, or the CPU engine's default."""
    from workers.capacity import CPU_KV_CACHE_BYTES

    configured = settings.engine.kv_cache_memory_bytes
    if configured is None and settings.engine.device == "cpu":
        return CPU_KV_CACHE_BYTES
    return configured


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
    from workers.limits import derive_limits

    shape, config_path = _kv_shape(args, settings)
    memory: dict[str, float | int | None]
    if args.gpu_memory_gib is not None:
        settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"device": "cuda"})})
        weights_gib = args.weights_gib
        if weights_gib is None:
            weights = list((config_path or settings.model.path / "config.json").parent.glob("*.safetensors"))
            if not weights:
                raise PlanError("no *.safetensors next to the model config; give --weights-gib")
            weights_gib = sum(path.stat().st_size for path in weights) / 1024**3
        memory = {
            "gpu_memory_gib": args.gpu_memory_gib,
            "gpu_memory_utilization": args.gpu_memory_utilization or settings.engine.gpu_memory_utilization,
            "weights_gib": weights_gib,
            "overhead_gib": DEFAULT_OVERHEAD_GIB if args.overhead_gib is None else args.overhead_gib,
        }
    else:
        memory = {"kv_cache_bytes": args.kv_cache_bytes or _cpu_kv_bytes(settings)}
    # NOTE: first the KV tokens alone (one sequence, no text), from which the worker's limits follow.
    bare = GpuPlanInputs.model_validate({**memory, "max_num_seqs": 1, "text_tokens_per_seq": 0})
    limits = derive_limits(settings, plan_budget(shape, bare).kv_tokens_per_gpu)
    inputs = bare.model_copy(
        update={
            "max_num_seqs": args.max_num_seqs or limits.max_num_seqs,
            "text_tokens_per_seq": limits.text_reserve if args.text_tokens is None else args.text_tokens,
            "block_size": args.block_size,
            "gpus": args.gpus,
        }
    )
    plan = plan_budget(shape, inputs)
    print(f"model               {config_path or 'from the command line'}")
    for line in plan.lines:
        print(line)
    batched = f"{limits.max_num_batched_tokens:,}" if limits.max_num_batched_tokens else "vLLM's default"
    print(f"engine              max_model_len {limits.max_model_len:,}, max_num_batched_tokens {batched},"
          f" max_num_seqs {args.max_num_seqs or limits.max_num_seqs}")  # fmt: skip
    at_once = plan.capacity_per_gpu // limits.image_tokens
    print(f"largest image       {limits.image_tokens:,} tokens -> {at_once:,} at once per GPU")
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
    async with _redis(settings) as redis:
        budget = await _budget(redis, settings, _pool(args, settings))
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
