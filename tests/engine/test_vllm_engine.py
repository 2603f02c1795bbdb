"""VllmEngine on vLLM for CPU with the tiny Qwen2-VL checkpoint: exact vision tokens, schema-valid JSON out."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("vllm", reason="vLLM is not installed: run the engine tests in the env of scripts/engine-env.sh")

import jsonschema  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from schemas.settings import Settings  # noqa: E402
from workers.engines.base import EngineRequest  # noqa: E402
from workers.engines.vllm_engine import VllmEngine  # noqa: E402
from workers.images import prepare_image  # noqa: E402
from workers.tokens import image_tokens  # noqa: E402

# The engine of tests/engine/conftest.py: the settings' defaults, min_pixels the family's, max_pixels below the
# shipped 12,845,056 so that large test images are scaled down (and profiling stays small on CPU).
MIN_PIXELS = 3_136
MAX_PIXELS = 1_003_520

# An answer or, as every task schema allows, a refusal.
SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "label": {"type": "string", "maxLength": 16},
                "count": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["label", "count"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "refusal": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string", "maxLength": 16},
                        "message": {"type": "string", "maxLength": 32},
                    },
                    "required": ["code", "message"],
                    "additionalProperties": False,
                }
            },
            "required": ["refusal"],
            "additionalProperties": False,
        },
    ]
}


def image_request(width: int, height: int) -> EngineRequest:
    return EngineRequest(
        prompt="What is in the image? Answer with JSON.",
        images=[Image.new("RGB", (width, height), "white")],
        json_schema=SCHEMA,
        max_tokens=64,
    )


async def test_1024x768_image_is_999_vision_tokens_and_the_answer_follows_the_schema(
    engine: VllmEngine, tiny_model_dir: Path
) -> None:
    request = image_request(1024, 768)
    # The chat prompt holds one <|image_pad|>, which vLLM expands to the image's vision tokens.
    num_text_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir)(engine.chat_prompt(request)).input_ids) - 1

    output = await engine.generate(request)

    assert output.num_image_tokens == 999
    assert output.num_prompt_tokens == 999 + num_text_tokens
    assert output.finish_reason == "stop"
    assert output.parsed_json is not None, output.text
    jsonschema.validate(output.parsed_json, SCHEMA)
    assert 0 < output.num_completion_tokens <= 64
    assert output.time_to_first_token_s is not None and output.time_to_first_token_s <= output.latency_s


@pytest.mark.parametrize("sizes", [[(2048, 1536), (30, 20), (4000, 100), (333, 777)]])
async def test_concurrent_images_get_the_estimators_token_counts(
    engine: VllmEngine, sizes: list[tuple[int, int]]
) -> None:
    outputs = await asyncio.gather(*(engine.generate(image_request(w, h)) for w, h in sizes))

    expected = [image_tokens(w, h, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) for w, h in sizes]
    assert [output.num_image_tokens for output in outputs] == expected
    for output in outputs:
        jsonschema.validate(output.parsed_json, SCHEMA)


async def test_a_thin_image_prepared_to_its_final_size_is_not_resized_again(
    engine: VllmEngine, engine_settings: Settings
) -> None:
    """41x5615 becomes 28x5628 (ratio 201): resized again, the processor would refuse it as over ratio 200.
    With `images_at_final_size` the engine skips its resize and counts exactly the estimator's tokens."""
    buffer = io.BytesIO()
    Image.new("RGB", (41, 5615), "white").save(buffer, format="PNG")
    prepared = prepare_image(buffer.getvalue(), uri="inline", settings=engine_settings)
    assert prepared.image.size == (28, 5628) and prepared.size == (41, 5615)
    request = EngineRequest(
        prompt="What is in the image? Answer with JSON.",
        images=[prepared.image],
        json_schema=SCHEMA,
        max_tokens=64,
        images_at_final_size=True,
    )
    output = await engine.generate(request)
    assert output.num_image_tokens == image_tokens(41, 5615, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == 201
    jsonschema.validate(output.parsed_json, SCHEMA)
