"""The newest records of a topic, and new ones as they come, printed for a person.

A record of a registry topic is decoded with its schema (`schemas.codec.decode`) and shown as its model with the
fields that differ from their defaults; one that does not decode is shown as INVALID with the reason. Long strings
(inline images, prompts) are cut to keep one record on one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from schemas.codec import decode
from schemas.errors import InvalidMessage
from schemas.settings import Settings
from schemas.topics import TOPICS
from streams.cluster import POLL_MS, OffsetRange, RangeReader, high_watermarks, open_consumer, topic_partitions
from streams.ops.window import format_time

MAX_STRING = 80
"""Characters of a string value shown before it is cut."""
MAX_RAW = 200
"""Characters shown of a value that is neither the topic's schema nor JSON."""


def format_record(record: ConsumerRecord) -> str:
    """One line: time, topic[partition]@offset, key, headers, then the value as its schema reads it."""
    parts = [format_time(record.timestamp), f"{record.topic}[{record.partition}]@{record.offset}"]
    parts.append(f"key={_text(record.key) if record.key is not None else '-'}")
    if record.headers:
        parts.append("headers={" + ",".join(f"{key}={_text(value)}" for key, value in record.headers) + "}")
    parts.append(format_value(record.topic, record.value))
    return " ".join(parts)


def format_value(topic: str, raw: bytes | None) -> str:
    if raw is None:
        return "(tombstone)"
    if topic in TOPICS:
        try:
            model = decode(topic, raw)
        except InvalidMessage as exc:
            return f"INVALID ({exc.reason}{f' at {exc.field}' if exc.field else ''}) {_preview(raw)}"
        data = model.model_dump(mode="json", exclude_defaults=True)
        return f"{type(model).__name__} {_compact(data)}"
    return _preview(raw)


def _preview(raw: bytes) -> str:
    try:
        return _compact(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError):
        text = _text(raw)
        return text if len(text) <= MAX_RAW else f"{text[:MAX_RAW]}…(+{len(text) - MAX_RAW:,} chars)"


def _compact(value: Any) -> str:
    return json.dumps(_shortened(value), separators=(",", ":"), ensure_ascii=False)


def _shortened(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_STRING:
        return f"{value[:MAX_STRING]}…(+{len(value) - MAX_STRING:,} chars)"
    if isinstance(value, dict):
        return {key: _shortened(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shortened(item) for item in value]
    return value


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return repr(raw)


def last_records(
    settings: Settings, admin: KafkaAdminClient, topic: str, count: int
) -> tuple[list[ConsumerRecord], dict[TopicPartition, int]]:
    """The `count` newest records of `topic` by timestamp, oldest first, and each partition's end."""
    partitions = [TopicPartition(topic, partition) for partition in topic_partitions(admin, topic)]
    timeout_s = settings.kafka.request_timeout_ms / 1000
    consumer = open_consumer(settings)
    try:
        ends = high_watermarks(consumer, partitions, timeout_s=timeout_s)
        beginnings = consumer.beginning_offsets(partitions)
        ranges = {tp: OffsetRange(max(beginnings[tp], ends[tp] - count), ends[tp]) for tp in partitions}
        records = list(RangeReader(consumer, ranges, stall_timeout_s=2 * timeout_s))
    finally:
        consumer.close()
    records.sort(key=lambda record: (record.timestamp, record.partition, record.offset))
    return records[max(0, len(records) - count) :], ends


def follow(settings: Settings, starts: dict[TopicPartition, int]) -> Iterator[ConsumerRecord]:
    """Records from `starts` on, as they arrive, per partition in order; runs until the caller stops."""
    consumer: KafkaConsumer = open_consumer(settings)
    try:
        consumer.assign(list(starts))
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        while True:
            for records in consumer.poll(timeout_ms=POLL_MS).values():
                yield from records
    finally:
        consumer.close()
