"""Consumer lag: per group and partition, how far the committed offset is behind the partition's end.

The end is the fetch high watermark (the local broker's ListOffsets "latest" answer is wrong, DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, TopicPartition

from schemas.errors import VlmflowError
from schemas.settings import Settings
from streams.cluster import GroupState, describe_group, high_watermarks, open_consumer


class UnknownGroup(VlmflowError):
    """A consumer group the cluster knows nothing about (no members, no committed offsets)."""


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


@dataclass(frozen=True)
class GroupLag:
    group: GroupState
    partitions: list[PartitionLag]

    @property
    def total(self) -> int:
        return sum(partition.lag for partition in self.partitions)


def group_lags(settings: Settings, admin: KafkaAdminClient, group_ids: list[str] | None = None) -> list[GroupLag]:
    """Lag of the named groups, or of every group the cluster lists."""
    names = group_ids if group_ids is not None else sorted(group["group_id"] for group in admin.list_groups())
    committed: dict[str, dict[TopicPartition, int]] = {}
    for name in names:
        offsets = admin.list_group_offsets(name).get(name, {})
        committed[name] = {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    states = {name: describe_group(admin, name) for name in names}
    for name in group_ids or []:
        if not committed[name] and not states[name].active:
            raise UnknownGroup(f"group {name!r} has no members and no committed offsets")
    partitions = sorted({tp for offsets in committed.values() for tp in offsets})
    consumer = open_consumer(settings)
    try:
        ends = (
            high_watermarks(consumer, partitions, timeout_s=settings.kafka.request_timeout_ms / 1000)
            if partitions
            else {}
        )
    finally:
        consumer.close()
    return [
        GroupLag(
            states[name],
            [PartitionLag(tp.topic, tp.partition, offset, ends[tp]) for tp, offset in sorted(committed[name].items())],
        )
        for name in names
    ]


def render_lag(groups: list[GroupLag]) -> list[str]:
    if not groups:
        return ["no consumer groups"]
    lines = [f"{'GROUP':<28} {'TOPIC':<24} {'PARTITION':>9} {'COMMITTED':>10} {'END':>10} {'LAG':>8}"]
    for group in groups:
        for row in group.partitions:
            lines.append(
                f"{group.group.group_id:<28} {row.topic:<24} {row.partition:>9} {row.committed:>10} "
                f"{row.end:>10} {row.lag:>8}"
            )
        lines.append(
            f"{group.group.group_id:<28} total lag {group.total} over {len(group.partitions)} partitions; "
            f"state {group.group.state}, {group.group.members} members"
        )
    return lines
