"""Image jobs from upstream services and the one result each of them gets."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.base import Message, UtcDatetime, utc_now
from schemas.errors import ErrorCode

Task = Literal["detect", "ground", "caption", "extract"]
TASKS: tuple[Task, ...] = ("detect", "ground", "caption", "extract")

JobId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
TopicName = Annotated[str, Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._\-]+$")]

IMAGE_SCHEMES = ("s3://", "data:image/", "http://", "https://")
MAX_IMAGES_PER_JOB = 8


class ImageJob(Message):
    """One request: a task over one or more images.

    Images are strings, like OpenAI's `image_url.url`: `s3://bucket/key` in a configured bucket, an inline
    `data:image/<type>;base64,...` up to the configured size, or an `http(s)://` URL whose host is allow-listed.
    """

    job_id: JobId
    task: Task
    images: Annotated[list[str], Field(min_length=1, max_length=MAX_IMAGES_PER_JOB)]
    prompt: Annotated[str | None, Field(max_length=8_000)] = None
    output_schema: dict[str, Any] | None = None
    """JSON Schema of the answer; required for `extract`, not allowed for the other tasks."""
    reply_to: TopicName | None = None
    """A topic that gets the result as well as `vlm.jobs.result`."""
    deadline: UtcDatetime | None = None
    """After this instant the job is answered with `deadline_exceeded` instead of being served."""
    attempt: Annotated[int, Field(ge=0)] = 0
    max_output_tokens: Annotated[int, Field(ge=1, le=4096)] = 512
    tenant: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    submitted_at: UtcDatetime = Field(default_factory=utc_now)

    @field_validator("images")
    @classmethod
    def _known_schemes(cls, images: list[str]) -> list[str]:
        for image in images:
            if not image.startswith(IMAGE_SCHEMES):
                raise ValueError(f"image {image[:40]!r} is not s3://, data:image/ or http(s)://")
        return images

    @model_validator(mode="after")
    def _schema_only_for_extract(self) -> Self:
        if self.task == "extract" and self.output_schema is None:
            raise ValueError("task 'extract' needs output_schema")
        if self.task != "extract" and self.output_schema is not None:
            raise ValueError(f"task {self.task!r} has a fixed schema; output_schema is only for 'extract'")
        return self


class JobError(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    code: ErrorCode
    message: Annotated[str, Field(max_length=2_000)]


class Timings(BaseModel):
    """Milliseconds spent in each stage of serving one job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_ms: float = 0.0
    """From `submitted_at` to the worker picking the job up."""
    admission_ms: float = 0.0
    """Waiting for a lease on the vision-token budget."""
    inference_ms: float = 0.0
    """Image loading and the engine call."""
    total_ms: float = 0.0
    """From pick-up to the result being ready to publish."""


class JobResult(Message):
    """The one answer to an `ImageJob`: `ok` with the parsed JSON, or `error` with a stable code."""

    job_id: JobId
    status: Literal["ok", "error"]
    task: Task | None = None
    output: dict[str, Any] | None = None
    error: JobError | None = None
    vision_tokens: Annotated[int, Field(ge=0)] = 0
    prompt_tokens: Annotated[int, Field(ge=0)] = 0
    completion_tokens: Annotated[int, Field(ge=0)] = 0
    model: str | None = None
    worker: str | None = None
    attempt: Annotated[int, Field(ge=0)] = 0
    timings: Timings = Timings()
    finished_at: UtcDatetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _status_matches_payload(self) -> Self:
        if self.status == "ok" and (self.output is None or self.error is not None):
            raise ValueError("status 'ok' needs output and no error")
        if self.status == "error" and self.error is None:
            raise ValueError("status 'error' needs error")
        return self


class RetryJob(Message):
    """A job on its way to another attempt (`vlm.jobs.retry`) or given up on (`vlm.jobs.dlq`)."""

    job: ImageJob
    attempt: Annotated[int, Field(ge=1)]
    """The attempt this record asks for (the job's own `attempt` is the one that failed)."""
    error: JobError
    not_before: UtcDatetime
    """Backoff: the retry consumer does not serve the job before this instant."""
