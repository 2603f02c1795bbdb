"""`streams.flywheel.model_output.normalize_objects`: by example, and by property against the definition it had
before it was made cheaper (same value, same copies, same errors, bit for bit)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.boxes import BoxError
from streams.flywheel.model_output import BOX_KEYS, LABEL_KEYS, JsonValue, normalize_objects
from tests.unit.test_boxes import BOX_VALUES, SIZES, exact, outcome, reference_to_xyxy

_REFERENCE_ROLES: dict[str, tuple[int, int]] = {}
_REFERENCE_BOX_FORMS = list(BOX_KEYS.values())


@lru_cache(maxsize=4096)
def _reference_vocabulary_key(key: str) -> str:
    return key.strip().lower().replace("-", "_").replace(" ", "_")


def _reference_role(key: str) -> tuple[int, int]:
    if len(_REFERENCE_ROLES) >= 4096:
        _REFERENCE_ROLES.clear()
    name = _reference_vocabulary_key(key)
    if name in BOX_KEYS:
        role = (1, list(BOX_KEYS).index(name))
    elif name in LABEL_KEYS:
        role = (2, LABEL_KEYS.index(name))
    else:
        role = (0, 0)
    _REFERENCE_ROLES[key] = role
    return role


def _reference_join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _ReferenceWalk:
    """`normalize_objects`' walk as it was before it was made cheaper."""

    __slots__ = ("errors", "height", "synonyms", "width")

    def __init__(self, width: int | None, height: int | None, synonyms: dict[str, str]):
        self.width = width
        self.height = height
        self.synonyms = synonyms
        self.errors: list[str] = []

    def node(self, value: Any, path: str) -> Any:
        if type(value) is dict:
            return self.obj(value, path)
        out = value
        for index, item in enumerate(value):
            kind = type(item)
            if kind is dict or kind is list:
                new = self.node(item, f"{path}[{index}]")
                if new is not item:
                    if out is value:
                        out = list(value)
                    out[index] = new
        return out

    def obj(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        out = value
        box: tuple[int, str] | None = None
        label: tuple[int, str] | None = None
        first_label: tuple[int, str] | None = None
        for key, item in value.items():
            kind = type(item)
            if kind is dict or kind is list:
                new = self.node(item, _reference_join(path, key))
                if new is not item:
                    if out is value:
                        out = dict(value)
                    out[key] = new
            if type(key) is not str:
                continue
            role, rank = _REFERENCE_ROLES.get(key) or _reference_role(key)
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
        try:
            xyxy = reference_to_xyxy(out[box_key], _REFERENCE_BOX_FORMS[rank], width=self.width, height=self.height)
        except BoxError as exc:
            self.errors.append(f"{_reference_join(path, box_key)}: {exc}")
        else:
            del out[box_key]
            out["bbox_xyxy"] = list(xyxy)
        if label is not None:
            out["label"] = self.label(out.pop(label[1]))
        elif first_label is not None:
            self.errors.append(f"{_reference_join(path, first_label[1])}: a label must be text")
        return out

    def label(self, text: str) -> str:
        key = text.strip().lower()
        return self.synonyms.get(key, key)


def reference_normalize_objects(
    value: JsonValue, *, width: int | None, height: int | None, synonyms: dict[str, str]
) -> tuple[JsonValue, list[str]]:
    """`normalize_objects` as it was before it was made cheaper."""
    walk = _ReferenceWalk(width, height, {k.strip().lower(): v.strip().lower() for k, v in synonyms.items()})
    return walk.node(value, ""), walk.errors


def spellings(name: str) -> st.SearchStrategy[str]:
    """`name` as a model may spell it: any case, `-` or a space for `_`, blanks around it."""
    parts = name.split("_")
    return st.tuples(
        st.lists(st.sampled_from(["_", "-", " "]), min_size=len(parts) - 1, max_size=len(parts) - 1),
        st.lists(st.booleans(), min_size=len(name), max_size=len(name)),
        st.sampled_from(["", " ", "\t"]),
        st.sampled_from(["", " "]),
    ).map(lambda t: _spell(parts, *t))


def _spell(parts: list[str], joins: list[str], upper: list[bool], before: str, after: str) -> str:
    word = parts[0] + "".join(join + part for join, part in zip(joins, parts[1:], strict=True))
    return before + "".join(c.upper() if up else c for c, up in zip(word, upper, strict=True)) + after


BOX_KEY = st.sampled_from(list(BOX_KEYS)).flatmap(spellings)
LABEL_KEY = st.sampled_from(LABEL_KEYS).flatmap(spellings)
OTHER_KEY = st.one_of(st.sampled_from(["", "objects", "note", "confidence", "boxes", "labels"]), st.text(max_size=6))
LABEL_TEXTS = ["Cat", " dog ", "PERSON", "car", "kitty", "Puppy ", ""]
LABEL_VALUE = st.one_of(
    st.sampled_from(LABEL_TEXTS), st.text(max_size=6), st.integers(), st.none(), st.lists(st.integers(), max_size=2)
)
PLAIN = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))


