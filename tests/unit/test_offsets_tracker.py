"""The commit position under out-of-order completion, rebalances and misuse."""

from __future__ import annotations

import random

import pytest

from workers.offsets import OffsetOrderError, OffsetTracker


def test_nothing_to_commit_before_anything_is_done() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.start("p0", 5)
    tracker.start("p0", 6)
    assert tracker.commit_points() == {}


def test_position_is_the_lowest_offset_still_in_flight() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tickets = [tracker.start("p0", offset) for offset in range(10, 14)]
    assert tracker.done(tickets[2]) and tracker.done(tickets[1])
    assert tracker.commit_points() == {}
    tracker.done(tickets[0])
    assert tracker.commit_points() == {"p0": 13}
    tracker.done(tickets[3])
    assert tracker.commit_points() == {"p0": 14}


def test_offset_zero_is_a_real_position() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.done(tracker.start("p0", 0))
    assert tracker.commit_points() == {"p0": 1}


def test_gaps_between_offsets_do_not_block_the_position() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    first, second = tracker.start("p0", 3), tracker.start("p0", 9)
    tracker.done(first)
    assert tracker.commit_points() == {"p0": 9}
    tracker.done(second)
    assert tracker.commit_points() == {"p0": 10}


def test_committed_points_are_not_offered_again() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.done(tracker.start("p0", 0))
    tracker.done(tracker.start("p1", 7))
    points = tracker.commit_points()
    tracker.committed(points)
    assert tracker.commit_points() == {}
    tracker.done(tracker.start("p1", 8))
    assert tracker.commit_points() == {"p1": 9}


def test_commit_points_of_some_partitions() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.done(tracker.start("p0", 0))
    tracker.done(tracker.start("p1", 0))
    assert tracker.commit_points(["p1", "gone"]) == {"p1": 1}


def test_a_ticket_from_before_a_rebalance_is_stale() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    old = tracker.start("p0", 4)
    tracker.forget(["p0"])
    assert tracker.in_flight() == 0
    new = tracker.start("p0", 4)
    assert tracker.done(old) is False
    assert tracker.commit_points() == {}
    assert tracker.done(new) is True
    assert tracker.commit_points() == {"p0": 5}


def test_out_of_order_start_and_double_done_are_refused() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    ticket = tracker.start("p0", 5)
    with pytest.raises(OffsetOrderError):
        tracker.start("p0", 5)
    tracker.done(ticket)
    with pytest.raises(OffsetOrderError):
        tracker.done(ticket)


def test_random_completion_order_never_commits_past_an_unfinished_record() -> None:
    rng = random.Random(7)
    tracker: OffsetTracker[int] = OffsetTracker()
    pending = [tracker.start(partition, offset) for offset in range(200) for partition in range(3)]
    finished: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    rng.shuffle(pending)
    for ticket in pending:
        tracker.done(ticket)
        finished[ticket.partition].add(ticket.offset)
        points = tracker.commit_points()
        tracker.committed(points)
        for partition, position in points.items():
            assert set(range(position)) <= finished[partition]
            assert position == 200 or position not in finished[partition]
    assert tracker.in_flight() == 0
    assert [tracker.position(partition) for partition in range(3)] == [200, 200, 200]
