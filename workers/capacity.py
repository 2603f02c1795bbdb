"""How many vision tokens one GPU's pool can hold at once: from the KV cache the engine really has (the worker, at
start), or derived from the model and the GPU (`vlmflow budget plan`, offline), and corrected from what vLLM
reports while it runs. Pure functions; the callers gather the inputs and print the lines.

The KV cache is what images fill: every prompt token, vision placeholders included, keeps
2 (K and V) x layers x KV heads x head dim x dtype bytes in it (Qwen2-VL-7B in bf16: 57,344 B). vLLM gives the
cache what is left of `gpu_memory_utilization` x GPU memory after the weights and the profiled peak
(activations, CUDA graphs, non-torch memory), in whole blocks; the text of each running sequence and the
rounding up to whole blocks take their share before images do (`pool_capacity`), and `HEADROOM_FRACTION` of it
is never lent. The worker and `budget plan` share `pool_capacity`, so they differ only in the KV tokens they start
from: vLLM's whole blocks against the plan's bytes / bytes per token, less than one block apart when the plan is
given vLLM's KV cache bytes (on CPU, `engine.kv_cache_memory_bytes`).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import VlmflowError
from schemas.settings import Settings
from workers.engines.base import KvCache

GIB = 1024**3
DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip
"""Bytes per element of the dtypes a checkpoint or vLLM's `kv_cache_dtype` names."""
DEFAULT_OVERHEAD_GIB = 2.0
"""The profiled peak vLLM keeps beside weights and KV cache (activations of the largest batch, CUDA graphs,
non-torch memory): about 2 GiB for a 7B VLM at the default batch size. vLLM logs the real figure at start."""
KV_USAGE_METRIC = "vllm:kv_cache_usage_perc"
HEADROOM_FRACTION = 0.02
"""The share of the KV cache a pool never lends: the block vLLM keeps empty (its null block), KV the engine
computes outside the worker's books (start-up warm-up, a health check), and a margin for a chat template longer
than the bound of workers.limits."""
UNBOUNDED_CAPACITY = 2**40
"""The pool of an engine without a KV cache (the instant engine): nothing to protect."""
CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of the CPU engine when the settings name none: ample for the tiny model (524,288 tokens of 512 B).
Without it vLLM on CPU takes `gpu_memory_utilization` of the machine's RAM."""
"""vLLM's gauge of the used fraction of the KV cache (0-1), one sample per engine."""


def pool_name(settings: Settings, host: str | None = None) -> str:
    """The budget pool of this worker's engine, one per GPU: `budget.pool` when set, else
    `<budget.node or host name>:gpu<engine.device_index>` (e.g. `gpu-node-1:gpu2`)."""
    if settings.budget.pool:
        return settings.budget.pool
    node = settings.budget.node or host or socket.gethostname()
    return f"{node}:gpu{settings.engine.device_index}"


class PlanError(VlmflowError):
    """The inputs of a capacity plan do not give a usable budget."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KvShape(_Frozen):
    """What one token keeps in the KV cache."""

    layers: Annotated[int, Field(ge=1)]
    kv_heads: Annotated[int, Field(ge=1)]
    head_dim: Annotated[int, Field(ge=1)]
    dtype: str
    """The KV cache dtype: the model's, unless vLLM runs with another `kv_cache_dtype`."""

    @property
    def dtype_bytes(self) -> int:
        try:
            return DTYPE_BYTES[self.dtype]
        except KeyError:
            raise PlanError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def kv_shape_from_config(config: Mapping[str, Any], *, kv_cache_dtype: str | None = None) -> KvShape:
    """The KV shape of a HuggingFace `config.json`: flat (Qwen2-VL, Qwen2.5-VL) or with the language model's
    fields under `text_config` (Qwen3-VL, newer transformers)."""
    text = {**config, **config.get("text_config", {})}
    try:
        layers = text["num_hidden_layers"]
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
    except KeyError as missing:
        raise PlanError(f"model config has no {missing.args[0]!r}; give --layers, --kv-heads and --head-dim") from None
    dtype = kv_cache_dtype or text.get("dtype") or text.get("torch_dtype")
    if dtype is None:
        raise PlanError("model config names no dtype; give --kv-cache-dtype")
    return KvShape(layers=layers, kv_heads=text.get("num_key_value_heads") or heads, head_dim=head_dim, dtype=dtype)


