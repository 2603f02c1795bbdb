"""What happens to a job whose attempt failed: answered, retried later through `vlm.jobs.retry`, or dead-lettered.

Only failures that another attempt can cure are retried (the engine failed, the store did not answer, the job's
budget lease was lost, a defect met the job); bad input is answered at once. Attempts are numbered from 0;
backoff doubles per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from schemas.errors import ErrorCode
from schemas.jobs import ImageJob, JobError, RetryJob
from schemas.settings import WorkerSettings

RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {"engine_error", "image_fetch_failed", "lease_lost", "internal_error"}
)

Route = Literal["answer", "retry", "dead_letter"]


@dataclass(frozen=True)
class RetryDecision:
    route: Route
    """`answer`: publish the error result; `retry`: send `record` to the retry topic; `dead_letter`: send
    `record` to the dead-letter topic and publish a `retries_exhausted` result."""
    record: RetryJob | None = None


def backoff_s(attempt: int, base_s: float) -> float:
    """The wait before attempt `attempt + 1`: `base_s`, doubled for each earlier attempt."""
    return base_s * 2**attempt


def decide(job: ImageJob, error: JobError, worker: WorkerSettings, now: datetime) -> RetryDecision:
    """Where a failed attempt of `job` goes."""
    if error.code not in RETRYABLE_CODES:
        return RetryDecision("answer")
    record = RetryJob(
        job=job,
        attempt=job.attempt + 1,
        error=error,
        not_before=now + timedelta(seconds=backoff_s(job.attempt, worker.retry_backoff_s)),
    )
    if job.attempt + 1 < worker.max_attempts:
        return RetryDecision("retry", record)
    return RetryDecision("dead_letter", record)


def exhausted(error: JobError, attempts: int) -> JobError:
    """The error a dead-lettered job is answered with: the last failure, said to be final."""
    message = f"failed {attempts} attempts; last: {error.code}: {error.message}"
    return JobError(code="retries_exhausted", message=message[:2_000])
