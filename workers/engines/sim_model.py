"""A model of vLLM's v1 continuous batching on one H100 serving Qwen2-VL-7B in bf16, in virtual time (no I/O).

Scheduling, as `vllm/v1/core/sched/scheduler.py` does it for one engine with chunked prefill:
- Each step has a budget of `max_num_batched_tokens` tokens. Running requests go first, in the order they
  started: a decoding one takes 1 token, a prefilling one the next chunk of its prompt. Then, if no request was
  preempted in this step, waiting requests join in arrival order while the budget lasts, fewer than
  `max_num_seqs` run, and the KV cache has blocks for their first chunk.
- The KV cache holds `kv_tokens` in blocks of `block_size`; a request holds the blocks of the tokens it has
  computed. When a running request needs a block and none is free, the request that started last is preempted:
  its blocks are freed and it goes back to the head of the queue, to be computed again from its first token
  (vLLM's RECOMPUTE mode), its images encoded again.
- The vision encoder takes at most max(`max_num_batched_tokens`, the largest image) vision tokens per step and
  encodes an image whole in the step whose chunk reaches its first placeholder; a chunk stops short of an image
  the encoder cannot take in this step.

Time of one step (a roofline: the step is as slow as the slower of its arithmetic and its memory traffic):
    overhead + max(FLOP / (peak x compute efficiency), bytes / (HBM bandwidth x memory efficiency))
    FLOP  = tokens x 2 x LLM parameters + attention 4 x layers x hidden x token x context
            + vision tokens x patches per token x 2 x vision parameters
    bytes = the weights, once per step, + the KV cache every scheduled request reads (its context)

First-principles figures (`SIM_H100`), Qwen2-VL-7B-Instruct in bf16 on one H100 SXM 80 GB:
- LLM: 7.6 B parameters (Qwen2-7B), 2 FLOP each per token: 15.2 GFLOP per token; attention 4 x 28 layers x 3,584
  hidden = 401,408 FLOP per token per context token.
- Vision tower: 675 M parameters; each vision (LLM) token is 2 x 2 = 4 patches of 14 px, so 4 x 2 x 675 M =
  5.4 GFLOP per vision token (its attention left out).
- Dense bf16 peak 989 TFLOP/s (NVIDIA's H100 SXM datasheet, without sparsity), at 50 % efficiency: what large
  vLLM prefills reach (40-60 % MFU).
- HBM3 3.35 TB/s at 80 % efficiency; 15.4 GB of weights read once per step; 57,344 B of KV per token of context
  (2 x 28 layers x 4 KV heads x 128 x 2 B).
- KV cache 0.99 M tokens: 80 GiB x 0.90 - 15.4 GB weights - ~2 GiB activations, / 57,344 B (`vlmflow budget plan`).
- 2 ms of host work per step (scheduling, input preparation, sampling), which vLLM v1 partly overlaps.
None of these has been measured on a GPU yet: `bench/gpu/calibrate.py` measures them, and its output can replace
them (`engine.sim.calibration_path`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from workers.limits import MARKERS_PER_IMAGE


class SimHardware(BaseModel):
    """The figures the step time is computed from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    peak_flops: Annotated[float, Field(gt=0)] = 989e12
    """Dense bf16 FLOP/s of the GPU."""
    compute_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.5
    hbm_bytes_per_s: Annotated[float, Field(gt=0)] = 3.35e12
    memory_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.8
    weight_bytes: Annotated[float, Field(ge=0)] = 15.4e9
    """Read once per step."""
    kv_bytes_per_token: Annotated[int, Field(ge=1)] = 57_344
    kv_tokens: Annotated[int, Field(ge=1)] = 990_000
    block_size: Annotated[int, Field(ge=1)] = 16
    flops_per_llm_token: Annotated[float, Field(ge=0)] = 15.2e9
    attention_flops_per_context_token: Annotated[float, Field(ge=0)] = 4 * 28 * 3_584
    """Per token of a chunk and per token of context it attends to."""
    flops_per_vision_token: Annotated[float, Field(ge=0)] = 4 * 2 * 675e6
    step_overhead_s: Annotated[float, Field(ge=0)] = 0.002

    def step_seconds(self, llm_tokens: int, attention_pairs: float, vision_tokens: int, kv_read_tokens: int) -> float:
        """The time of one step that computes `llm_tokens`, attends over `attention_pairs` (token, context) pairs,
        encodes `vision_tokens` and reads `kv_read_tokens` of KV cache."""
        flop = (
            llm_tokens * self.flops_per_llm_token
            + attention_pairs * self.attention_flops_per_context_token
            + vision_tokens * self.flops_per_vision_token
        )
        traffic = self.weight_bytes + kv_read_tokens * self.kv_bytes_per_token
        compute_s = flop / (self.peak_flops * self.compute_efficiency)
        memory_s = traffic / (self.hbm_bytes_per_s * self.memory_efficiency)
        return self.step_overhead_s + max(compute_s, memory_s)


