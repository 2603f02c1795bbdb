"""The records the raw-log stage writes: where each goes (Kafka's own key partitioning) and the header that names
the raw record it came from. Pure: no I/O.

Every output carries `x-vlmflow-source: <topic>:<partition>:<offset>` of its raw record, so that after a crash
the stage can find which outputs of an unfinished batch reached the broker (`streams.flywheel.ledger`).
Partitions are chosen as Kafka's default partitioner does (murmur2 of the key, positive, modulo the partition
count), so a Java or librdkafka producer writing the same key picks the same partition.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

SOURCE_HEADER = "x-vlmflow-source"
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Source:
    """Where a record was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int

    def header(self) -> bytes:
        return f"{self.topic}:{self.partition}:{self.offset}".encode()

    @classmethod
    def from_header(cls, value: bytes) -> Source | None:
        """The source named by a header value; None when it is not `topic:partition:offset`."""
        topic, _, rest = value.decode("utf-8", "replace").rpartition(":")
        topic, _, partition = topic.rpartition(":")
        if not topic or not partition.isdigit() or not rest.isdigit():
            return None
        return cls(topic, int(partition), int(rest))


class Output(NamedTuple):
    """One record to write: topic, key, value, and the source header naming the raw record it came from. A tuple:
    one or two are built for every raw record, and a frozen dataclass cost several times as much."""

    topic: str
    key: bytes
    key_hash: int
    """`murmur2(key)`, computed where the record was screened (`partition_of` needs only this)."""
    value: bytes
    source: bytes
    """`Source.header()` of the raw record."""


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (seed 0x9747b28c), as `org.apache.kafka.common.utils.Utils.murmur2`; four bytes a step."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length // 4
    for k in struct.unpack_from(f"<{whole}I", data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail, at = length & 3, whole * 4
    if tail == 3:
        h ^= data[at + 2] << 16
    if tail >= 2:
        h ^= data[at + 1] << 8
    if tail >= 1:
        h ^= data[at]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record."""
    return partition_of(murmur2(key), partitions)


def partition_of(key_hash: int, partitions: int) -> int:
    """`partition_for` of a key whose `murmur2` is `key_hash`."""
    return (key_hash & 0x7FFFFFFF) % partitions
