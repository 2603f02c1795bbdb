"""Times as ops people type them, half-open windows and per-partition offset ranges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.ops.window import (
    OffsetRange,
    TimeWindow,
    WindowError,
    format_time,
    parse_partition_list,
    parse_partition_offsets,
    parse_time,
    plan_ranges,
)

NOW_MS = 1_714_564_800_000  # 2024-05-01T12:00:00Z
epoch_ms = st.integers(0, 4_102_444_800_000)  # up to 2100
zones = st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))


@given(epoch_ms)
def test_formatted_times_parse_back(moment_ms: int) -> None:
    assert parse_time(format_time(moment_ms), NOW_MS) == moment_ms


@given(epoch_ms, zones)
def test_iso_times_in_any_zone(moment_ms: int, zone: timezone) -> None:
    moment = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=moment_ms)).astimezone(zone)
    assert parse_time(moment.isoformat(timespec="milliseconds"), NOW_MS) == moment_ms


@given(epoch_ms)
def test_epoch_milliseconds(moment_ms: int) -> None:
    assert parse_time(str(moment_ms), NOW_MS) == moment_ms


@given(
    st.integers(0, 10_000),
    st.sampled_from([("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000), ("w", 604_800_000)]),
)
def test_relative_times_count_back_from_now(amount: int, unit: tuple[str, int]) -> None:
    suffix, unit_ms = unit
    assert parse_time(f"now-{amount}{suffix}", NOW_MS) == NOW_MS - amount * unit_ms
    assert parse_time(f"-{amount}{suffix}", NOW_MS) == NOW_MS - amount * unit_ms


@given(st.text(max_size=30))
def test_any_text_is_a_time_or_a_window_error(text: str) -> None:
    try:
        parse_time(text, NOW_MS)
    except WindowError as exc:
        assert repr(text) in str(exc)


def test_named_and_zoned_forms() -> None:
    assert parse_time("now", NOW_MS) == NOW_MS
    assert parse_time("2024-05-01T12:00:00Z", NOW_MS) == NOW_MS
    assert parse_time("2024-05-01T14:00+02:00", NOW_MS) == NOW_MS
    assert parse_time("2024-05-01T12:00:00.250Z", NOW_MS) == NOW_MS + 250


@pytest.mark.parametrize("text", ["2024-05-01", "2024-05-01T12:00:00"])
def test_naive_times_are_refused_not_guessed(text: str) -> None:
    with pytest.raises(WindowError, match="has no zone"):
        parse_time(text, NOW_MS)


@given(st.integers(-(10**15), 10**15), st.integers(0, 10**6), st.integers(-(10**15), 10**15))
def test_window_is_half_open(start: int, length: int, timestamp: int) -> None:
    if length == 0:
        with pytest.raises(WindowError, match="is not after"):
            TimeWindow(start, start)
        return
    window = TimeWindow(start, start + length)
    assert window.contains(timestamp) == (start <= timestamp < start + length)


def test_open_sides() -> None:
    assert TimeWindow(None, 10).contains(-5) and not TimeWindow(None, 10).contains(10)
    assert TimeWindow(10, None).contains(10**15) and not TimeWindow(10, None).contains(9)


def test_to_before_from_names_both_times() -> None:
    with pytest.raises(WindowError) as caught:
        TimeWindow(parse_time("now", NOW_MS), parse_time("now-1h", NOW_MS))
    assert "2024-05-01T11:00:00.000Z is not after --from 2024-05-01T12:00:00.000Z" in str(caught.value)


@given(st.dictionaries(st.integers(0, 50), st.integers(0, 10**12), min_size=1, max_size=6))
def test_partition_offsets_round_trip(offsets: dict[int, int]) -> None:
    text = ",".join(f"{partition}:{offset}" for partition, offset in offsets.items())
    assert parse_partition_offsets(text, "--from-offset") == offsets


@pytest.mark.parametrize("text", ["", "0", "0:", ":5", "0:1,0:2", "a:1", "0:-1", "0:1;1:2"])
def test_bad_partition_offsets(text: str) -> None:
    with pytest.raises(WindowError, match="--from-offset"):
        parse_partition_offsets(text, "--from-offset")


def test_partition_lists() -> None:
    assert parse_partition_list("3, 0,3") == [0, 3]
    with pytest.raises(WindowError, match="--partitions"):
        parse_partition_list("0,x")


BEGIN = {0: 10, 1: 0}
END = {0: 100, 1: 50}


@given(
    st.fixed_dictionaries({}, optional={0: st.integers(0, 200), 1: st.integers(0, 200)}),
    st.fixed_dictionaries({}, optional={0: st.integers(0, 200), 1: st.integers(0, 200)}),
    st.fixed_dictionaries({}, optional={0: st.integers(0, 200), 1: st.integers(0, 200)}),
)
def test_ranges_stay_inside_what_each_partition_holds(
    starts: dict[int, int], ends: dict[int, int], floors: dict[int, int]
) -> None:
    try:
        ranges = plan_ranges([0, 1], BEGIN, END, starts, ends, floors=floors)
    except WindowError:
        assert any(ends[p] < starts[p] for p in starts.keys() & ends.keys())
        return
    for partition, offsets in ranges.items():
        assert BEGIN[partition] <= offsets.start <= offsets.end <= END[partition]
        assert offsets.start >= min(max(starts.get(partition, 0), floors.get(partition, 0)), offsets.end)
        assert offsets.end == min(max(ends.get(partition, END[partition]), BEGIN[partition]), END[partition])


def test_ranges_default_to_everything_held() -> None:
    assert plan_ranges([0, 1], BEGIN, END, {}, {}) == {0: OffsetRange(10, 100), 1: OffsetRange(0, 50)}


def test_ranges_refuse_unknown_partitions_and_reversed_offsets() -> None:
    with pytest.raises(WindowError, match="--to-offset names partition 7"):
        plan_ranges([0, 1], BEGIN, END, {}, {7: 1})
    with pytest.raises(WindowError, match="--to-offset 20 is before --from-offset 30"):
        plan_ranges([0, 1], BEGIN, END, {0: 30}, {0: 20})
