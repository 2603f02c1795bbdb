"""The topic registry: every topic vlmflow reads or writes, with its key, value model and layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from schemas.cases import Correction, GoldenRecord, HardCase
from schemas.jobs import ImageJob, JobResult, RetryJob
from schemas.logs import NormalizedLog, RawLog, RejectedLog

CleanupPolicy = Literal["delete", "compact"]


class Topic(StrEnum):
    """Every topic name vlmflow uses. The one place these strings are written; a `Topic` is a `str` everywhere."""

    JOBS_IMAGE = "vlm.jobs.image"
    JOBS_RESULT = "vlm.jobs.result"
    JOBS_RETRY = "vlm.jobs.retry"
    JOBS_DLQ = "vlm.jobs.dlq"
    LOGS_RAW = "vlm.logs.raw"
    LOGS_NORMALIZED = "vlm.logs.normalized"
    LOGS_REJECTED = "vlm.logs.rejected"
    CASES_HARD = "vlm.cases.hard"
    CORRECTIONS_DONE = "vlm.corrections.done"
    GOLDEN = "vlm.golden"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key_field: str
    """The value field whose text is the record key (per-key order, and compaction for compacted topics)."""
    value_type: Any
    """A pydantic model, or a union of them for topics that carry several source formats."""
    partitions: int
    cleanup_policy: CleanupPolicy = "delete"
    configs: dict[str, str] = field(default_factory=dict)
    """Extra topic configs passed to CreateTopics."""
    description: str = ""

    def topic_configs(self) -> dict[str, str]:
        return {"cleanup.policy": self.cleanup_policy, **self.configs}


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        # NOTE: 12 partitions divide evenly among 1, 2, 3, 4, 6 or 12 workers (one per GPU): 3 each on a 4 x H100
        # host. Each worker's share of the jobs is its share of the partitions, so an uneven split (6 over 4
        # workers: 2/2/1/1) leaves GPUs idle while others queue.
        TopicSpec(Topic.JOBS_IMAGE, "job_id", ImageJob, 12, description="image jobs from upstream services"),
        TopicSpec(Topic.JOBS_RESULT, "job_id", JobResult, 6, description="one result per job_id"),
        TopicSpec(Topic.JOBS_RETRY, "job.job_id", RetryJob, 3, description="jobs waiting for another attempt"),
        TopicSpec(Topic.JOBS_DLQ, "job.job_id", RetryJob, 1, description="jobs whose retries ran out"),
        TopicSpec(Topic.LOGS_RAW, "request_id", RawLog, 6, description="request logs in any source format"),
        TopicSpec(Topic.LOGS_NORMALIZED, "log_id", NormalizedLog, 6, description="logs in one vocabulary"),
        TopicSpec(Topic.LOGS_REJECTED, "log_id", RejectedLog, 3, description="logs that did not pass, with why"),
        TopicSpec(Topic.CASES_HARD, "log_id", HardCase, 3, description="hard cases with score and signals"),
        TopicSpec(Topic.CORRECTIONS_DONE, "case_id", Correction, 3, description="submitted corrections"),
        TopicSpec(
            Topic.GOLDEN,
            "record_id",
            GoldenRecord,
            1,
            cleanup_policy="compact",
            configs={"min.compaction.lag.ms": "0"},
            description="the golden dataset, latest version per record",
        ),
    )
}


def topic(name: str) -> TopicSpec:
    """The registry entry for `name`; a clear error for a topic vlmflow does not know."""
    try:
        return TOPICS[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(TOPICS)}") from None
