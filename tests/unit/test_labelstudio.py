"""The pure half of the Label Studio bridge: labeling configs, box math, cases to tasks, annotations to answers."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.cases import HardCase, Signal
from schemas.logs import ImageInfo, NormalizedLog
from streams.review.labelstudio import partition_of, webhook_app
from streams.review.labelstudio_client import updated_after_query
from streams.review.labelstudio_config import labeling_config, project_labels
from streams.review.labelstudio_tasks import (
    ImageSize,
    InvalidAnnotation,
    UnsupportedCase,
    annotation_answer,
    percent_to_xyxy,
    task_payload,
    xyxy_to_percent,
)

LABELS = project_labels(["Cat", " dog ", "cat", "person"])
SIZE = ImageSize(640, 480)


def case(task: str = "detect", output: Any = None, images: int = 1, width: int | None = 640) -> HardCase:
    log = NormalizedLog(
        log_id="log-1",
        source_format="openai-chat",
        request_id="req-1",
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
        task=task,
        prompt="Find every cat.",
        images=[ImageInfo(uri=f"s3://vlm-images/{i}.png", width=width, height=480) for i in range(images)],
        output=output,
        output_text="raw",
    )
    signals = [Signal(name="retry", weight=0.5), Signal(name="negative_feedback", weight=1.0, detail="thumbs down")]
    return HardCase(case_id="case-1", log_id="log-1", score=1.5, priority=150, signals=signals, log=log)


def box(region: str, label: str, x: float, y: float, w: float, h: float) -> dict[str, Any]:
    return {
        "id": region,
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 640,
        "original_height": 480,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
    }


def choice(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def text(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": [value]}}


def answer(task: str, results: Any, origin: dict[str, str] | None = None) -> dict[str, Any]:
    reviewed = annotation_answer(task, results, labels=LABELS, origin_labels=origin or {}, size=SIZE, tolerance_px=1)
    return reviewed.answer


def test_labels_are_trimmed_lowercased_unique_with_other_last() -> None:
    assert LABELS == ["cat", "dog", "person", "other"]


@pytest.mark.parametrize("task", ["detect", "ground", "caption", "extract"])
def test_configs_are_well_formed_and_ask_for_a_verdict(task: str) -> None:
    root = ElementTree.fromstring(labeling_config(task, project_labels(['a "quoted" <label> & more'])))
    assert root.find("Image").get("value") == "$image"
    verdicts = [c.get("value") for c in root.find("Choices[@name='verdict']")]
    assert verdicts == ["correct", "wrong", "should refuse"]
    if task in ("detect", "ground"):
        assert [label.get("value") for label in root.find("RectangleLabels")] == ['a "quoted" <label> & more', "other"]
    else:
        assert root.find("TextArea[@name='answer']") is not None


@given(
    st.integers(1, 5000),
    st.integers(1, 5000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_box_round_trip_through_percent_is_within_a_tenth_of_a_pixel(
    width: int, height: int, a: float, b: float, c: float, d: float
) -> None:
    size = ImageSize(width, height)
    x1, x2 = sorted((a * width, c * width))
    y1, y2 = sorted((b * height, d * height))
    back = percent_to_xyxy(xyxy_to_percent([x1, y1, x2, y2], size), size)
    assert all(abs(got - want) <= 0.05 + 1e-9 for got, want in zip(back, [x1, y1, x2, y2], strict=True))


def test_a_case_becomes_a_task_with_its_signals_and_the_model_boxes_as_a_prediction() -> None:
    output = {
        "objects": [{"label": "cat", "bbox_xyxy": [64, 48, 320, 240]}, {"label": "truck", "bbox_xyxy": [0, 0, 1, 1]}]
    }
    payload = task_payload(case(output=output), LABELS, SIZE, "qwen")
    data = payload["data"]
    assert (data["image"], data["priority"], data["case_id"]) == ("s3://vlm-images/0.png", 150, "case-1")
    assert data["signals"] == "negative_feedback (+1): thumbs down; retry (+0.5)"
    regions = payload["predictions"][0]["result"]
    assert regions[0]["value"] | {} == {"x": 10.0, "y": 10.0, "width": 40.0, "height": 40.0, "rotation": 0,
                                        "rectanglelabels": ["cat"]}  # fmt: skip
    assert regions[1]["value"]["rectanglelabels"] == ["other"]
    assert data["vlmflow"]["origin_labels"] == {"m1": "truck"}


def test_a_case_without_image_size_has_no_boxes_and_several_images_are_refused() -> None:
    payload = task_payload(case(output={"objects": [{"label": "cat", "bbox_xyxy": [1, 1, 2, 2]}]}), LABELS, None, "m")
    assert "predictions" not in payload
    with pytest.raises(UnsupportedCase, match="2 images"):
        task_payload(case(images=2), LABELS, SIZE, "m")


def test_a_moved_box_comes_back_in_pixels_and_other_gets_the_model_label_back() -> None:
    results = [box("m0", "cat", 5, 10, 40, 40), box("m1", "other", 0, 0, 10, 10), choice("verdict", "wrong")]
    got = answer("detect", results, {"m1": "truck"})
    assert got == {
        "objects": [
            {"label": "cat", "bbox_xyxy": [32.0, 48.0, 288.0, 240.0]},
            {"label": "truck", "bbox_xyxy": [0.0, 0.0, 64.0, 48.0]},
        ]
    }


def test_should_refuse_becomes_the_refusal_answer() -> None:
    results = [choice("verdict", "should refuse"), choice("refusal_code", "not_visible"), text("comment", "no cat")]
    assert answer("ground", results) == {"refusal": {"code": "not_visible", "message": "no cat"}}


def test_caption_and_extract_answers() -> None:
    assert answer("caption", [choice("verdict", "correct"), text("answer", " a cat ")]) == {"caption": "a cat"}
    got = answer("extract", [choice("verdict", "wrong"), text("answer", '{"total": 12.5}')])
    assert got == {"total": 12.5}


@pytest.mark.parametrize(
    ("task", "results", "message"),
    [
        ("detect", [box("a", "cat", 90, 10, 20, 20), choice("verdict", "wrong")], "outside the image"),
        ("detect", [box("a", "cat", -5, 10, 20, 20), choice("verdict", "wrong")], "outside the image"),
        ("detect", [box("a", "unicorn", 10, 10, 20, 20), choice("verdict", "wrong")], "'unicorn' is not one of"),
        ("detect", [box("a", "other", 10, 10, 20, 20), choice("verdict", "wrong")], "no model label to keep"),
        ("detect", [box("a", "cat", 10, 10, 20, 20)], "verdict: pick one of"),
        ("detect", [box("a", "cat", 10, 10, 0, 20), choice("verdict", "wrong")], "no area"),
        ("ground", [box("a", "cat", 1, 1, 2, 2), box("b", "cat", 3, 3, 2, 2), choice("verdict", "wrong")], "one box"),
        ("extract", [choice("verdict", "wrong"), text("answer", '{"total": 12.5,}')], "not JSON"),
        ("extract", [choice("verdict", "wrong"), text("answer", "[1, 2]")], "not an object"),
        ("extract", [choice("verdict", "wrong"), text("answer", '{"x": NaN}')], "NaN is not JSON"),
        ("caption", [choice("verdict", "wrong"), text("answer", "  ")], "caption is empty"),
        ("detect", "not a list", "no result list"),
        ("detect", [{"from_name": "label"}], "result"),
    ],
)
def test_bad_annotations_are_refused_with_one_clear_line(task: str, results: Any, message: str) -> None:
    with pytest.raises(InvalidAnnotation, match=message) as error:
        answer(task, results)
    assert "\n" not in str(error.value)


def test_a_box_within_the_tolerance_is_clamped_to_the_image() -> None:
    results = [box("a", "cat", 50, 50, 50.1, 50.1), choice("verdict", "correct")]
    assert answer("detect", results) == {"objects": [{"label": "cat", "bbox_xyxy": [320.0, 240.0, 640.0, 480.0]}]}


def test_the_poll_query_uses_the_form_label_studio_filters_on() -> None:
    query = updated_after_query(datetime(2026, 3, 1, 12, 0, 5, 123456, tzinfo=UTC))
    assert '"value": "2026-03-01T12:00:05.000Z"' in query and '"operator": "greater"' in query


def test_corrections_go_to_the_partition_any_kafka_producer_picks() -> None:
    from kafka.partitioner.default import murmur2

    for key in (b"case-1", b"case-2", b"another"):
        assert partition_of(key, {0, 1, 2}) == (murmur2(key) & 0x7FFFFFFF) % 3


async def test_the_webhook_receiver_refuses_a_caller_without_the_secret() -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    wake = asyncio.Event()
    async with TestClient(TestServer(webhook_app("s3cret", wake))) as client:
        assert (await client.post("/webhook", json={"action": "ANNOTATION_CREATED"})).status == 401
        wrong = await client.post("/webhook", json={}, headers={"X-Vlmflow-Webhook-Secret": "guess"})
        assert wrong.status == 401 and not wake.is_set()
        right = await client.post("/webhook", json={}, headers={"X-Vlmflow-Webhook-Secret": "s3cret"})
        assert right.status == 200 and wake.is_set()
