"""Hard cases, their corrections, and the golden records those become."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import Message, UtcDatetime, utc_now
from schemas.logs import ImageInfo, NormalizedLog

CorrectionSource = Literal["human", "model"]
"""Who wrote a correction: a person, or a stronger model whose suggestion a person accepted."""


class Signal(BaseModel):
    """One explainable reason a log is hard, with the weight it added to the score."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float
    detail: str = ""


class HardCase(Message):
    case_id: str
    log_id: str
    score: float
    priority: Annotated[int, Field(ge=0)]
    """Higher is served first by the correction queue."""
    signals: list[Signal]
    log: NormalizedLog
    suggestion: dict[str, Any] | None = None
    """A stronger model's pre-filled answer; a person still confirms it."""


class Correction(Message):
    case_id: str
    log_id: str
    task: str | None = None
    output: dict[str, Any]
    """The corrected answer, validated against the task schema."""
    source: CorrectionSource = "human"
    reviewer: str
    submitted_at: UtcDatetime = Field(default_factory=utc_now)
    case: HardCase | None = None
    """The case corrected (its log holds the prompt and images), so a golden record is built from this event alone."""


class GoldenRecord(Message):
    """A trusted example. Keyed by `record_id` on a compacted topic; `version` grows with each correction."""

    record_id: str
    version: Annotated[int, Field(ge=1)]
    task: str | None = None
    tenant: str = "default"
    prompt: str
    images: list[ImageInfo]
    answer: dict[str, Any]
    source_log_id: str
    source_case_id: str | None = None
    created_at: UtcDatetime = Field(default_factory=utc_now)
