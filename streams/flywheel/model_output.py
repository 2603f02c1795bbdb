"""A model's answer as logs carry it: text to JSON (plain, in a ```json fence, after a line of prose, or Qwen2-VL's
grounding tokens), then each detected object in one vocabulary (`label`, `bbox_xyxy`)."""

from __future__ import annotations

import itertools
import json
import re
from functools import lru_cache
from typing import Any

from schemas.boxes import QWEN_BOX_TEXT, BoxError, BoxForm, to_xyxy
from streams.flywheel.jsontext import RefusedJson, loads

JsonValue = dict[str, Any] | list[Any]

BOX_KEYS: dict[str, BoxForm] = {
    "bbox_xyxy": "xyxy",
    "bbox_2d": "xyxy",
    "bbox": "xywh",
    "box": "norm1",
    "box_1000": "norm1000",
}
"""Where an object may carry its box (any case, `-` or a space for `_`), in the order they are looked for;
`bbox_xyxy` is the normalized form."""
LABEL_KEYS = (
    "label",
    "label_name",
    "class",
    "class_name",
    "classname",
    "cls",
    "category",
    "category_name",
    "object",
    "object_name",
    "name",
    "tag",
)
"""Where a detected object may carry its label (any case, `-` or a space for `_`), in order of preference: the
first one present with a text value becomes `label`; other label-like keys stay as they are."""
MAX_JSON_STARTS = 20
"""Lines starting with `{` or `[` tried as the answer after prose; each try may read to the end of the text."""
MAX_DEPTH = 32
"""Deeper answers are refused: no task schema nests this far, and walking them recursively costs stack."""

_FENCE = re.compile(r"```[A-Za-z0-9_-]{0,20}[ \t]{0,8}\n(.*?)```", re.DOTALL)
_JSON_LINE_START = re.compile(r"^[ \t]*[\[{]", re.MULTILINE)
_GROUNDING = re.compile(
    r"(?:<\|object_ref_start\|>([^<]{0,200})<\|object_ref_end\|>)?\s{0,8}(" + QWEN_BOX_TEXT.pattern + ")"
)
"""Bounded repeats (a label ends at the next token, at most 8 blanks between tokens): long text stays linear."""


class OutputError(ValueError):
    """An answer that cannot be read as JSON; the message says why without quoting the text."""


def _no_constants(name: str) -> Any:
    raise OutputError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)
"""Reads the JSON value at the start of a text and where it ends (the answer may go on in prose after it)."""


def _loads(text: str) -> JsonValue:
    try:
        return _container(loads(text), text)
    except json.JSONDecodeError as exc:
        raise OutputError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise OutputError(f"nested deeper than {MAX_DEPTH} levels") from None
    except RefusedJson as exc:
        raise OutputError(str(exc)) from None
    except OutputError:
        raise
    except ValueError as exc:
        raise OutputError(f"not JSON: {exc}") from None


def parse_json_text(text: str) -> JsonValue:
    """The JSON object or array in a model's text answer, wherever the model put it: the whole text, a fenced
    block, the first line that starts a JSON value (after prose), or else Qwen2-VL grounding tokens (read after
    the JSON: a JSON answer may carry box tokens in its strings, and its labels would be lost)."""
    stripped = text.strip()
    if not stripped:
        raise OutputError("empty answer")
    reason = None
    if stripped[0] in "[{":
        try:
            return _loads(stripped)
        except OutputError as exc:
            reason = str(exc)
    fence = _FENCE.search(text) if "```" in text else None
    if fence:
        try:
            return _loads(fence.group(1))
        except OutputError:
            pass
    for start in itertools.islice(_JSON_LINE_START.finditer(text), MAX_JSON_STARTS):
        rest = text[start.end() - 1 :].rstrip()
        try:
            return _loads(rest)
        except OutputError:
            pass
        try:
            value, _ = _DECODER.raw_decode(rest)
            return _container(value)
        except (OutputError, ValueError, RecursionError):
            continue
    grounded = _grounding(stripped) if "<|box_start|>" in stripped else None
    if grounded is not None:
        return grounded
    if reason is None:
        try:
            _loads(stripped)
        except OutputError as exc:
            reason = str(exc)
    raise OutputError(reason or "not JSON")


def _container(value: Any, text: str | None = None) -> JsonValue:
    """`value` when it is an object or array no deeper than `MAX_DEPTH`; a text with no more brackets than that
    cannot nest deeper, so its value is not walked."""
    if not isinstance(value, dict | list):
        raise OutputError(f"the answer is a JSON {type(value).__name__}, not an object or array")
    if text is None or text.count("[") + text.count("{") > MAX_DEPTH:
        check_depth(value)
    return value


def check_depth(value: JsonValue) -> None:
    """Refuse answers nested deeper than `MAX_DEPTH` (walked without recursion)."""
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return
    raise OutputError(f"nested deeper than {MAX_DEPTH} levels")


def _grounding(text: str) -> JsonValue | None:
    """Qwen2-VL's native grounding answer (`<|object_ref_start|>cat<|object_ref_end|><|box_start|>...`) as
    `{"objects": [{"label", "box_1000"}]}`; None when the text holds no box tokens."""
    objects = []
    for match in _GROUNDING.finditer(text):
        item: dict[str, Any] = {"box_1000": match.group(2)}
        if match.group(1) is not None:
            item["label"] = match.group(1)
        objects.append(item)
    return {"objects": objects} if objects else None


