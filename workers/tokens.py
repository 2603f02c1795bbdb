"""Exact vision-token counts for the Qwen2-VL family, as the model's own processor computes them.

An image is resized so that each side is a multiple of `patch_size * merge_size` and its area lies within
[min_pixels, max_pixels] (`smart_resize`), cut into `patch_size` squares, and every `merge_size`² patches become
one LLM placeholder token. The arithmetic below is transformers' `smart_resize` (the version vLLM 0.32 uses,
transformers 5.19) step for step, including the float expressions, so the counts agree exactly; the tests
compare it against the real processors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.settings import ModelFamily

MAX_ASPECT_RATIO = 200
"""The processor refuses images whose longer side is more than 200 times the shorter one."""


@dataclass(frozen=True)
class VisionSpec:
    """What a model family's vision tower does to pixels, with the defaults its checkpoints ship."""

    patch_size: int
    """Side of one ViT patch in pixels."""
    merge_size: int
    """Patches merged per side into one LLM token (2 → 2x2 patches per token)."""
    temporal_patch_size: int
    """Video frames folded into one patch; a lone image is repeated to fill it and counts once."""
    min_pixels: int
    """Images smaller than this are scaled up (the checkpoint's preprocessor `min_pixels`)."""
    max_pixels: int
    """Images larger than this are scaled down (the checkpoint's preprocessor `max_pixels`)."""
    video_min_pixels: int
    """The same bounds for videos."""
    video_max_pixels: int
    video_bounds_per_clip: bool
    """True: the video bounds hold frames x height x width (Qwen3-VL); False: each frame alone (Qwen2/2.5-VL)."""

    @property
    def factor(self) -> int:
        """Every resized side is a multiple of this many pixels."""
        return self.patch_size * self.merge_size


# NOTE: Qwen2-VL-7B-Instruct and Qwen2.5-VL-7B-Instruct ship one preprocessor_config.json (min_pixels 3,136,
# max_pixels 12,845,056) that their video processor falls back to; Qwen3-VL ships preprocessor_config.json
# (shortest_edge 65,536, longest_edge 16,777,216) and video_preprocessor_config.json (4,096 and 25,165,824).
FAMILIES: dict[ModelFamily, VisionSpec] = {
    "qwen2-vl": VisionSpec(14, 2, 2, 3_136, 12_845_056, 3_136, 12_845_056, video_bounds_per_clip=False),
    "qwen2.5-vl": VisionSpec(14, 2, 2, 3_136, 12_845_056, 3_136, 12_845_056, video_bounds_per_clip=False),
    "qwen3-vl": VisionSpec(16, 2, 2, 65_536, 16_777_216, 4_096, 25_165_824, video_bounds_per_clip=True),
}


def vision_spec(family: ModelFamily) -> VisionSpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}") from None


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")


def _bounds(min_pixels: int | None, max_pixels: int | None, default_min: int, default_max: int) -> tuple[int, int]:
    low = default_min if min_pixels is None else min_pixels
    high = default_max if max_pixels is None else max_pixels
    if low < 1 or high < low:
        raise ValueError(f"need 1 <= min_pixels <= max_pixels, got min_pixels={low}, max_pixels={high}")
    return low, high


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, *, frames: tuple[int, int] = (1, 1)
) -> tuple[int, int]:
    """(height, width) after the processor's resize: sides rounded to `factor` (half to even), then scaled down
    with floor above `max_pixels` (never below one factor) or up with ceil below `min_pixels`.

    `frames` is (frames, frames rounded to the temporal patch) for a clip, whose bounds hold all its frames:
    the rounded count decides whether to scale, the real one by how much (as transformers' video processors do).
    """
    _check_size(width, height)
    num_frames, t_bar = frames
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_size(
    width: int,
    height: int,
    *,
    family: ModelFamily = "qwen2-vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(width, height) of the image the vision tower sees. None bounds mean the family's shipped defaults."""
    spec = vision_spec(family)
    low, high = _bounds(min_pixels, max_pixels, spec.min_pixels, spec.max_pixels)
    resized_height, resized_width = smart_resize(height, width, spec.factor, low, high)
    return resized_width, resized_height


def _tokens(spec: VisionSpec, resized_width: int, resized_height: int, frames: int = 1) -> int:
    return frames * (resized_height // spec.patch_size) * (resized_width // spec.patch_size) // spec.merge_size**2


def image_tokens(
    width: int,
    height: int,
    *,
    family: ModelFamily = "qwen2-vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> int:
    """LLM placeholder tokens of one image, without the vision start/end tokens around them."""
    resized_width, resized_height = resized_size(
        width, height, family=family, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return _tokens(FAMILIES[family], resized_width, resized_height)


def _video_smart_resize(
    num_frames: int, height: int, width: int, spec: VisionSpec, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The resize of a clip whose pixel bounds hold frames x height x width (frames rounded to the temporal
    patch); frames smaller than one factor are first scaled up to it."""
    factor, temporal = spec.factor, spec.temporal_patch_size
    if num_frames < temporal:
        raise ValueError(f"this family's videos need at least {temporal} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    t_bar = round(num_frames / temporal) * temporal
    return smart_resize(height, width, factor, min_pixels, max_pixels, frames=(num_frames, t_bar))


def video_tokens(
    frames: int,
    width: int,
    height: int,
    *,
    family: ModelFamily = "qwen2-vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> int:
    """LLM placeholder tokens of a video given as `frames` sampled frames of width x height.

    Frames are grouped by the temporal patch (2), the last frame repeated to fill the final group. Bounds are
    the family's video defaults when None. The frame sampling itself (fps, min/max frames) is the caller's.
    """
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got {frames}")
    spec = vision_spec(family)
    low, high = _bounds(min_pixels, max_pixels, spec.video_min_pixels, spec.video_max_pixels)
    if spec.video_bounds_per_clip:
        resized_height, resized_width = _video_smart_resize(frames, height, width, spec, low, high)
    else:
        resized_height, resized_width = smart_resize(height, width, spec.factor, low, high)
    return _tokens(spec, resized_width, resized_height, frames=-(-frames // spec.temporal_patch_size))
