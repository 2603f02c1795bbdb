"""Benchmark: preparing one image for the engine (`workers.images.prepare_image`: decode at a DCT scale where the
format allows, RGB, resize to the final `smart_resize` size, EXIF turn) against the baseline of a full decode then
the same resize (what the engine's processor had to do after the worker decoded the image at full size), on the
same encoded JPEG and PNG images in the same run. Prints CPU milliseconds per image, decoded megapixels held at the
peak, and the ratio baseline ÷ prepared.

    python bench/bench_images.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from PIL import Image

from schemas.settings import Settings, load_settings
from workers.images import PixelBudget, prepare_image
from workers.tokens import resized_size

SIZES = [(640, 480), (1600, 1200), (2400, 1800), (4000, 3000)]
"""0.3, 1.9, 4.3 and 12 megapixels: phone photos and scans."""


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((200, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def baseline(data: bytes, settings: Settings) -> int:
    """Full decode, RGB, resize to the same final size; the decoded pixels it held."""
    image = Image.open(io.BytesIO(data))
    image.load()
    model = settings.model
    final = resized_size(*image.size, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels)
    image.convert("RGB").resize(final, Image.Resampling.BICUBIC)
    return image.width * image.height


def cpu_ms(run: Callable[[], object], rounds: int) -> float:
    """Median CPU milliseconds of `run` (all threads of the process, so a pool's work counts too)."""
    times = []
    for _ in range(rounds):
        started = time.process_time()
        run()
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    settings = load_settings()
    rows = []
    for fmt in ("JPEG", "PNG"):
        for size in SIZES:
            data = encoded(size, fmt)
            budget = PixelBudget(10**9)
            prepared_ms = cpu_ms(
                partial(prepare_image, data, uri="bench", settings=settings, budget=budget), args.rounds
            )
            baseline_ms = cpu_ms(partial(baseline, data, settings), args.rounds)
            rows.append(
                {
                    "format": fmt,
                    "megapixels": round(size[0] * size[1] / 1e6, 1),
                    "prepared_cpu_ms": round(prepared_ms, 1),
                    "baseline_cpu_ms": round(baseline_ms, 1),
                    "ratio": round(baseline_ms / prepared_ms, 2),
                    "prepared_peak_megapixels": round(budget.peak / 1e6, 1),
                    "baseline_peak_megapixels": round(baseline(data, settings) / 1e6, 1),
                }
            )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
