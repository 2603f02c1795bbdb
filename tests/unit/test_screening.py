"""`streams.flywheel.screening.screen_record`: one raw record screened, encoded and mined, and what a defect in
any of those steps becomes."""

from __future__ import annotations

import json

import pytest

from schemas.codec import decode
from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel import screening
from streams.flywheel.screening import RawRecord, Rules, screen_record

RAW = {
    "req_id": "r-1", "ts": 1772366400, "app": "shop", "img": "vlm-images/a.png", "img_w": 640, "img_h": 480,
    "q": "find the cat", "ans": '{"objects": [{"label": "cat", "bbox": [1, 2, 3, 4], "confidence": 0.2}]}',
    "lat": 0.42, "ok": True,
}  # fmt: skip


def record(raw: dict[str, object]) -> RawRecord:
    return RawRecord(Topic.LOGS_RAW, 0, 7, json.dumps(raw).encode())


def test_a_defect_while_mining_becomes_the_records_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(screening, "hard_case", broken)
    item = screen_record(record(RAW), Rules.from_settings(StreamsSettings()))
    assert (item.kind, item.code, item.case) == ("rejected", "internal_error", None)
    assert decode(Topic.LOGS_REJECTED, item.value).detail == "RuntimeError"


def test_numbers_beyond_a_floats_range_in_an_answer_are_screened_without_redaction() -> None:
    """A 400-digit number survives when redaction is off; boxes, rules and mining must all take it."""
    huge = "9" * 400
    answer = '{"objects": [{"label": "cat", "bbox": [1, 2, 3, ' + huge + '], "confidence": ' + huge + "}]}"
    rules = Rules.from_settings(StreamsSettings(redact_pii=False))
    item = screen_record(record({**RAW, "ans": answer}), rules)
    assert item.kind == "normalized", item
    assert decode(Topic.LOGS_NORMALIZED, item.value).output_error is not None  # the box is unreadable, told as such
