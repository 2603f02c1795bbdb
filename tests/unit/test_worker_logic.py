"""The worker's pure steps: a job's vision-token cost, the prompt of each task, the second check of the engine's
output against the task schema, and the bounded log event and error results a job ends with."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.codec import encode
from schemas.jobs import ImageJob, JobResult
from schemas.settings import load_settings
from schemas.tasks import MAX_OUTPUT_SCHEMA_BYTES
from workers.engines.base import EngineOutput
from workers.prompts import MissingPrompt, task_prompt
from workers.serving import (
    MAX_LOGGED_URI_CHARS,
    JobFailure,
    error_result,
    image_reference,
    log_event,
    validated_output,
    vision_tokens,
)


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


def test_an_answer_too_deep_to_encode_is_output_invalid() -> None:
    """Issue 12 item 1: an answer nested past pydantic's serializer limit must fail the job, not `encode` later."""
    deep: Any = "leaf"
    for _ in range(900):
        deep = {"a": deep}
    with pytest.raises(JobFailure) as caught:
        validated_output(output({"caption": "x", "deep": deep}), job("caption"), "box_1000")
    assert caught.value.code == "output_invalid" and "nests" in str(caught.value)


def test_a_schema_the_validator_refuses_is_invalid_output_schema() -> None:
    chain: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(500)}
    chain["d500"] = {"type": "string"}
    extract = job("extract", output_schema={"properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": chain})
    with pytest.raises(JobFailure) as caught:
        validated_output(output({"x": "y"}), extract, "box_1000")
    assert caught.value.code == "invalid_output_schema"


def test_the_log_event_references_inline_images_instead_of_copying_them() -> None:
    """Issue 12 item 3: a job of about 1 MB (an inline image) made a log event over Kafka's default message size;
    the event now names the image by digest and length, and stays small whatever the job held."""
    inline = "data:image/png;base64," + "A" * 1_048_000
    long_url = "https://images.example.org/" + "p" * (MAX_LOGGED_URI_CHARS + 1)
    schema = {"type": "object", "description": "d" * (2 * MAX_OUTPUT_SCHEMA_BYTES)}
    big = job("extract", output_schema=schema).model_copy(
        update={"images": [inline, long_url, "s3://vlm-images/a.png"]}
    )
    result = JobResult(job_id="j", status="ok", task="extract", output={"x": 1})
    event = log_event(big, result, [(10, 10)] * 3)
    assert len(encode(event)) < 4_096
    first, second, third = event.job.images
    assert first == image_reference(inline) and first.startswith("data:image/png;sha256=") and "length=" in first
    assert second.startswith("data:image/unknown;sha256=") and third == "s3://vlm-images/a.png"
    assert event.job.output_schema is not None and "not logged" in event.job.output_schema["$comment"]
    assert image_reference(inline) != image_reference(inline[:-1] + "B"), "the digest tells images apart"


def test_an_error_result_replaces_the_output() -> None:
    result = JobResult(job_id="j", status="ok", task="caption", output={"caption": "x"})
    refused = error_result(result, "invalid_message", "m" * 5_000)
    assert refused.status == "error" and refused.output is None and refused.error is not None
    assert refused.error.code == "invalid_message" and len(refused.error.message) == 2_000
    encode(refused)
