"""Benchmark: `image_tokens` calls per second, next to the naive `(w // 14) * (h // 14)` estimate (wrong by about
4x, but what many gateways run) and, when transformers is installed, the processor's own
`get_number_of_image_patches` that vLLM calls, all on the same sizes in the same run.

    python bench/bench_tokens.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from workers.tokens import image_tokens

ROUNDS = 5
"""Timed rounds per contender; figures are medians."""


def calls_per_second(count: Callable[[int, int], int], sizes: list[tuple[int, int]]) -> float:
    rates = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for width, height in sizes:
            count(width, height)
        rates.append(len(sizes) / (time.perf_counter() - started))
    return statistics.median(rates)


def naive(width: int, height: int) -> int:
    return (width // 14) * (height // 14)


def processor_count() -> Callable[[int, int], int] | None:
    try:
        from transformers import Qwen2VLImageProcessorPil
    except ImportError:
        return None
    processor = Qwen2VLImageProcessorPil(min_pixels=3_136, max_pixels=1_003_520)
    return lambda width, height: processor.get_number_of_image_patches(height, width, {}) // 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000, help="sizes per timed round")
    args = parser.parse_args()
    rng = random.Random(1)
    sizes = [(rng.randint(64, 4_096), rng.randint(64, 4_096)) for _ in range(args.calls)]
    ours = calls_per_second(lambda width, height: image_tokens(width, height, max_pixels=1_003_520), sizes)
    print(f"{len(sizes):,} random sizes up to 4096 px, qwen2-vl at max_pixels 1,003,520, median of {ROUNDS} rounds")
    print(f"image_tokens                       {ours:>12,.0f} calls/s  ({1e6 / ours:.2f} us per call)")
    baseline = calls_per_second(naive, sizes)
    print(f"naive (w // 14) * (h // 14)        {baseline:>12,.0f} calls/s  ratio {baseline / ours:.1f}x faster, wrong")
    processor = processor_count()
    if processor is None:
        print("transformers not installed: no processor baseline")
        return
    import transformers

    theirs = calls_per_second(processor, sizes)
    print(
        f"get_number_of_image_patches {transformers.__version__:<7}{theirs:>12,.0f} calls/s"
        f"  ratio image_tokens / processor {ours / theirs:.1f}x"
    )


if __name__ == "__main__":
    main()
