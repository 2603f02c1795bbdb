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

An `extract` job's schema comes from a job and is hostile until bounded (`_check_output_schema`): its size and
nesting are limited, its `$ref`s must be local, resolve, not recurse, and stay within a depth and a number of
subschemas once followed (so validation cannot overflow the stack or explode), and its regular expressions
(`pattern`, `patternProperties`) must compile with RE2 and are evaluated by RE2, in time linear in the text. An
answer nested deeper than `MAX_ANSWER_DEPTH` is refused before it reaches the validator or a serializer.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from functools import cache, lru_cache
from typing import Annotated, Any, Literal, get_args
from urllib.parse import unquote

import re2
from jsonschema import Draft202012Validator, SchemaError, ValidationError, validators
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
MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH = 64
"""Nesting of subschemas with every `$ref` followed (a hop counts one): bounds the validator's recursion."""
MAX_OUTPUT_SCHEMA_EXPANDED_NODES = 20_000
"""Subschemas with every `$ref` followed: a few definitions referenced over and over must not make validating
one answer take exponential time."""
MAX_ANSWER_DEPTH = 64
"""Nesting of objects and arrays in an answer. Deeper ones are refused before validation: pydantic's serializer
stops at a lower depth than JSON parsers, and the validator recurses per level."""

_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
"""Keywords whose value maps names to subschemas."""
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
"""Keywords whose value is a list of subschemas."""
_SCHEMA_ONE = frozenset(
    {"additionalProperties", "unevaluatedProperties", "items", "additionalItems", "unevaluatedItems", "contains"}
    | {"not", "if", "then", "else", "propertyNames"}
)
"""Keywords whose value is one subschema (`items` may still be a list in older drafts)."""
_REFUSED_KEYWORDS = frozenset(
    {"$id", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$schema"}
)
"""Keywords that would move where a `$ref` points (or the dialect) below the root; a job's schema has no use for
them once it is embedded with the refusal."""
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # NOTE: the refusal is the InvalidTaskSchema's one line, not a log on stderr


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


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re2._Regexp:
    """`pattern` compiled by RE2; `InvalidTaskSchema` naming it when RE2 cannot run it (backreferences,
    lookaround)."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidTaskSchema(
            f"output_schema pattern {pattern[:100]!r}: RE2 (linear time) cannot run it: {reason}"
        ) from None


class _ExpandedBounds:
    """Walks a schema as the validator will, `$ref`s followed, and refuses what the validator could not bound."""

    def __init__(self, root: JsonSchema):
        self.root = root
        self._expanded: dict[str, tuple[int, int]] = {}  # $ref -> (depth below it, subschemas) of its target
        self._following: set[str] = set()  # $refs being followed on the current path

    def check(self) -> None:
        self._walk(self.root, 0)
        if _uses(self.root, "unevaluatedProperties") and _uses(self.root, "patternProperties"):
            raise InvalidTaskSchema("output_schema: unevaluatedProperties with patternProperties is not supported")

    def _walk(self, node: Any, depth: int) -> tuple[int, int]:
        """(deepest depth reached, subschemas) of `node` taken as a subschema at `depth`."""
        if depth > MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH:
            raise InvalidTaskSchema(
                f"output_schema nests over {MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH} levels with its $refs followed"
            )
        deepest, nodes = depth, 1
        if not isinstance(node, dict):
            return deepest, nodes
        for keyword, value in node.items():
            children: list[Any] = []
            if keyword == "$ref" and isinstance(value, str):
                below, count = self._follow(value, depth + 1)
                deepest, nodes = max(deepest, below), nodes + count
            elif keyword in _REFUSED_KEYWORDS and isinstance(value, str):
                raise InvalidTaskSchema(f"output_schema: {keyword} is not supported below the root")
            elif keyword == "pattern" and isinstance(value, str):
                _regex(value)
            elif keyword in _SCHEMA_MAPS and isinstance(value, dict):
                if keyword == "patternProperties":
                    for pattern in value:
                        _regex(pattern)
                children = list(value.values())
            elif keyword in _SCHEMA_LISTS and isinstance(value, list):
                children = value
            elif keyword in _SCHEMA_ONE:
                children = value if isinstance(value, list) else [value]
            for child in children:
                below, count = self._walk(child, depth + 1)
                deepest, nodes = max(deepest, below), nodes + count
            if nodes > MAX_OUTPUT_SCHEMA_EXPANDED_NODES:
                raise InvalidTaskSchema(
                    f"output_schema has over {MAX_OUTPUT_SCHEMA_EXPANDED_NODES:,} subschemas with its $refs followed"
                )
        return deepest, nodes

    def _follow(self, ref: str, depth: int) -> tuple[int, int]:
        if ref in self._following:
            raise InvalidTaskSchema(f"output_schema $ref {ref[:100]!r} refers to itself: recursive schemas are refused")
        known = self._expanded.get(ref)
        if known is not None:
            below, count = known
            if depth + below > MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH:
                raise InvalidTaskSchema(
                    f"output_schema nests over {MAX_OUTPUT_SCHEMA_EXPANDED_DEPTH} levels with its $refs followed"
                )
            return depth + below, count
        target = self._resolve(ref)
        self._following.add(ref)
        deepest, count = self._walk(target, depth)
        self._following.discard(ref)
        self._expanded[ref] = (deepest - depth, count)
        return deepest, count

    def _resolve(self, ref: str) -> Any:
        """The node a local JSON Pointer `$ref` ("#", "#/$defs/Name") names."""
        if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
            raise InvalidTaskSchema(f"output_schema $ref {ref[:100]!r}: only local JSON Pointers (#/...) are allowed")
        node: Any = self.root
        for raw in ref[2:].split("/") if len(ref) > 1 else []:
            part = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise InvalidTaskSchema(f"output_schema $ref {ref[:100]!r} does not resolve")
        return node


def _uses(value: Any, keyword: str) -> bool:
    """Whether `keyword` is a key anywhere in `value` (as a keyword or a name: erring on the side of refusing)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if keyword in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` deep in `value`; without recursion, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: JsonSchema) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and _regex(pattern).search(instance) is None:
        yield ValidationError(f"{instance[:100]!r} does not match {pattern[:100]!r}")


def _re2_pattern_properties(
    validator: Any, pattern_properties: JsonSchema, instance: Any, schema: JsonSchema
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        regex = _regex(pattern)
        for name, value in instance.items():
            if regex.search(name) is not None:
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


def _re2_additional_properties(
    validator: Any, additional: Any, instance: Any, schema: JsonSchema
) -> Iterator[ValidationError]:
    """jsonschema's `additionalProperties`, with the names `patternProperties` covers matched by RE2."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = [_regex(pattern) for pattern in schema.get("patternProperties", {})]
    extras = [
        name
        for name in instance
        if name not in properties and not any(regex.search(name) is not None for regex in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        shown = ", ".join(repr(extra[:100]) for extra in sorted(extras)[:5])
        yield ValidationError(f"Additional properties are not allowed ({shown} unexpected)")


_AnswerValidator = validators.extend(
    Draft202012Validator,
    {
        "pattern": _re2_pattern,
        "patternProperties": _re2_pattern_properties,
        "additionalProperties": _re2_additional_properties,
    },
)
"""Draft 2020-12 with every regular expression evaluated by RE2."""


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
    _ExpandedBounds(_extract_with_refusal(output_schema)).check()


@cache
def _fixed_task_schema(task: Task, box_field: BoxField) -> JsonSchema:
    """Built once per task and box key: pydantic takes milliseconds to build a schema, and workers ask per job."""
    model = _answer_model(task, box_field)
    assert model is not None
    return _with_refusal(model)


@cache
def _fixed_task_validator(task: Task, box_field: BoxField) -> Any:
    return _AnswerValidator(_fixed_task_schema(task, box_field))


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


def _validator(task: str, output_schema: JsonSchema | None, box_field: BoxField) -> Any:
    _checked_task(task, output_schema)
    if output_schema is not None:
        _check_output_schema(output_schema)
        return _AnswerValidator(_extract_with_refusal(output_schema))
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
    """Raise `InvalidAnswer` naming the first problem when `answer` is not a valid answer to `task`
    (`InvalidTaskSchema` when the task or its schema is refused)."""
    validator = _validator(task, output_schema, box_field)
    if _nested_deeper_than(answer, MAX_ANSWER_DEPTH):
        raise InvalidAnswer(f"answer to {task!r} nests objects and arrays over {MAX_ANSWER_DEPTH} levels deep")
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
