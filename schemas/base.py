"""The base of every topic value: frozen, strict about unknown fields, and versioned."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
"""The newest value layout this code writes. Readers accept this version and older ones."""


def _supported_version(version: int) -> int:
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this reader supports ({SCHEMA_VERSION})")
    return version


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a time zone")
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_aware_utc)]
"""A point in time with a zone, stored in UTC. Naive times are rejected, never guessed."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """A topic value. Unknown fields are an error, so a typo in a producer fails loudly at the first consumer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Annotated[int, Field(ge=1), AfterValidator(_supported_version)] = SCHEMA_VERSION
