"""A replay resolved against the cluster's answers, without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streams.cluster import OffsetRange
from streams.ops.filter_expr import FilterError
from streams.ops.replay.plan import ReplayError, ReplayRequest, check_replay_id, new_replay_id, plan_replay
from streams.ops.window import WindowError

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PARTITIONS = [0, 1, 2, 3]
BEGIN = {p: 0 for p in PARTITIONS}
END = {0: 100, 1: 80, 2: 0, 3: 50}


def _plan(request: ReplayRequest, *, floors: dict[int, int] | None = None, destination_partitions: int = 4):
    return plan_replay(
        request,
        replay_id="r1",
        now=NOW,
        source_partitions=PARTITIONS,
        beginnings=BEGIN,
        ends=END,
        time_floors=floors or {},
        destination_partitions=destination_partitions,
    )


def test_a_time_window_scans_every_partition_to_its_end_from_the_time_floor() -> None:
    plan = _plan(ReplayRequest(source="a", destination="b", from_time="now-1h", to_time="now"), floors={0: 40, 3: 60})
    assert plan.from_ms == int(NOW.timestamp() * 1000) - 3_600_000
    assert plan.to_ms == int(NOW.timestamp() * 1000)
    assert plan.ranges == {0: OffsetRange(40, 100), 1: OffsetRange(0, 80), 2: OffsetRange(0, 0), 3: OffsetRange(50, 50)}
    assert plan.total == 60 + 80
    assert plan.keep_partitions


def test_offsets_alone_pick_the_partitions_they_name() -> None:
    plan = _plan(ReplayRequest(source="a", destination="b", from_offsets="1:10,3:5", to_offsets="1:20"))
    assert plan.ranges == {1: OffsetRange(10, 20), 3: OffsetRange(5, 50)}
    assert plan.window.contains(0)


def test_partitions_option_and_fewer_destination_partitions() -> None:
    plan = _plan(ReplayRequest(source="a", destination="b", partitions=[0, 3], from_time="0"), destination_partitions=2)
    assert set(plan.ranges) == {0, 3}
    assert not plan.keep_partitions


@pytest.mark.parametrize(
    ("request_fields", "error", "message"),
    [
        ({}, WindowError, "needs a start"),
        ({"from_time": "now", "to_time": "now-1h"}, WindowError, "is not after"),
        ({"from_time": "yesterday"}, WindowError, "cannot read time"),
        ({"from_time": "now-1h", "filter": "status="}, FilterError, "cannot parse filter"),
        ({"from_offsets": "9:0"}, ReplayError, "--from-offset names [9]"),
        ({"from_time": "0", "partitions": [4]}, ReplayError, "--partitions names [4]"),
        ({"from_offsets": "0:50", "to_offsets": "0:10"}, WindowError, "before --from-offset"),
    ],
)
def test_bad_requests(request_fields: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        _plan(ReplayRequest(source="a", destination="b", **request_fields))
    assert message in str(caught.value)


def test_replay_ids_are_file_names() -> None:
    assert check_replay_id(new_replay_id(NOW)).startswith("20240501T120000-")
    with pytest.raises(ReplayError):
        check_replay_id("../../etc/passwd")
