"""The topic registry: every topic vlmflow reads or writes, with its key, value model and layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.cases import Correction, GoldenRecord, HardCase
from schemas.jobs import ImageJob, JobResult, RetryJob
from schemas.logs import NormalizedLog, RawLog, RejectedLog

CleanupPolicy = Literal["delete", "compact"]


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
        TopicSpec("vlm.jobs.image", "job_id", ImageJob, 6, description="image jobs from upstream services"),
        TopicSpec("vlm.jobs.result", "job_id", JobResult, 6, description="one result per job_id"),
        TopicSpec("vlm.jobs.retry", "job.job_id", RetryJob, 3, description="jobs waiting for another attempt"),
        TopicSpec("vlm.jobs.dlq", "job.job_id", RetryJob, 1, description="jobs whose retries ran out"),
        TopicSpec("vlm.logs.raw", "request_id", RawLog, 6, description="request logs in any source format"),
        TopicSpec("vlm.logs.normalized", "log_id", NormalizedLog, 6, description="logs in one vocabulary"),
        TopicSpec("vlm.logs.rejected", "log_id", RejectedLog, 3, description="logs that did not pass, with why"),
        TopicSpec("vlm.cases.hard", "log_id", HardCase, 3, description="hard cases with score and signals"),
        TopicSpec("vlm.corrections.done", "case_id", Correction, 3, description="submitted corrections"),
        TopicSpec(
            "vlm.golden",
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
