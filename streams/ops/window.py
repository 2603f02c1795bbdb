"""Windows over a topic: points in time as ops people type them, and per-partition offset ranges.

Every window is half-open, `[from, to)`, for times and offsets alike, so two adjacent windows never share a
record. Times are epoch milliseconds (Kafka's record timestamps); relative times are resolved once, against a
`now` the caller passes, so a resumed replay keeps the window it started with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.errors import VlmflowError
from streams.cluster import OffsetRange

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_RELATIVE = re.compile(r"^(?:now)?-(\d+)(ms|s|m|h|d|w)$")
_EPOCH_MS = re.compile(r"^\d+$")
_PARTITION_OFFSET = re.compile(r"^(\d+):(\d+)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TIME_HELP = (
    "ISO 8601 with a zone (2024-05-01T12:00:00Z, 2024-05-01T14:00+02:00), epoch milliseconds (1714564800000), "
    "'now', or a duration before now (now-90s, now-15m, now-2h, now-1d, now-1w)"
)


class WindowError(VlmflowError, ValueError):
    """A time, offset list or window that cannot be read, or that selects nothing by construction."""


def parse_time(text: str, now_ms: int) -> int:
    """Epoch milliseconds for `text` (see TIME_HELP). Naive datetimes are refused rather than guessed."""
    value = text.strip()
    if value == "now":
        return now_ms
    if _EPOCH_MS.match(value):
        return int(value)
    relative = _RELATIVE.match(value)
    if relative:
        return now_ms - int(relative.group(1)) * _UNIT_MS[relative.group(2)]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise WindowError(f"cannot read time {text!r}: use {TIME_HELP}") from None
    if parsed.tzinfo is None:
        raise WindowError(f"time {text!r} has no zone; add one, e.g. {value}Z for UTC")
    return _epoch_ms(parsed)


def _epoch_ms(moment: datetime) -> int:
    # NOTE: integer arithmetic on the timedelta; float seconds would round some milliseconds away.
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000 + delta.microseconds // 1_000


def format_time(epoch_ms: int) -> str:
    """A record timestamp as ISO 8601 UTC with milliseconds, the form `parse_time` reads back (plain epoch
    milliseconds outside the years 1 to 9999)."""
    try:
        moment = _EPOCH + timedelta(milliseconds=epoch_ms)
    except OverflowError:
        return str(epoch_ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TimeWindow:
    """Record timestamps in `[from_ms, to_ms)`; None leaves that side open."""

    from_ms: int | None = None
    to_ms: int | None = None

    def __post_init__(self) -> None:
        if self.from_ms is not None and self.to_ms is not None and self.to_ms <= self.from_ms:
            raise WindowError(
                f"--to {format_time(self.to_ms)} is not after --from {format_time(self.from_ms)}; "
                "the window [from, to) would be empty"
            )

    def contains(self, timestamp_ms: int) -> bool:
        if self.from_ms is not None and timestamp_ms < self.from_ms:
            return False
        return self.to_ms is None or timestamp_ms < self.to_ms


def parse_partition_list(text: str) -> list[int]:
    """`0,2,3` → [0, 2, 3]."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise WindowError(f"--partitions {text!r}: expected partition numbers separated by commas, e.g. 0,2,3")
    return sorted({int(part) for part in parts})


def parse_partition_offsets(text: str, option: str) -> dict[int, int]:
    """`0:100,3:250` → {0: 100, 3: 250}; `option` names the flag in the error."""
    offsets: dict[int, int] = {}
    for part in text.split(","):
        match = _PARTITION_OFFSET.match(part.strip())
        if not match:
            raise WindowError(f"{option} {text!r}: expected PARTITION:OFFSET[,PARTITION:OFFSET...], e.g. 0:100,1:250")
        partition, offset = int(match.group(1)), int(match.group(2))
        if partition in offsets:
            raise WindowError(f"{option} {text!r}: partition {partition} is given twice")
        offsets[partition] = offset
    return offsets


def plan_ranges(
    partitions: list[int],
    beginnings: dict[int, int],
    ends: dict[int, int],
    from_offsets: dict[int, int],
    to_offsets: dict[int, int],
    *,
    floors: dict[int, int] | None = None,
) -> dict[int, OffsetRange]:
    """The offsets to scan in each partition: `[from, to)` where given, clamped to what the partition holds now
    (`beginnings` from the log start, `ends` from the fetch high watermark), and started no earlier than
    `floors` (offsets known to hold nothing wanted, e.g. from a time lookup)."""
    for option, offsets in (("--from-offset", from_offsets), ("--to-offset", to_offsets)):
        unknown = sorted(set(offsets) - set(partitions))
        if unknown:
            raise WindowError(f"{option} names partition {unknown[0]}, which is not among {partitions}")
    ranges = {}
    for partition in partitions:
        first, last = beginnings[partition], ends[partition]
        start, end = from_offsets.get(partition, first), to_offsets.get(partition, last)
        if partition in from_offsets and partition in to_offsets and end < start:
            raise WindowError(f"partition {partition}: --to-offset {end} is before --from-offset {start}")
        start = max(start, first, (floors or {}).get(partition, first))
        end = min(max(end, first), last)
        ranges[partition] = OffsetRange(min(start, end), end)
    return ranges