SIM_H100 = SimHardware()
"""First principles only (the module docstring cites each figure)."""
IMAGE_OFFSET = 14
"""Tokens of the chat template before the first image (the system turn and `<|im_start|>user\\n`)."""


@dataclass(frozen=True)
class SimRequest:
    """One request as the simulated engine sees it: token counts only."""

    request_id: str
    image_tokens: tuple[int, ...]
    # Tokens of the prompt besides images and their markers: the chat template and the prompt text.
    text_tokens: int
    # Tokens it generates before it stops (at least 1).
    output_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + sum(tokens + MARKERS_PER_IMAGE for tokens in self.image_tokens)

    def image_spans(self) -> list[tuple[int, int]]:
        """(first placeholder position, placeholders) of each image, after `IMAGE_OFFSET` template tokens."""
        spans, position = [], min(IMAGE_OFFSET, self.text_tokens)
        for tokens in self.image_tokens:
            spans.append((position + 1, tokens))
            position += tokens + MARKERS_PER_IMAGE
        return spans


@dataclass(frozen=True)
class SimFinish:
    """A request that finished, with virtual times."""

    request: SimRequest
    first_token_s: float
    finished_s: float
    preemptions: int
    """Times this request was preempted and computed again."""


@dataclass(eq=False)
class _Seq:
    """A request's progress; compared by identity."""

    request: SimRequest
    spans: list[tuple[int, int]]
    arrival_s: float
    computed: int = 0
    generated: int = 0
    blocks: int = 0
    encoded: set[int] = field(default_factory=set)
    first_token_s: float | None = None
    preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.request.prompt_tokens + self.generated


@dataclass(frozen=True)
class StepOutcome:
    """What one step did."""

    seconds: float
    finished: list[SimFinish]
    scheduled_tokens: int
    vision_tokens: int
    running: int
    preempted: int


class SimScheduler:
    """Requests in, steps out: the books of a simulated engine, advanced one step at a time by the caller."""

    def __init__(self, hardware: SimHardware, *, max_num_seqs: int, max_num_batched_tokens: int, max_image_tokens: int):
        self.hardware = hardware
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.encoder_budget = max(max_num_batched_tokens, max_image_tokens)
        self.total_blocks = hardware.kv_tokens // hardware.block_size
        self.free_blocks = self.total_blocks
        self.now_s = 0.0
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.steps = 0
        self.preemptions = 0
        self.busy_s = 0.0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def kv_tokens(self) -> int:
        """The cache in whole blocks, as vLLM reports it."""
        return self.total_blocks * self.hardware.block_size

    def add(self, request: SimRequest, arrival_s: float = 0.0) -> None:
        """Queue `request`; it is not scheduled before `arrival_s` (a caller running behind the clock adds requests
        it received later than the steps it has yet to run: they must not start in those steps)."""
        if request.output_tokens < 1:
            raise ValueError(f"{request.request_id}: a request generates at least one token")
        self.waiting.append(_Seq(request, request.image_spans(), arrival_s))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (its caller gave up), freeing its blocks, as vLLM's abort does."""
        for seq in [*self.waiting, *self.running]:
            if seq.request.request_id == request_id:
                if seq in self.running:
                    self.running.remove(seq)
                    self.free_blocks += seq.blocks
                else:
                    self.waiting.remove(seq)
                return

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.hardware.block_size)

    def _chunk(self, seq: _Seq, tokens: int, encoder_left: int) -> tuple[int, list[int], int]:
        """The tokens of `seq` to compute now (at most `tokens`), the images to encode with them, and their tokens:
        the chunk stops before an image the encoder budget cannot take."""
        start, end = seq.computed, seq.computed + tokens
        images: list[int] = []
        vision = 0
        for index, (offset, length) in enumerate(seq.spans):
            if index in seq.encoded or offset >= end or offset + length <= start:
                continue
            if vision + length > encoder_left:
                return max(0, offset - start), images, vision
            images.append(index)
            vision += length
        return tokens, images, vision

    def _preempt_last(self) -> _Seq:
        victim = self.running.pop()
        self.free_blocks += victim.blocks
        victim.blocks, victim.computed, victim.encoded = 0, 0, set()
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def step(self) -> StepOutcome | None:
        """Schedule and run one step; None when nothing can run (no requests)."""
        if self.idle:
            return None
        if not self.running and self.waiting[0].arrival_s > self.now_s:
            self.now_s = self.waiting[0].arrival_s  # NOTE: the engine is idle until the next request arrives.
        budget, encoder_left, preempted = self.max_num_batched_tokens, self.encoder_budget, 0
        scheduled: list[tuple[_Seq, int, list[int]]] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            tokens, images, vision = self._chunk(seq, min(seq.num_tokens - seq.computed, budget), encoder_left)
            index += 1
            if not tokens:
                continue
            need = self._blocks_for(seq.computed + tokens) - seq.blocks
            victim = None
            while need > self.free_blocks and victim is not seq:
                victim = self._preempt_last()
                preempted += 1
            if victim is seq:
                break  # NOTE: as vLLM: the request could only be kept by preempting itself; the step stops here.
            seq.blocks += need
            self.free_blocks -= need
            budget -= tokens
            encoder_left -= vision
            scheduled.append((seq, tokens, images))
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.arrival_s > self.now_s:
                break
            tokens, images, vision = self._chunk(seq, min(seq.num_tokens, budget), encoder_left)
            need = self._blocks_for(tokens)
            if not tokens or need > self.free_blocks:
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.blocks, self.free_blocks = need, self.free_blocks - need
            budget -= tokens
            encoder_left -= vision
            scheduled.append((seq, tokens, images))
        assert budget >= 0 and encoder_left >= 0 and self.free_blocks >= 0, "a step over its budgets"
        return self._run(scheduled, preempted)

    def _run(self, scheduled: list[tuple[_Seq, int, list[int]]], preempted: int) -> StepOutcome:
        """Advance the clock by the step's time and apply what it computed."""
        llm_tokens = sum(tokens for _, tokens, _ in scheduled)
        vision_tokens = sum(seq.spans[i][1] for seq, _, images in scheduled for i in images)
        seconds = self.hardware.step_seconds(
            llm_tokens=llm_tokens,
            attention_pairs=sum(tokens * (seq.computed + tokens / 2) for seq, tokens, _ in scheduled),
            vision_tokens=vision_tokens,
            kv_read_tokens=sum(seq.computed + tokens for seq, tokens, _ in scheduled),
        )
        self.now_s += seconds
        self.busy_s += seconds
        self.steps += 1
        finished = []
        for seq, tokens, images in scheduled:
            seq.computed += tokens
            seq.encoded.update(images)
            if seq.computed < seq.num_tokens:
                continue
            seq.generated += 1
            if seq.first_token_s is None:
                seq.first_token_s = self.now_s
            if seq.generated >= seq.request.output_tokens:
                self.running.remove(seq)
                self.free_blocks += seq.blocks
                finished.append(SimFinish(seq.request, seq.first_token_s, self.now_s, seq.preemptions))
        return StepOutcome(seconds, finished, llm_tokens, vision_tokens, len(self.running), preempted)

    def idle_until(self, now_s: float) -> None:
        """Let virtual time pass without work (an engine waiting for requests)."""
        self.now_s = max(self.now_s, now_s)


