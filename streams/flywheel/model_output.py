"""A model's answer as logs carry it: text to JSON (plain, in a ```json fence, after a line of prose, or Qwen2-VL's
grounding tokens), then each detected object in one vocabulary (`label`, `bbox_xyxy`)."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from schemas.boxes import QWEN_BOX_TEXT, BoxError, BoxForm, to_xyxy

JsonValue = dict[str, Any] | list[Any]

BOX_KEYS: dict[str, BoxForm] = {
    "bbox_xyxy": "xyxy",
    "bbox_2d": "xyxy",
    "bbox": "xywh",
    "box": "norm1",
    "box_1000": "norm1000",
}
"""Where an object may carry its box, in the order they are looked for; `bbox_xyxy` is the normalized form."""
LABEL_KEYS = ("label", "name", "category")
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


def _loads(text: str) -> JsonValue:
    try:
        return _container(json.loads(text, parse_constant=_no_constants))
    except json.JSONDecodeError as exc:
        raise OutputError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise OutputError(f"nested deeper than {MAX_DEPTH} levels") from None
    except OutputError:
        raise
    except ValueError as exc:
        raise OutputError(f"not JSON: {exc}") from None


def parse_json_text(text: str) -> JsonValue:
    """The JSON object or array in a model's text answer, wherever the model put it: the whole text, a fenced
    block, Qwen2-VL grounding tokens, or the first line that starts a JSON value (after prose)."""
    stripped = text.strip()
    if not stripped:
        raise OutputError("empty answer")
    try:
        return _loads(stripped)
    except OutputError as exc:
        reason = str(exc)
    fence = _FENCE.search(text)
    if fence:
        try:
            return _loads(fence.group(1))
        except OutputError:
            pass
    grounded = _grounding(stripped)
    if grounded is not None:
        return grounded
    decoder = json.JSONDecoder(parse_constant=_no_constants)
    for start in itertools.islice(_JSON_LINE_START.finditer(text), MAX_JSON_STARTS):
        try:
            value, _ = decoder.raw_decode(text, start.end() - 1)
            return _container(value)
        except (OutputError, ValueError, RecursionError):
            continue
    raise OutputError(reason)


def _container(value: Any) -> JsonValue:
    if not isinstance(value, dict | list):
        raise OutputError(f"the answer is a JSON {type(value).__name__}, not an object or array")
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


@dataclass
class _Walk:
    """One pass over an answer; collects where boxes or labels could not be read."""

    width: int | None
    height: int | None
    synonyms: dict[str, str]
    errors: list[str] = field(default_factory=list)

    def node(self, value: Any, path: str) -> Any:
        if isinstance(value, list):
            return [self.node(item, f"{path}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, dict):
            return self.obj(value, path)
        return value

    def obj(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        out = {key: self.node(item, _join(path, key)) for key, item in value.items()}
        box_key = next((key for key in BOX_KEYS if key in out), None)
        if box_key is None:
            return out
        try:
            box = to_xyxy(out[box_key], BOX_KEYS[box_key], width=self.width, height=self.height)
        except BoxError as exc:
            self.errors.append(f"{_join(path, box_key)}: {exc}")
        else:
            del out[box_key]
            out["bbox_xyxy"] = list(box)
        label_key = next((key for key in LABEL_KEYS if key in out), None)
        if label_key is not None:
            if isinstance(out[label_key], str):
                out["label"] = self.label(out.pop(label_key))
            else:
                self.errors.append(f"{_join(path, label_key)}: a label must be text")
        return out

    def label(self, text: str) -> str:
        key = text.strip().lower()
        return self.synonyms.get(key, key)


def normalize_objects(
    value: JsonValue, *, width: int | None, height: int | None, synonyms: dict[str, str]
) -> tuple[JsonValue, list[str]]:
    """Every object that carries a box gets `bbox_xyxy` (absolute pixels, 0.1) and a lowercased, trimmed,
    synonym-mapped `label`. Objects without a box are left alone (an extracted `name` is not a label).

    Returns the new value and the problems met (`path: reason`); an object whose box cannot be read keeps it."""
    walk = _Walk(width, height, {k.strip().lower(): v.strip().lower() for k, v in synonyms.items()})
    return walk.node(value, ""), walk.errors


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
