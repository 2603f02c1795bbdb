"""How many vision tokens a GPU pool can hold at once, derived from the model and the GPU, and corrected from
what vLLM reports while it runs. Pure functions; `vlmflow budget plan` gathers the inputs and prints the lines.

The KV cache is what images fill: every prompt token, vision placeholders included, keeps
2 (K and V) x layers x KV heads x head dim x dtype bytes in it (Qwen2-VL-7B in bf16: 57,344 B). vLLM gives the
cache what is left of `gpu_memory_utilization` x GPU memory after the weights and the profiled peak
(activations, CUDA graphs, non-torch memory); the text of each running sequence and the rounding up to whole
blocks take their share before images do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import VlmflowError

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
"""vLLM's gauge of the used fraction of the KV cache (0-1), one sample per engine."""


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
    """The memory side of a plan."""

    gpu_memory_gib: Annotated[float, Field(gt=0)]
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)]
    weights_gib: Annotated[float, Field(ge=0)]
    overhead_gib: Annotated[float, Field(ge=0)] = DEFAULT_OVERHEAD_GIB
    max_num_seqs: Annotated[int, Field(ge=1)]
    """Sequences an engine runs at once (vLLM's `max_num_seqs`)."""
    text_tokens_per_seq: Annotated[int, Field(ge=0)]
    """Prompt text and output tokens of one sequence, which share the cache with its images."""
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
    capacity_per_gpu: int
    capacity: int
    """Vision tokens in flight at once across the pool: the budget's capacity."""
    lines: tuple[str, ...]
    """The derivation, one step per line, for people to check."""


def plan_budget(shape: KvShape, gpu: GpuPlanInputs) -> BudgetPlan:
    """The capacity that fills each GPU's KV cache with vision tokens after the text of a full batch."""
    usable_gib = gpu.gpu_memory_gib * gpu.gpu_memory_utilization
    kv_cache_gib = usable_gib - gpu.weights_gib - gpu.overhead_gib
    if kv_cache_gib <= 0:
        raise PlanError(
            f"nothing left for the KV cache: {usable_gib:.2f} GiB usable - {gpu.weights_gib:.2f} GiB weights"
            f" - {gpu.overhead_gib:.2f} GiB overhead = {kv_cache_gib:.2f} GiB"
        )
    kv_tokens = math.floor(kv_cache_gib * GIB / shape.bytes_per_token)
    reserve = gpu.max_num_seqs * (gpu.text_tokens_per_seq + gpu.block_size)
    per_gpu = kv_tokens - reserve
    if per_gpu <= 0:
        raise PlanError(
            f"the text of {gpu.max_num_seqs} sequences ({reserve:,} tokens) fills the KV cache ({kv_tokens:,})"
        )
    lines = (
        f"KV bytes per token  2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} head dim"
        f" x {shape.dtype_bytes} B ({shape.dtype}) = {shape.bytes_per_token:,} B",
        f"usable memory       {gpu.gpu_memory_gib:.2f} GiB x {gpu.gpu_memory_utilization:.2f} = {usable_gib:.2f} GiB",
        f"KV cache            {usable_gib:.2f} - {gpu.weights_gib:.2f} weights - {gpu.overhead_gib:.2f} overhead"
        f" = {kv_cache_gib:.2f} GiB = {kv_tokens:,} tokens",
        f"text reserve        {gpu.max_num_seqs} seqs x ({gpu.text_tokens_per_seq:,} text + {gpu.block_size} block)"
        f" = {reserve:,} tokens",
        f"vision tokens       {kv_tokens:,} - {reserve:,} = {per_gpu:,} per GPU x {gpu.gpus} = {per_gpu * gpu.gpus:,}",
    )
    return BudgetPlan(
        kv_bytes_per_token=shape.bytes_per_token,
        kv_cache_gib=kv_cache_gib,
        kv_tokens_per_gpu=kv_tokens,
        text_reserve_tokens=reserve,
        capacity_per_gpu=per_gpu,
        capacity=per_gpu * gpu.gpus,
        lines=lines,
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
