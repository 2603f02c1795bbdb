"""`schemas.boxes`: each source form to absolute xyxy pixels, and back to each model's convention."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.boxes import (
    GRID,
    QWEN_BOX_TEXT,
    RELATIVE_FORMS,
    Box,
    BoxError,
    BoxForm,
    _tenth,
    from_xyxy,
    parse_qwen_box_text,
    qwen2vl_box_text,
    to_xyxy,
    xyxy_to_qwen2vl_1000,
    xyxy_to_qwen25vl_abs,
)

W, H = 640, 480
XYXY = (64.0, 96.0, 320.0, 288.0)


@pytest.mark.parametrize(
    ("values", "form"),
    [
        ([64, 96, 320, 288], "xyxy"),
        ([64, 96, 256, 192], "xywh"),
        ([0.1, 0.2, 0.5, 0.6], "norm1"),
        ([100, 200, 500, 600], "norm1000"),
        ("<|box_start|>(100,200),(500,600)<|box_end|>", "xyxy"),
    ],
)
def test_to_xyxy(values: object, form: str) -> None:
    assert to_xyxy(values, form, width=W, height=H) == XYXY  # type: ignore[arg-type]


def test_absolute_forms_need_no_image_size_and_are_not_clamped() -> None:
    assert to_xyxy([-5, 0, 700.04, 500.06], "xyxy") == (-5.0, 0.0, 700.0, 500.1)
    assert to_xyxy([10, 10, 0, 0], "xywh") == (10.0, 10.0, 10.0, 10.0)


@pytest.mark.parametrize(
    ("values", "form", "message"),
    [
        ([1, 2, 3], "xyxy", "4 numbers"),
        ([1, 2, 3, "4"], "xyxy", "finite numbers"),
        ([1, 2, 3, True], "xyxy", "finite numbers"),
        ([1, 2, 3, float("inf")], "xyxy", "finite numbers"),
        ({"x": 1}, "xyxy", "4 numbers"),
        ([0, 0, -1, 5], "xywh", "negative"),
        ([0.1, 0.1, 0.2, 0.2], "norm1", "image size"),
        ("<|box_start|>(1,2)<|box_end|>", "xyxy", "box_start"),
        ([1e308, 0, 1e308, 1], "norm1000", "overflow"),
    ],
)
def test_unreadable_boxes(values: object, form: str, message: str) -> None:
    with pytest.raises(BoxError, match=message):
        to_xyxy(values, form, width=None if form == "norm1" else 10**6, height=10**6)  # type: ignore[arg-type]


def test_qwen_box_text_round_trip() -> None:
    assert parse_qwen_box_text(" <|box_start|>( 1 , 2 ),(3,4)<|box_end|> ") == (1, 2, 3, 4)
    assert qwen2vl_box_text((100, 200, 500, 600)) == "<|box_start|>(100,200),(500,600)<|box_end|>"


def test_qwen2vl_grid_rounds_and_clamps() -> None:
    assert xyxy_to_qwen2vl_1000(XYXY, width=W, height=H) == (100, 200, 500, 600)
    assert xyxy_to_qwen2vl_1000((-10.0, 0.0, 700.0, 480.0), width=W, height=H) == (0, 0, 1000, 1000)


def test_qwen25vl_uses_the_resized_image() -> None:
    # a 640x480 image that the processor resizes to 644x476 (smart_resize, factor 28)
    assert xyxy_to_qwen25vl_abs(XYXY, width=W, height=H, resized_width=644, resized_height=476) == (64, 95, 322, 286)
    assert xyxy_to_qwen25vl_abs((0.0, 0.0, 700.0, 500.0), width=W, height=H, resized_width=W, resized_height=H) == (
        0, 0, 640, 480,
    )  # fmt: skip


SIDE = st.integers(min_value=1, max_value=8_000)
COORD = st.floats(min_value=0, max_value=1, allow_nan=False)


@given(SIDE, SIDE, COORD, COORD, COORD, COORD, st.sampled_from(["xyxy", "xywh", "norm1", "norm1000"]))
def test_every_form_round_trips_within_rounding(
    width: int, height: int, a: float, b: float, c: float, d: float, form: str
) -> None:
    box = (round(min(a, c) * width, 1), round(min(b, d) * height, 1), round(max(a, c) * width, 1),
           round(max(b, d) * height, 1))  # fmt: skip
    there = from_xyxy(box, form, width=width, height=height)  # type: ignore[arg-type]
    back = to_xyxy(list(there), form, width=width, height=height)  # type: ignore[arg-type]
    assert all(abs(x - y) <= 0.1 + 1e-9 for x, y in zip(back, box, strict=True))


def reference_parse_qwen_box_text(text: str) -> Box:
    """`parse_qwen_box_text` as it was before it was made cheaper: the new one must give the same results."""
    match = QWEN_BOX_TEXT.fullmatch(text.strip())
    if match is None:
        raise BoxError("text is not <|box_start|>(x1,y1),(x2,y2)<|box_end|>")
    x1, y1, x2, y2 = (float(group) for group in match.groups())
    return x1, y1, x2, y2


def reference_four_numbers(values: object) -> Box:
    """`_four_numbers` as it was before it was made cheaper (an int beyond a float's range refused: it used to
    raise `OverflowError`)."""
    if not isinstance(values, list | tuple) or len(values) != 4:
        raise BoxError("expected a list of 4 numbers")
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not reference_finite(value):
            raise BoxError("expected a list of 4 finite numbers")
        numbers.append(float(value))
    x1, y1, x2, y2 = numbers
    return x1, y1, x2, y2


def reference_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def reference_to_xyxy(values: object, form: BoxForm, *, width: int | None = None, height: int | None = None) -> Box:
    """`to_xyxy` as it was before it was made cheaper (an image size beyond a float's range refused)."""
    if isinstance(values, str):
        a, b, c, d = reference_parse_qwen_box_text(values)
        form = "norm1000"
    else:
        a, b, c, d = reference_four_numbers(values)
    if form in RELATIVE_FORMS:
        if width is None or height is None:
            raise BoxError(f"a {form} box needs the image size, which the log does not give")
        if not (reference_finite(width) and reference_finite(height)):
            raise BoxError("box coordinates overflow")
        scale = 1.0 if form == "norm1" else float(GRID)
        a, b, c, d = a / scale * width, b / scale * height, c / scale * width, d / scale * height
    elif form == "xywh":
        if c < 0 or d < 0:
            raise BoxError("an [x, y, w, h] box has a negative width or height")
        c, d = a + c, b + d
    box = (round(a, 1), round(b, 1), round(c, 1), round(d, 1))
    if not all(math.isfinite(value) for value in box):
        raise BoxError("box coordinates overflow")
    return box


def exact(value: Any) -> Any:
    """`value` with every float as its exact bits (`-0.0` is not `0.0`, NaN equals NaN) and every type kept."""
    if isinstance(value, float):
        return float, value.hex()
    if isinstance(value, list | tuple):
        return type(value), [exact(item) for item in value]
    if isinstance(value, dict):
        return dict, [(exact(key), exact(item)) for key, item in value.items()]
    return type(value), value


def outcome(call: Any, *args: Any, **kwargs: Any) -> Any:
    """What a call gives, exactly, or the exception it raises (type and message)."""
    try:
        return "value", exact(call(*args, **kwargs))
    except Exception as exc:  # any exception, compared as such
        return "raises", type(exc), str(exc)


FLOATS = st.one_of(
    st.floats(),
    st.floats(min_value=-2_000, max_value=2_000),
    st.integers(-20_000, 20_000).map(lambda k: k / 20),  # halves and quarters of 0.1
    st.integers(-(10**6), 10**6).map(lambda k: (k + 0.5) / 10),
    st.integers(-(10**6), 10**6).map(lambda k: math.nextafter((k + 0.5) / 10, math.inf)),
    st.integers(-(10**6), 10**6).map(lambda k: math.nextafter((k + 0.5) / 10, -math.inf)),
    st.sampled_from([0.0, -0.0, 0.04, -0.04, 0.05, -0.05, 0.35, 2.675, 1e15, 4.5e14 + 0.5, 2.0**52, 1e308]),
)
NUMBERS = st.one_of(
    FLOATS,
    st.integers(-(10**6), 10**6),
    st.integers(10**300, 10**310),  # too large for a float
    st.booleans(),
    st.just("4"),
    st.none(),
)
QWEN_NUMBER = st.one_of(st.integers(-5, 1_200).map(str), st.decimals(0, 1_000, places=3).map(str))
BOX_VALUES = st.one_of(
    st.lists(NUMBERS, min_size=4, max_size=4),
    st.lists(FLOATS, min_size=4, max_size=4),
    st.lists(st.integers(-2_000, 2_000), min_size=4, max_size=4),
    st.tuples(NUMBERS, NUMBERS, NUMBERS, NUMBERS),
    st.lists(NUMBERS, max_size=6),
    st.tuples(QWEN_NUMBER, QWEN_NUMBER, QWEN_NUMBER, QWEN_NUMBER, st.sampled_from(["", " ", "x"])).map(
        lambda t: f"{t[4]}<|box_start|>({t[0]}, {t[1]}),( {t[2]},{t[3]})<|box_end|>"
    ),
    st.text(max_size=12),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=4),
    st.none(),
)
SIZES = st.one_of(st.none(), st.integers(0, 10_000), st.sampled_from([10**300, 10**400]))


