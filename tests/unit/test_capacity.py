"""Capacity planning: KV bytes per token from model configs, the derivation, and the correction from vLLM's
KV-cache usage."""

from __future__ import annotations

import pytest

from schemas.settings import load_settings
from workers.capacity import (
    GIB,
    UNBOUNDED_CAPACITY,
    GpuPlanInputs,
    KvShape,
    PlanError,
    UsageSample,
    corrected_capacity,
    engine_pool_capacity,
    kv_cache_usage,
    kv_shape_from_config,
    plan_budget,
    pool_capacity,
    pool_name,
)
from workers.engines.base import KvCache

QWEN2_VL_7B = {  # the fields of Qwen/Qwen2-VL-7B-Instruct's config.json that matter here
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "torch_dtype": "bfloat16",
}
QWEN3_VL_8B = {  # Qwen3-VL nests the language model under text_config and names head_dim
    "text_config": {
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "dtype": "bfloat16",
    },
    "vision_config": {"depth": 27},
}

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen2-vl"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen2-vl"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="qwen2-vl"} 0.75
"""


def test_qwen2_vl_7b_keeps_57344_bytes_per_token() -> None:
    shape = kv_shape_from_config(QWEN2_VL_7B)
    assert shape == KvShape(layers=28, kv_heads=4, head_dim=128, dtype="bfloat16")
    assert shape.bytes_per_token == 57_344


def test_nested_text_config_and_a_kv_cache_dtype_of_its_own() -> None:
    shape = kv_shape_from_config(QWEN3_VL_8B)
    assert shape.bytes_per_token == 2 * 36 * 8 * 128 * 2
    assert kv_shape_from_config(QWEN3_VL_8B, kv_cache_dtype="fp8").bytes_per_token == shape.bytes_per_token // 2


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden_size": 64, "num_attention_heads": 2, "torch_dtype": "bfloat16"}, "num_hidden_layers"),
        ({**QWEN2_VL_7B, "torch_dtype": None}, "dtype"),
    ],
)
def test_unusable_configs(config: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        kv_shape_from_config(config)


def test_unknown_dtype() -> None:
    with pytest.raises(PlanError, match="unknown dtype 'int3'"):
        _ = KvShape(layers=1, kv_heads=1, head_dim=64, dtype="int3").bytes_per_token


def gpu(**overrides: object) -> GpuPlanInputs:
    values: dict[str, object] = {
        "gpu_memory_gib": 10.0,
        "gpu_memory_utilization": 0.5,
        "weights_gib": 1.0,
        "overhead_gib": 1.0,
        "max_num_seqs": 4,
        "text_tokens_per_seq": 100,
        "block_size": 16,
        "gpus": 2,
    }
    return GpuPlanInputs(**{**values, **overrides})  # type: ignore[arg-type]


def test_plan_derivation() -> None:
    shape = KvShape(layers=2, kv_heads=1, head_dim=64, dtype="float16")  # 512 B per token
    plan = plan_budget(shape, gpu())
    # 10 GiB x 0.5 - 1 - 1 = 3 GiB of KV cache; 3 GiB / 512 B = 6,291,456 tokens
    assert plan.kv_tokens_per_gpu == 3 * GIB // 512 == 6_291_456
    assert plan.text_reserve_tokens == 4 * (100 + 16)
    assert plan.headroom_tokens == 125_830  # 2 % of the cache, rounded up
    assert plan.capacity_per_gpu == 6_291_456 - 464 - 125_830
    assert plan.capacity == 2 * plan.capacity_per_gpu
    assert any("6,291,456 - 464 - 125,830 = 6,165,162" in line for line in plan.lines)
    assert any("6,165,162 per GPU x 2 = 12,330,324" in line for line in plan.lines)


def test_a_plan_from_the_kv_cache_bytes_is_the_pool_the_worker_computes_from_the_same_cache() -> None:
    """`budget plan` and the worker at start share `pool_capacity`: from equal KV tokens, equal capacities."""
    shape = KvShape(layers=2, kv_heads=1, head_dim=64, dtype="bfloat16")
    plan = plan_budget(shape, GpuPlanInputs(kv_cache_bytes=256 * 2**20, max_num_seqs=121, text_tokens_per_seq=2_164))
    assert plan.kv_tokens_per_gpu == 524_288
    worker = pool_capacity(524_288, block_size=16, max_num_seqs=121, text_tokens_per_seq=2_164)
    assert worker.capacity == plan.capacity_per_gpu == 524_288 - 121 * (2_164 + 16) - 10_486


def test_a_plan_needs_memory_or_kv_bytes() -> None:
    with pytest.raises(PlanError, match="needs the GPU's memory or the KV cache bytes"):
        plan_budget(KvShape(layers=2, kv_heads=1, head_dim=64, dtype="float16"), GpuPlanInputs(max_num_seqs=1,
                    text_tokens_per_seq=1))  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"weights_gib": 4.5}, "nothing left for the KV cache"),
        ({"text_tokens_per_seq": 2_000_000}, "fill the KV cache"),
    ],
)
def test_plans_that_leave_no_room(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_budget(KvShape(layers=2, kv_heads=1, head_dim=64, dtype="float16"), gpu(**overrides))


def test_kv_usage_is_read_per_engine_from_the_prometheus_text() -> None:
    assert kv_cache_usage(VLLM_METRICS) == [0.25, 0.75]
    assert kv_cache_usage("# TYPE other gauge\nother 1.0\n") == []


def test_correction_fills_the_target_at_the_costliest_observed_ratio() -> None:
    samples = [UsageSample(in_use=1_000, kv_usage=0.2), UsageSample(in_use=1_000, kv_usage=0.5)]
    capacity, reason = corrected_capacity(samples, target_usage=0.9)
    assert capacity == 1_800  # 0.9 x 1,000 / 0.5
    assert "costliest of 2 samples" in reason


def test_correction_needs_a_working_pool() -> None:
    with pytest.raises(PlanError, match="while the pool works"):
        corrected_capacity([UsageSample(in_use=0, kv_usage=0.3), UsageSample(in_use=10, kv_usage=0.0)], 0.9)


def test_a_worker_sizes_its_pool_from_its_engines_kv_cache() -> None:
    kv = KvCache(tokens=990_000, block_size=16, max_num_seqs=228)
    pool = engine_pool_capacity(kv, None, 2_164)
    assert pool.capacity == 990_000 - 228 * (2_164 + 16) - 19_800 == 473_160
    assert pool.lines[0].startswith("KV cache            990,000 tokens in blocks of 16")
    lowered = engine_pool_capacity(kv, 100_000, 2_164)
    assert lowered.capacity == 100_000 and "configured" in lowered.lines[-1]
    above = engine_pool_capacity(kv, 10**12, 2_164)
    assert above.capacity == 10**12 and "may have to preempt" in above.lines[-1]
    assert engine_pool_capacity(None, None, 2_164).capacity == UNBOUNDED_CAPACITY
    assert engine_pool_capacity(None, 4_096, 2_164).capacity == 4_096


def test_pools_are_named_per_gpu_unless_named_outright() -> None:
    base = load_settings()
    on = base.model_copy(
        update={
            "budget": base.budget.model_copy(update={"pool": None, "node": "gpu-node-3"}),
            "engine": base.engine.model_copy(update={"device_index": 2}),
        }
    )
    assert pool_name(on) == "gpu-node-3:gpu2"
    assert (
        pool_name(on.model_copy(update={"budget": on.budget.model_copy(update={"node": None})}), host="h") == "h:gpu2"
    )
    assert pool_name(on.model_copy(update={"budget": on.budget.model_copy(update={"pool": "shared"})})) == "shared"
