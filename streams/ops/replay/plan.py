"""What a replay will copy, decided before the first record moves: the request as the user typed it, and the plan
resolved from it against the cluster (absolute times, an offset range per partition, how records map onto the
destination's partitions). Pure: the cluster's answers come in as arguments.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import VlmflowError
from streams.ops import filter_expr
from streams.ops.window import (
    OffsetRange,
    TimeWindow,
    WindowError,
    format_time,
    parse_partition_offsets,
    parse_time,
    plan_ranges,
)

REPLAY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"


class ReplayError(VlmflowError):
    """A replay that cannot start, cannot go on, or cannot be resumed as asked."""


class ReplayRequest(BaseModel):
    """A replay as asked for on the command line. Kept verbatim in the checkpoint, so a resume can be checked
    against what was asked first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    destination: str
    partitions: list[int] | None = None
    """None: every partition of the source."""
    from_time: str | None = None
    to_time: str | None = None
    from_offsets: str | None = None
    """`PARTITION:OFFSET,...`, inclusive."""
    to_offsets: str | None = None
    """`PARTITION:OFFSET,...`, exclusive."""
    filter: str | None = None

    def window(self, now_ms: int) -> TimeWindow:
        """The time window, relative times resolved against `now_ms`; also checks every other option can be read,
        so bad input fails before any connection is made."""
        if self.from_time is None and self.from_offsets is None:
            raise WindowError("a replay needs a start: --from TIME or --from-offset PARTITION:OFFSET,...")
        if self.filter is not None:
            filter_expr.parse(self.filter)
        self.start_offsets()
        self.end_offsets()
        return TimeWindow(
            parse_time(self.from_time, now_ms) if self.from_time is not None else None,
            parse_time(self.to_time, now_ms) if self.to_time is not None else None,
        )

    def start_offsets(self) -> dict[int, int]:
        return parse_partition_offsets(self.from_offsets, "--from-offset") if self.from_offsets else {}

    def end_offsets(self) -> dict[int, int]:
        return parse_partition_offsets(self.to_offsets, "--to-offset") if self.to_offsets else {}

    def selected_partitions(self, source_partitions: list[int]) -> list[int]:
        """`--partitions` if given, else those `--from-offset` names (when there is no `--from`), else all."""
        if self.partitions is not None:
            chosen, option = set(self.partitions), "--partitions"
        elif self.from_offsets and self.from_time is None:
            chosen, option = set(self.start_offsets()), "--from-offset"
        else:
            return source_partitions
        unknown = sorted(chosen - set(source_partitions))
        if unknown:
            raise ReplayError(f"{self.source} has partitions {source_partitions}; {option} names {unknown}")
        return sorted(chosen)


class ReplayPlan(BaseModel):
    """A replay resolved against the cluster when it started; a resume follows it unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replay_id: Annotated[str, Field(pattern=REPLAY_ID_PATTERN)]
    request: ReplayRequest
    from_ms: int | None
    to_ms: int | None
    ranges: dict[int, OffsetRange]
    """source partition -> offsets to scan, `[start, end)`; the end is the high watermark when the replay began."""
    keep_partitions: bool
    """True: a record goes to the destination partition with its source partition's number (full per-partition
    order). False (the destination has fewer partitions): the producer places it by key (order per key)."""
    created_at: datetime

    @property
    def window(self) -> TimeWindow:
        return TimeWindow(self.from_ms, self.to_ms)

    @property
    def total(self) -> int:
        """Offsets to scan, in all partitions."""
        return sum(offsets.size for offsets in self.ranges.values())

    def describe(self) -> str:
        """One line for logs and the summary."""
        ranges = " ".join(f"{p}:[{r.start},{r.end})" for p, r in sorted(self.ranges.items()))
        start = format_time(self.from_ms) if self.from_ms is not None else "-inf"
        end = format_time(self.to_ms) if self.to_ms is not None else "+inf"
        where = f"{self.request.source} {ranges} -> {self.request.destination}"
        matching = f" where {self.request.filter}" if self.request.filter else ""
        return f"{where}, timestamps [{start}, {end}){matching}"


def new_replay_id(now: datetime) -> str:
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def check_replay_id(replay_id: str) -> str:
    """Ids name checkpoint files: refuse anything that is not a plain file name."""
    if not re.match(REPLAY_ID_PATTERN, replay_id):
        raise ReplayError(f"replay id {replay_id!r} is not one vlmflow gives (letters, digits, '.', '_', '-')")
    return replay_id


def plan_replay(
    request: ReplayRequest,
    *,
    replay_id: str,
    now: datetime,
    source_partitions: list[int],
    beginnings: dict[int, int],
    ends: dict[int, int],
    time_floors: dict[int, int],
    destination_partitions: int,
) -> ReplayPlan:
    """Resolve `request` with the cluster's facts: `beginnings` (log start), `ends` (fetch high watermarks),
    `time_floors` (offsets before which, per the broker's time index, no record is at or after `--from`; only ever
    used to skip ahead, since the window is enforced record by record anyway)."""
    now_ms = int(now.timestamp() * 1000)
    window = request.window(now_ms)
    partitions = request.selected_partitions(source_partitions)
    ranges = plan_ranges(
        partitions, beginnings, ends, request.start_offsets(), request.end_offsets(), floors=time_floors
    )
    return ReplayPlan(
        replay_id=replay_id,
        request=request,
        from_ms=window.from_ms,
        to_ms=window.to_ms,
        ranges=ranges,
        keep_partitions=destination_partitions > max(partitions, default=0),
        created_at=now,
    )
