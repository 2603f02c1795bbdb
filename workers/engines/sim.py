"""A simulated H100 behind the engine protocol (`engine.kind=sim`): a benchmark instrument, never a default.

It lets the whole worker (Kafka, Redis leases, S3, image decoding) be measured against a GPU's pace on a machine
without one: requests are scheduled by workers.engines.sim_model (vLLM v1's continuous batching, preemption
included, on a KV cache of 0.99 M tokens) and each answer comes back when the simulated GPU would have produced
it. The answer itself is the smallest instance of the request's JSON Schema, as InstantEngine gives; token
counts are the model's: vision tokens exactly (workers.tokens on the image sizes it receives), text from its
bytes, and an answer length drawn from the request (sim_model.answer_tokens), so the same requests take the
same time in the worker and in `sim_model.run_offline`.

Time: the model runs in virtual time, tied to the wall clock by `engine.sim.time_scale` (wall seconds per
simulated second). After each step the engine sleeps until the wall clock reaches the step's end; a request
arrives at the wall clock's present. When the event loop falls behind, steps run back to back until the simulated
GPU is on time again, as vLLM's engine core (a process of its own) keeps computing while the worker is busy; a
request never starts in a step that ended before it arrived.

Counters (steps, preemptions, simulated busy time, the CPU time the model itself used, the first arrival and the
last finish in simulated seconds) are written as JSON to `engine.sim.stats_path` when the engine closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from schemas.settings import Settings
from workers.engines.base import EngineOutput, EngineRequest, KvCache
from workers.engines.instant import minimal_instance
from workers.engines.sim_model import (
    SIM_H100,
    SimFinish,
    SimHardware,
    SimRequest,
    SimScheduler,
    answer_tokens,
    text_tokens,
)
from workers.limits import GPU_MAX_NUM_BATCHED_TOKENS, EngineLimits, text_tokens_bound
from workers.tokens import image_tokens

log = logging.getLogger("vlmflow.sim")


def sim_hardware(settings: Settings) -> SimHardware:
    """The first-principles H100, or the figures of `engine.sim.calibration_path` where one is given."""
    path = settings.engine.sim.calibration_path
    if path is None:
        return SIM_H100
    return SimHardware.model_validate({**SIM_H100.model_dump(), **json.loads(path.read_text())})


def sim_request(
    request_id: str, prompt: str, sizes: Sequence[tuple[int, int]], max_tokens: int, settings: Settings
) -> SimRequest:
    """The token counts of one request, from its prompt text and image sizes: exact vision tokens, text from its
    bytes, an answer length from its content (the same request always gets the same length)."""
    model = settings.model
    vision = tuple(
        image_tokens(width, height, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels)
        for width, height in sizes
    )
    # NOTE: seeded by the vision tokens, not the sizes: an image resized to its final size keeps its tokens.
    seed = zlib.crc32(f"{prompt}|{vision}".encode())
    return SimRequest(
        request_id=request_id,
        image_tokens=vision,
        text_tokens=text_tokens(text_tokens_bound(prompt)),
        output_tokens=min(max_tokens, answer_tokens(seed)),
    )


class SimEngine:
    """The simulated H100, stepped in an asyncio task paced by the wall clock."""

    def __init__(self, settings: Settings, limits: EngineLimits):
        self.settings = settings
        self.limits = limits
        self.time_scale = settings.engine.sim.time_scale
        self.scheduler = SimScheduler(
            sim_hardware(settings),
            max_num_seqs=limits.max_num_seqs,
            max_num_batched_tokens=limits.max_num_batched_tokens or GPU_MAX_NUM_BATCHED_TOKENS,
            max_image_tokens=limits.image_tokens,
        )
        self._pending: dict[str, asyncio.Future[SimFinish]] = {}  # request id -> its caller's future
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wall_origin = 0.0
        self._model_cpu_s = 0.0
        self._first_arrival_s: float | None = None
        self._last_finish_s: float | None = None
        self._finished = 0
        self._next_id = 0

    async def start(self) -> None:
        """Start the clock; nothing to load."""
        self._wall_origin = time.monotonic()
        self._task = asyncio.create_task(self._loop(), name="sim engine")

    def kv_cache(self) -> KvCache | None:
        return KvCache(self.scheduler.kv_tokens, self.scheduler.hardware.block_size, self.scheduler.max_num_seqs)

    def _virtual_now(self) -> float:
        return (time.monotonic() - self._wall_origin) / self.time_scale

    async def generate(self, request: EngineRequest) -> EngineOutput:
        """Queue the request and wait until the simulated GPU finished it."""
        if self._task is None:
            raise RuntimeError("SimEngine.generate() called before start()")
        self._next_id += 1
        sizes = [image.size for image in request.images]
        simulated = sim_request(f"sim-{self._next_id}", request.prompt, sizes, request.max_tokens, self.settings)
        if simulated.prompt_tokens + simulated.output_tokens > self.limits.max_model_len:
            raise ValueError(
                f"the prompt ({simulated.prompt_tokens} tokens) and output exceed max_model_len"
                f" {self.limits.max_model_len}"
            )
        started = time.perf_counter()
        future: asyncio.Future[SimFinish] = asyncio.get_running_loop().create_future()
        self._pending[simulated.request_id] = future
        arrival_s = self._virtual_now()
        if self.scheduler.idle:
            self.scheduler.idle_until(arrival_s)
        if self._first_arrival_s is None:
            self._first_arrival_s = arrival_s
        self.scheduler.add(simulated, arrival_s)
        self._wake.set()
        try:
            finish = await future
        except asyncio.CancelledError:
            self._pending.pop(simulated.request_id, None)
            self.scheduler.abort(simulated.request_id)
            raise
        latency_s = time.perf_counter() - started
        answer = {} if request.json_schema is None else minimal_instance(request.json_schema)
        return EngineOutput(
            text=json.dumps(answer, separators=(",", ":")),
            parsed_json=answer,
            num_prompt_tokens=simulated.prompt_tokens,
            num_completion_tokens=simulated.output_tokens,
            num_image_tokens=sum(simulated.image_tokens),
            finish_reason="stop",
            time_to_first_token_s=max(0.0, latency_s - (finish.finished_s - finish.first_token_s) * self.time_scale),
            latency_s=latency_s,
        )

    async def _loop(self) -> None:
        """Step while there is work, sleeping after each step until the wall clock reaches its end."""
        while True:
            if self.scheduler.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            cpu_started = time.thread_time()
            outcome = self.scheduler.step()
            self._model_cpu_s += time.thread_time() - cpu_started
            if outcome is None:
                continue
            # NOTE: sleeps even when behind (0 s): catching up must not keep the event loop from the worker.
            await asyncio.sleep(max(0.0, self._wall_origin + self.scheduler.now_s * self.time_scale - time.monotonic()))
            for finish in outcome.finished:
                self._finished += 1
                self._last_finish_s = finish.finished_s
                future = self._pending.pop(finish.request.request_id, None)
                if future is not None and not future.done():
                    future.set_result(finish)

    def stats(self) -> dict[str, Any]:
        """The counters the benchmark reads."""
        return {
            "steps": self.scheduler.steps,
            "preemptions": self.scheduler.preemptions,
            "finished": self._finished,
            "busy_s": self.scheduler.busy_s,
            "model_cpu_s": self._model_cpu_s,
            "first_arrival_s": self._first_arrival_s,
            "last_finish_s": self._last_finish_s,
            "time_scale": self.time_scale,
            "kv_tokens": self.scheduler.kv_tokens,
            "max_num_seqs": self.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
        }

    async def close(self) -> None:
        """Stop the clock, fail what is still queued, and write the counters."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the simulated engine closed"))
        self._pending.clear()
        path = self.settings.engine.sim.stats_path
        if path is not None:
            path.write_text(json.dumps(self.stats()))
            log.info("sim stats written to %s", path)
