"""Calibrate the simulated H100 (workers/engines/sim_model.py) on a real GPU: PyTorch and transformers only, no
vLLM, no network, no checkpoint.

    python bench/gpu/calibrate.py > sim-h100.json            # a CUDA machine; progress and the table on stderr
    VLMFLOW_ENGINE__SIM__CALIBRATION_PATH=sim-h100.json ...  # the sim then runs on the measured figures
    python bench/gpu/calibrate.py --shape tiny --device cpu  # the same path on CPU, to check the script

A Qwen2-VL-7B-Instruct-shaped model (its config.json dimensions) is built with random bf16 weights: random
weights run the same kernels on the same shapes, so times and memory are the real checkpoint's. It measures
- the vision tower's time and peak memory per image of 256, 999 and 1,280 vision tokens (grids of 32x32, 54x74
  and 64x80 patches: 4 patches per token);
- LLM prefill time per token over chunks of 1,024 / 4,096 / 8,192 tokens;
- a decode step at batch 1 / 16 / 64 / 256 over `--context` tokens of KV cache each (random K and V);
and prints the sim's parameters (a JSON object of `SimHardware` fields) fitted to them on stdout:
- compute_efficiency: the sim's FLOP count of the largest prefill chunk / (its time x --peak-tflops);
- flops_per_vision_token: what makes the sim's vision time equal the measured time per vision token;
- memory_efficiency and step_overhead_s: a line through the decode times against the bytes each step reads
  (weights + KV), t = overhead + bytes / (HBM x efficiency);
- weight_bytes: the language model's parameters x 2 B; kv_tokens: `--gpu-memory-utilization` of the GPU less
  all weights and the prefill's peak activations, / KV bytes per token.
NOTE: transformers runs decode eagerly, vLLM with CUDA graphs: the fitted step overhead is an upper bound of
vLLM's; the prefill and vision figures carry over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

QWEN2_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
}
"""Qwen2-VL-7B-Instruct's text model (its config.json); KV bytes per token in bf16: 2*28*4*128*2 = 57,344."""
QWEN2_VL_7B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "hidden_size": 3584,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
"""Qwen2-VL-7B-Instruct's vision tower (675M parameters)."""
TINY_TEXT = {**QWEN2_VL_7B_TEXT, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1024,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}}  # fmt: skip
TINY_VISION = {**QWEN2_VL_7B_VISION, "depth": 2, "embed_dim": 64, "num_heads": 2, "hidden_size": 128}
VISION_GRIDS = {256: (32, 32), 999: (54, 74), 1_280: (64, 80)}
"""Vision tokens -> the patch grid (h, w) of one image: h x w / 4 tokens (Qwen2-VL merges 2 x 2 patches)."""
PREFILL_CHUNKS = (1_024, 4_096, 8_192)
DECODE_BATCHES = (1, 16, 64, 256)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Probe:
    """The model on the device, and a timer that synchronizes it."""

    def __init__(self, shape: str, device: str):
        import torch
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        self.torch, self.device = torch, torch.device(device)
        text, vision = (QWEN2_VL_7B_TEXT, QWEN2_VL_7B_VISION) if shape == "qwen2-vl-7b" else (TINY_TEXT, TINY_VISION)
        self.config = Qwen2VLConfig(text_config=text, vision_config=vision, dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = Qwen2VLForConditionalGeneration(self.config).to(torch.bfloat16).eval()
        self.visual = self.model.model.visual
        self.language = self.model.model.language_model
        self.text = self.config.text_config

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def timed(self, run: Callable[[], Any], repeats: int = 3) -> tuple[float, int | None]:
        """Seconds of one run (the mean of `repeats` after a warm-up) and its peak memory above the start."""
        torch = self.torch
        with torch.inference_mode():
            run()
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if self.cuda else 0
            started = time.perf_counter()
            for _ in range(repeats):
                run()
            if self.cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / repeats
            peak = torch.cuda.max_memory_allocated() - before if self.cuda else None
        return seconds, peak

    def vision(self, grid: tuple[int, int]) -> tuple[float, int | None]:
        torch = self.torch
        height, width = grid
        patch = self.config.vision_config
        features = 3 * patch.temporal_patch_size * patch.patch_size**2
        pixels = torch.randn(height * width, features, device=self.device, dtype=torch.bfloat16)
        grid_thw = torch.tensor([[1, height, width]], device=self.device)
        return self.timed(lambda: self.visual(pixels, grid_thw=grid_thw))

    def prefill(self, tokens: int) -> tuple[float, int | None]:
        torch = self.torch
        embeds = torch.randn(1, tokens, self.text.hidden_size, device=self.device, dtype=torch.bfloat16)
        positions = torch.arange(tokens, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        return self.timed(lambda: self.language(inputs_embeds=embeds, position_ids=positions, use_cache=False))

    def decode(self, batch: int, context: int) -> float:
        """One step of `batch` sequences, each with `context` tokens of (random) KV cache, logits included."""
        torch = self.torch
        from transformers import DynamicCache

        text = self.text
        head_dim = text.hidden_size // text.num_attention_heads
        cache = DynamicCache()
        for layer in range(text.num_hidden_layers):
            kv = torch.randn(2, batch, text.num_key_value_heads, context, head_dim, device=self.device,
                             dtype=torch.bfloat16)  # fmt: skip
            cache.update(kv[0], kv[1], layer)
        embeds = torch.randn(batch, 1, text.hidden_size, device=self.device, dtype=torch.bfloat16)
        positions = torch.full((3, batch, 1), context, device=self.device)

        def step() -> None:
            out = self.language(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True)
            self.model.lm_head(out.last_hidden_state)
            cache.crop(-1)

        seconds, _ = self.timed(step, repeats=5)
        return seconds

    def language_bytes(self) -> int:
        """bf16 bytes of the language model's weights every step reads: all but the embedding table (of which a
        step reads only its tokens' rows), with the output head."""
        parameters = sum(p.numel() for p in self.language.parameters()) - self.language.embed_tokens.weight.numel()
        return 2 * (parameters + self.model.lm_head.weight.numel())

    def all_bytes(self) -> int:
        return 2 * sum(p.numel() for p in self.model.parameters())

    def memory_bytes(self) -> int | None:
        return int(self.torch.cuda.get_device_properties(self.device).total_memory) if self.cuda else None


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    n, mean_x, mean_y = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / max(
        1e-30, sum((x - mean_x) ** 2 for x in xs)
    )
    return mean_y - slope * mean_x, slope if n > 1 else 0.0


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["qwen2-vl-7b", "tiny"], default="qwen2-vl-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=1_024, help="KV tokens per sequence in the decode steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM)")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth of the GPU (H100 SXM)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)))
    args = parser.parse_args()
    peak, hbm = args.peak_tflops * 1e12, args.hbm_tbps * 1e12

    started = time.perf_counter()
    probe = Probe(args.shape, args.device)
    text = probe.text
    head_dim = text.hidden_size // text.num_attention_heads
    kv_bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    flops_per_llm_token = probe.language_bytes()  # 2 FLOP per parameter = its bytes in bf16
    attention_flops = 4 * text.num_hidden_layers * text.hidden_size
    built_s = time.perf_counter() - started
    log(f"{args.shape} on {args.device}: built in {built_s:.0f} s, weights {gib(probe.all_bytes())} GiB")

    vision = {}
    for tokens, grid in VISION_GRIDS.items():
        seconds, peak_bytes = probe.vision(grid)
        vision[tokens] = (seconds, peak_bytes)
        log(f"vision  {tokens:>5} tokens  {seconds * 1e3:8.2f} ms  {seconds / tokens * 1e6:7.2f} us/token"
            f"  peak +{gib(peak_bytes)} GiB")  # fmt: skip
    prefill = {}
    for tokens in PREFILL_CHUNKS:
        seconds, peak_bytes = probe.prefill(tokens)
        prefill[tokens] = (seconds, peak_bytes)
        log(f"prefill {tokens:>5} tokens  {seconds * 1e3:8.2f} ms  {seconds / tokens * 1e6:7.2f} us/token"
            f"  peak +{gib(peak_bytes)} GiB")  # fmt: skip
    batches = [int(batch) for batch in args.decode_batches.split(",")]
    decode = {}
    for batch in batches:
        decode[batch] = probe.decode(batch, args.context)
        log(f"decode  batch {batch:>4} x {args.context} context  {decode[batch] * 1e3:8.2f} ms/step")

    chunk = max(PREFILL_CHUNKS)
    chunk_flop = chunk * flops_per_llm_token + chunk * chunk / 2 * attention_flops
    compute_efficiency = min(1.0, chunk_flop / (prefill[chunk][0] * peak))
    largest = max(VISION_GRIDS)
    flops_per_vision_token = vision[largest][0] / largest * peak * compute_efficiency
    weight_bytes = probe.language_bytes()
    traffic = [weight_bytes + batch * args.context * kv_bytes_per_token for batch in batches]
    intercept, slope = fit_line([float(t) for t in traffic], [decode[batch] for batch in batches])
    bandwidth = 1 / slope if slope > 0 else hbm
    overhead = max(0.0, intercept)
    memory_total = probe.memory_bytes()
    activations = max(peak_bytes or 0 for _, peak_bytes in prefill.values())
    kv_tokens = (
        int((memory_total * args.gpu_memory_utilization - probe.all_bytes() - activations) / kv_bytes_per_token)
        if memory_total is not None
        else None
    )
    parameters: dict[str, Any] = {
        "peak_flops": peak,
        "compute_efficiency": round(compute_efficiency, 4),
        "hbm_bytes_per_s": hbm,
        "memory_efficiency": round(min(1.0, bandwidth / hbm), 4),
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "flops_per_llm_token": flops_per_llm_token,
        "attention_flops_per_context_token": attention_flops,
        "flops_per_vision_token": round(flops_per_vision_token),
        "step_overhead_s": round(overhead, 5),
    }
    if kv_tokens is not None and kv_tokens > 0:
        parameters["kv_tokens"] = kv_tokens
    log(f"fitted: {parameters}")
    print(json.dumps(parameters))


if __name__ == "__main__":
    main()
