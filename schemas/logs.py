"""Request logs: the source formats found in `vlm.logs.raw`, the one normalized record, and rejections."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import Message, UtcDatetime, utc_now
from schemas.jobs import ImageJob, JobResult

SourceFormat = Literal["openai-chat", "legacy-flat", "vlmflow-job"]
Status = Literal["ok", "error"]
Feedback = Literal["none", "positive", "negative"]
InvalidLogCode = Literal[
    "not_json",  # the value is not JSON (or holds NaN/Infinity)
    "not_an_object",  # JSON, but not an object
    "unknown_format",  # an object of no known source format
    "invalid_field",  # a field of the source format has a value that cannot be read; the detail names it
    "invalid_timestamp",  # no time, or one that is no epoch number or ISO 8601 / `YYYY-MM-DD HH:MM:SS` text
    "invalid_image",  # an image reference that is no s3://, bucket/key or http(s) URL, or sizes that do not match
    "inline_image",  # a `data:` image: a dataset needs a stored object to point at
    "invalid_correction",  # the user's correction is no JSON object or array, or holds an unreadable box
]
"""Why `streams.flywheel.normalize.normalize` could not read a raw log (the `code` of `schemas.InvalidLog`)."""
FlywheelRejectCode = Literal["rule", "duplicate", "pii_in_image_uri", "too_large", "internal_error"]
"""`rule`: a filter rule fired (named in `rule`); `duplicate`: same content as an earlier log; `pii_in_image_uri`:
an image URI holds an email or phone number, so the example cannot point at its image without keeping that
personal data (only while PII redaction is on); `too_large`: the normalized record would not fit a Kafka message;
`internal_error`: a defect in vlmflow met this log (the detail names the exception)."""
RejectCode = InvalidLogCode | FlywheelRejectCode
REJECT_CODES: tuple[str, ...] = (*get_args(InvalidLogCode), *get_args(FlywheelRejectCode))


class _SourceLog(BaseModel):
    """Source formats are written by other systems: they are read leniently and never re-serialized."""

    model_config = ConfigDict(frozen=True, extra="allow")


class OpenAIChatLog(_SourceLog):
    """An OpenAI-style chat completion as gateways log it (`request.messages` with `image_url` parts)."""

    id: str | None = None
    created: float | None = None
    timestamp: str | None = None
    tenant: str | None = None
    metadata: dict[str, Any] | None = None
    request: dict[str, Any]
    response: dict[str, Any]
    latency_ms: float | None = None
    status_code: int | None = None
    x_image_sizes: list[list[int]] | None = None
    feedback: dict[str, Any] | None = None


class LegacyFlatLog(_SourceLog):
    """The legacy flat app log: loose types everywhere (epoch or string times, truthy strings)."""

    req_id: str | int
    ts: float | int | str | None = None
    app: str | None = None
    img: str | None = None
    img_w: int | float | str | None = None
    img_h: int | float | str | None = None
    q: str | None = None
    ans: str | None = None
    lat: float | int | str | None = None
    ok: bool | int | str | None = None
    thumbs: int | str | None = None
    fix: str | None = None


class JobEvent(Message):
    """What an inference worker logs for every job it served: the job, its result and the image sizes it saw."""

    kind: Literal["vlmflow-job"] = "vlmflow-job"
    job: ImageJob
    result: JobResult
    image_sizes: list[tuple[int, int]] = []
    """`(width, height)` of each image as decoded, in the job's order; empty when loading failed."""


RawLog = OpenAIChatLog | LegacyFlatLog | JobEvent
"""Any value of `vlm.logs.raw`."""


class Lineage(BaseModel):
    """Where a record came from, so any derived record can be traced to one raw message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]


class ImageInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    """`s3://bucket/key`, whatever form the source used (`bucket/key`, path-style presigned URLs); an http(s) URL
    that is not presigned stays as it is."""
    width: Annotated[int, Field(ge=1)] | None = None
    height: Annotated[int, Field(ge=1)] | None = None


class NormalizedLog(Message):
    """One request log in one vocabulary: UTC times, milliseconds, s3:// URIs, parsed output, xyxy pixel boxes."""

    log_id: str
    source_format: SourceFormat
    request_id: str
    timestamp: UtcDatetime
    tenant: str = "default"
    model: str | None = None
    task: str | None = None
    prompt: str = ""
    images: list[ImageInfo] = []
    output_text: str | None = None
    output: dict[str, Any] | list[Any] | None = None
    output_error: str | None = None
    """Why `output_text` did not parse as JSON; None when it did or when there was no output."""
    latency_ms: float | None = None
    status: Status = "ok"
    feedback: Feedback = "none"
    correction: dict[str, Any] | list[Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    lineage: Lineage | None = None
    error_code: str | None = None
    """Why the request failed: the job's `ErrorCode`, or `http_<status>` for gateway logs; None when it did not."""
    attempt: Annotated[int, Field(ge=0)] = 0
    """Earlier tries of the same request: the job's attempt, or how many logs with the same tenant, images and
    prompt the flywheel saw before this one (0 the first time)."""


class RejectedLog(Message):
    """A raw log that did not pass: nothing is dropped silently, and the rule or parse error is named."""

    log_id: str
    code: RejectCode
    """`rule` when a filter rule fired, `duplicate`, or an `InvalidLog` code from normalization."""
    rule: str | None = None
    """The filter rule that fired (`dedupe` for duplicates); None for normalization errors."""
    detail: str = ""
    original: Any = None
    """The raw value as JSON, or its text when it was not JSON; texts are PII-redacted like normalized logs."""
    lineage: Lineage | None = None
    rejected_at: UtcDatetime = Field(default_factory=utc_now)