@dataclass(frozen=True)
class OfflineRun:
    """All requests given at once and run to the end, as vLLM's offline `LLM.generate` does."""

    finishes: list[SimFinish]
    seconds: float
    steps: int
    preemptions: int

    @property
    def jobs_per_s(self) -> float:
        """Requests per second between the first and the last to finish (the rate once the engine is full)."""
        times = sorted(finish.finished_s for finish in self.finishes)
        return (len(times) - 1) / max(1e-9, times[-1] - times[0])


def run_offline(
    requests: list[SimRequest], hardware: SimHardware, *, max_num_seqs: int, max_num_batched_tokens: int,
    max_image_tokens: int, capacity: int | None = None,
) -> OfflineRun:  # fmt: skip
    """Every request at time 0, stepped until all finished. With `capacity`, they wait in order behind a budget of
    that many vision tokens, each joining the engine once its vision tokens fit and giving them back when it
    finishes (what the worker's admission does); without, all join at once (admission off)."""
    scheduler = SimScheduler(
        hardware,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_image_tokens=max_image_tokens,
    )
    queued, leased = deque(requests), 0
    finishes: list[SimFinish] = []
    while queued or not scheduler.idle:
        while queued and (capacity is None or leased + sum(queued[0].image_tokens) <= capacity):
            request = queued.popleft()
            leased += sum(request.image_tokens)
            scheduler.add(request, scheduler.now_s)
        outcome = scheduler.step()
        if outcome is None:
            raise RuntimeError(f"{queued[0].request_id} can never fit the budget of {capacity} vision tokens")
        if outcome.scheduled_tokens == 0 and not outcome.finished:
            raise RuntimeError("the simulated engine cannot make progress: a request is larger than its KV cache")
        finishes.extend(outcome.finished)
        leased -= sum(sum(finish.request.image_tokens) for finish in outcome.finished)
    return OfflineRun(finishes, scheduler.now_s, scheduler.steps, scheduler.preemptions)


def answer_tokens(seed: int, low: int = 24, high: int = 200) -> int:
    """A JSON answer's length in tokens, spread evenly over [low, high] by `seed`: the same request always gets
    the same length, in the worker and in the offline reference."""
    return low + seed % (high - low + 1)


def text_tokens(prompt_text_bytes: int, template_tokens: int = 20, bytes_per_token: float = 4.0) -> int:
    """Tokens of the chat template and a prompt text: Qwen2's tokenizer averages about 4 bytes of English per token;
    its chat template around one user turn is 20 tokens."""
    return template_tokens + math.ceil(prompt_text_bytes / bytes_per_token)
