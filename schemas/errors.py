"""One error tree and the closed vocabulary of error codes that results and rejections carry."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import ValidationError

ErrorCode = Literal[
    # the message itself
    "invalid_message",  # not JSON, or not the topic's schema
    "payload_too_large",  # the message or an inline image is over the configured size
    "invalid_output_schema",  # an extract job's schema is not a JSON Schema, or too large or deep
    # images
    "image_not_found",  # no object at the s3:// key
    "bucket_forbidden",  # the bucket is not one the worker may read
    "url_forbidden",  # a plain URL (or a redirect hop) whose host and port are not allow-listed
    "invalid_image_uri",  # an image URI that is malformed or ambiguous (dot segments, user info, backslashes)
    "image_fetch_failed",  # the store or URL did not answer
    "image_undecodable",  # bytes that are no image Pillow can read
    "image_truncated",  # an image cut short
    "image_too_large",  # more pixels than the decompression-bomb limit
    "aspect_ratio",  # longer side over 200 times the shorter one
    # admission and serving
    "too_many_tokens",  # the job's vision tokens can never fit the budget
    "budget_timeout",  # waited for budget longer than allowed
    "lease_lost",  # the job's budget lease was lost while it ran (Redis away past its TTL, or lost with its data)
    "deadline_exceeded",  # the job's deadline passed before it could be served
    "engine_error",  # the engine failed on this job
    "output_invalid",  # the model's output did not validate against the task schema
    "retries_exhausted",  # every retry failed; the job went to the dead-letter topic
    "internal_error",  # a defect in vlmflow; the message says where
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)


class VlmflowError(Exception):
    """Root of vlmflow's own errors. The command line prints these as one line, without a traceback."""


class InvalidMessage(VlmflowError, ValueError):
    """A topic value that cannot be decoded. It names the topic and the field, and carries a stable code."""

    def __init__(self, topic: str, reason: str, *, field: str | None = None, code: ErrorCode = "invalid_message"):
        self.topic = topic
        self.field = field
        self.reason = reason
        self.code: ErrorCode = code
        where = f"{topic}.{field}" if field else topic
        super().__init__(f"{where}: {reason}")


class InvalidLog(VlmflowError, ValueError):
    """A raw log that normalization cannot read. `code` is stable and goes to `vlm.logs.rejected`."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


def first_error(exc: ValidationError, *, top: str = "(top level)") -> tuple[str, str]:
    """The first problem of a pydantic error as (dotted location, message): one line is what a person reads.

    `top` names the location when the problem is the whole value; pydantic's "Value error, " prefix is dropped.
    """
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or top
    return where, first["msg"].removeprefix("Value error, ")
