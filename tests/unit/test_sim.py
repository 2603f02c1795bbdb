"""The simulated H100: vLLM-style continuous batching in virtual time, its step times, and the engine around it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas.settings import load_settings
from schemas.tasks import task_schema
from workers.capacity import pool_capacity
from workers.engines.base import EngineRequest
from workers.engines.sim import SimEngine, sim_request
from workers.engines.sim_model import SIM_H100, SimHardware, SimRequest, SimScheduler, run_offline
from workers.limits import derive_limits


def request(name: str, images: tuple[int, ...] = (1_000,), text: int = 60, output: int = 100) -> SimRequest:
    return SimRequest(name, images, text, output)


def test_first_principles_step_times() -> None:
    """A decode step of one sequence reads the weights; a full prefill step is compute-bound."""
    decode = SIM_H100.step_seconds(llm_tokens=1, attention_pairs=1_000, vision_tokens=0, kv_read_tokens=1_000)
    weights_s = 15.4e9 / (3.35e12 * 0.8)
    assert decode == pytest.approx(0.002 + weights_s + 1_000 * 57_344 / (3.35e12 * 0.8), rel=1e-6)
    prefill = SIM_H100.step_seconds(llm_tokens=8_192, attention_pairs=0, vision_tokens=0, kv_read_tokens=0)
    assert prefill == pytest.approx(0.002 + 8_192 * 15.2e9 / (989e12 * 0.5), rel=1e-6)
    image = SIM_H100.step_seconds(llm_tokens=0, attention_pairs=0, vision_tokens=1_000, kv_read_tokens=0)
    assert image - 0.002 == pytest.approx(max(1_000 * 5.4e9 / (989e12 * 0.5), weights_s), rel=1e-6)


def test_decode_steps_grow_with_the_batch() -> None:
    times = [
        SIM_H100.step_seconds(llm_tokens=batch, attention_pairs=batch * 1_200, vision_tokens=0,
                              kv_read_tokens=batch * 1_200)
        for batch in (1, 16, 64, 256)
    ]  # fmt: skip
    assert times == sorted(times) and len(set(times)) == 4
    # batch 256 at 1,200 tokens of context reads 17.6 GB of KV besides the 15.4 GB of weights: memory-bound
    assert times[-1] == pytest.approx(0.002 + (15.4e9 + 256 * 1_200 * 57_344) / (3.35e12 * 0.8), rel=1e-6)


def scheduler(hardware: SimHardware = SIM_H100, seqs: int = 256, batched: int = 8_192) -> SimScheduler:
    return SimScheduler(hardware, max_num_seqs=seqs, max_num_batched_tokens=batched, max_image_tokens=1_280)


def test_steps_keep_to_the_token_and_encoder_budgets() -> None:
    books = scheduler(batched=2_048)
    for index in range(20):
        books.add(request(f"r{index}", images=(1_280, 1_280, 1_280, 1_280), output=5))
    finished = []
    while (outcome := books.step()) is not None:
        assert outcome.scheduled_tokens <= 2_048
        assert outcome.vision_tokens <= 2_048
        finished += [finish.request.request_id for finish in outcome.finished]
    assert sorted(finished) == sorted(f"r{index}" for index in range(20))


def test_at_most_max_num_seqs_run_at_once() -> None:
    books = scheduler(seqs=3)
    for index in range(10):
        books.add(request(f"r{index}"))
    while (outcome := books.step()) is not None:
        assert outcome.running <= 3


def test_a_full_kv_cache_preempts_the_latest_and_recomputes_it() -> None:
    tiny = SimHardware(kv_tokens=1_600, block_size=16)
    books = scheduler(tiny)
    for name in ("first", "second"):
        books.add(request(name, images=(500,), text=20, output=600))
    order = []
    while (outcome := books.step()) is not None:
        assert books.free_blocks >= 0
        order += [(finish.request.request_id, finish.preemptions) for finish in outcome.finished]
    assert books.preemptions >= 1
    assert order[0] == ("first", 0) and order[1][0] == "second" and order[1][1] >= 1


def test_an_offline_run_serves_every_request_once_and_reproducibly() -> None:
    requests = [request(f"r{index}", images=(200 + 37 * index,), output=1 + index % 50) for index in range(200)]
    first = run_offline(requests, SIM_H100, max_num_seqs=64, max_num_batched_tokens=8_192, max_image_tokens=1_280)
    again = run_offline(requests, SIM_H100, max_num_seqs=64, max_num_batched_tokens=8_192, max_image_tokens=1_280)
    assert sorted(finish.request.request_id for finish in first.finishes) == sorted(r.request_id for r in requests)
    assert first == again
    assert first.jobs_per_s > 0 and first.preemptions == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(4, 1_280), st.integers(1, 1_024)), min_size=1, max_size=60))
def test_leases_within_the_pools_capacity_never_make_the_engine_preempt(
    jobs: list[tuple[int, int, int]],
) -> None:
    """The budget's promise: jobs whose vision tokens fit the pool's capacity, run by an engine of the derived
    max_num_seqs, always fit its KV cache, however many images and output tokens they have."""
    base = load_settings()
    hardware = SimHardware(kv_tokens=60_000, block_size=16)
    limits = derive_limits(base, hardware.kv_tokens)
    pool = pool_capacity(
        hardware.kv_tokens, block_size=16, max_num_seqs=limits.max_num_seqs, text_tokens_per_seq=limits.text_reserve
    )
    admitted, leased = [], 0
    for index, (images, per_image, output) in enumerate(jobs):
        vision = images * per_image
        if leased + vision > pool.capacity:
            break
        leased += vision
        text = limits.text_reserve - images * 2 - limits.output_tokens
        admitted.append(SimRequest(f"j{index}", (per_image,) * images, text, output))
    run = run_offline(
        admitted, hardware, max_num_seqs=limits.max_num_seqs, max_num_batched_tokens=8_192, max_image_tokens=1_280
    )
    assert run.preemptions == 0
    assert len(run.finishes) == len(admitted)


def test_requests_take_exact_vision_tokens_and_a_stable_answer_length() -> None:
    base = load_settings()
    simulated = sim_request("a", "Describe it.", [(1024, 768)], 512, base)
    assert simulated.image_tokens == (999,)
    assert simulated == sim_request("a", "Describe it.", [(1036, 756)], 512, base), "resized: same tokens, same length"
    assert 24 <= simulated.output_tokens <= 200
    assert sim_request("b", "Describe it.", [], 3, base).output_tokens == 3


async def test_the_engine_answers_with_schema_valid_json_in_scaled_time(tmp_path: Path) -> None:
    base = load_settings()
    stats = tmp_path / "stats.json"
    settings_ = base.model_copy(
        update={
            "engine": base.engine.model_copy(
                update={"kind": "sim", "sim": base.engine.sim.model_copy(update={"time_scale": 0.01,
                                                                              "stats_path": stats})}
            )
        }
    )  # fmt: skip
    engine = SimEngine(settings_, derive_limits(settings_, SIM_H100.kv_tokens))
    await engine.start()
    kv = engine.kv_cache()
    assert kv is not None and kv.tokens == 990_000 and kv.block_size == 16 and kv.max_num_seqs == 228
    schema = task_schema("caption", None, box_field="box_1000")
    image = Image.new("RGB", (1024, 768))
    outputs = await asyncio.gather(
        *(engine.generate(EngineRequest(prompt=f"Caption {n}.", images=[image], json_schema=schema)) for n in range(8))
    )
    await engine.close()
    for output in outputs:
        jsonschema.validate(output.parsed_json, schema)
        assert output.num_image_tokens == 999 and output.finish_reason == "stop"
        assert output.time_to_first_token_s is not None and output.time_to_first_token_s <= output.latency_s
    counters = json.loads(stats.read_text())
    assert counters["finished"] == 8 and counters["preemptions"] == 0
    assert counters["last_finish_s"] > counters["first_arrival_s"]


async def test_a_cancelled_request_leaves_the_engine() -> None:
    base = load_settings()
    slow = base.model_copy(
        update={"engine": base.engine.model_copy(update={"sim": base.engine.sim.model_copy(update={"time_scale": 50})})}
    )
    engine = SimEngine(slow, derive_limits(slow, SIM_H100.kv_tokens))
    await engine.start()
    task = asyncio.create_task(engine.generate(EngineRequest(prompt="x", images=[Image.new("RGB", (640, 480))])))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.scheduler.idle and engine.scheduler.free_blocks == engine.scheduler.total_blocks
    await engine.close()


def test_a_request_never_starts_before_it_arrived() -> None:
    """A caller behind the clock adds requests late: they must not run in steps that ended before they came."""
    books = scheduler()
    books.add(request("early", output=50))
    books.add(request("late", output=5), arrival_s=2.0)
    first = books.step()
    assert first is not None and first.running == 1, "only the request that has arrived runs"
    finishes = {}
    while (outcome := books.step()) is not None:
        finishes.update({finish.request.request_id: finish for finish in outcome.finished})
    assert finishes["late"].first_token_s > 2.0
    idle = scheduler()
    idle.add(request("alone", output=1), arrival_s=3.0)
    step = idle.step()
    assert step is not None and step.finished[0].finished_s == pytest.approx(3.0 + step.seconds)


async def test_an_engine_behind_the_clock_still_lets_the_worker_run() -> None:
    """Catching up (a step per iteration, no sleep due) must yield: the worker's heartbeats and renewals share
    the event loop."""
    base = load_settings()
    sim = base.engine.sim.model_copy(update={"time_scale": 1e-9})
    fast = base.model_copy(update={"engine": base.engine.model_copy(update={"sim": sim})})
    engine = SimEngine(fast, derive_limits(fast, SIM_H100.kv_tokens))
    await engine.start()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    image = Image.new("RGB", (640, 480))
    await asyncio.gather(*(engine.generate(EngineRequest(prompt=f"{n}", images=[image])) for n in range(20)))
    ticker.cancel()
    steps = engine.scheduler.steps
    await engine.close()
    assert steps > 20 and ticks >= steps // 2, (steps, ticks)


def test_image_heavy_jobs_preempt_without_admission_and_never_with_it() -> None:
    """The worst case of the benchmark: jobs of 4 images of 1,280 tokens and long answers fill the KV cache of an
    engine that takes them all; behind the pool's budget the same engine never preempts and serves them all."""
    hardware = SimHardware(kv_tokens=120_000, block_size=16)
    limits = derive_limits(load_settings(), hardware.kv_tokens)
    pool = pool_capacity(
        hardware.kv_tokens, block_size=16, max_num_seqs=limits.max_num_seqs, text_tokens_per_seq=limits.text_reserve
    )
    jobs = [SimRequest(f"j{index}", (1_280,) * 4, 80, 512) for index in range(60)]
    shape = {"max_num_seqs": limits.max_num_seqs, "max_num_batched_tokens": 8_192, "max_image_tokens": 1_280}
    taken = run_offline(jobs, hardware, **shape)
    admitted = run_offline(jobs, hardware, capacity=pool.capacity, **shape)
    assert taken.preemptions > 0
    assert admitted.preemptions == 0 and len(admitted.finishes) == 60
