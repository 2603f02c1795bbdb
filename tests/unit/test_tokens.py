"""Vision-token counts: pinned values and properties of the formula always, and agreement with transformers'
processors (the version vLLM uses) on a generated set of sizes when transformers is installed."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.settings import ModelFamily
from workers.tokens import FAMILIES, MAX_ASPECT_RATIO, image_tokens, resized_size, video_tokens

# (family, min_pixels, max_pixels): shipped defaults (None) and overrides, including the project's default cap.
BOUNDS: list[tuple[ModelFamily, int | None, int | None]] = [
    ("qwen2-vl", None, None),
    ("qwen2-vl", None, 1_003_520),
    ("qwen2-vl", 256 * 28 * 28, 1280 * 28 * 28),
    ("qwen2-vl", 3_136, 200_704),
    ("qwen2.5-vl", None, None),
    ("qwen2.5-vl", 4 * 28 * 28, 16_384 * 28 * 28),
    ("qwen2.5-vl", 100_000, 100_000),
    ("qwen3-vl", None, None),
    ("qwen3-vl", 256 * 32 * 32, 1280 * 32 * 32),
    ("qwen3-vl", 1_024, 262_144),
]
SIZES_PER_BOUNDS = 260


def test_1024x768_is_999_tokens_on_qwen2_vl_not_the_naive_3942() -> None:
    assert image_tokens(1024, 768) == 999
    assert image_tokens(1024, 768, max_pixels=1_003_520) == 999
    assert resized_size(1024, 768) == (1036, 756)
    assert (1024 // 14) * (768 // 14) == 3_942


@pytest.mark.parametrize(
    ("width", "height", "family", "max_pixels", "tokens"),
    [
        (1024, 768, "qwen2.5-vl", None, 999),
        (1024, 768, "qwen3-vl", None, 768),
        (4000, 3000, "qwen2-vl", 1_003_520, 1_230),  # scaled down with floor: 1148 x 840
        (10, 10, "qwen2-vl", None, 4),  # scaled up to min_pixels: 56 x 56
        (70, 42, "qwen2-vl", None, 4),  # 2.5 and 1.5 factors round half to even: 56 x 56
        (8192, 8192, "qwen2-vl", None, 16_384),  # the shipped max_pixels is 16,384 tokens
    ],
)
def test_pinned_values(width: int, height: int, family: ModelFamily, max_pixels: int | None, tokens: int) -> None:
    assert image_tokens(width, height, family=family, max_pixels=max_pixels) == tokens


def test_aspect_ratio_above_200_is_refused_as_the_processor_does() -> None:
    assert image_tokens(MAX_ASPECT_RATIO * 28, 28) > 0
    with pytest.raises(ValueError, match="aspect ratio"):
        image_tokens(MAX_ASPECT_RATIO * 28 + 1, 28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0, "height": 10}, "positive"),
        ({"width": 10, "height": 10, "min_pixels": 5_000, "max_pixels": 4_000}, "min_pixels <= max_pixels"),
        ({"width": 10, "height": 10, "family": "llava"}, "unknown model family"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_tokens(**kwargs)  # type: ignore[arg-type]


@given(
    width=st.integers(1, 20_000),
    height=st.integers(1, 20_000),
    family=st.sampled_from(list(FAMILIES)),
)
def test_resized_image_is_whole_merged_patches_within_the_bounds(width: int, height: int, family: ModelFamily) -> None:
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return
    spec = FAMILIES[family]
    resized_width, resized_height = resized_size(width, height, family=family)
    assert resized_width % spec.factor == 0 and resized_height % spec.factor == 0
    assert spec.min_pixels <= resized_width * resized_height <= spec.max_pixels
    tokens = image_tokens(width, height, family=family)
    assert tokens * (spec.patch_size * spec.merge_size) ** 2 == resized_width * resized_height


def test_video_tokens_fold_frame_pairs_and_repeat_the_last_frame() -> None:
    per_pair = image_tokens(640, 480)
    assert video_tokens(2, 640, 480) == per_pair
    assert video_tokens(7, 640, 480) == video_tokens(8, 640, 480) == 4 * per_pair
    with pytest.raises(ValueError, match="at least 2 frames"):
        video_tokens(1, 640, 480, family="qwen3-vl")


def generated_sizes(rng: random.Random, factor: int) -> Iterator[tuple[int, int]]:
    """Sizes that exercise every branch: log-uniform sides, tiny images, sides at and around multiples of the
    factor (the half-to-even rounding), and aspect ratios at the 200 limit on either side."""
    while True:
        kind = rng.randrange(5)
        if kind == 0:
            yield int(10 ** rng.uniform(0, 4.1)), int(10 ** rng.uniform(0, 4.1))
        elif kind == 1:
            yield rng.randint(1, 80), rng.randint(1, 80)
        elif kind == 2:
            yield (
                rng.randint(1, 150) * factor + rng.choice((-1, 0, 1, factor // 2)),
                rng.randint(1, 150) * factor + rng.choice((-1, 0, 1, factor // 2)),
            )
        elif kind == 3:
            short = rng.randint(1, 60)
            yield short * MAX_ASPECT_RATIO + rng.randint(-1, 1), short
        else:
            yield rng.randint(200, 4_000), rng.randint(200, 4_000)


def ours(width: int, height: int, family: ModelFamily, low: int | None, high: int | None) -> int | str:
    try:
        return image_tokens(width, height, family=family, min_pixels=low, max_pixels=high)
    except ValueError:
        return "ValueError"


def processor_for(family: ModelFamily, low: int | None, high: int | None, backend: str) -> object:
    """The image processor vLLM builds for the family (Qwen3-VL reuses Qwen2-VL's with 16-px patches)."""
    transformers = pytest.importorskip("transformers")
    spec = FAMILIES[family]
    cls = transformers.Qwen2VLImageProcessorPil if backend == "pil" else transformers.Qwen2VLImageProcessor
    return cls(
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        min_pixels=spec.min_pixels if low is None else low,
        max_pixels=spec.max_pixels if high is None else high,
    )


def backends() -> list[str]:
    """`pil` needs only numpy and Pillow; the default (`torchvision`) backend only where torchvision loads."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return ["pil"]
    return ["pil", "torchvision"]


@pytest.mark.parametrize("backend", backends())
def test_counts_match_the_processor_on_generated_sizes(backend: str) -> None:
    """vLLM sizes the placeholders with the processor's `get_number_of_image_patches`; every generated size of
    every bounds set must give the same count, or the same ValueError."""
    rng = random.Random(20_240_917)
    compared = mismatches = 0
    for family, low, high in BOUNDS:
        processor = processor_for(family, low, high, backend)
        sizes = generated_sizes(rng, FAMILIES[family].factor)
        merge = FAMILIES[family].merge_size
        for _ in range(SIZES_PER_BOUNDS):
            width, height = next(sizes)
            try:
                expected: int | str = processor.get_number_of_image_patches(height, width, {}) // merge**2
            except ValueError:
                expected = "ValueError"
            compared += 1
            if ours(width, height, family, low, high) != expected:
                mismatches += 1
    assert compared >= 2_000
    assert mismatches == 0


@pytest.mark.parametrize("backend", backends())
def test_counts_match_the_processors_output_grid(backend: str) -> None:
    """The full preprocessing of real pixel arrays: `image_grid_thw` of the output, on sizes small enough to
    keep the test quick."""
    rng = random.Random(7)
    for family, low, high in BOUNDS:
        processor = processor_for(family, low, high, backend)
        merge = FAMILIES[family].merge_size
        for _ in range(12):
            width, height = rng.randint(2, 1_400), rng.randint(2, 1_400)
            pixels = np.zeros((height, width, 3), dtype=np.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grid = processor(images=pixels, return_tensors="np", input_data_format="channels_last")
            t, grid_h, grid_w = (int(value) for value in grid["image_grid_thw"][0])
            assert ours(width, height, family, low, high) == t * grid_h * grid_w // merge**2, (width, height)


@pytest.mark.parametrize("bounds", [None, (1_024, 60_000)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_video_counts_match_the_video_processor(family: ModelFamily, bounds: tuple[int, int] | None) -> None:
    """The `video_grid_thw` of real (small) videos, odd frame counts included. NOTE: not the processor's
    `get_num_of_video_patches`, which floors odd frame counts in transformers 5.17 while its processing pads."""
    pytest.importorskip("torchvision")
    transformers = pytest.importorskip("transformers")
    spec = FAMILIES[family]
    low, high = bounds or (spec.video_min_pixels, spec.video_max_pixels)
    cls = transformers.Qwen3VLVideoProcessor if spec.video_bounds_per_clip else transformers.Qwen2VLVideoProcessor
    processor = cls(
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        size={"shortest_edge": low, "longest_edge": high},
    )
    rng = random.Random(11)
    for _ in range(40):
        frames = rng.randint(spec.temporal_patch_size if spec.video_bounds_per_clip else 1, 9)
        width, height = rng.randint(8, 400), rng.randint(8, 400)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            video = np.zeros((frames, height, width, 3), dtype=np.uint8)
            grid = processor(videos=[video], return_tensors="np", do_sample_frames=False)["video_grid_thw"][0]
        expected = int(grid[0] * grid[1] * grid[2]) // spec.merge_size**2
        overrides = {} if bounds is None else {"min_pixels": low, "max_pixels": high}
        assert video_tokens(frames, width, height, family=family, **overrides) == expected, (frames, width, height)
