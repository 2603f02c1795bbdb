"""The engine's limits, derived from the settings and checked against each other before a worker takes work, and
the check that keeps a job the engine cannot hold from ever reaching it.

A job occupies the engine's context and KV cache with
    its vision tokens            exact (workers.tokens), at most `max_pixels` / factor² per image,
    2 markers per image          <|vision_start|> and <|vision_end|> around each image's placeholders,
    the chat template            the system turn and the role markers around one user turn,
    its prompt text              the task instruction and the job's own prompt,
    its output                   at most the job's `max_output_tokens`.
Text is bounded, not counted: Qwen-family tokenizers are byte-level BPE over NFC-normalized text, so a text of
N UTF-8 bytes (after NFC) is at most N tokens. The worker needs no tokenizer, and the bound never undercounts.

Invariants this module keeps:
- `derive_limits` refuses (`LimitsConflict`, one line) unless `max_model_len` holds the largest job the settings
  allow: `limit_images_per_prompt` images at `max_pixels`, `max_prompt_tokens` of text and `max_output_tokens`.
  So every job that passes `check_job` fits the context: no job is refused by the engine (`engine_error`).
- `check_job` refuses a job whose text or output is over the room every sequence is guaranteed
  (`TooManyTokens`, error code `too_many_tokens`), before its images are even loaded.
- `max_num_seqs` is chosen so that the text of that many sequences takes at most `TEXT_SHARE` of the KV cache;
  the rest is the budget's, in vision tokens (workers.capacity.pool_capacity). With leases never above the
  capacity, the sequences the engine runs always fit its KV cache: vLLM never has to preempt.

`max_num_batched_tokens` on CUDA is 8,192 (`GPU_MAX_NUM_BATCHED_TOKENS`, see there for why).
"""

from __future__ import annotations

import math
import unicodedata
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from schemas.errors import ErrorCode, VlmflowError
from schemas.settings import Settings
from workers.engines.base import KvCache
from workers.tokens import vision_spec

CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
)
"""The text Qwen2-VL's chat template puts around one user turn (Qwen2.5-VL's is the same, Qwen3-VL's shorter)."""
CHAT_TEMPLATE_TOKENS = len(CHAT_TEMPLATE.encode())
"""At most one token per byte: 108."""
MARKERS_PER_IMAGE = 2
"""<|vision_start|> and <|vision_end|>: the image's placeholders sit between them."""
GPU_MAX_NUM_BATCHED_TOKENS = 8_192
"""Tokens per engine step on CUDA. vLLM's `AsyncLLM` falls back to 2,048, and its vision encoder takes as many
tokens per step as the step does (at least one image): 2,048 encodes one 1,280-token image per step and spreads
a 4-image job's prefill over four steps, each paying the weight reads and launch costs again. 8,192 is vLLM's own
H100 default for serving (16,384 for offline batches): a whole 4-image job (5,128 vision tokens) and its text in
one step, 6 large images per encoder pass. Larger steps gain little once prefill is compute-bound (a step of
8,192 tokens is ~125 TFLOP, 0.25 s at half the H100's peak), and every running sequence waits for the step to
end before its next token: 16,384 would double that wait for no throughput."""
NO_KV_IN_FLIGHT = 16
"""Jobs in flight at once for an engine without a KV cache (the instant engine answers at once)."""
MAX_NUM_SEQS: dict[str, int] = {"cuda": 1_024, "cpu": 256}
"""The most sequences at once whatever the KV cache holds: vLLM's own defaults for an H100 and for CPU."""
TEXT_SHARE = 0.5
"""The share of the KV cache kept for the text (prompt and output) of the sequences the engine runs at once;
the rest is the vision budget. Half: with the defaults' room of 2,164 text tokens per sequence this gives an
H100 (0.99 M KV tokens) 228 sequences and about 0.47 M vision tokens, a few hundred one-image jobs in flight."""


class LimitsConflict(VlmflowError):
    """The settings contradict each other: the worker must not start."""


class TooManyTokens(VlmflowError):
    """This job can never be served by the engine as configured."""

    code: ClassVar[ErrorCode] = "too_many_tokens"


class EngineLimits(BaseModel):
    """What the engine is started with and what each job may bring, all in tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_model_len: int
    max_num_batched_tokens: int | None
    """None: the engine's own default (vLLM on CPU)."""
    max_num_seqs: int
    images_per_job: int
    image_tokens: int
    """The most vision tokens of one image (at `max_pixels`)."""
    prompt_tokens: int
    """Room for the prompt text of one job (`engine.max_prompt_tokens`)."""
    output_tokens: int
    """The most output tokens one job may ask for (`engine.max_output_tokens`)."""

    @property
    def text_reserve(self) -> int:
        """KV tokens a sequence may hold besides its vision tokens: markers, template, prompt and output."""
        return self.images_per_job * MARKERS_PER_IMAGE + CHAT_TEMPLATE_TOKENS + self.prompt_tokens + self.output_tokens

    @property
    def largest_job(self) -> int:
        """Tokens of the largest job the settings allow."""
        return self.images_per_job * self.image_tokens + self.text_reserve


