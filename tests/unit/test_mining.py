"""`streams.flywheel.mining`: each signal, weights from config, the threshold and the priority."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.logs import ImageInfo, NormalizedLog
from schemas.settings import MiningSettings
from streams.flywheel.mining import hard_case, priority, signals

CONFIG = MiningSettings()
GOOD = NormalizedLog(
    log_id="log-1",
    source_format="vlmflow-job",
    request_id="job-1",
    timestamp=datetime(2026, 3, 1, tzinfo=UTC),
    task="detect",
    prompt="find the cats",
    images=[ImageInfo(uri="s3://b/a.png", width=640, height=480)],
    output_text="{}",
    output={"objects": [{"label": "cat", "bbox_xyxy": [10.0, 10.0, 100.0, 100.0], "confidence": 0.9}]},
)


def names(update: dict[str, Any], config: MiningSettings = CONFIG) -> list[str]:
    return [signal.name for signal in signals(GOOD.model_copy(update=update), config)]


def test_a_good_log_has_no_signal() -> None:
    assert names({}) == []
    assert hard_case(GOOD, CONFIG, threshold=1.0) is None


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"output": None, "output_error": "not JSON: Expecting value"}, ["unparseable_output"]),
        ({"output": None, "output_text": None, "error_code": "output_invalid"}, ["unparseable_output"]),
        ({"output_error": "objects[0].box: needs the image size"}, ["schema_violation"]),
        ({"output": {"refusal": {"code": "cannot_see", "message": "too dark"}}}, ["refusal"]),
        ({"output": {"refusal": "no"}}, ["refusal"]),
        ({"output": {"refusal": {"code": "x"}}, "task": "translate"}, []),
        ({"output": {"refusal": {"code": "x"}}, "task": None}, []),
        ({"feedback": "negative"}, ["negative_feedback"]),
        ({"feedback": "positive"}, []),
        ({"correction": {"objects": []}}, ["correction"]),
        ({"output": {"objects": [{"bbox_xyxy": [600.0, 10.0, 700.0, 50.0]}]}}, ["box_outside_image"]),
        ({"output": {"objects": [{"bbox_xyxy": [-0.5, 0.0, 640.9, 480.0]}]}}, []),
        ({"output": {"objects": [{"bbox_xyxy": [50.0, 10.0, 40.0, 50.0]}]}}, ["box_outside_image"]),
        ({"output": {"objects": [{"bbox_xyxy": [600.0, 10.0, 700.0, "x"]}]}}, []),
        ({"images": [ImageInfo(uri="s3://b/a.png")], "output": {"objects": [{"bbox_xyxy": [0, 0, 9e9, 1]}]}}, []),
        ({"output": {"items": [{"nested": {"score": 0.1}}]}}, ["low_confidence"]),
        ({"output": {"confidence": 0.29}}, ["low_confidence"]),
        ({"output": {"confidence": True}}, []),
        ({"attempt": 2}, ["retry"]),
    ],
)
def test_signals(update: dict[str, Any], expected: list[str]) -> None:
    assert names(update) == expected


def test_signals_carry_their_weight_and_detail() -> None:
    found = signals(GOOD.model_copy(update={"attempt": 1, "feedback": "negative"}), CONFIG)
    assert [(s.name, s.weight, s.detail) for s in found] == [
        ("negative_feedback", 1.0, "thumbs down"),
        ("retry", 0.5, "1 earlier try of the same request"),
    ]


def test_zero_or_missing_weights_turn_signals_off() -> None:
    config = MiningSettings(weights={"retry": 0.0, "correction": 2.0})
    assert names({"attempt": 1, "feedback": "negative", "correction": {}}, config) == ["correction"]


def test_threshold_score_and_priority() -> None:
    weak = GOOD.model_copy(update={"attempt": 1})
    assert hard_case(weak, CONFIG, threshold=1.0) is None
    assert hard_case(weak, CONFIG, threshold=0.5) is not None
    strong = GOOD.model_copy(
        update={"feedback": "negative", "correction": {"objects": []}, "output": {"confidence": 0.1}}
    )
    case = hard_case(strong, CONFIG, threshold=1.0)
    assert case is not None
    assert (case.case_id, case.log_id, case.log) == ("case-log-1", "log-1", strong)
    assert case.score == 3.0 and case.priority == 300
    assert [s.name for s in case.signals] == ["negative_feedback", "correction", "low_confidence"]
    single = hard_case(GOOD.model_copy(update={"feedback": "negative"}), CONFIG, threshold=1.0)
    assert single is not None and single.priority < case.priority


def test_priority_is_the_score_in_hundredths() -> None:
    assert [priority(score) for score in (0.0, 1.0, 1.234, 2.5)] == [0, 100, 123, 250]


def test_numbers_beyond_a_floats_range_are_not_boxes_or_confidences() -> None:
    """With redaction off, an answer may keep a 400-digit number: mining must not raise on it."""
    huge = 10**400
    output = {"objects": [{"label": "cat", "bbox_xyxy": [10.0, 10.0, 100.0, huge], "confidence": huge}]}
    assert names({"output": output}) == []
