"""A topic as the cluster holds it: partitions, leaders, replicas and offsets, next to what the registry says."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, TopicPartition

from schemas.settings import Settings
from schemas.topics import TOPICS
from streams.cluster import high_watermarks, open_consumer, topic_metadata


@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    leader: int
    replicas: list[int]
    in_sync: list[int]
    start: int
    """The log start offset."""
    end: int
    """The high watermark: the offset the next record will get."""

    @property
    def records(self) -> int:
        """Offsets held; after compaction some of them hold no record."""
        return self.end - self.start


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: list[PartitionInfo]


def describe_topic(settings: Settings, admin: KafkaAdminClient, topic: str) -> TopicDescription:
    described = topic_metadata(admin, topic)
    tps = [TopicPartition(topic, partition["partition_index"]) for partition in described["partitions"]]
    consumer = open_consumer(settings)
    try:
        ends = high_watermarks(consumer, tps, timeout_s=settings.kafka.request_timeout_ms / 1000)
        starts = consumer.beginning_offsets(tps)
    finally:
        consumer.close()
    infos = [
        PartitionInfo(
            partition=partition["partition_index"],
            leader=partition["leader_id"],
            replicas=list(partition["replica_nodes"]),
            in_sync=list(partition["isr_nodes"]),
            start=starts[TopicPartition(topic, partition["partition_index"])],
            end=ends[TopicPartition(topic, partition["partition_index"])],
        )
        for partition in described["partitions"]
    ]
    return TopicDescription(topic, sorted(infos, key=lambda info: info.partition))


def render_description(description: TopicDescription) -> list[str]:
    spec = TOPICS.get(description.name)
    if spec is None:
        registry = "not in the vlmflow registry"
    else:
        value = getattr(spec.value_type, "__name__", str(spec.value_type))
        registry = (
            f"registry: key={spec.key_field} value={value} partitions={spec.partitions} "
            f"cleanup={spec.cleanup_policy} ({spec.description})"
        )
    lines = [f"topic {description.name}: {len(description.partitions)} partitions; {registry}"]
    lines.append(
        f"{'PARTITION':>9}  {'LEADER':>6}  {'REPLICAS':<10}  {'ISR':<10}  {'START':>10}  {'END':>10}  {'RECORDS':>10}"
    )
    for info in description.partitions:
        lines.append(
            f"{info.partition:>9}  {info.leader:>6}  {','.join(map(str, info.replicas)):<10}  "
            f"{','.join(map(str, info.in_sync)):<10}  {info.start:>10}  {info.end:>10}  {info.records:>10}"
        )
    total = sum(info.records for info in description.partitions)
    lines.append(f"{'total':>9}  {'':>6}  {'':<10}  {'':<10}  {'':>10}  {'':>10}  {total:>10}")
    if spec is not None and spec.partitions != len(description.partitions):
        lines.append(
            f"note: the registry expects {spec.partitions} partitions, the cluster has {len(description.partitions)}"
        )
    return lines
