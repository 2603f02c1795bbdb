"""The answer each task must give, as JSON Schema: for constrained decoding in the workers, and to check a
reviewer's corrected answer before it becomes training data.

Every task admits a refusal, `{"refusal": {"code", "message"}}`, so the model (or a reviewer) can say that the
question cannot be answered from the image instead of inventing an answer. Fixed tasks:

| task      | answer                                                                  |
| --------- | ----------------------------------------------------------------------- |
| `detect`  | `{"objects": [{"label": str, BOX: [x1, y1, x2, y2], "confidence"?: 0–1}]}` |
| `ground`  | `{BOX: [x1, y1, x2, y2], "label"?: str}` (the referred element)        |
| `caption` | `{"caption": str}`                                                      |
| `extract` | the job's own `output_schema`                                           |

BOX is the key of the box convention: `bbox_xyxy` (absolute pixels of the original image, what normalized logs,
corrections and golden records hold), `box_1000` (Qwen2-VL and Qwen3-VL's 0–1000 grid) or `bbox_2d` (Qwen2.5-VL's
pixels of the resized image). A worker constraining a model asks for that model's key (`MODEL_BOX_FIELD`).
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from typing import Annotated, Any, Literal, get_args

from jsonschema import Draft202012Validator, SchemaError
from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model

from schemas.errors import VlmflowError
from schemas.jobs import TASKS, Task
from schemas.settings import ModelFamily

BoxField = Literal["bbox_xyxy", "box_1000", "bbox_2d"]
BOX_FIELDS: tuple[BoxField, ...] = get_args(BoxField)
MODEL_BOX_FIELD: dict[ModelFamily, BoxField] = {"qwen2-vl": "box_1000", "qwen2.5-vl": "bbox_2d", "qwen3-vl": "box_1000"}
"""The key under which each model family writes a box, in its own coordinates."""

RefusalCode = Literal[
    "unsupported_capability",  # the request asks for something the model does not do (audio, editing, ...)
    "unknown_field",  # the request asks for a field the schema or the document does not have
    "missing_partition",  # the request names a page, part or region the input does not contain
    "not_visible",  # the referred element is not in the image
    "unreadable",  # the image is too blurred, cut or dark to answer
    "other",
]
REFUSAL_CODES: tuple[str, ...] = get_args(RefusalCode)
JsonSchema = dict[str, Any]

MAX_OUTPUT_SCHEMA_BYTES = 16_384
"""An `extract` job's schema, as compact JSON, may not be larger: it is compiled into a grammar per request."""
MAX_OUTPUT_SCHEMA_DEPTH = 16
"""Nesting of objects and arrays in an `extract` job's schema (a `properties` level counts as two)."""


class InvalidAnswer(VlmflowError, ValueError):
    """An answer that does not follow its task's schema; the message names the path of the first problem."""


class InvalidTaskSchema(VlmflowError, ValueError):
    """A task without the schema it needs (`extract`), with one it must not have, or an unknown task."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Refusal(_Strict):
    code: RefusalCode
    message: Annotated[str, Field(min_length=1, max_length=500)]


class RefusalAnswer(_Strict):
    """The answer of any task that cannot be answered from the input."""

    refusal: Refusal


class CaptionAnswer(_Strict):
    caption: Annotated[str, Field(min_length=1, max_length=4_000)]


def _box_type(box_field: BoxField) -> Any:
    # NOTE: only the 0–1000 grid has an upper bound; pixel boxes are bounded by an image size the schema cannot see.
    upper = {"le": 1000} if box_field == "box_1000" else {}
    coordinate = Annotated[float, Field(ge=0, **upper)]
    return Annotated[list[coordinate], Field(min_length=4, max_length=4)]


@cache
def _answer_model(task: Task, box_field: BoxField) -> type[BaseModel] | None:
    """The pydantic model of a fixed task's answer with boxes under `box_field`; None for `extract`."""
    box = (_box_type(box_field), Field(alias=box_field))
    if task == "detect":
        detected = create_model(
            "DetectedObject",
            __base__=_Strict,
            label=(Annotated[str, Field(min_length=1, max_length=200)], ...),
            box=box,
            confidence=(Annotated[float, Field(ge=0, le=1)] | None, None),
        )
        return create_model("DetectAnswer", __base__=_Strict, objects=(list[detected], ...))  # type: ignore[valid-type]
    if task == "ground":
        label = Annotated[str, Field(min_length=1, max_length=200)] | None
        return create_model("GroundAnswer", __base__=_Strict, box=box, label=(label, None))
    if task == "caption":
        return CaptionAnswer
    return None


def _with_refusal(answer_model: type[BaseModel]) -> JsonSchema:
    union = RootModel[answer_model | RefusalAnswer]  # type: ignore[valid-type]
    return union.model_json_schema(by_alias=True)


