"""Task answer schemas: each task's answer, a refusal for every task, extract's job schema, box keys, and the bounds
on a job's schema and answer that keep validating it finite and fast (issue 12 items 1 and 2)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from schemas.tasks import (
    BOX_FIELDS,
    MAX_ANSWER_DEPTH,
    MAX_OUTPUT_SCHEMA_BYTES,
    MAX_OUTPUT_SCHEMA_DEPTH,
    MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH,
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


# -- hostile schemas and answers (issue 12 items 1 and 2) ---------------------------------------------------------


def chained_refs(hops: int) -> dict[str, Any]:
    """A schema whose one property reaches a string through `hops` `$ref`s: small, shallow, and (unbounded) deep
    enough to overflow the validator's stack."""
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    defs[f"d{hops}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def doubling_refs(levels: int) -> dict[str, Any]:
    """Each definition refers twice to the next: a few hundred bytes that expand to 2**levels subschemas."""
    defs: dict[str, Any] = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def nested_answer(levels: int) -> Any:
    answer: Any = "leaf"
    for _ in range(levels):
        answer = {"a": answer}
    return answer


def test_a_chain_of_500_refs_is_refused_not_a_recursion_error() -> None:
    schema = chained_refs(500)
    assert len(json.dumps(schema, separators=(",", ":"))) <= MAX_OUTPUT_SCHEMA_BYTES, "passes the size check"
    with pytest.raises(InvalidTaskSchema, match="with its \\$refs followed"):
        validate_answer("extract", {"x": "y"}, schema)
    with pytest.raises(InvalidTaskSchema, match="with its \\$refs followed"):
        task_schema("extract", schema)


def test_refs_within_the_bounds_are_followed() -> None:
    schema = chained_refs(MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH // 2)
    validate_answer("extract", {"x": "y"}, schema)
    with pytest.raises(InvalidAnswer, match="is not of type 'string'"):
        validate_answer("extract", {"x": 1}, schema)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"$ref": "#/$defs/loop", "$defs": {"loop": {"$ref": "#/$defs/loop"}}}, "refers to itself"),
        ({"properties": {"a": {"$ref": "https://example.org/s.json"}}}, "only local JSON Pointers"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not resolve"),
        ({"properties": {"a": {"$ref": "#anchor"}}}, "only local JSON Pointers"),
        ({"properties": {"a": {"$id": "urn:other", "type": "string"}}}, r"\$id is not supported"),
        (doubling_refs(30), "subschemas with its \\$refs followed"),
        ({"properties": {"a": {"type": "string", "pattern": "(a)\\1"}}}, "RE2 .* cannot run it"),
        ({"patternProperties": {"(?=x)": {"type": "string"}}}, "RE2 .* cannot run it"),
        ({"patternProperties": {"^a": {}}, "unevaluatedProperties": False}, "unevaluatedProperties with"),
    ],
)
def test_schemas_the_validator_could_not_bound_are_refused(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTaskSchema, match=message):
        task_schema("extract", schema)


def test_an_answer_nested_past_the_limit_is_invalid_whatever_its_depth() -> None:
    validate_answer("extract", nested_answer(MAX_ANSWER_DEPTH - 1), {"type": "object"})
    for levels in (MAX_ANSWER_DEPTH + 1, 5_000):
        with pytest.raises(InvalidAnswer, match="nests objects and arrays over"):
            validate_answer("extract", nested_answer(levels), {"type": "object"})


def test_a_catastrophic_pattern_is_evaluated_in_linear_time() -> None:
    """`^([A-Za-z ]+)*$` backtracks exponentially in Python's `re` (0.4 s at 23 characters, doubling per
    character); RE2 answers at once, so a hostile pattern cannot freeze a worker."""
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^([A-Za-z ]+)*$"}}}
    with ThreadPoolExecutor(1) as pool:
        checked = pool.submit(validate_answer, "extract", {"x": "a" * 5_000 + "!"}, schema)
        with pytest.raises(InvalidAnswer, match="does not match"):
            checked.result(timeout=5)
        pool.submit(validate_answer, "extract", {"x": "Just Words"}, schema).result(timeout=5)


def test_pattern_properties_and_additional_properties_follow_re2() -> None:
    schema = {
        "type": "object",
        "patternProperties": {"^n_[0-9]+$": {"type": "number"}},
        "additionalProperties": False,
    }
    validate_answer("extract", {"n_1": 1.5, "n_22": 3}, schema)
    with pytest.raises(InvalidAnswer, match="is not of type 'number'"):
        validate_answer("extract", {"n_1": "one"}, schema)
    with pytest.raises(InvalidAnswer, match="Additional properties are not allowed"):
        validate_answer("extract", {"name": 1}, schema)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
SCHEMA_KEYWORDS = st.sampled_from(
    ["type", "properties", "items", "$ref", "pattern", "patternProperties", "anyOf", "$defs", "minLength", "enum"]
)
HOSTILE_SCHEMAS = st.recursive(
    st.fixed_dictionaries({}, optional={"type": st.sampled_from(["object", "string", "array", "number", 7])}),
    lambda children: st.dictionaries(
        SCHEMA_KEYWORDS,
        children
        | st.text(max_size=12)
        | st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=6), children),
        max_size=4,
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(schema=HOSTILE_SCHEMAS, answer=JSON_VALUES)
def test_any_schema_and_answer_end_in_a_typed_outcome(schema: dict[str, Any], answer: Any) -> None:
    """Whatever a job sends as schema and the engine as answer: valid, `InvalidAnswer` or `InvalidTaskSchema`,
    never another exception (a crash of the worker)."""
    try:
        validate_answer("extract", answer, schema)
    except (InvalidAnswer, InvalidTaskSchema):
        pass