class GpuPlanInputs(_Frozen):
    """The memory side of a plan: the GPU's memory, or the KV cache bytes themselves."""

    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    weights_gib: Annotated[float, Field(ge=0)] = 0.0
    overhead_gib: Annotated[float, Field(ge=0)] = DEFAULT_OVERHEAD_GIB
    kv_cache_bytes: Annotated[int, Field(ge=1)] | None = None
    """The KV cache the engine is given outright (vLLM's `kv_cache_memory_bytes`, the CPU engine's); when set,
    the GPU memory is not needed."""
    max_num_seqs: Annotated[int, Field(ge=1)]
    """Sequences an engine runs at once (vLLM's `max_num_seqs`)."""
    text_tokens_per_seq: Annotated[int, Field(ge=0)]
    """Prompt text and output tokens of one sequence, which share the cache with its images
    (`workers.limits.EngineLimits.text_reserve`)."""
    block_size: Annotated[int, Field(ge=1)] = 16
    """vLLM's KV block: each sequence may waste up to one block to rounding."""
    gpus: Annotated[int, Field(ge=1)] = 1
    """Engines (one GPU each) sharing the pool's budget."""


class BudgetPlan(_Frozen):
    kv_bytes_per_token: int
    kv_cache_gib: float
    """Memory left for the KV cache on one GPU."""
    kv_tokens_per_gpu: int
    text_reserve_tokens: int
    """KV tokens per GPU kept for the text of running sequences and block rounding."""
    headroom_tokens: int
    """KV tokens per GPU never lent (`HEADROOM_FRACTION`)."""
    capacity_per_gpu: int
    capacity: int
    """Vision tokens in flight at once across the pool: the budget's capacity."""
    lines: tuple[str, ...]
    """The derivation, one step per line, for people to check."""


class PoolCapacity(_Frozen):
    """One GPU's pool: its KV cache, what is kept from images, and the capacity left."""

    kv_tokens: int
    text_reserve_tokens: int
    headroom_tokens: int
    capacity: int
    """Vision tokens the pool lends at once."""
    lines: tuple[str, ...]


def pool_capacity(kv_tokens: int, *, block_size: int, max_num_seqs: int, text_tokens_per_seq: int) -> PoolCapacity:
    """The vision tokens a KV cache of `kv_tokens` can lend when `max_num_seqs` sequences, each with up to
    `text_tokens_per_seq` of text and one partly filled block, run at once and `HEADROOM_FRACTION` is kept back.

    With the leases of running jobs at most this capacity, running sequences never outgrow the cache."""
    reserve = max_num_seqs * (text_tokens_per_seq + block_size)
    headroom = math.ceil(HEADROOM_FRACTION * kv_tokens)
    capacity = kv_tokens - reserve - headroom
    if capacity <= 0:
        raise PlanError(
            f"the text of {max_num_seqs} sequences ({reserve:,} tokens) and the headroom ({headroom:,}) fill the KV"
            f" cache ({kv_tokens:,} tokens); lower engine.max_num_seqs, max_prompt_tokens or max_output_tokens"
        )
    lines = (
        f"text reserve        {max_num_seqs} seqs x ({text_tokens_per_seq:,} text + {block_size} block)"
        f" = {reserve:,} tokens",
        f"headroom            {HEADROOM_FRACTION:.0%} of {kv_tokens:,} = {headroom:,} tokens",
        f"vision tokens       {kv_tokens:,} - {reserve:,} - {headroom:,} = {capacity:,}",
    )
    return PoolCapacity(
        kv_tokens=kv_tokens, text_reserve_tokens=reserve, headroom_tokens=headroom, capacity=capacity, lines=lines
    )


def engine_pool_capacity(kv: KvCache | None, configured: int | None, text_tokens_per_seq: int) -> PoolCapacity:
    """The capacity a worker gives its pool at start: `pool_capacity` of the KV cache its engine allocated, or
    `configured` (budget.capacity) when one is set; a configured capacity above the cache's figure is kept as the
    operator's choice (the benchmark's "admission off"), and its line says the engine may then preempt. An engine
    without a KV cache has nothing to protect: `configured`, or `UNBOUNDED_CAPACITY`."""
    if kv is None:
        capacity = configured or UNBOUNDED_CAPACITY
        return PoolCapacity(
            kv_tokens=0, text_reserve_tokens=0, headroom_tokens=0, capacity=capacity,
            lines=(f"capacity            {capacity:,} (the engine keeps no KV cache)",),
        )  # fmt: skip
    pool = pool_capacity(
        kv.tokens, block_size=kv.block_size, max_num_seqs=kv.max_num_seqs, text_tokens_per_seq=text_tokens_per_seq
    )
    lines = (f"KV cache            {kv.tokens:,} tokens in blocks of {kv.block_size} (the engine's)", *pool.lines)
    if configured is None:
        return pool.model_copy(update={"lines": lines})
    if configured > pool.capacity:
        lines += (f"budget.capacity     {configured:,} configured, above the {pool.capacity:,} the KV cache holds:"
                  " the engine may have to preempt",)  # fmt: skip
    else:
        lines += (f"budget.capacity     {configured:,} configured",)
    return pool.model_copy(update={"capacity": configured, "lines": lines})


