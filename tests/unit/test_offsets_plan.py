"""Planning a consumer group's new offsets, without a cluster."""

from __future__ import annotations

import pytest

from streams.ops.reset import PlannedOffset, ResetError, ResetTarget, plan_offsets

BEGIN = {0: 5, 1: 0}
END = {0: 100, 1: 40}
CURRENT = {0: 50}


def _plan(target: ResetTarget, at_time: dict[int, int] | None = None, current: dict[int, int] | None = None):
    return plan_offsets(
        target, current=CURRENT if current is None else current, beginnings=BEGIN, ends=END, at_time=at_time or {}
    )


def test_earliest_and_latest() -> None:
    assert _plan(ResetTarget("earliest")) == [PlannedOffset(0, 50, 5), PlannedOffset(1, None, 0)]
    assert _plan(ResetTarget("latest")) == [PlannedOffset(0, 50, 100), PlannedOffset(1, None, 40)]


def test_datetime_takes_the_scanned_offsets() -> None:
    assert _plan(ResetTarget("datetime", 1), at_time={0: 70, 1: 40}) == [
        PlannedOffset(0, 50, 70),
        PlannedOffset(1, None, 40),
    ]


@pytest.mark.parametrize(("shift", "new"), [(-10, 40), (-1000, 5), (30, 80), (1000, 100)])
def test_shift_is_clamped_to_the_partition(shift: int, new: int) -> None:
    assert _plan(ResetTarget("shift", shift), current={0: 50, 1: 0})[0] == PlannedOffset(0, 50, new)


def test_shift_needs_a_committed_offset() -> None:
    with pytest.raises(ResetError, match="partition 1 has none"):
        _plan(ResetTarget("shift", 1))
