"""Known records for the ops tools' tests: topics of their own, records with known timestamps, and a plain
reader of a whole topic (kafka-python only, so the tests do not check the tools with the tools' own code)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord

from schemas.settings import Settings

BASE_MS = 1_700_000_000_000
"""2023-11-14T22:13:20Z: record i has a timestamp near BASE_MS + 10 ms · i."""
JITTER_MS = 2_000
"""Timestamps are shuffled by up to this much, so they are not in offset order within a partition."""
TENANTS = ("acme", "globex", "initech")


@dataclass(frozen=True)
class Sent:
    index: int
    partition: int
    offset: int
    timestamp: int
    key: bytes
    value: bytes
    document: dict[str, object]


def create_topics(settings: Settings, partitions: dict[str, int]) -> None:
    admin = KafkaAdminClient(**settings.kafka.client_options())
    try:
        admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
    finally:
        admin.close()


def produce_known(settings: Settings, topic: str, count: int = 10_000, partitions: int = 4) -> list[Sent]:
    """`count` records over `partitions` partitions, in batches of many records (where the local broker's
    ListOffsets answers go wrong), each with a header and a known, jittered timestamp."""
    rng = random.Random(6)
    producer = KafkaProducer(**settings.kafka.client_options(), linger_ms=20, batch_size=64 * 1024)
    futures = []
    for index in range(count):
        document = {"i": index, "status": "error" if index % 7 == 0 else "ok", "tenant": TENANTS[index % 3]}
        timestamp = BASE_MS + 10 * index + rng.randint(-JITTER_MS, JITTER_MS)
        key, value = f"k{index}".encode(), json.dumps(document).encode()
        future = producer.send(
            topic,
            key=key,
            value=value,
            partition=index % partitions,
            timestamp_ms=timestamp,
            headers=[("origin-h", f"v{index}".encode())],
        )
        futures.append((index, timestamp, key, value, document, future))
    producer.flush()
    producer.close()
    sent = []
    for index, timestamp, key, value, document, future in futures:
        metadata = future.get(timeout=10)
        sent.append(Sent(index, metadata.partition, metadata.offset, timestamp, key, value, document))
    return sent


def read_topic(settings: Settings, topic: str, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of `topic`, per partition in offset order, read up to each partition's high watermark."""
    consumer = KafkaConsumer(**settings.kafka.client_options(), group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while True:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            ends = {tp: consumer.highwater(tp) for tp in partitions}
            if all(end is not None and consumer.position(tp) >= end for tp, end in ends.items()):
                return sorted(records, key=lambda record: (record.partition, record.offset))
            assert time.monotonic() < deadline, f"reading {topic} did not reach the high watermarks {ends}"
    finally:
        consumer.close()


def headers_of(record: ConsumerRecord) -> dict[str, bytes]:
    return dict(record.headers)


def origin_of(record: ConsumerRecord) -> tuple[int, int]:
    headers = headers_of(record)
    return int(headers["x-replay-origin-partition"]), int(headers["x-replay-origin-offset"])


def cli_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that point `vlmflow` (in this process or a child) at the test's broker and state."""
    return {
        "VLMFLOW_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "VLMFLOW_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "VLMFLOW_STATE_DIR": str(settings.state_dir),
    }