def plan_budget(shape: KvShape, gpu: GpuPlanInputs) -> BudgetPlan:
    """The capacity that fills each GPU's KV cache with vision tokens after the text of a full batch."""
    lines = [
        f"KV bytes per token  2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} head dim"
        f" x {shape.dtype_bytes} B ({shape.dtype}) = {shape.bytes_per_token:,} B",
    ]
    if gpu.kv_cache_bytes is not None:
        kv_cache_gib = gpu.kv_cache_bytes / GIB
        kv_tokens = gpu.kv_cache_bytes // shape.bytes_per_token
        lines.append(f"KV cache            {gpu.kv_cache_bytes:,} B given = {kv_tokens:,} tokens")
    elif gpu.gpu_memory_gib is not None:
        usable_gib = gpu.gpu_memory_gib * gpu.gpu_memory_utilization
        kv_cache_gib = usable_gib - gpu.weights_gib - gpu.overhead_gib
        if kv_cache_gib <= 0:
            raise PlanError(
                f"nothing left for the KV cache: {usable_gib:.2f} GiB usable - {gpu.weights_gib:.2f} GiB weights"
                f" - {gpu.overhead_gib:.2f} GiB overhead = {kv_cache_gib:.2f} GiB"
            )
        kv_tokens = math.floor(kv_cache_gib * GIB / shape.bytes_per_token)
        lines += [
            f"usable memory       {gpu.gpu_memory_gib:.2f} GiB x {gpu.gpu_memory_utilization:.2f}"
            f" = {usable_gib:.2f} GiB",
            f"KV cache            {usable_gib:.2f} - {gpu.weights_gib:.2f} weights - {gpu.overhead_gib:.2f} overhead"
            f" = {kv_cache_gib:.2f} GiB = {kv_tokens:,} tokens",
        ]
    else:
        raise PlanError("a plan needs the GPU's memory or the KV cache bytes")
    pool = pool_capacity(
        kv_tokens, block_size=gpu.block_size, max_num_seqs=gpu.max_num_seqs, text_tokens_per_seq=gpu.text_tokens_per_seq
    )
    lines += [*pool.lines, f"pool                {pool.capacity:,} per GPU x {gpu.gpus} = {pool.capacity * gpu.gpus:,}"]
    return BudgetPlan(
        kv_bytes_per_token=shape.bytes_per_token,
        kv_cache_gib=kv_cache_gib,
        kv_tokens_per_gpu=kv_tokens,
        text_reserve_tokens=pool.text_reserve_tokens,
        headroom_tokens=pool.headroom_tokens,
        capacity_per_gpu=pool.capacity,
        capacity=pool.capacity * gpu.gpus,
        lines=tuple(lines),
    )


def kv_cache_usage(metrics_text: str) -> list[float]:
    """Every `vllm:kv_cache_usage_perc` sample (one per engine) of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == KV_USAGE_METRIC
        for sample in family.samples
    ]


class UsageSample(_Frozen):
    """The pool's leased tokens and its engines' mean KV-cache usage, read at the same moment."""

    in_use: Annotated[int, Field(ge=0)]
    kv_usage: Annotated[float, Field(ge=0, le=1)]


def corrected_capacity(samples: Sequence[UsageSample], target_usage: float) -> tuple[int, str]:
    """The capacity at which a full budget would fill `target_usage` of the KV cache, and the reasoning.

    With L tokens leased the cache was u full, so each leased token cost u/L of it (its text, output and block
    rounding included); target/(u/L) tokens fill `target`. The costliest sample wins, the safe side.
    """
    loaded = [sample for sample in samples if sample.in_use > 0 and sample.kv_usage > 0]
    if not loaded:
        raise PlanError("no sample had leased tokens and KV usage at once; correct the budget while the pool works")
    costliest = max(loaded, key=lambda sample: sample.kv_usage / sample.in_use)
    capacity = math.floor(target_usage * costliest.in_use / costliest.kv_usage)
    if capacity < 1:
        raise PlanError(f"target usage {target_usage} gives no capacity")
    reason = (
        f"{costliest.in_use:,} tokens leased at {costliest.kv_usage:.1%} KV usage (costliest of {len(loaded)} samples)"
        f" -> {target_usage:.0%} usage at {target_usage:.2f} x {costliest.in_use:,} / {costliest.kv_usage:.4f}"
        f" = {capacity:,} tokens"
    )
    return capacity, reason