@settings(max_examples=3_000)
@given(FLOATS)
def test_tenth_is_round(value: float) -> None:
    """`_tenth` gives `round(value, 1)` bit for bit: halves, their neighbours, negatives, zeros, huge and non-finite."""
    assert exact(_tenth(value)) == exact(round(value, 1))
    assert exact(_tenth(-value)) == exact(round(-value, 1))


@settings(max_examples=1_500)
@given(BOX_VALUES, st.sampled_from(["xyxy", "xywh", "norm1", "norm1000"]), SIZES, SIZES)
@example([math.nan, 10**400, 0, 0], "xyxy", None, None)  # the first problem met is the one told
@example([10**400, math.nan, 0, 0], "xyxy", None, None)  # an int too large for a float is not a finite number
@example([1, 2, 3, 4.0], "norm1000", 10**400, 1)
def test_to_xyxy_is_the_reference(values: object, form: BoxForm, width: int | None, height: int | None) -> None:
    """Bit for bit the same boxes, and the same errors, as before `to_xyxy` was made cheaper."""
    assert outcome(to_xyxy, values, form, width=width, height=height) == outcome(
        reference_to_xyxy, values, form, width=width, height=height
    )


@pytest.mark.parametrize(
    ("values", "width"), [([10**400, 0, 1, 1], None), ([1, 2, 3, 4], 10**400)], ids=["coordinate", "image size"]
)
def test_a_number_beyond_a_floats_range_is_a_box_error(values: list[int], width: int | None) -> None:
    """JSON numbers have no size limit; one too large for a float is a bad box (it raised OverflowError, which made
    the whole log an internal error)."""
    with pytest.raises(BoxError):
        to_xyxy(values, "norm1000" if width else "xyxy", width=width, height=1)
