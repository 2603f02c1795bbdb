"""The limits of workers/limits.py against vLLM on CPU: the largest job the settings allow is served, the text
bound never undercounts the real tokenizer, and `budget plan` agrees with the KV cache the engine allocated."""

from __future__ import annotations

import argparse
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("vllm", reason="vLLM is not installed: run the engine tests in the env of scripts/engine-env.sh")

import jsonschema  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from schemas.settings import Settings  # noqa: E402
from schemas.tasks import task_schema  # noqa: E402
from vlmflow.commands import budget  # noqa: E402
from workers.capacity import pool_capacity  # noqa: E402
from workers.engines.base import EngineRequest  # noqa: E402
from workers.engines.factory import planned_kv_tokens  # noqa: E402
from workers.engines.vllm_engine import VllmEngine  # noqa: E402
from workers.limits import CHAT_TEMPLATE_TOKENS, MARKERS_PER_IMAGE, derive_limits, text_tokens_bound  # noqa: E402
from workers.tokens import image_tokens  # noqa: E402

LARGEST = (1120, 896)
"""1,003,520 pixels, exactly `max_pixels`: 40 x 32 patches of 28 px = 1,280 vision tokens."""


async def test_a_job_of_four_1280_token_images_is_served(engine: VllmEngine, engine_settings: Settings) -> None:
    """The job the old 4,096-token context refused with engine_error: 4 x 1,280 vision tokens + text."""
    assert image_tokens(*LARGEST, max_pixels=1_003_520) == 1_280
    schema = task_schema("caption", None, box_field="box_1000")
    request = EngineRequest(
        prompt="Describe the four images in one or two sentences.",
        images=[Image.new("RGB", LARGEST, colour) for colour in ("white", "red", "green", "blue")],
        json_schema=schema,
        max_tokens=engine_settings.engine.max_output_tokens,
    )
    output = await engine.generate(request)
    assert output.num_image_tokens == 4 * 1_280
    assert output.num_prompt_tokens > 5_120
    assert output.finish_reason == "stop", output.text
    jsonschema.validate(output.parsed_json, schema)


def test_the_engine_runs_the_derived_limits(engine: VllmEngine, engine_settings: Settings) -> None:
    limits = derive_limits(engine_settings, planned_kv_tokens(engine_settings))
    kv = engine.kv_cache()
    assert kv is not None
    assert kv.max_num_seqs == limits.max_num_seqs == 121  # half of 524,288 KV tokens / 2,164 text tokens each
    assert engine.engine_args.max_model_len == limits.max_model_len == 8_192


def test_budget_plan_agrees_with_the_engines_kv_cache_within_one_block(
    engine: VllmEngine, engine_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmflow budget plan` as an operator runs it (its own parser and command), against the capacity the worker
    takes from the engine: equal, or less than one KV block apart (vLLM allocates whole blocks)."""
    kv = engine.kv_cache()
    assert kv is not None
    limits = derive_limits(engine_settings, planned_kv_tokens(engine_settings))
    worker = pool_capacity(
        kv.tokens, block_size=kv.block_size, max_num_seqs=kv.max_num_seqs, text_tokens_per_seq=limits.text_reserve
    )
    parser = argparse.ArgumentParser()
    budget.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["budget", "plan", f"--block-size={kv.block_size}"])
    assert budget.run(args, engine_settings) == 0
    printed = capsys.readouterr().out
    (planned,) = re.findall(r"^capacity\s+([\d,]+)$", printed, re.MULTILINE)
    assert 0 <= int(planned.replace(",", "")) - worker.capacity < kv.block_size, printed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=300), images=st.integers(0, 4))
def test_the_text_bound_never_undercounts_the_tokenizer(tiny_model_dir: Path, prompt: str, images: int) -> None:
    tokenizer = _tokenizer(tiny_model_dir)
    assert len(tokenizer(prompt, add_special_tokens=False).input_ids) <= text_tokens_bound(prompt)
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    # each image's <|image_pad|> stands for its placeholders, counted apart
    text_part = len(tokenizer(chat, add_special_tokens=False).input_ids) - images
    assert text_part <= images * MARKERS_PER_IMAGE + CHAT_TEMPLATE_TOKENS + text_tokens_bound(prompt)


@cache
def _tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)
