"""Points in time as source logs write them: epoch seconds or milliseconds (numbers or numeric text),
`YYYY-MM-DD HH:MM:SS` in UTC, or ISO 8601 with `Z`, an offset, or no zone (read as UTC)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

EPOCH_MS_ABOVE = 100_000_000_000
"""Epoch values at or above this are milliseconds: as seconds it would be the year 5138, as ms it is 1973."""

_NUMERIC = re.compile(r"^-?\d+(\.\d+)?$")


class TimeError(ValueError):
    """A value that is no point in time this module can read."""


def parse_log_time(value: object) -> datetime:
    """An aware UTC datetime from an epoch number (s or ms) or ISO 8601 / `YYYY-MM-DD HH:MM:SS` text."""
    # NOTE: the exact `int` test first: most times are integer epochs, and `bool` (an `int`) must not pass.
    if type(value) is int:
        return _from_epoch(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMERIC.match(text):
            return _from_epoch(float(value))
        try:
            parsed = datetime.fromisoformat(text)
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        except (ValueError, OverflowError):
            raise TimeError("not ISO 8601 or YYYY-MM-DD HH:MM:SS") from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _from_epoch(value)
    raise TimeError(f"expected an epoch number or a date-time text, got {type(value).__name__}")


def _from_epoch(number: float) -> datetime:
    try:
        seconds = float(number)
    except OverflowError:
        raise TimeError("epoch out of range") from None
    if not math.isfinite(seconds):
        raise TimeError("epoch is not a finite number")
    if abs(seconds) >= EPOCH_MS_ABOVE:
        seconds /= 1000
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise TimeError("epoch out of range") from None
