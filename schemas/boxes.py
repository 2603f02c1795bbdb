"""Bounding-box conventions: every source form to one (absolute pixel `[x1, y1, x2, y2]` of the original image,
rounded to 0.1) and back to each model's own convention for training data.

Source forms (the key an object carries its box under in logs):

| form       | key        | values                                         |
| ---------- | ---------- | ---------------------------------------------- |
| `xyxy`     | `bbox_2d`  | `[x1, y1, x2, y2]` pixels                      |
| `xywh`     | `bbox`     | `[x, y, w, h]` pixels                          |
| `norm1`    | `box`      | `[x1, y1, x2, y2]` as fractions 0–1            |
| `norm1000` | `box_1000` | `[x1, y1, x2, y2]` on Qwen2-VL's 0–1000 grid   |

The text `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` (0–1000) is read under any of those keys. Model conventions:
Qwen2-VL (and Qwen3-VL) ground on the 0–1000 grid; Qwen2.5-VL in absolute pixels of the *resized* image the
processor feeds the model (`workers.tokens.smart_resize` gives that size).
"""

from __future__ import annotations

import re
from math import isfinite
from typing import Literal

BoxForm = Literal["xyxy", "xywh", "norm1", "norm1000"]
Box = tuple[float, float, float, float]
"""`(x1, y1, x2, y2)` in absolute pixels of the original image."""

RELATIVE_FORMS: frozenset[BoxForm] = frozenset({"norm1", "norm1000"})
GRID = 1000
"""Qwen2-VL's coordinate grid: 0–1000 on each axis, whatever the image size."""

_NUMBER = r"\s{0,8}(-?\d{1,9}(?:\.\d{1,9})?)\s{0,8}"
_GAP = r"\s{0,8}"
QWEN_BOX_TEXT = re.compile(
    rf"<\|box_start\|>{_GAP}\({_NUMBER},{_NUMBER}\){_GAP},{_GAP}\({_NUMBER},{_NUMBER}\){_GAP}<\|box_end\|>"
)
"""Whitespace and digits are bounded, so searching long text for box tokens stays linear in its length."""


class BoxError(ValueError):
    """A box that cannot be read: wrong shape, not numbers, or relative without the image size."""


def parse_qwen_box_text(text: str) -> Box:
    """`<|box_start|>(x1,y1),(x2,y2)<|box_end|>` → the four 0–1000 numbers."""
    match = QWEN_BOX_TEXT.fullmatch(text.strip())
    if match is None:
        raise BoxError("text is not <|box_start|>(x1,y1),(x2,y2)<|box_end|>")
    x1, y1, x2, y2 = map(float, match.groups())
    return x1, y1, x2, y2


_PLAIN_NUMBERS = frozenset({int, float})


def _four_numbers(values: object) -> Box:
    if not isinstance(values, list | tuple) or len(values) != 4:
        raise BoxError("expected a list of 4 numbers")
    x1, y1, x2, y2 = values
    if {type(x1), type(y1), type(x2), type(y2)} <= _PLAIN_NUMBERS:
        # NOTE: the common box (plain ints and floats) is checked in one go; anything else, and every failure,
        # goes through the loop below, which says what is wrong in the order the numbers come.
        try:
            box = float(x1), float(y1), float(x2), float(y2)
        except OverflowError:
            pass
        else:
            if _finite(box):
                return box
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value):
            raise BoxError("expected a list of 4 finite numbers")
        numbers.append(float(value))
    x1, y1, x2, y2 = numbers
    return x1, y1, x2, y2


def is_finite(value: float) -> bool:
    """`isfinite`, False for an int beyond a float's range (JSON numbers have any number of digits): shared by
    every reader of numbers from logs and answers."""
    try:
        return isfinite(value)
    except OverflowError:
        return False


def _finite(box: Box) -> bool:
    x1, y1, x2, y2 = box
    return isfinite(x1) and isfinite(y1) and isfinite(x2) and isfinite(y2)


def _tenth(value: float) -> float:
    """`round(value, 1)`, bit for bit; a whole number (most pixel boxes) is returned as it is: `round` would give
    that very float, at ten times the cost."""
    return value if value.is_integer() else round(value, 1)


def to_xyxy(values: object, form: BoxForm, *, width: int | None = None, height: int | None = None) -> Box:
    """A box in `form` → absolute pixel xyxy of the original image, rounded to 0.1 (never clamped: a box outside
    the image is a finding of its own). Relative forms need the image size; a string is read as Qwen box text."""
    if isinstance(values, str):
        a, b, c, d = parse_qwen_box_text(values)
        form = "norm1000"
    else:
        a, b, c, d = _four_numbers(values)
    if form in RELATIVE_FORMS:
        if width is None or height is None:
            raise BoxError(f"a {form} box needs the image size, which the log does not give")
        if not (is_finite(width) and is_finite(height)):
            raise BoxError("box coordinates overflow")
        scale = 1.0 if form == "norm1" else float(GRID)
        a, b, c, d = a / scale * width, b / scale * height, c / scale * width, d / scale * height
    elif form == "xywh":
        if c < 0 or d < 0:
            raise BoxError("an [x, y, w, h] box has a negative width or height")
        c, d = a + c, b + d
    box = a, b, c, d
    # NOTE: checked before rounding: rounding keeps finite numbers finite and infinities infinite.
    if not _finite(box):
        raise BoxError("box coordinates overflow")
    return _tenth(a), _tenth(b), _tenth(c), _tenth(d)


def from_xyxy(box: Box, form: BoxForm, *, width: int, height: int) -> Box:
    """The inverse of `to_xyxy` (up to rounding): absolute pixel xyxy → `form`."""
    x1, y1, x2, y2 = box
    if form == "xyxy":
        return box
    if form == "xywh":
        return x1, y1, x2 - x1, y2 - y1
    scale = 1.0 if form == "norm1" else float(GRID)
    return x1 / width * scale, y1 / height * scale, x2 / width * scale, y2 / height * scale


def xyxy_to_qwen2vl_1000(box: Box, *, width: int, height: int) -> tuple[int, int, int, int]:
    """Qwen2-VL's (and Qwen3-VL's) grounding coordinates: integers on the 0–1000 grid, clamped to it."""
    x1, y1, x2, y2 = from_xyxy(box, "norm1000", width=width, height=height)
    return _grid(x1), _grid(y1), _grid(x2), _grid(y2)


def _grid(value: float) -> int:
    return min(GRID, max(0, round(value)))


def qwen2vl_box_text(box_1000: tuple[int, int, int, int]) -> str:
    """The text form Qwen2-VL reads and writes: `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`."""
    x1, y1, x2, y2 = box_1000
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def xyxy_to_qwen25vl_abs(
    box: Box, *, width: int, height: int, resized_width: int, resized_height: int
) -> tuple[int, int, int, int]:
    """Qwen2.5-VL's grounding coordinates: integer pixels of the resized image (`smart_resize` of
    `width`×`height`), clamped to it."""
    x1, y1, x2, y2 = box
    sx, sy = resized_width / width, resized_height / height

    def clamp(value: float, limit: int) -> int:
        return min(limit, max(0, round(value)))

    return (
        clamp(x1 * sx, resized_width),
        clamp(y1 * sy, resized_height),
        clamp(x2 * sx, resized_width),
        clamp(y2 * sy, resized_height),
    )
