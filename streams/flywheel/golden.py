"""The golden set: corrected cases as versioned records on the compacted topic `vlm.golden`, with snapshots of
the latest version of every record in the dataset bucket (`golden/snapshots/<UTC time>.jsonl`).

    vlm.corrections.done ──golden_record (+ the record's previous version, a Faust table)──▶ vlm.golden
    vlm.golden (read to its end) ──latest per record──▶ s3://<dataset bucket>/golden/snapshots/<time>.jsonl

A record is keyed by its case id (one case per log), so a case corrected again gets the next version under the
same key, and compaction keeps the newest. A correction delivered twice adds no version.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from datetime import datetime

from kafka import TopicPartition

from schemas.base import utc_now
from schemas.cases import Correction, GoldenRecord, HardCase
from schemas.codec import decode
from schemas.connections import object_store
from schemas.errors import InvalidMessage, VlmflowError
from schemas.settings import Settings
from schemas.topics import Topic, topic
from streams.cluster import OffsetRange, RangeReader, high_watermarks, open_consumer

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "golden/snapshots/"
READ_TIMEOUT_S = 30.0


class GoldenError(VlmflowError):
    """The golden set cannot be built or read (a correction without its case, a bad snapshot line)."""


def golden_record(correction: Correction, case: HardCase, previous: GoldenRecord | None) -> GoldenRecord | None:
    """The next version of the case's golden record; None when `previous` already holds this very answer (the same
    correction delivered again, or a re-review that changed nothing)."""
    if previous is not None and previous.answer == correction.output:
        return None
    source = case.log
    return GoldenRecord(
        record_id=case.case_id,
        version=previous.version + 1 if previous is not None else 1,
        task=correction.task or source.task,
        tenant=source.tenant,
        prompt=source.prompt,
        images=source.images,
        answer=correction.output,
        source_log_id=source.log_id,
        source_case_id=case.case_id,
        created_at=correction.submitted_at,
    )


def latest_records(records: Iterable[GoldenRecord | tuple[str, None]]) -> list[GoldenRecord]:
    """The newest version of each record, sorted by record id; `(record_id, None)` (a tombstone) deletes one."""
    latest: dict[str, GoldenRecord] = {}
    for record in records:
        if isinstance(record, tuple):
            latest.pop(record[0], None)
        elif record.record_id not in latest or record.version >= latest[record.record_id].version:
            latest[record.record_id] = record
    return [latest[record_id] for record_id in sorted(latest)]


def snapshot_lines(records: list[GoldenRecord]) -> bytes:
    """JSONL, one record a line with sorted keys, so equal sets give equal bytes."""
    return b"".join(json.dumps(record.model_dump(mode="json"), sort_keys=True).encode() + b"\n" for record in records)


def parse_snapshot(data: bytes, source: str) -> list[GoldenRecord]:
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            try:
                records.append(GoldenRecord.model_validate_json(line))
            except ValueError as exc:
                raise GoldenError(f"{source} line {number}: not a golden record ({str(exc).splitlines()[0]})") from None
    return records


def snapshot_key(at: datetime) -> str:
    return f"{SNAPSHOT_PREFIX}{at.strftime('%Y%m%dT%H%M%S.%fZ')}.jsonl"


def read_golden(settings: Settings) -> list[GoldenRecord]:
    """The latest version of every golden record, read from `vlm.golden` up to its current end."""
    consumer = open_consumer(settings)
    try:
        partitions = [TopicPartition(Topic.GOLDEN, partition) for partition in range(topic(Topic.GOLDEN).partitions)]
        ends = high_watermarks(consumer, partitions, timeout_s=READ_TIMEOUT_S)
        ranges = {tp: OffsetRange(0, end) for tp, end in ends.items()}
        found: list[GoldenRecord | tuple[str, None]] = []
        for message in RangeReader(consumer, ranges, stall_timeout_s=READ_TIMEOUT_S):
            if message.value is None:
                found.append((message.key.decode(), None))
                continue
            try:
                found.append(decode(Topic.GOLDEN, message.value))
            except InvalidMessage as exc:
                log.error("skipped %s[%d]@%d: %s", Topic.GOLDEN, message.partition, message.offset, exc)
        return latest_records(found)
    finally:
        consumer.close()


def write_snapshot(settings: Settings, records: list[GoldenRecord], at: datetime) -> str:
    """Store `records` as `golden/snapshots/<at>.jsonl` in the dataset bucket; returns its s3:// URI."""
    client = object_store(settings)
    bucket = settings.s3.dataset_bucket
    data = snapshot_lines(records)
    key = snapshot_key(at)
    client.put_object(bucket, key, io.BytesIO(data), len(data), content_type="application/x-ndjson")
    return f"s3://{bucket}/{key}"


def snapshot(settings: Settings) -> tuple[str, int]:
    """Read the golden set to its end and store a snapshot of it; returns its URI and the number of records."""
    records = read_golden(settings)
    return write_snapshot(settings, records, utc_now()), len(records)
