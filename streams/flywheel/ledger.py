"""Exactly-once effects on at-least-once delivery: which raw records already have their outputs on the broker.

Kafka redelivers the records after the last committed offset when a member dies or a partition moves, and the
local broker has no transactions (docs/flywheel.md). So the raw-log stage keeps, per input partition, a ledger
entry in Redis and writes each record's outputs at most once:

- `done`: every record at or below this offset has all its outputs confirmed by the broker;
- `pending`: the offsets of the batch being written (its outputs may be partly on the broker), with `scan_from`,
  for each output partition, an offset at or below where that batch's outputs can start;
- `version`: bumped on every write, which is a compare-and-set on it (`owner` names the member, for people).

A batch, in the stage's order:

    1. read the entries (`read`); `Plan`: records at or below `done` are skipped; when an earlier batch was left
       unfinished (`pending` beyond `done`), its outputs are looked up on the output partitions from `scan_from`
       by their source header (`find_written`), and the records found are skipped too
    2. (the stage screens, dedupes, mines and queues what is left)
    3. `begin`: pending := the batch's offsets, scan_from := the known ends of the output partitions
    4. (the stage produces and waits for every acknowledgement)
    5. `finish`: done := the batch's last offset, pending cleared

A member killed between 3 and 5 leaves `pending`; the next owner writes only what did not reach the broker. A
compare-and-set that fails means another member wrote the entry since step 1 (the partition moved): the batch is
dropped unwritten, that member handles its records. Failure policy: Redis errors are retried by the caller; a
scan whose partitions stop answering raises `ScanStalled` and the batch is taken again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis

from schemas.errors import VlmflowError
from streams.flywheel.outputs import SOURCE_HEADER, Source

SCAN_POLL_MS = 200

# KEYS[1]: the ledger hash. ARGV: field, expected version, new entry JSON, ... (3 per entry).
# Returns one 1 (written) or 0 (the stored version was not the expected one) per entry. 1 + 2 commands per entry.
_COMPARE_AND_SET = """
local out = {}
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local version = 0
  if current then version = cjson.decode(current).version end
  if version == tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


class ScanStalled(VlmflowError):
    """An output partition stopped answering while the stage looked for what an unfinished batch wrote."""


