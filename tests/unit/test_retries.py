"""Where a failed attempt goes: answered at once, retried with doubling backoff, or dead-lettered."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.jobs import ImageJob, JobError
from schemas.settings import WorkerSettings
from workers.retries import backoff_s, decide, exhausted

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WORKER = WorkerSettings(max_attempts=3, retry_backoff_s=2.0)


def job(attempt: int) -> ImageJob:
    return ImageJob(job_id="j1", task="caption", images=["s3://vlm-images/a.png"], attempt=attempt)


@pytest.mark.parametrize("code", ["image_truncated", "too_many_tokens", "output_invalid", "deadline_exceeded"])
def test_bad_input_is_answered_not_retried(code: str) -> None:
    assert decide(job(0), JobError(code=code, message="m"), WORKER, NOW).route == "answer"  # type: ignore[arg-type]


def test_retryable_failure_is_retried_with_doubling_backoff() -> None:
    error = JobError(code="engine_error", message="boom")
    first, second = decide(job(0), error, WORKER, NOW), decide(job(1), error, WORKER, NOW)
    assert (first.route, second.route) == ("retry", "retry")
    assert first.record is not None and second.record is not None
    assert (first.record.attempt, second.record.attempt) == (1, 2)
    assert first.record.not_before == NOW + timedelta(seconds=2)
    assert second.record.not_before == NOW + timedelta(seconds=4)
    assert first.record.error == error


def test_last_attempt_goes_to_the_dead_letter_topic() -> None:
    decision = decide(job(2), JobError(code="image_fetch_failed", message="timeout"), WORKER, NOW)
    assert decision.route == "dead_letter"
    assert decision.record is not None and decision.record.attempt == 3


def test_one_attempt_allowed_means_dead_letter_at_once() -> None:
    worker = WorkerSettings(max_attempts=1)
    assert decide(job(0), JobError(code="internal_error", message="x"), worker, NOW).route == "dead_letter"


def test_backoff_and_final_error() -> None:
    assert [backoff_s(attempt, 0.5) for attempt in range(4)] == [0.5, 1.0, 2.0, 4.0]
    final = exhausted(JobError(code="engine_error", message="boom"), 3)
    assert final.code == "retries_exhausted"
    assert final.message == "failed 3 attempts; last: engine_error: boom"
