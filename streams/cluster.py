"""What the cluster says about topics, partition ends and consumer groups, read in ways that stay right on the
local broker (DESIGN.md: its ListOffsets "latest" and by-timestamp answers are wrong; the fetch high watermark
is right). The ops tools (replay, offsets, lag, tail) read partitions only through this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import for_code
from kafka.protocol.admin import DescribeGroupsRequest

from schemas.errors import VlmflowError
from schemas.settings import Settings


@dataclass(frozen=True)
class OffsetRange:
    """Offsets `[start, end)` of one partition."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


POLL_MS = 100
"""One poll's wait: short, so progress and the stall check stay responsive."""


class UnknownTopic(VlmflowError):
    """A topic the cluster does not have."""


class PartitionStalled(VlmflowError):
    """A partition whose reads stopped moving before reaching the wanted offset."""


def open_consumer(settings: Settings) -> KafkaConsumer:
    """A consumer outside any group: it assigns partitions itself and never commits."""
    return KafkaConsumer(
        **settings.kafka.client_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=POLL_MS,
        request_timeout_ms=settings.kafka.request_timeout_ms,
    )


def topic_metadata(admin: KafkaAdminClient, topic: str) -> dict[str, Any]:
    """The cluster's description of `topic` (partitions with leader, replicas, ISR), or `UnknownTopic` naming the
    topics that exist. Asked through the admin API, which never creates a topic as a side effect."""
    (described,) = admin.describe_topics([topic])
    if described["error_code"] != 0 or not described["partitions"]:
        existing = ", ".join(sorted(name for name in admin.list_topics() if not name.startswith("__")))
        raise UnknownTopic(f"topic {topic!r} does not exist (topics: {existing or 'none'})")
    return described


def topic_partitions(admin: KafkaAdminClient, topic: str) -> list[int]:
    return sorted(partition["partition_index"] for partition in topic_metadata(admin, topic)["partitions"])


def high_watermarks(
    consumer: KafkaConsumer, partitions: list[TopicPartition], *, timeout_s: float
) -> dict[TopicPartition, int]:
    """The end of each partition (the offset the next record will get), from the high watermark of a fetch.

    NOTE: `seek_to_end` asks ListOffsets "latest", which the local broker answers with a lower bound; it is only
    where the fetch starts (so it returns little), never the answer. This reassigns the consumer.
    """
    _assign(consumer, partitions)
    consumer.seek_to_end(*partitions)
    ends: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(ends) < len(partitions):
        if time.monotonic() > deadline:
            missing = sorted(str(tp.partition) for tp in partitions if tp not in ends)
            raise PartitionStalled(f"no fetch answer within {timeout_s:.0f} s for partitions {', '.join(missing)}")
        consumer.poll(timeout_ms=POLL_MS)
        for tp in partitions:
            highwater = consumer.highwater(tp)
            if tp not in ends and highwater is not None:
                ends[tp] = highwater
                consumer.pause(tp)
    return ends


def _assign(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
    # NOTE: `assign` keeps the state (paused, high watermark) of partitions the consumer already had; start clean.
    consumer.unsubscribe()
    consumer.assign(partitions)


class RangeReader:
    """The records of `[start, end)` of each partition, per partition in offset order.

    A partition is finished when the consumer's position reaches its end (positions also move past offsets
    that hold no record, as after compaction). `stop` finishes a partition early.
    """

    def __init__(self, consumer: KafkaConsumer, ranges: dict[TopicPartition, OffsetRange], *, stall_timeout_s: float):
        self.consumer = consumer
        self.stall_timeout_s = stall_timeout_s
        self._pending = {tp: offsets for tp, offsets in ranges.items() if offsets.size > 0}
        """tp -> the range still to read; a partition leaves when finished."""

    @property
    def pending(self) -> list[TopicPartition]:
        return list(self._pending)

    def stop(self, tp: TopicPartition) -> None:
        if self._pending.pop(tp, None) is not None:
            self.consumer.pause(tp)

    def __iter__(self) -> Iterator[ConsumerRecord]:
        if not self._pending:
            return
        _assign(self.consumer, list(self._pending))
        for tp, offsets in self._pending.items():
            self.consumer.seek(tp, offsets.start)
        last_moved, last_positions = time.monotonic(), self._positions()
        while self._pending:
            for tp, records in self.consumer.poll(timeout_ms=POLL_MS).items():
                for record in records:
                    if tp not in self._pending or record.offset >= self._pending[tp].end:
                        break
                    yield record
            for tp in self.pending:
                if self.consumer.position(tp) >= self._pending[tp].end:
                    self.stop(tp)
            positions = self._positions()
            if positions != last_positions:
                last_moved, last_positions = time.monotonic(), positions
            elif time.monotonic() - last_moved > self.stall_timeout_s:
                where = ", ".join(
                    f"{tp.topic}[{tp.partition}] at {positions[tp]} of {r.end}" for tp, r in self._pending.items()
                )
                raise PartitionStalled(f"reads stopped moving for {self.stall_timeout_s:.0f} s: {where}")

    def _positions(self) -> dict[TopicPartition, int]:
        return {tp: self.consumer.position(tp) for tp in self._pending}


@dataclass(frozen=True)
class GroupState:
    group_id: str
    state: str
    """The coordinator's word: Empty, Stable, PreparingRebalance, CompletingRebalance, Dead."""
    members: int

    @property
    def active(self) -> bool:
        return self.members > 0


def describe_group(admin: KafkaAdminClient, group_id: str) -> GroupState:
    """The group's state and member count, as its coordinator reports them.

    NOTE: `KafkaAdminClient.describe_groups` (kafka-python 3.0.12) turns every authorized-operation bit into an
    `ACLOperation` and fails on bits it does not know; the local broker sets all 32. So the request goes out
    here, through the admin client's own connection manager.
    """

    async def describe() -> object:
        coordinator = await admin._find_coordinator_id(group_id)
        request = DescribeGroupsRequest(groups=[group_id], include_authorized_operations=False)
        return await admin._manager.send(request, node_id=coordinator)

    (group,) = admin._manager.run(describe).groups
    if group.error_code != 0:
        raise VlmflowError(f"describing group {group_id!r} failed: {for_code(group.error_code).__name__}")
    return GroupState(group_id, group.group_state or "Unknown", len(group.members))
