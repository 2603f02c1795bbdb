"""One valid sample value per topic, shared by the schema and codec tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas import (
    Correction,
    GoldenRecord,
    HardCase,
    ImageInfo,
    ImageJob,
    JobError,
    JobResult,
    Lineage,
    NormalizedLog,
    RejectedLog,
    RetryJob,
    Signal,
)
from schemas.topics import Topic

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

JOB = ImageJob(job_id="job-1", task="detect", images=["s3://vlm-images/a.png"], prompt="find the buttons")
NORMALIZED = NormalizedLog(
    log_id="log-1",
    source_format="openai-chat",
    request_id="req-1",
    timestamp=T0,
    prompt="describe",
    images=[ImageInfo(uri="s3://vlm-images/a.png", width=640, height=480)],
    output={"caption": "a cat"},
    lineage=Lineage(topic=Topic.LOGS_RAW, partition=0, offset=0),
)

SAMPLES: dict[str, Any] = {
    Topic.JOBS_IMAGE: JOB,
    Topic.JOBS_RESULT: JobResult(job_id="job-1", status="ok", task="detect", output={"objects": []}),
    Topic.JOBS_RETRY: RetryJob(job=JOB, attempt=1, error=JobError(code="engine_error", message="x"), not_before=T0),
    Topic.JOBS_DLQ: RetryJob(job=JOB, attempt=3, error=JobError(code="retries_exhausted", message="x"), not_before=T0),
    Topic.LOGS_RAW: {"req_id": "r1", "ts": 1764158400, "q": "what is this", "ans": "{}"},
    Topic.LOGS_NORMALIZED: NORMALIZED,
    Topic.LOGS_REJECTED: RejectedLog(log_id="log-2", code="rule", rule="empty_prompt", original={"req_id": "r2"}),
    Topic.CASES_HARD: HardCase(
        case_id="case-1",
        log_id="log-1",
        score=2.5,
        priority=25,
        signals=[Signal(name="negative_feedback", weight=2.5)],
        log=NORMALIZED,
    ),
    Topic.CORRECTIONS_DONE: Correction(case_id="case-1", log_id="log-1", output={"caption": "a dog"}, reviewer="ana"),
    Topic.GOLDEN: GoldenRecord(
        record_id="rec-1",
        version=1,
        prompt="describe",
        images=NORMALIZED.images,
        answer={"caption": "a dog"},
        source_log_id="log-1",
    ),
}