def detections(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[Any, Any]]:
    """An object that may carry boxes (one or several box keys), labels (text or not) and anything else."""
    entries = st.one_of(
        st.tuples(BOX_KEY, BOX_VALUES),
        st.tuples(LABEL_KEY, LABEL_VALUE),
        st.tuples(OTHER_KEY, st.one_of(PLAIN, children)),
        st.tuples(st.integers(0, 3), st.one_of(PLAIN, children)),  # not JSON, but a dict may have such keys
    )
    return st.lists(entries, max_size=6).map(dict)


ANSWERS = st.recursive(
    st.one_of(detections(PLAIN), st.lists(PLAIN, max_size=3)),
    lambda children: st.one_of(detections(children), st.lists(children, max_size=4)),
    max_leaves=12,
)
SYNONYMS = st.dictionaries(st.sampled_from(LABEL_TEXTS + [" CAT", "Kitty"]), st.sampled_from(LABEL_TEXTS), max_size=3)


def containers(value: Any) -> list[Any]:
    """Every dict and list in `value`, outermost first."""
    found = [value] if isinstance(value, dict | list) else []
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        found.extend(containers(item))
    return found


def result(call: Any, value: JsonValue, **kwargs: Any) -> Any:
    """A normalization's exact outcome, which of the input's containers it returns as they are, and whether the
    input is left as it was."""
    before = exact(value)
    got = outcome(call, value, **kwargs)
    try:
        out, _ = call(value, **kwargs)
    except Exception:  # the outcome has the exception
        kept = None
    else:
        inputs = {id(item) for item in containers(value)}
        kept = [id(item) in inputs for item in containers(out)]
    return got, kept, exact(value) == before


@settings(max_examples=1_000)
@given(ANSWERS, SIZES, SIZES, SYNONYMS)
def test_normalize_objects_is_the_reference(
    value: JsonValue, width: int | None, height: int | None, synonyms: dict[str, str]
) -> None:
    kwargs: dict[str, Any] = {"width": width, "height": height, "synonyms": synonyms}
    assert result(normalize_objects, value, **kwargs) == result(reference_normalize_objects, value, **kwargs)


def test_detections_get_a_box_and_a_label() -> None:
    answer = {"objects": [{"Class-Name": " Kitty ", "box_1000": [100, 200, 500, 600], "score": 0.9}], "n": 1}
    out, errors = normalize_objects(answer, width=640, height=480, synonyms={"kitty": "cat"})
    assert out == {"objects": [{"score": 0.9, "bbox_xyxy": [64.0, 96.0, 320.0, 288.0], "label": "cat"}], "n": 1}
    assert errors == []
    assert answer["objects"][0]["box_1000"] == [100, 200, 500, 600]  # type: ignore[index]


def test_unchanged_answers_are_returned_as_they_are() -> None:
    answer = {"caption": "a cat", "tags": [{"name": "cat"}, [1, 2]]}
    assert normalize_objects(answer, width=None, height=None, synonyms={}) == (answer, [])
    assert normalize_objects(answer, width=None, height=None, synonyms={})[0] is answer


def test_errors_say_where() -> None:
    answer = [{"objects": [{"bbox": [1, 2, -3, 4], "label": 7}, {"": {"box": [0.1, 0.2, 0.3, 0.4]}}]}]
    _, errors = normalize_objects(answer, width=None, height=None, synonyms={})
    assert errors == [
        "[0].objects[0].bbox: an [x, y, w, h] box has a negative width or height",
        "[0].objects[0].label: a label must be text",
        "[0].objects[1]..box: a norm1 box needs the image size, which the log does not give",
    ]