@dataclass(frozen=True)
class LedgerEntry:
    """The ledger of one input partition (see the module docstring)."""

    done: int = -1
    pending: tuple[int, int] | None = None
    scan_from: dict[str, int] = field(default_factory=dict)
    """`topic:partition` of an output partition -> an offset at or below the pending batch's first output there."""
    owner: str = ""
    version: int = 0

    def unfinished(self) -> tuple[int, int] | None:
        """The offsets of a batch whose outputs may be partly written; None when there is none."""
        if self.pending is None or self.pending[1] <= self.done:
            return None
        return max(self.pending[0], self.done + 1), self.pending[1]

    def to_json(self) -> str:
        return json.dumps(
            {
                "done": self.done,
                "pending": list(self.pending) if self.pending else None,
                "scan_from": self.scan_from,
                "owner": self.owner,
                "version": self.version,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> LedgerEntry:
        data = json.loads(raw)
        pending = data.get("pending")
        return cls(
            done=int(data["done"]),
            pending=(int(pending[0]), int(pending[1])) if pending else None,
            scan_from={str(key): int(value) for key, value in data.get("scan_from", {}).items()},
            owner=str(data.get("owner", "")),
            version=int(data["version"]),
        )


@dataclass(frozen=True)
class Plan:
    """What step 1 decided for one input partition's records."""

    skip_through: int
    """Records at or below this offset were written before."""
    look_up: tuple[int, int] | None
    """Offsets whose outputs must be looked up on the broker first (an unfinished batch); None when none."""


def plan(entry: LedgerEntry) -> Plan:
    return Plan(skip_through=entry.done, look_up=entry.unfinished())


def output_partition_text(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


class Ledger:
    """The ledger entries of one consumer group's input partitions, in one Redis hash (one hash tag)."""

    def __init__(self, redis: Redis, *, app_id: str, owner: str):
        self.redis = redis
        self.key = f"vlmflow:{{streams:{app_id}}}:ledger"
        self.owner = owner
        self._compare_and_set = redis.register_script(_COMPARE_AND_SET)

    @staticmethod
    def field_of(tp: TopicPartition) -> str:
        return f"{tp.topic}:{tp.partition}"

    async def read(self, tps: list[TopicPartition]) -> dict[TopicPartition, LedgerEntry]:
        stored = await self.redis.hmget(self.key, [self.field_of(tp) for tp in tps])
        return {tp: LedgerEntry.from_json(raw) if raw else LedgerEntry() for tp, raw in zip(tps, stored, strict=True)}

    async def write(self, updates: Mapping[TopicPartition, tuple[LedgerEntry, LedgerEntry]]) -> set[TopicPartition]:
        """Replace each `(expected, new)` entry where the stored version is still `expected.version`; the
        partitions written (the others moved to another member)."""
        if not updates:
            return set()
        order = list(updates)
        args: list[str | int] = []
        for tp in order:
            expected, new = updates[tp]
            args += [self.field_of(tp), expected.version, new.to_json()]
        replies = await self._compare_and_set(keys=[self.key], args=args)
        return {tp for tp, reply in zip(order, replies, strict=True) if int(reply) == 1}

    def begun(self, entry: LedgerEntry, offsets: tuple[int, int], ends: Mapping[str, int]) -> LedgerEntry:
        """Step 3: the entry while the batch `offsets` is being written (`ends`: known ends of the outputs)."""
        return replace(entry, pending=offsets, scan_from=dict(ends), owner=self.owner, version=entry.version + 1)

    def finished(self, begun: LedgerEntry) -> LedgerEntry:
        """Step 5: every output of the pending batch is confirmed."""
        assert begun.pending is not None, "finish follows begin"
        done = max(begun.done, begun.pending[1])
        return replace(begun, done=done, pending=None, scan_from={}, version=begun.version + 1)


async def find_written(
    consumer: AIOKafkaConsumer,
    starts: Mapping[TopicPartition, int],
    source_topic: str,
    source_partition: int,
    offsets: tuple[int, int],
    *,
    stall_timeout_s: float,
) -> set[int]:
    """The offsets in `offsets` (inclusive) of `source_topic[source_partition]` whose outputs are on the output
    partitions, read from `starts` to each partition's high watermark (from fetch responses: the local broker's
    ListOffsets answer is only a lower bound). `consumer` is outside any group; it is reassigned."""
    consumer.assign(list(starts))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    found: set[int] = set()
    remaining = set(starts)
    last_moved, positions = time.monotonic(), dict[TopicPartition, int]()
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=SCAN_POLL_MS)
        for records in batches.values():
            for record in records:
                source = _source_of(record.headers)
                if (
                    source is not None
                    and source.topic == source_topic
                    and source.partition == source_partition
                    and offsets[0] <= source.offset <= offsets[1]
                ):
                    found.add(source.offset)
        now_positions = {tp: await consumer.position(tp) for tp in remaining}
        for tp in list(remaining):
            highwater = consumer.highwater(tp)
            if highwater is not None and now_positions[tp] >= highwater:
                remaining.discard(tp)
        if now_positions != positions:
            last_moved, positions = time.monotonic(), now_positions
        elif time.monotonic() - last_moved > stall_timeout_s:
            where = ", ".join(sorted(output_partition_text(tp) for tp in remaining))
            raise ScanStalled(f"no progress for {stall_timeout_s:.0f} s reading {where}")
    return found


def _source_of(headers: object) -> Source | None:
    for name, value in headers or ():  # type: ignore[attr-defined]
        if name == SOURCE_HEADER and isinstance(value, bytes):
            return Source.from_header(value)
    return None
