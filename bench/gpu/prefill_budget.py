"""Calibrate the vision-token budget on a GPU: prefill time and peak GPU memory of a Qwen2-VL-7B-shaped model
against the vision tokens of one batch, and the KV cache vLLM allocates.

    python bench/gpu/prefill_budget.py                       # an H100, in an environment with vLLM for CUDA
    python bench/gpu/prefill_budget.py --shape tiny --batches 1,2 --image 320x240   # the same path on CPU

Nothing is downloaded: the checkpoint directory is written here (the tiny model's tokenizer, processor and chat
template from `workers.tiny_model`, with a config of Qwen2-VL-7B-Instruct's dimensions) and vLLM fills it with
random weights (`load_format="dummy"`). Random weights run the same kernels on the same shapes, so time and memory
are those of the real checkpoint; only the answers are noise (one token is generated per request).

The engine is built exactly as the worker builds it (`workers.engines.factory.build_engine`, so `mm_processor_kwargs`,
`limit_mm_per_prompt` and encoder CUDA graphs match) and driven in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
so that `torch.cuda.max_memory_allocated` sees the engine's allocations. Each batch holds distinct random images,
so neither the prefix cache nor the encoder cache serves a request from an earlier one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}.items():
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.gpu.calibrate import QWEN2_VL_7B_TEXT, QWEN2_VL_7B_VISION  # noqa: E402
from schemas.settings import Settings, load_settings  # noqa: E402
from workers.capacity import pool_capacity  # noqa: E402
from workers.limits import derive_limits  # noqa: E402
from workers.tokens import image_tokens  # noqa: E402

PROMPT = "Describe the image."


@dataclass(frozen=True)
class BatchFigures:
    images: int
    vision_tokens: int
    prefill_s: float
    peak_bytes: int | None
    """Peak memory the engine allocated during the batch (None off CUDA)."""
    before_bytes: int | None
    """Allocated before the batch: weights, KV cache and buffers."""


def write_checkpoint(dest: Path, shape: str) -> Path:
    """The tiny checkpoint, with the config swapped for Qwen2-VL-7B's dimensions unless `shape` is `tiny`."""
    from transformers import Qwen2VLConfig

    from workers.tiny_model import write_tiny_qwen2_vl

    write_tiny_qwen2_vl(dest)
    if shape == "tiny":
        return dest
    tiny = Qwen2VLConfig.from_pretrained(dest)
    special = {name: getattr(tiny.text_config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2VLConfig(
        architectures=["Qwen2VLForConditionalGeneration"],
        dtype="bfloat16",
        text_config={**QWEN2_VL_7B_TEXT, **special},
        vision_config=QWEN2_VL_7B_VISION,
        image_token_id=tiny.image_token_id,
        video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id,
        vision_end_token_id=tiny.vision_end_token_id,
    )
    config.save_pretrained(dest)
    return dest


def kv_bytes_per_token(dest: Path) -> int:
    """2 (K and V) x layers x KV heads x head dim x 2 bytes (bf16), from the written config."""
    from transformers import Qwen2VLConfig

    text: Any = Qwen2VLConfig.from_pretrained(dest).text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2


def random_images(count: int, size: tuple[int, int], rng: np.random.Generator) -> list[Image.Image]:
    width, height = size
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


class Probe:
    """The engine in this process, fed one batch at a time."""

    def __init__(self, settings: Settings):
        import torch
        from transformers import AutoTokenizer
        from vllm import SamplingParams
        from vllm.v1.engine.llm_engine import LLMEngine

        from workers.engines.factory import build_engine

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        engine_args = build_engine(settings, "vllm").engine_args  # type: ignore[attr-defined]
        self.engine = LLMEngine.from_engine_args(engine_args)
        tokenizer = AutoTokenizer.from_pretrained(settings.model.path)
        messages: Any = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        self.prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        self.params = SamplingParams(max_tokens=1, temperature=0.0)
        self.batches = 0

    def max_num_batched_tokens(self) -> int:
        """Tokens the scheduler puts into one forward pass; a larger batch is prefilled in several."""
        return int(self.engine.vllm_config.scheduler_config.max_num_batched_tokens)

    def kv_cache_tokens(self) -> int:
        cache = self.engine.vllm_config.cache_config
        return int(cache.num_gpu_blocks or 0) * int(cache.block_size)

    def run(self, images: list[Image.Image]) -> tuple[float, int | None, int | None]:
        """Prefill one batch to its first token: seconds, peak and starting allocated bytes."""
        self.batches += 1
        before = None
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            before = self.torch.cuda.memory_allocated()
        started = time.perf_counter()
        for index, image in enumerate(images):
            prompt = {"prompt": self.prompt, "multi_modal_data": {"image": image}}
            self.engine.add_request(f"b{self.batches}-{index}", prompt, self.params)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        if self.cuda:
            self.torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else None
        return elapsed, peak, before


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["qwen2-vl-7b", "tiny"], default="qwen2-vl-7b")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64", help="images per batch, comma-separated")
    parser.add_argument("--image", default="1024x768", help="WIDTHxHEIGHT of every image (1024x768: 999 tokens)")
    parser.add_argument("--max-pixels", type=int, default=1_003_520, help="the engine's and estimator's max_pixels")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    args = parser.parse_args()
    width, height = (int(side) for side in args.image.lower().split("x"))
    batches = [int(count) for count in args.batches.split(",")]
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / args.shape, args.shape)
        settings = load_settings(
            model={"path": checkpoint, "family": "qwen2-vl", "max_pixels": args.max_pixels},
            engine={
                "load_format": "dummy",
                "device": "cuda" if args.shape != "tiny" else "cpu",
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "limit_images_per_prompt": 1,
                "max_num_seqs": max(batches),
            },
        )
        per_image = image_tokens(width, height, family="qwen2-vl", max_pixels=args.max_pixels)
        started = time.perf_counter()
        probe = Probe(settings)
        print(f"engine: {args.shape}, started in {time.perf_counter() - started:.0f} s", flush=True)
        probe.run(random_images(2, (width, height), rng))  # warm-up: compilation, CUDA graphs, allocator
        figures = []
        for count in batches:
            elapsed, peak, before = probe.run(random_images(count, (width, height), rng))
            figures.append(BatchFigures(count, count * per_image, elapsed, peak, before))
            print(f"  batch of {count} done in {elapsed:.2f} s", file=sys.stderr, flush=True)
        kv_tokens = probe.kv_cache_tokens()
        step_tokens = probe.max_num_batched_tokens()
        kv_per_token = kv_bytes_per_token(checkpoint)

    print(f"\n{args.shape}, {width}x{height} images = {per_image} vision tokens each, max_pixels {args.max_pixels:,}")
    print(f"max_num_batched_tokens {step_tokens:,} (tokens per forward pass)")
    print(f"{'images':>6} {'vision tok':>10} {'prefill s':>9} {'vision tok/s':>12} {'peak GiB':>8} {'+ GiB':>6}")
    for row in figures:
        extra = None if row.peak_bytes is None or row.before_bytes is None else row.peak_bytes - row.before_bytes
        rate = row.vision_tokens / row.prefill_s
        print(
            f"{row.images:>6} {row.vision_tokens:>10,} {row.prefill_s:>9.3f} {rate:>12,.0f} "
            f"{gib(row.peak_bytes):>8} {gib(extra):>6}"
        )
    limits = derive_limits(settings, kv_tokens)
    pool = pool_capacity(kv_tokens, block_size=16, max_num_seqs=limits.max_num_seqs,
                         text_tokens_per_seq=limits.text_reserve)  # fmt: skip
    print(f"\nKV cache: {kv_tokens:,} tokens ({kv_per_token:,} bytes per token)")
    for line in pool.lines:
        print(line)
    print(
        f"the worker's pool on this GPU: {pool.capacity:,} vision tokens, {pool.capacity // per_image:,} images of"
        f" {per_image} tokens at once (taken from the engine at start; `vlmflow budget status` shows it)"
    )


if __name__ == "__main__":
    main()
