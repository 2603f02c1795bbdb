"""The pure pieces of serving one job: its failure type, what serving produced, its cost, the second check of the
engine's output, the `JobResult` built from all that, and the bounded log event. No I/O: the worker
(`workers.worker`) does the I/O and calls these.

Invariant: every way a job can fail that is the job's own business is a `JobFailure` with a stable error code,
which becomes that job's error result (or another attempt, `workers.retries`). What a job sends in is hostile
until bounded: the log event names inline images (and absurdly long URIs) by digest and length instead of
copying them, and an output schema over the size a worker accepts by a note, so one job's event stays far below
a Kafka message whatever the job held.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.base import utc_now
from schemas.errors import ErrorCode, VlmflowError
from schemas.jobs import ImageJob, JobError, JobResult, Timings
from schemas.logs import JobEvent
from schemas.settings import Settings
from schemas.tasks import MAX_OUTPUT_SCHEMA_BYTES, BoxField, InvalidAnswer, InvalidTaskSchema, validate_answer
from workers.engines.base import EngineOutput
from workers.tokens import MAX_ASPECT_RATIO, image_tokens

MAX_ERROR_MESSAGE_CHARS = 2_000
"""An error message in a result is cut to this length (messages may quote hostile input)."""
MAX_LOGGED_URI_CHARS = 8_192
"""Image URIs up to this length are logged as they are (presigned URLs with session tokens run to a few KB);
longer ones, and every inline `data:` image, are logged as a reference (`image_reference`)."""
_MEDIA_TYPE = re.compile(r"^image/[A-Za-z0-9.+\-]{1,64}$")


class JobFailure(VlmflowError):
    """This job cannot be served: it gets an error result with `code` (or another attempt, if retryable)."""

    def __init__(self, code: ErrorCode, message: str):
        self.code: ErrorCode = code
        super().__init__(message)

    def error(self) -> JobError:
        return JobError(code=self.code, message=str(self)[:MAX_ERROR_MESSAGE_CHARS])


@dataclass
class Served:
    """What serving one job produced, success or not: the input of its result (step 8 of `Worker._handle`)."""

    picked_at: datetime
    """When this worker took the job (after a retry's backoff)."""
    output: dict[str, Any] | None = None
    """The validated answer; None when the job failed."""
    failure: JobFailure | None = None
    """What stopped the job; None when it has an output."""
    reply_to: str | None = None
    """The topic that gets a copy of the result: the job's `reply_to` once the checks accepted it (a job refused
    for its `reply_to` gets no copy there)."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each image, in the job's order; empty when loading failed."""
    vision_tokens: int = 0
    """The job's cost in vision tokens (0 before it was known)."""
    engine: EngineOutput | None = None
    """What the engine answered; None when the job did not reach it."""
    admission_s: float = 0.0
    """Seconds spent waiting for the budget's lease."""
    inference_s: float = 0.0
    """Seconds spent in the engine."""


def seconds_left(deadline: datetime | None, now: datetime) -> float | None:
    """Seconds until `deadline` (negative once passed); None when there is no deadline."""
    return None if deadline is None else (deadline - now).total_seconds()


def vision_tokens(sizes: Sequence[tuple[int, int]], settings: Settings) -> int:
    """The job's exact vision tokens at the engine's `min_pixels`/`max_pixels`: the cost of its lease."""
    model = settings.model
    total = 0
    for width, height in sizes:
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise JobFailure("aspect_ratio", f"a {width}x{height} image is over the aspect ratio {MAX_ASPECT_RATIO}")
        total += image_tokens(
            width, height, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels
        )
    return total


def validated_output(engine_output: EngineOutput, job: ImageJob, box_field: BoxField) -> dict[str, Any]:
    """The engine's JSON, checked again against the task schema (constrained decoding can be cut off)."""
    parsed = engine_output.parsed_json
    if not isinstance(parsed, dict):
        reason = "was cut off at max_output_tokens" if engine_output.finish_reason == "length" else "is no JSON object"
        raise JobFailure("output_invalid", f"the model's output {reason}: {engine_output.text[:200]!r}")
    try:
        validate_answer(job.task, parsed, job.output_schema, box_field=box_field)
    except InvalidAnswer as exc:
        raise JobFailure("output_invalid", str(exc)) from None
    except InvalidTaskSchema as exc:
        raise JobFailure("invalid_output_schema", str(exc)) from None
    return parsed


def job_result(job: ImageJob, served: Served, *, model: str, worker: str) -> JobResult:
    """The result of `job`: its output, or the error of its failure, with its cost and timings."""
    engine = served.engine
    timings = Timings(
        queue_ms=max(0.0, (served.picked_at - job.submitted_at).total_seconds() * 1000),
        admission_ms=served.admission_s * 1000,
        inference_ms=served.inference_s * 1000,
        total_ms=(utc_now() - served.picked_at).total_seconds() * 1000,
    )
    return JobResult(
        job_id=job.job_id,
        status="ok" if served.failure is None else "error",
        task=job.task,
        output=served.output,
        error=None if served.failure is None else served.failure.error(),
        vision_tokens=served.vision_tokens,
        prompt_tokens=engine.num_prompt_tokens if engine else 0,
        completion_tokens=engine.num_completion_tokens if engine else 0,
        model=model,
        worker=worker,
        attempt=job.attempt,
        timings=timings,
    )


def error_result(result: JobResult, code: ErrorCode, message: str) -> JobResult:
    """`result` turned into an error with `code` (its output dropped): what is published when the result as it
    was cannot be."""
    error = JobError(code=code, message=message[:MAX_ERROR_MESSAGE_CHARS])
    return result.model_copy(update={"status": "error", "output": None, "error": error})


def image_reference(uri: str) -> str:
    """How a log event names an image: the URI itself, or for an inline image (or a URI over
    `MAX_LOGGED_URI_CHARS`) `data:<media type>;sha256=<hex of the URI>;length=<characters>,` with no payload."""
    if not uri.startswith("data:") and len(uri) <= MAX_LOGGED_URI_CHARS:
        return uri
    media_type = uri[len("data:") :].split(";", 1)[0].split(",", 1)[0] if uri.startswith("data:") else ""
    if not _MEDIA_TYPE.match(media_type):
        media_type = "image/unknown"
    digest = hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()
    return f"data:{media_type};sha256={digest};length={len(uri)},"


def log_event(job: ImageJob, result: JobResult, image_sizes: list[tuple[int, int]]) -> JobEvent:
    """The log event of a served job, bounded whatever the job held: images by reference (`image_reference`),
    an output schema over `MAX_OUTPUT_SCHEMA_BYTES` (refused by the worker anyway) by a note naming its size."""
    update: dict[str, Any] = {"images": [image_reference(uri) for uri in job.images]}
    if job.output_schema is not None:
        text = json.dumps(job.output_schema, separators=(",", ":"), default=str)
        if len(text) > MAX_OUTPUT_SCHEMA_BYTES:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            update["output_schema"] = {"$comment": f"output_schema of {len(text)} bytes not logged (sha256 {digest})"}
    return JobEvent(job=job.model_copy(update=update), result=result, image_sizes=image_sizes)
