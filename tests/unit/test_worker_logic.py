"""The worker's pure steps: a job's vision-token cost, the prompt of each task, and the second check of the
engine's output against the task schema."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.jobs import ImageJob
from schemas.settings import load_settings
from workers.engines.base import EngineOutput
from workers.prompts import MissingPrompt, task_prompt
from workers.worker import JobFailure, validated_output, vision_tokens


def output(answer: Any, finish_reason: str = "stop") -> EngineOutput:
    text = answer if isinstance(answer, str) else json.dumps(answer)
    parsed = None if isinstance(answer, str) else answer
    return EngineOutput(text, parsed, 1000, 20, 999, finish_reason, 0.1, 0.2)


def job(task: str, **fields: Any) -> ImageJob:
    return ImageJob(job_id="j", task=task, images=["s3://vlm-images/a.png"], **fields)  # type: ignore[arg-type]


def test_cost_is_the_sum_of_exact_vision_tokens_at_the_configured_pixels() -> None:
    settings = load_settings(model={"family": "qwen2-vl", "min_pixels": None, "max_pixels": 12_845_056})
    assert vision_tokens([(1024, 768)], settings) == 999
    assert vision_tokens([(1024, 768), (1024, 768)], settings) == 1998


def test_cost_follows_max_pixels() -> None:
    small = load_settings(model={"max_pixels": 200_704})
    # scaled by sqrt(1024*768/200704) and floored to multiples of 28: 504x364 px, (504/14)*(364/14)/4 tokens
    assert vision_tokens([(1024, 768)], small) == 234


def test_aspect_ratio_over_200_is_its_own_error() -> None:
    with pytest.raises(JobFailure) as caught:
        vision_tokens([(64, 64), (2010, 10)], load_settings())
    assert caught.value.code == "aspect_ratio"


def test_output_that_fits_the_schema_is_kept() -> None:
    answer = {"objects": [{"label": "cat", "box_1000": [10, 20, 300, 400]}]}
    assert validated_output(output(answer), job("detect"), "box_1000") == answer


def test_a_refusal_is_a_valid_answer_to_any_task() -> None:
    refusal = {"refusal": {"code": "not_visible", "message": "no such element"}}
    assert validated_output(output(refusal), job("ground", prompt="the red car"), "box_1000") == refusal


@pytest.mark.parametrize(
    ("engine_output", "fragment"),
    [
        (output('{"caption": "cut', "length"), "cut off at max_output_tokens"),
        (output("[1, 2]"), "no JSON object"),
        (output({"box_1000": [500, 10, 100, 20]}), "x1 > x2"),
        (output({"caption": 7}), "$.caption"),
    ],
)
def test_output_outside_the_schema_is_output_invalid(engine_output: EngineOutput, fragment: str) -> None:
    task = "ground" if "box_1000" in engine_output.text else "caption"
    with pytest.raises(JobFailure) as caught:
        validated_output(engine_output, job(task, prompt="the car"), "box_1000")
    assert caught.value.code == "output_invalid"
    assert fragment in str(caught.value)


def test_prompts_name_the_box_convention_and_carry_the_job_prompt() -> None:
    detect = task_prompt(job("detect", prompt="only vehicles"), "box_1000")
    assert '"box_1000"' in detect and "0-1000" in detect and detect.endswith("only vehicles")
    assert "the red car" in task_prompt(job("ground", prompt="the red car"), "bbox_2d")
    assert "refus" in task_prompt(job("caption"), "box_1000")


def test_ground_needs_a_prompt() -> None:
    with pytest.raises(MissingPrompt):
        task_prompt(job("ground"), "box_1000")