def text_tokens_bound(text: str) -> int:
    """The most tokens `text` can become: its UTF-8 bytes after NFC normalization."""
    return len(unicodedata.normalize("NFC", text).encode())


def largest_image_tokens(settings: Settings) -> int:
    """Vision tokens of the largest image: `smart_resize` keeps h x w at or below `max_pixels`."""
    spec = vision_spec(settings.model.family)
    max_pixels = spec.max_pixels if settings.model.max_pixels is None else settings.model.max_pixels
    return max(1, max_pixels // spec.factor**2)


def derive_limits(settings: Settings, planned_kv_tokens: int | None) -> EngineLimits:
    """The engine's limits from the settings; `planned_kv_tokens` (the KV cache the engine is expected to get, None
    when unknown) sizes `max_num_seqs` when the settings leave it open. Raises `LimitsConflict` with one line."""
    engine = settings.engine
    draft = EngineLimits(
        max_model_len=engine.max_model_len,
        max_num_batched_tokens=engine.max_num_batched_tokens
        or (GPU_MAX_NUM_BATCHED_TOKENS if engine.device == "cuda" else None),
        max_num_seqs=1,
        images_per_job=engine.limit_images_per_prompt,
        image_tokens=largest_image_tokens(settings),
        prompt_tokens=engine.max_prompt_tokens,
        output_tokens=engine.max_output_tokens,
    )
    if draft.largest_job > draft.max_model_len:
        raise LimitsConflict(
            f"engine.max_model_len {draft.max_model_len:,} cannot hold the largest job the settings allow:"
            f" {draft.images_per_job} images x {draft.image_tokens:,} tokens (model.max_pixels)"
            f" + {draft.text_reserve:,} text (markers, template, engine.max_prompt_tokens, engine.max_output_tokens)"
            f" = {draft.largest_job:,};"
            " raise max_model_len or lower one of the others"
        )
    return draft.model_copy(update={"max_num_seqs": _max_num_seqs(settings, draft, planned_kv_tokens)})


def _max_num_seqs(settings: Settings, draft: EngineLimits, planned_kv_tokens: int | None) -> int:
    """The configured value, else as many sequences as `TEXT_SHARE` of the planned KV cache holds the text of."""
    if settings.engine.max_num_seqs is not None:
        return settings.engine.max_num_seqs
    ceiling = MAX_NUM_SEQS[settings.engine.device]
    if planned_kv_tokens is None:
        return ceiling
    fitting = math.floor(TEXT_SHARE * planned_kv_tokens / draft.text_reserve)
    if fitting < 1:
        raise LimitsConflict(
            f"a KV cache of {planned_kv_tokens:,} tokens cannot hold the text of one sequence"
            f" ({draft.text_reserve:,} tokens); lower engine.max_prompt_tokens or engine.max_output_tokens"
        )
    return min(ceiling, fitting)


def max_in_flight(settings: Settings, kv: KvCache | None) -> int:
    """The worker's safety bound on jobs held at once: configured, or the sequences the engine runs at once and a
    quarter more (loading images, queued in the engine, publishing); `NO_KV_IN_FLIGHT` for an engine without a KV
    cache. The budget, not this bound, limits what reaches the engine.

    NOTE: not more: a job held beyond what the engine can run only waits, and a waiter asks the budget again every
    50 ms (workers.budget); in the GPU benchmark, twice `max_num_seqs` in flight left ~130 jobs polling and more
    than doubled the worker's CPU per job."""
    if settings.worker.max_in_flight is not None:
        return settings.worker.max_in_flight
    return NO_KV_IN_FLIGHT if kv is None else kv.max_num_seqs + kv.max_num_seqs // 4


def job_text_tokens(prompt_text: str, images: int) -> int:
    """The most tokens of a job's text part: its images' markers, the chat template and the prompt text."""
    return images * MARKERS_PER_IMAGE + CHAT_TEMPLATE_TOKENS + text_tokens_bound(prompt_text)


def check_job(limits: EngineLimits, prompt_text: str, max_output_tokens: int) -> None:
    """Refuse (`TooManyTokens`) a job whose prompt or output is over the room every sequence has."""
    prompt = text_tokens_bound(prompt_text)
    if prompt > limits.prompt_tokens:
        raise TooManyTokens(
            f"the prompt text is up to {prompt:,} tokens ({prompt:,} UTF-8 bytes); the engine has room for"
            f" {limits.prompt_tokens:,} (engine.max_prompt_tokens)"
        )
    if max_output_tokens > limits.output_tokens:
        raise TooManyTokens(
            f"max_output_tokens {max_output_tokens:,} is over the engine's {limits.output_tokens:,}"
            " (engine.max_output_tokens)"
        )
