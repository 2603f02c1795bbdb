"""How `topics tail` and a replay's dry run show one record."""

from __future__ import annotations

import json

from kafka.consumer.fetcher import ConsumerRecord

from schemas.codec import encode
from schemas.jobs import JobError, JobResult
from schemas.topics import Topic
from streams.ops.tail import format_record


def _record(topic: str, value: bytes | None, *, key: bytes | None = b"job-1", headers=()) -> ConsumerRecord:  # type: ignore[no-untyped-def]
    return ConsumerRecord(topic, 2, 0, 17, 1_714_564_800_000, 0, key, value, list(headers), None, 0, 0, 0)


def test_a_registry_record_is_shown_as_its_model_without_defaults() -> None:
    result = JobResult(job_id="job-1", status="error", error=JobError(code="image_undecodable", message="bad bytes"))
    line = format_record(_record(Topic.JOBS_RESULT, encode(result), headers=[("reply-to", b"x")]))
    assert line.startswith(
        f"2024-05-01T12:00:00.000Z {Topic.JOBS_RESULT}[2]@17 key=job-1 headers={{reply-to=x}} JobResult "
    )
    shown = json.loads(line.split(" JobResult ", 1)[1])
    assert shown["status"] == "error" and shown["error"]["code"] == "image_undecodable"
    assert "vision_tokens" not in shown


def test_a_record_that_does_not_decode_says_why() -> None:
    line = format_record(_record(Topic.JOBS_RESULT, b'{"job_id":"job-1"}'))
    assert "INVALID (Field required at status)" in line


def test_long_strings_are_cut_and_other_topics_shown_as_json_or_text() -> None:
    long = "data:image/png;base64," + "A" * 5000
    line = format_record(_record("ops.anything", json.dumps({"image": long}).encode(), key=None))
    assert "key=-" in line and "…(+4,942 chars)" in line and len(line) < 250
    assert format_record(_record("ops.anything", b"\xff\x00")).endswith("b'\\xff\\x00'")
    assert format_record(_record("ops.anything", None)).endswith("(tombstone)")
