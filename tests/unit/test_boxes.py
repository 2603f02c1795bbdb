"""`schemas.boxes`: each source form to absolute xyxy pixels, and back to each model's convention."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.boxes import (
    BoxError,
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