def _extract_with_refusal(output_schema: JsonSchema) -> JsonSchema:
    """`anyOf` the job's schema and a refusal, with the job's `$defs` kept at the root where its `$ref`s point."""
    refusal = RefusalAnswer.model_json_schema()
    refusal_defs = refusal.pop("$defs")
    job_schema = {key: value for key, value in output_schema.items() if key not in ("$defs", "$schema", "$id")}
    job_defs = output_schema.get("$defs", {})
    clash = set(job_defs) & (set(refusal_defs) | {"RefusalAnswer"})
    if clash:
        raise InvalidTaskSchema(f"output_schema $defs use names reserved for refusals: {', '.join(sorted(clash))}")
    return {
        "$defs": {**job_defs, **refusal_defs, "RefusalAnswer": refusal},
        "anyOf": [job_schema, {"$ref": "#/$defs/RefusalAnswer"}],
    }


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _check_output_schema(output_schema: JsonSchema) -> None:
    size = len(json.dumps(output_schema, separators=(",", ":")))
    if size > MAX_OUTPUT_SCHEMA_BYTES:
        raise InvalidTaskSchema(f"output_schema is {size} bytes as JSON, limit {MAX_OUTPUT_SCHEMA_BYTES}")
    depth = _depth(output_schema)
    if depth > MAX_OUTPUT_SCHEMA_DEPTH:
        raise InvalidTaskSchema(f"output_schema nests {depth} levels deep, limit {MAX_OUTPUT_SCHEMA_DEPTH}")
    try:
        Draft202012Validator.check_schema(output_schema)
    except SchemaError as exc:
        raise InvalidTaskSchema(f"output_schema is not a JSON Schema: {exc.message}") from None


@cache
def _fixed_task_schema(task: Task, box_field: BoxField) -> JsonSchema:
    """Built once per task and box key: pydantic takes milliseconds to build a schema, and workers ask per job."""
    model = _answer_model(task, box_field)
    assert model is not None
    return _with_refusal(model)


@cache
def _fixed_task_validator(task: Task, box_field: BoxField) -> Draft202012Validator:
    return Draft202012Validator(_fixed_task_schema(task, box_field))


def _checked_task(task: str, output_schema: JsonSchema | None) -> None:
    if task not in TASKS:
        raise InvalidTaskSchema(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if task == "extract" and output_schema is None:
        raise InvalidTaskSchema("task 'extract' needs the job's output_schema")
    if task != "extract" and output_schema is not None:
        raise InvalidTaskSchema(f"task {task!r} has a fixed schema; output_schema is only for 'extract'")


def task_schema(task: str, output_schema: JsonSchema | None = None, *, box_field: BoxField = "bbox_xyxy") -> JsonSchema:
    """JSON Schema of the answer to `task` (a refusal always allowed); `output_schema` is the job's, for `extract`,
    limited in size and depth. The caller owns the returned dict."""
    _checked_task(task, output_schema)
    if output_schema is not None:
        _check_output_schema(output_schema)
        return _extract_with_refusal(output_schema)
    return copy.deepcopy(_fixed_task_schema(task, box_field))


def _validator(task: str, output_schema: JsonSchema | None, box_field: BoxField) -> Draft202012Validator:
    _checked_task(task, output_schema)
    if output_schema is not None:
        _check_output_schema(output_schema)
        return Draft202012Validator(_extract_with_refusal(output_schema))
    return _fixed_task_validator(task, box_field)


def is_refusal(answer: Any) -> bool:
    return isinstance(answer, dict) and set(answer) == {"refusal"}


def _check_box_order(answer: Any, box_field: BoxField, task: str, path: str = "$") -> None:
    """JSON Schema cannot say x1 <= x2 and y1 <= y2; a box drawn backwards is a reviewer's slip worth catching."""
    if isinstance(answer, dict):
        for key, value in answer.items():
            if key == box_field and isinstance(value, list) and len(value) == 4:
                x1, y1, x2, y2 = value
                if all(isinstance(v, int | float) and math.isfinite(v) for v in value) and (x1 > x2 or y1 > y2):
                    raise InvalidAnswer(f"answer to {task!r} at {path}.{key}: box {value} has x1 > x2 or y1 > y2")
            _check_box_order(value, box_field, task, f"{path}.{key}")
    elif isinstance(answer, list):
        for index, item in enumerate(answer):
            _check_box_order(item, box_field, task, f"{path}[{index}]")


def validate_answer(
    task: str, answer: Any, output_schema: JsonSchema | None = None, *, box_field: BoxField = "bbox_xyxy"
) -> None:
    """Raise `InvalidAnswer` naming the first problem when `answer` is not a valid answer to `task`."""
    validator = _validator(task, output_schema, box_field)
    errors = sorted(validator.iter_errors(answer), key=lambda error: (len(error.absolute_path), error.message))
    if errors:
        first = errors[0]
        path = "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first.absolute_path)
        detail = first.message
        if first.validator == "anyOf" and isinstance(answer, dict):
            # NOTE: the anyOf message only says "not valid under any"; the branch the answer meant says why.
            branch = 1 if "refusal" in answer else 0
            branch_errors = [e for e in first.context or [] if e.relative_schema_path[0] == branch]
            if branch_errors:
                best = min(branch_errors, key=lambda error: len(error.absolute_path))
                path += "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in best.absolute_path)
                detail = best.message
        raise InvalidAnswer(f"answer to {task!r} at {path}: {detail[:300]}")
    _check_box_order(answer, box_field, task)
