"""The golden set: corrected cases as versioned records on the compacted topic `vlm.golden`, with snapshots of
the latest version of every record in the dataset bucket (`golden/snapshots/<UTC time>.jsonl`).

    vlm.corrections.done ──decide (+ the record's state in Redis)──golden_record──▶ vlm.golden
    vlm.golden (read to its end) ──latest per record──▶ s3://<dataset bucket>/golden/snapshots/<time>.jsonl

A record is keyed by its case id (one case per log), so a case corrected again gets the next version under the
same key, and compaction keeps the newest. Versions only go forward:

- Redis remembers, per record, the latest version written, the stamp of the correction it came from (its
  `submitted_at`, then a digest of its answer) and whether the record was confirmed sent (`GoldenState`).
- `decide` writes a new version only for a correction newer than that stamp with a different answer. The latest
  correction delivered again is written again under the same version (an identical record) only when its first
  write was not confirmed; an older correction (a redelivery or a replay) writes nothing.
- When Redis has lost the state (no `built` marker: a flush, a restart without persistence), it is rebuilt from
  `vlm.golden` itself before the next decision, so corrections continue after the highest version written, never
  at 1. A loss of only the last writes (AOF `everysec`) can at worst write a version number again with the newer
  answer, which `latest_records` and compaction both resolve to that answer.

Failure policy: Redis errors are retried (the agent pauses); a Kafka or S3 error of the hourly snapshot is logged
by the caller and the next interval tries again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from kafka import TopicPartition
from redis.asyncio import Redis

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


@dataclass(frozen=True, order=True)
class Stamp:
    """Which correction a record version came from: its submission time (µs since the epoch), then its answer."""

    submitted_us: int
    answer_digest: str

    def text(self) -> str:
        return f"{self.submitted_us}:{self.answer_digest}"

    @classmethod
    def parse(cls, text: str) -> Stamp:
        submitted, _, digest = text.partition(":")
        return cls(int(submitted), digest)


def stamp_of(submitted_at: datetime, answer: dict[str, object]) -> Stamp:
    digest = hashlib.sha256(json.dumps(answer, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    return Stamp(round(submitted_at.timestamp() * 1_000_000), digest)


@dataclass(frozen=True)
class GoldenState:
    """What Redis remembers of one golden record."""

    version: int
    stamp: Stamp
    sent: bool
    """Whether the write of `version` was confirmed by the broker."""


GoldenStep = Literal["write", "rewrite", "redelivered", "older", "unchanged"]
"""`write`: a new version; `rewrite`: the latest version again (its first write was not confirmed); the others
write nothing: the latest correction again after its write was confirmed, an older correction than the latest,
a newer correction with the same answer."""


@dataclass(frozen=True)
class Decision:
    step: GoldenStep
    version: int
    """The version to write (`write`, `rewrite`); the latest version otherwise (0 when there is none)."""

    @property
    def writes(self) -> bool:
        return self.step in ("write", "rewrite")


def decide(state: GoldenState | None, stamp: Stamp) -> Decision:
    """What a correction with `stamp` does to a record whose remembered state is `state` (None: no record yet).

    Corrections submitted at the very same microsecond with different answers are taken in arrival order."""
    if state is None:
        return Decision("write", 1)
    latest = state.stamp
    if stamp == latest:
        return Decision("redelivered" if state.sent else "rewrite", state.version)
    if stamp.submitted_us < latest.submitted_us:
        return Decision("older", state.version)
    if stamp.answer_digest == latest.answer_digest:
        return Decision("unchanged", state.version)
    return Decision("write", state.version + 1)


def golden_record(correction: Correction, case: HardCase, version: int) -> GoldenRecord:
    """Version `version` of the case's golden record, from `correction`."""
    source = case.log
    return GoldenRecord(
        record_id=case.case_id,
        version=version,
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


class GoldenStore:
    """The golden records' states in Redis under `vlmflow:{golden:<app_id>}:` (one hash tag: Redis Cluster works).

    Keys: `records` (hash: record_id -> `version stamp sent`), `built` (set once the hash holds everything that
    `vlm.golden` held when it was rebuilt; its absence means the state was lost or never built)."""

    def __init__(self, redis: Redis, app_id: str):
        self.redis = redis
        self.records_key = f"vlmflow:{{golden:{app_id}}}:records"
        self.built_key = f"vlmflow:{{golden:{app_id}}}:built"
        self._merge = redis.register_script(_MERGE)

    async def state(self, record_id: str) -> GoldenState | None | Literal["unbuilt"]:
        """The record's state; `unbuilt` when the store must first be rebuilt from `vlm.golden`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.built_key)
            pipe.hget(self.records_key, record_id)
            built, raw = await pipe.execute()
        if not built:
            return "unbuilt"
        return _parse_state(raw) if raw is not None else None

    async def put(self, record_id: str, state: GoldenState) -> None:
        await self.redis.hset(self.records_key, record_id, _state_text(state))

    async def rebuild(self, records: list[GoldenRecord]) -> None:
        """Merge the latest version of every record (from `vlm.golden`) into the store, keeping a higher version
        already there, and mark the store built."""
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]
            args = [
                value
                for record in chunk
                for value in (
                    record.record_id,
                    record.version,
                    _state_text(GoldenState(record.version, stamp_of(record.created_at, record.answer), sent=True)),
                )
            ]
            await self._merge(keys=[self.records_key], args=args)
        await self.redis.set(self.built_key, "1")


# KEYS[1]: the records hash. ARGV: record_id, version, state text, ... Keeps the higher version of each record.
_MERGE = """
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if not current or tonumber(string.match(current, '^%d+')) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
return #ARGV / 3
"""


def _state_text(state: GoldenState) -> str:
    return f"{state.version} {state.stamp.text()} {int(state.sent)}"


def _parse_state(raw: bytes | str) -> GoldenState:
    version, stamp, sent = (raw.decode() if isinstance(raw, bytes) else raw).split(" ")
    return GoldenState(int(version), Stamp.parse(stamp), sent == "1")


def snapshot(settings: Settings) -> tuple[str, int]:
    """Read the golden set to its end and store a snapshot of it; returns its URI and the number of records."""
    records = read_golden(settings)
    return write_snapshot(settings, records, utc_now()), len(records)
