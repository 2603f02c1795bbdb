"""Images prepared by the worker (workers/images.py) against transformers' own Qwen2-VL processor, the one vLLM runs:
the processor finds them at their final size (no second resample) and counts exactly the worker's vision tokens."""

from __future__ import annotations

import io

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("torchvision", reason="the processor vLLM runs needs torchvision: the engine env")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

from schemas.settings import Settings, load_settings  # noqa: E402
from workers.images import prepare_image  # noqa: E402
from workers.tokens import image_tokens, vision_spec  # noqa: E402

MAX_PIXELS = 1_003_520


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(model={"family": "qwen2-vl", "max_pixels": MAX_PIXELS})


@pytest.fixture(scope="module")
def processor() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(min_pixels=vision_spec("qwen2-vl").min_pixels, max_pixels=MAX_PIXELS)


def noise(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 50).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def tokens_of(processor: Qwen2VLImageProcessor, image: Image.Image, **options: object) -> tuple[int, torch.Tensor]:
    out = processor(images=[image], return_tensors="pt", **options)
    return int(out["image_grid_thw"][0].prod()) // 4, out["pixel_values"]


@pytest.mark.parametrize("size", [(1024, 768), (3000, 2000), (30, 20), (333, 777), (100, 4000)])
def test_the_processor_does_not_resample_a_prepared_image(
    settings: Settings, processor: Qwen2VLImageProcessor, size: tuple[int, int]
) -> None:
    data = noise(*size)
    prepared = prepare_image(data, uri="t", settings=settings)
    expected = image_tokens(*size, max_pixels=MAX_PIXELS)

    resized_tokens, resized_pixels = tokens_of(processor, prepared.image)
    as_is_tokens, as_is_pixels = tokens_of(processor, prepared.image, do_resize=False)
    original_tokens, _ = tokens_of(processor, Image.open(io.BytesIO(data)).convert("RGB"))

    assert resized_tokens == as_is_tokens == original_tokens == expected
    assert torch.equal(resized_pixels, as_is_pixels), "the processor's resize was a no-op"


def test_a_thin_image_needs_the_engine_to_skip_its_resize(settings: Settings, processor: Qwen2VLImageProcessor) -> None:
    """41x5615 (ratio 137) becomes 28x5628 (ratio 201): resizing that again is refused, so the engine is told the
    image is final (`EngineRequest.images_at_final_size`: `do_resize=False`) and counts the original's tokens."""
    prepared = prepare_image(noise(5615, 41), uri="t", settings=settings)
    assert prepared.image.size == (5628, 28)
    assert tokens_of(processor, prepared.image, do_resize=False)[0] == image_tokens(5615, 41, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="aspect ratio"):
        tokens_of(processor, prepared.image)
