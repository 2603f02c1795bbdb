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
       by their source header (`find_written`), and only the outputs not found there are written
    2. (the stage screens, dedupes, mines and queues what is left)
    3. `begin`: pending := the batch's offsets, scan_from := the known ends of the output partitions
    4. (the stage produces and waits for every acknowledgement)
    5. `finish`: done := the batch's last offset, pending cleared

A member killed between 3 and 5 leaves `pending`; the next owner writes only what did not reach the broker, output
by output (a record's outcome may be there and its hard case not). A compare-and-set that fails means another
member wrote the entry since step 1 (the partition moved meanwhile): nothing of that partition is written, and the
caller takes its records again from step 1.

The writer lease: step 3 also takes a lease on the partition (a Redis key with a TTL, renewed by `WriterLease`
while the batch is written; step 5 gives it back). A member that finds an unfinished batch whose writer still
holds its lease waits for it (`busy`) instead of scanning: the group can hand a partition to another member while
its old owner is still writing (a member that the coordinator dropped while it finished its batch), and a scan
made then would miss what is still on its way. A dead member's lease lapses after one TTL (the session timeout).

Failure policy: Redis errors are retried by the caller; a scan whose partitions stop answering raises
`ScanStalled`, and a writer whose lease lapsed raises `WriterLost`; either way the batch is taken again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.connections import cancel_and_wait
from schemas.errors import VlmflowError
from streams.flywheel.outputs import SOURCE_HEADER, Source

log = logging.getLogger(__name__)

SCAN_POLL_MS = 200

# KEYS[1]: the ledger hash, KEYS[1 + n]: the writer lease of the n-th entry. ARGV[1]: this member, ARGV[2]: the
# writer lease's TTL in ms (0: give the lease back), then field, expected version, new entry JSON (3 per entry).
# Returns one 1 (written) or 0 (the stored version was not the expected one) per entry.
_COMPARE_AND_SET = """
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 3 do
  local writer = KEYS[1 + #out + 1]
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local version = 0
  if current then version = cjson.decode(current).version end
  if version == tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    if ttl > 0 then
      redis.call('SET', writer, owner, 'PX', ttl)
    elseif redis.call('GET', writer) == owner then
      redis.call('DEL', writer)
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: writer leases. ARGV[1]: this member, ARGV[2]: TTL in ms (0: give them back). One 1 (held) or 0 per key.
_RENEW_WRITERS = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2]) else redis.call('DEL', KEYS[i]) end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class ScanStalled(VlmflowError):
    """An output partition stopped answering while the stage looked for what an unfinished batch wrote."""


class WriterLost(VlmflowError):
    """This member's writer lease on an input partition lapsed or was taken over while it wrote a batch."""


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
    """The ledger entries of one consumer group's input partitions, in one Redis hash, and their writer leases
    (one hash tag)."""

    def __init__(self, redis: Redis, *, app_id: str, owner: str):
        self.redis = redis
        self.key = f"vlmflow:{{streams:{app_id}}}:ledger"
        self.owner = owner
        self._compare_and_set = redis.register_script(_COMPARE_AND_SET)
        self._renew_writers = redis.register_script(_RENEW_WRITERS)

    @staticmethod
    def field_of(tp: TopicPartition) -> str:
        return f"{tp.topic}:{tp.partition}"

    def writer_key(self, tp: TopicPartition) -> str:
        return f"{self.key}:writer:{self.field_of(tp)}"

    async def read(self, tps: list[TopicPartition]) -> dict[TopicPartition, LedgerEntry]:
        stored = await self.redis.hmget(self.key, [self.field_of(tp) for tp in tps])
        return {tp: LedgerEntry.from_json(raw) if raw else LedgerEntry() for tp, raw in zip(tps, stored, strict=True)}

    async def busy(self, entries: Mapping[TopicPartition, LedgerEntry]) -> dict[TopicPartition, str]:
        """The partitions among `entries` with an unfinished batch whose writer, another member, still holds its
        lease (-> that member): their outputs may still be on their way, so they cannot be looked up yet."""
        unfinished = [tp for tp, entry in entries.items() if entry.unfinished() is not None]
        if not unfinished:
            return {}
        writers = await self.redis.mget([self.writer_key(tp) for tp in unfinished])
        return {
            tp: writer.decode() if isinstance(writer, bytes) else str(writer)
            for tp, writer in zip(unfinished, writers, strict=True)
            if writer is not None and writer not in (self.owner, self.owner.encode())
        }

    async def write(
        self, updates: Mapping[TopicPartition, tuple[LedgerEntry, LedgerEntry]], *, writer_ttl_s: float = 0.0
    ) -> set[TopicPartition]:
        """Replace each `(expected, new)` entry where the stored version is still `expected.version`; the
        partitions written (the others moved to another member). With `writer_ttl_s` (a begin) this member takes
        the writer lease of each partition written; without (a finish) it gives back those it holds."""
        if not updates:
            return set()
        order = list(updates)
        args: list[str | int] = [self.owner, round(writer_ttl_s * 1000)]
        for tp in order:
            expected, new = updates[tp]
            args += [self.field_of(tp), expected.version, new.to_json()]
        keys = [self.key, *(self.writer_key(tp) for tp in order)]
        replies = await self._compare_and_set(keys=keys, args=args)
        return {tp for tp, reply in zip(order, replies, strict=True) if int(reply) == 1}

    async def renew_writers(self, tps: list[TopicPartition], ttl_s: float) -> set[TopicPartition]:
        """Extend this member's writer leases on `tps` by `ttl_s` (0: give them back); those it still held."""
        if not tps:
            return set()
        replies = await self._renew_writers(
            keys=[self.writer_key(tp) for tp in tps], args=[self.owner, round(ttl_s * 1000)]
        )
        return {tp for tp, reply in zip(tps, replies, strict=True) if int(reply) == 1}

    def begun(self, entry: LedgerEntry, offsets: tuple[int, int], ends: Mapping[str, int]) -> LedgerEntry:
        """Step 3: the entry while the batch `offsets` is being written (`ends`: known ends of the outputs)."""
        return replace(entry, pending=offsets, scan_from=dict(ends), owner=self.owner, version=entry.version + 1)

    def finished(self, begun: LedgerEntry) -> LedgerEntry:
        """Step 5: every output of the pending batch is confirmed."""
        assert begun.pending is not None, "finish follows begin"
        done = max(begun.done, begun.pending[1])
        return replace(begun, done=done, pending=None, scan_from={}, version=begun.version + 1)


class WriterLease:
    """This member's writer lease on some input partitions while it writes their batch, for an `async with` block
    (redis-py's asyncio `Lock` is the model): taken with the begin (`Ledger.write` with `writer_ttl_s`, sent at
    `taken_at` on the loop's clock), renewed every third of the TTL while the block runs. A block that ends
    normally ends with the finish (`Ledger.write` without a TTL), which gives the leases back, or found that
    another member's begin took them over; one that raised gives them back on exit.

    The block calls `check` before each write: it raises `WriterLost` once a renewal found the lease gone, or
    once the TTL since the last renewal that Redis answered has passed (another member may be scanning now).
    """

    def __init__(self, ledger: Ledger, tps: set[TopicPartition], ttl_s: float, taken_at: float):
        self.ledger = ledger
        self.tps = sorted(tps)
        self.ttl_s = ttl_s
        self._held_until = taken_at + ttl_s
        """A lower bound of when the leases expire in Redis, on the loop's clock."""
        self._lost: str | None = None
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WriterLease:
        if self.tps:
            self._renewer = asyncio.create_task(self._renew_while_held(), name="writer lease renewal")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._renewer is None:
            return
        await cancel_and_wait(self._renewer)
        if exc_type is None:
            return
        try:
            await self.ledger.renew_writers(self.tps, 0)
        except RedisError as error:
            log.warning("writer leases not given back (%s); they lapse after %.0f s", error, self.ttl_s)

    def check(self) -> None:
        """Raise `WriterLost` if the block may no longer write."""
        if self._lost is None and asyncio.get_running_loop().time() >= self._held_until:
            self._lost = f"no renewal answered within {self.ttl_s:.1f} s"
        if self._lost is not None:
            where = ", ".join(Ledger.field_of(tp) for tp in self.tps)
            raise WriterLost(f"the writer lease on {where} was lost: {self._lost}")

    async def _renew_while_held(self) -> None:
        loop = asyncio.get_running_loop()
        while self._lost is None:
            await asyncio.sleep(self.ttl_s / 3)
            sent_at = loop.time()
            try:
                async with asyncio.timeout(max(0.0, self._held_until - sent_at)):
                    held = await self.ledger.renew_writers(self.tps, self.ttl_s)
            except (RedisError, TimeoutError) as error:
                log.warning("writer lease renewal failed (%s); retrying while the lease lasts", error)
                continue
            if held != set(self.tps):
                self._lost = "another member holds it (it had lapsed)"
                return
            self._held_until = sent_at + self.ttl_s


async def find_written(
    consumer: AIOKafkaConsumer,
    starts: Mapping[TopicPartition, int],
    source_topic: str,
    source_partition: int,
    offsets: tuple[int, int],
    *,
    stall_timeout_s: float,
) -> dict[int, set[str]]:
    """The offsets in `offsets` (inclusive) of `source_topic[source_partition]` with outputs on the output
    partitions -> the topics those are on, read from `starts` to each partition's high watermark (from fetch
    responses: the local broker's ListOffsets answer is only a lower bound). `consumer` is outside any group; it
    is reassigned."""
    consumer.assign(list(starts))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    found: dict[int, set[str]] = {}
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
                    found.setdefault(source.offset, set()).add(record.topic)
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
