"""Moving a consumer group's committed offsets on one topic, the way `kafka-consumer-groups --reset-offsets` does:
a plan first (current and new offset per partition), applied only when asked and only while the group has no
active members.

New offsets are clamped to what each partition holds. `--to-datetime` gives, per partition, the first offset
whose record timestamp is at or after the time, found by reading timestamps (the local broker's by-time lookup
answers 0; its answer is used only as a place to start reading); no such record means the end. `--to-latest` is
the fetch high watermark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import NoError
from kafka.structs import OffsetAndMetadata

from schemas.errors import VlmflowError
from schemas.settings import Settings
from streams.cluster import OffsetRange, RangeReader, describe_group, high_watermarks, open_consumer, topic_partitions
from streams.ops.window import format_time

TargetKind = Literal["earliest", "latest", "datetime", "shift"]


class ResetError(VlmflowError):
    """A reset that cannot be planned or applied as asked."""


class GroupActive(ResetError):
    """The group has members; moving offsets under them would be overwritten by their next commit."""


@dataclass(frozen=True)
class ResetTarget:
    kind: TargetKind
    value: int = 0
    """Epoch milliseconds for `datetime`, the number of offsets for `shift`."""

    def describe(self) -> str:
        if self.kind == "datetime":
            return f"first record at or after {format_time(self.value)}"
        if self.kind == "shift":
            return f"shift by {self.value:+d}"
        return self.kind


@dataclass(frozen=True)
class PlannedOffset:
    partition: int
    current: int | None
    """The committed offset; None when the group has none for this partition."""
    new: int


@dataclass(frozen=True)
class ResetPlan:
    group: str
    topic: str
    target: ResetTarget
    rows: list[PlannedOffset]


def plan_offsets(
    target: ResetTarget,
    *,
    current: dict[int, int],
    beginnings: dict[int, int],
    ends: dict[int, int],
    at_time: dict[int, int],
) -> list[PlannedOffset]:
    """New offset per partition, clamped to `[beginning, end]`. `at_time` is needed for `datetime` only."""
    rows = []
    for partition in sorted(ends):
        committed = current.get(partition)
        if target.kind == "earliest":
            wanted = beginnings[partition]
        elif target.kind == "latest":
            wanted = ends[partition]
        elif target.kind == "datetime":
            wanted = at_time[partition]
        elif committed is None:
            raise ResetError(
                f"--shift-by needs a committed offset, and partition {partition} has none; "
                "use --to-earliest, --to-latest or --to-datetime"
            )
        else:
            wanted = committed + target.value
        rows.append(PlannedOffset(partition, committed, min(max(wanted, beginnings[partition]), ends[partition])))
    return rows


def plan_reset(settings: Settings, admin: KafkaAdminClient, group: str, topic: str, target: ResetTarget) -> ResetPlan:
    tps = [TopicPartition(topic, partition) for partition in topic_partitions(admin, topic)]
    committed = admin.list_group_offsets({group: tps}).get(group, {})
    current = {tp.partition: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
    timeout_s = settings.kafka.request_timeout_ms / 1000
    consumer = open_consumer(settings)
    try:
        ends = high_watermarks(consumer, tps, timeout_s=timeout_s)
        beginnings = consumer.beginning_offsets(tps)
        at_time = (
            first_offsets_at(consumer, target.value, beginnings, ends, timeout_s) if target.kind == "datetime" else {}
        )
    finally:
        consumer.close()
    rows = plan_offsets(
        target,
        current=current,
        beginnings={tp.partition: offset for tp, offset in beginnings.items()},
        ends={tp.partition: offset for tp, offset in ends.items()},
        at_time={tp.partition: offset for tp, offset in at_time.items()},
    )
    return ResetPlan(group, topic, target, rows)


def first_offsets_at(
    consumer: KafkaConsumer,
    timestamp_ms: int,
    beginnings: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    timeout_s: float,
) -> dict[TopicPartition, int]:
    """Per partition, the first offset whose record timestamp is at or after `timestamp_ms`, else the end."""
    hints = consumer.offsets_for_times({tp: timestamp_ms for tp in ends})
    ranges = {}
    for tp, end in ends.items():
        hint = hints.get(tp)
        ranges[tp] = OffsetRange(min(max(beginnings[tp], hint.offset if hint is not None else 0), end), end)
    found = dict(ends)
    reader = RangeReader(consumer, ranges, stall_timeout_s=2 * timeout_s)
    for record in reader:
        tp = TopicPartition(record.topic, record.partition)
        if record.timestamp >= timestamp_ms:
            found[tp] = record.offset
            reader.stop(tp)
    return found


def apply_reset(admin: KafkaAdminClient, plan: ResetPlan) -> None:
    """Commit the plan's offsets for the group; refused while the group has members."""
    state = describe_group(admin, plan.group)
    if state.active:
        raise GroupActive(
            f"group {plan.group!r} has {state.members} active member(s) (state {state.state}); "
            "stop its consumers, then run the reset again"
        )
    offsets = {TopicPartition(plan.topic, row.partition): OffsetAndMetadata(row.new, "", None) for row in plan.rows}
    failed = {tp: error for tp, error in admin.alter_group_offsets(plan.group, offsets).items() if error is not NoError}
    if failed:
        tp, error = sorted(failed.items())[0]
        raise ResetError(
            f"committing offsets for group {plan.group!r} failed on {tp.topic}[{tp.partition}]: {error.__name__}"
        )


def render_plan(plan: ResetPlan) -> list[str]:
    lines = [f"group {plan.group} on {plan.topic}: {plan.target.describe()}"]
    lines.append(f"{'PARTITION':>9} {'CURRENT':>10} {'NEW':>10} {'CHANGE':>8}")
    for row in plan.rows:
        current = "-" if row.current is None else str(row.current)
        change = "" if row.current is None else f"{row.new - row.current:+d}"
        lines.append(f"{row.partition:>9} {current:>10} {row.new:>10} {change:>8}")
    return lines