_ROLES: dict[str, tuple[int, int]] = {}
"""key as an object spells it -> (role, rank): role 1 for a box key, 2 for a label key, 0 for neither; rank is its
place in `BOX_KEYS` or `LABEL_KEYS`. Filled as keys are met (answers repeat a few keys), emptied when it grows
past `_ROLES_MAX` (keys come from logs)."""
_ROLES_MAX = 4096
_BOX_FORMS = list(BOX_KEYS.values())


def _role(key: str) -> tuple[int, int]:
    """`_ROLES[key]`, filled when missing (the walk reads `_ROLES` itself first: most keys are there)."""
    if len(_ROLES) >= _ROLES_MAX:
        _ROLES.clear()
    name = _vocabulary_key(key)
    if name in BOX_KEYS:
        role = (1, list(BOX_KEYS).index(name))
    elif name in LABEL_KEYS:
        role = (2, LABEL_KEYS.index(name))
    else:
        role = (0, 0)
    _ROLES[key] = role
    return role


_Answer = tuple[int | None, int | None, dict[str, str], list[str]]
"""What the walk over one answer needs at each box (width, height, synonyms) and where it collects the problems
met (errors). NOTE: a plain tuple: a class or named tuple costs more to make than a short answer costs to walk."""


Trail = tuple[Any, Any, bool] | None
"""Where a value sits in the answer: `(outer trail, key or index, whether it is a list index)`, None at the top.
NOTE: the walk passes trails, not path strings: a path is only written for an error, and most answers have none."""


def _walk_list(value: list[Any], answer: _Answer, trail: Trail) -> list[Any]:
    """`value` with its objects normalized; a list without a change is returned as it is (the walk copies only what
    it changes, and never walks a list of plain values such as a box). Written for the common answer (a few objects
    of a few keys each): types are tested with `type() is`."""
    out = value
    for index, item in enumerate(value):
        kind = type(item)
        if kind is dict or kind is list:
            inner = (trail, index, True)
            new = _walk_dict(item, answer, inner) if kind is dict else _walk_list(item, answer, inner)
            if new is not item:
                if out is value:
                    out = list(value)
                out[index] = new
    return out


def _walk_dict(value: dict[str, Any], answer: _Answer, trail: Trail) -> dict[str, Any]:
    """`_walk_list` for an object, which may be a detection: roles of keys are read from `_ROLES` inline."""
    out = value
    box: tuple[int, str] | None = None
    """(rank, key) of the first box key in vocabulary order"""
    label: tuple[int, str] | None = None
    """the first (rank, key) of a label key with a text value"""
    first_label: tuple[int, str] | None = None
    """the first (rank, key) of any label key"""
    for key, item in value.items():
        kind = type(item)
        if kind is dict or kind is list:
            inner = (trail, key, False)
            new = _walk_dict(item, answer, inner) if kind is dict else _walk_list(item, answer, inner)
            if new is not item:
                if out is value:
                    out = dict(value)
                out[key] = new
        if type(key) is not str:
            continue
        role, rank = _ROLES.get(key) or _role(key)
        if role == 1:
            if box is None or rank < box[0]:
                box = (rank, key)
        elif role == 2:
            if first_label is None or (rank, key) < first_label:
                first_label = (rank, key)
            if kind is str and (label is None or (rank, key) < label):
                label = (rank, key)
    if box is None:
        return out
    if out is value:
        out = dict(value)
    rank, box_key = box
    width, height, synonyms, errors = answer
    try:
        xyxy = to_xyxy(out[box_key], _BOX_FORMS[rank], width=width, height=height)
    except BoxError as exc:
        errors.append(f"{_join(_path(trail), box_key)}: {exc}")
    else:
        del out[box_key]
        out["bbox_xyxy"] = list(xyxy)
    if label is not None:
        text = out.pop(label[1]).strip().lower()
        out["label"] = synonyms.get(text, text)
    elif first_label is not None:
        errors.append(f"{_join(_path(trail), first_label[1])}: a label must be text")
    return out


def _path(trail: Trail) -> str:
    """A trail as errors name it: `objects[0].box`."""
    if trail is None:
        return ""
    outer, step, is_index = trail
    path = _path(outer)
    return f"{path}[{step}]" if is_index else _join(path, step)


def normalize_objects(
    value: JsonValue, *, width: int | None, height: int | None, synonyms: dict[str, str]
) -> tuple[JsonValue, list[str]]:
    """Every object that carries a box (a detection) gets `bbox_xyxy` (absolute pixels, 0.1) and, from the first
    label-like key with a text value (`LABEL_KEYS`), a lowercased, trimmed, synonym-mapped `label`. Objects without
    a box are left alone (an extracted `name` is not a label).

    Returns the new value (the very input where nothing changed: only what changes is copied) and the problems met
    (`path: reason`); an object whose box cannot be read keeps it."""
    errors: list[str] = []
    answer = (width, height, {k.strip().lower(): v.strip().lower() for k, v in synonyms.items()}, errors)
    if type(value) is dict:
        return _walk_dict(value, answer, None), errors
    return _walk_list(value, answer, None), errors  # type: ignore[arg-type]  # a dict subclass is walked as a list


@lru_cache(maxsize=4096)
def _vocabulary_key(key: str) -> str:
    """A key as the vocabularies spell it: trimmed, lowercase, `_` for `-` and spaces (`Class-Name` → `class_name`).
    Cached (bounded: keys come from logs): answers repeat the same few keys."""
    return key.strip().lower().replace("-", "_").replace(" ", "_")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
