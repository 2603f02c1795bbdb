"""Task answer schemas: each task's answer, a refusal for every task, extract's job schema, box keys."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from schemas.tasks import (
    BOX_FIELDS,
    MAX_OUTPUT_SCHEMA_BYTES,
    MAX_OUTPUT_SCHEMA_DEPTH,
    InvalidAnswer,
    InvalidTaskSchema,
    task_schema,
    validate_answer,
)
from workers.engines.instant import minimal_instance

INVOICE = {
    "type": "object",
    "properties": {"total": {"type": "number"}, "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}}},
    "required": ["total"],
    "$defs": {"Line": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}},
}
REFUSAL = {"refusal": {"code": "not_visible", "message": "There is no dog in the image."}}
VALID = {
    "detect": {"objects": [{"label": "cat", "bbox_xyxy": [10, 20, 30.5, 40], "confidence": 0.9}]},
    "ground": {"bbox_xyxy": [0, 0, 5, 5], "label": "the red door"},
    "caption": {"caption": "A cat on a mat."},
}


@pytest.mark.parametrize("task", ["detect", "ground", "caption", "extract"])
def test_every_schema_is_json_schema_and_admits_a_refusal(task: str) -> None:
    schema = task_schema(task, INVOICE if task == "extract" else None)
    Draft202012Validator.check_schema(schema)
    validate_answer(task, REFUSAL, INVOICE if task == "extract" else None)


@pytest.mark.parametrize("task", sorted(VALID))
def test_valid_answers_pass(task: str) -> None:
    validate_answer(task, VALID[task])


def test_extract_uses_the_job_schema_with_its_defs() -> None:
    validate_answer("extract", {"total": 12.5, "lines": [{"item": "tea"}]}, INVOICE)
    with pytest.raises(InvalidAnswer, match=r"\$\.lines\[0\]: 'item' is a required property"):
        validate_answer("extract", {"total": 1, "lines": [{}]}, INVOICE)


@pytest.mark.parametrize(
    ("task", "answer", "message"),
    [
        (
            "detect",
            {"objects": [{"label": "cat", "bbox_xyxy": [1, 2, 3]}]},
            r"\$\.objects\[0\]\.bbox_xyxy: .* too short",
        ),
        ("detect", {"objects": [{"label": "cat", "bbox_xyxy": [9, 2, 3, 4]}]}, "x1 > x2"),
        ("detect", {"objects": [{"label": "", "bbox_xyxy": [1, 2, 3, 4]}]}, r"\.label"),
        ("detect", {"objects": [{"label": "cat", "bbox_xyxy": [-1, 2, 3, 4]}]}, "minimum of 0"),
        ("ground", {"box_1000": [1, 2, 3, 4]}, "box_1000"),
        ("caption", {"caption": "x", "extra": 1}, "Additional properties"),
        ("caption", {"refusal": {"code": "nope", "message": "m"}}, r"\$\.refusal\.code: 'nope' is not one of"),
        ("caption", {"refusal": {"code": "other"}}, "'message' is a required property"),
    ],
)
def test_invalid_answers_name_the_problem(task: str, answer: object, message: str) -> None:
    with pytest.raises(InvalidAnswer, match=message):
        validate_answer(task, answer)


def test_box_field_follows_the_model_convention() -> None:
    for field in BOX_FIELDS:
        validate_answer("ground", {field: [1, 2, 3, 4]}, box_field=field)
    with pytest.raises(InvalidAnswer, match="1000"):
        validate_answer("ground", {"box_1000": [0, 0, 1001, 5]}, box_field="box_1000")


def _nested(levels: int) -> dict:
    """An object schema with `levels` levels of `properties` (each counts two levels of JSON nesting)."""
    schema: dict = {"type": "object"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("task", "schema", "message"),
    [
        ("extract", None, "needs the job's output_schema"),
        ("detect", INVOICE, "fixed schema"),
        ("translate", None, "unknown task"),
        ("extract", {"type": "no-such-type"}, "not a JSON Schema"),
        ("extract", {"type": "object", "description": "x" * MAX_OUTPUT_SCHEMA_BYTES}, "bytes as JSON, limit"),
        ("extract", _nested(MAX_OUTPUT_SCHEMA_DEPTH), "levels deep, limit"),
    ],
)
def test_schema_misuse_is_refused(task: str, schema: dict | None, message: str) -> None:
    with pytest.raises(InvalidTaskSchema, match=message):
        task_schema(task, schema)
    with pytest.raises(InvalidTaskSchema, match=message):
        validate_answer(task, {}, schema)


def test_schema_just_inside_the_depth_limit_is_accepted() -> None:
    schema = _nested(MAX_OUTPUT_SCHEMA_DEPTH // 2 - 1)
    validate_answer("extract", {"a": {"a": {}}}, schema)


def test_fixed_schemas_are_built_once_and_callers_get_their_own_copy() -> None:
    first = task_schema("caption")
    first["mutated"] = True
    assert "mutated" not in task_schema("caption")


@pytest.mark.parametrize("task", ["detect", "ground", "caption", "extract"])
def test_the_instant_engine_answers_every_schema_validly(task: str) -> None:
    """The workers decode with these schemas; their smallest instance must itself be a valid answer."""
    output_schema = INVOICE if task == "extract" else None
    validate_answer(task, minimal_instance(task_schema(task, output_schema)), output_schema)
