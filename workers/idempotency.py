"""One result per job_id, whatever Kafka redelivers: a record per job in Redis that says who serves it.

Kafka delivers at least once: a job is redelivered when its worker died (or lost its partition) before the offset
was committed. The record makes the second delivery harmless:

    (no record) --claim--> serving --publishing()--> publishing --done()--> done (kept idempotency_ttl_s)
                              └── release() (job handed to the retry topic): record deleted

- `claim` on a `done` record answers DONE: the redelivered job is skipped and its offset committed (no second
  result, no second log event).
- `claim` on a live `serving`/`publishing` record of another owner answers BUSY: the caller waits (a rebalance
  handed the job to a second worker while the first still serves it), so the engine runs it once.
- The owner renews its claim (`renew`) as it renews its budget lease. A claim not renewed in time belongs to a
  dead worker: `claim` takes it over and says in which state it was left.
- Redis may lose a record (a flush, a restart that lost the last second, a failover to a replica that lagged)
  while its owner still serves the job. The owner's next renewal, or its `publishing()`, finds no record and writes
  it again as its own, so the job still gets its result (and a redelivery meanwhile waits for it, as for any
  live owner). A record lost after `done` lets a redelivered job be answered again: Redis' persistence bounds how
  often that happens.
- Taken over from `publishing`, the job is *in doubt*: the dead worker may have published its result and died
  before `done`. `published_before` reads the result's partition from the offset the dead worker recorded (the
  end of that partition before it produced) to the high watermark, looking for the job_id. Found: the record is
  marked done and the job skipped. Not found: the result never landed and the job is served again. So a consumer
  of `vlm.jobs.result` sees exactly one result per job even when a worker is killed between publish and `done`.

Every step is one Lua script over a hash, using Redis server time, so workers' clocks do not matter.

`IdempotencyRecords.hold` is the claim as an `async with` (redis-py's `asyncio.Lock` is the model): entering claims
(waiting while a live owner serves the job, reading back when in doubt), a background task renews while the block
runs, and leaving releases a claim that published nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.connections import aiokafka_options
from schemas.settings import Settings

log = logging.getLogger(__name__)

ClaimState = Literal["claimed", "done", "busy", "taken_over"]
KeepOutcome = Literal["kept", "rewritten", "lost"]
"""What renewing a claim (or marking it publishing) found. kept: the record was this owner's; rewritten: Redis had
lost it, and it was written again as this owner's; lost: another owner holds it (or it is done)."""
_KEEP_OUTCOMES: dict[int, KeepOutcome] = {1: "kept", 2: "rewritten", 0: "lost"}
HoldState = Literal["answered", "serving", "publishing", "done", "lost"]
"""Where a `ClaimHold` stands. answered: the job's result was published before (a `done` record, or found by
reading back after an in-doubt takeover), nothing is held; serving: this owner holds the claim; publishing: it is
about to produce the result; done: the result is out; lost: Redis answered that another owner took the claim."""
ReadBack = Callable[[str, int, int | None], Awaitable[bool]]
"""(job_id, result partition, offset lower bound or None) -> whether the job's result lies on the result topic."""
KEY_PREFIX = "vlmflow:job:"
READ_BACK_POLL_MS = 500
MAX_BUSY_WAIT_S = 1.0
"""A claim held by a live owner is asked again at most this long after a BUSY answer."""
RENEW_RETRY_S = 0.2
"""A claim renewal Redis did not answer is tried again after this long."""

_CLAIM = """
local now_s = redis.call('TIME')
local now = tonumber(now_s[1]) * 1000 + math.floor(tonumber(now_s[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' then return {'done'} end
local previous = {}
if state then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner == ARGV[1] then return {'claimed'} end
  local live_until = tonumber(redis.call('HGET', KEYS[1], 'until'))
  if live_until > now then return {'busy', tostring(live_until - now)} end
  local partition = redis.call('HGET', KEYS[1], 'partition') or ''
  previous = {'taken_over', state, partition, redis.call('HGET', KEYS[1], 'offset') or ''}
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'state', 'serving', 'owner', ARGV[1], 'until', now + tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], ARGV[3])
if state then return previous end
return {'claimed'}
"""

# ARGV: owner, claim TTL ms, record TTL s. Answers 1 renewed, 2 written again (Redis had lost it), 0 lost to
# another owner (or done).
_RENEW = """
local now_s = redis.call('TIME')
local now = tonumber(now_s[1]) * 1000 + math.floor(tonumber(now_s[2]) / 1000)
local owner, state = unpack(redis.call('HMGET', KEYS[1], 'owner', 'state'))
if not state then
  redis.call('HSET', KEYS[1], 'state', 'serving', 'owner', ARGV[1], 'until', now + tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 2
end
if owner ~= ARGV[1] or state == 'done' then return 0 end
redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[2]))
return 1
"""

# ARGV: owner, claim TTL ms, partition, offset lower bound (-1 unknown), record TTL s. Answers 1 publishing, 2
# publishing in a record written again (Redis had lost it), 0 lost to another owner.
_PUBLISHING = """
local now_s = redis.call('TIME')
local now = tonumber(now_s[1]) * 1000 + math.floor(tonumber(now_s[2]) / 1000)
local owner, state = unpack(redis.call('HMGET', KEYS[1], 'owner', 'state'))
local answer = 1
if not state then
  answer = 2
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
elseif owner ~= ARGV[1] or state ~= 'serving' then
  return 0
end
local live_until = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'publishing', 'until', live_until, 'partition', ARGV[3], 'offset', ARGV[4])
return answer
"""

_DONE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' then return 1 end
if state and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'done', 'owner', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'serving' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    retry_in_s: float = 0.0
    """BUSY: when the other owner's claim runs out unless renewed."""
    previous_state: str = ""
    """TAKEN_OVER: the state the dead owner left (`serving` or `publishing`)."""
    previous_partition: int | None = None
    """TAKEN_OVER from `publishing`: the result partition the dead owner produced to."""
    previous_offset: int | None = None
    """TAKEN_OVER from `publishing`: the end of that partition before it produced (a lower bound)."""

    @property
    def in_doubt(self) -> bool:
        """A dead owner may have published: read the result topic before serving again."""
        return self.state == "taken_over" and self.previous_state == "publishing"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _int_or_none(raw: bytes | str) -> int | None:
    text = _text(raw)
    return int(text) if text not in ("", "-1") else None


class IdempotencyRecords:
    """The Redis side: one hash per job_id, moved through its states by single scripts."""

    def __init__(self, redis: Redis, *, claim_ttl_s: float, record_ttl_s: int):
        self._redis = redis
        self.claim_ttl_s = claim_ttl_s
        self._claim_ttl_ms = int(claim_ttl_s * 1000)
        self._record_ttl_s = record_ttl_s
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._publishing = redis.register_script(_PUBLISHING)
        self._done = redis.register_script(_DONE)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    async def claim(self, job_id: str, owner: str) -> Claim:
        answer = await self._claim(keys=[self.key(job_id)], args=[owner, self._claim_ttl_ms, self._record_ttl_s])
        state = _text(answer[0])
        if state == "busy":
            return Claim("busy", retry_in_s=int(answer[1]) / 1000)
        if state == "taken_over":
            return Claim(
                "taken_over",
                previous_state=_text(answer[1]),
                previous_partition=_int_or_none(answer[2]),
                previous_offset=_int_or_none(answer[3]),
            )
        return Claim("done" if state == "done" else "claimed")

    async def renew(self, job_id: str, owner: str) -> KeepOutcome:
        """Keep the claim alive. `rewritten`: Redis had lost the record, and it is this owner's again; `lost`:
        another owner took it over (this one was presumed dead)."""
        answer = await self._renew(keys=[self.key(job_id)], args=[owner, self._claim_ttl_ms, self._record_ttl_s])
        return _KEEP_OUTCOMES[int(answer)]

    async def publishing(self, job_id: str, owner: str, partition: int, offset_lower_bound: int | None) -> KeepOutcome:
        """About to produce the result to `partition`, whose end is at least `offset_lower_bound` (None: unknown,
        read from the beginning). `lost`: another owner took the claim over, so this one must not publish;
        `rewritten`: Redis had lost the record, which now says this owner publishes."""
        offset = -1 if offset_lower_bound is None else offset_lower_bound
        args: list[str | int] = [owner, self._claim_ttl_ms, partition, offset, self._record_ttl_s]
        return _KEEP_OUTCOMES[int(await self._publishing(keys=[self.key(job_id)], args=args))]

    async def done(self, job_id: str, owner: str) -> bool:
        """The result is on the topic. False when another owner took the claim over meanwhile (it will find the
        result by reading back and not publish a second one)."""
        return bool(await self._done(keys=[self.key(job_id)], args=[owner, self._record_ttl_s]))

    async def release(self, job_id: str, owner: str) -> None:
        """Give up a claim that published nothing (the job went to the retry topic, or the worker stops)."""
        await self._release(keys=[self.key(job_id)], args=[owner])

    def hold(self, job_id: str, owner: str, *, read_back: ReadBack) -> ClaimHold:
        """`async with records.hold(job_id, owner, read_back=...) as claim:` the job's claim for the block."""
        return ClaimHold(self, job_id, owner, read_back)


class ClaimHold:
    """A job's claim held for the length of an `async with` block.

    Entering claims the job, waiting while a live owner holds it; a job left in doubt by a dead owner is looked
    up with `read_back`, and found there it counts as answered. While the block runs the claim is renewed every
    third of its TTL. Leaving gives back a claim still `serving` (the job published nothing: it went to the retry
    topic, or the worker stops), so the next delivery serves it.
    """

    def __init__(self, records: IdempotencyRecords, job_id: str, owner: str, read_back: ReadBack):
        self.records = records
        self.job_id = job_id
        self.owner = owner
        self._read_back = read_back
        self.state: HoldState = "serving"
        self._renewer: asyncio.Task[None] | None = None
        self._leaving = False  # renewals end (set before the renewer is cancelled)

    async def __aenter__(self) -> ClaimHold:
        while True:
            claim = await self.records.claim(self.job_id, self.owner)
            if claim.state != "busy":
                break
            await asyncio.sleep(min(max(claim.retry_in_s, 0.05), MAX_BUSY_WAIT_S))
        if claim.state == "done":
            self.state = "answered"
            return self
        if claim.in_doubt:
            assert claim.previous_partition is not None, "a publishing claim records its partition"
            if await self._read_back(self.job_id, claim.previous_partition, claim.previous_offset):
                log.info("job %s: a dead worker had published its result; skipping", self.job_id)
                await self.records.done(self.job_id, self.owner)
                self.state = "answered"
                return self
        self._renewer = asyncio.create_task(self._renew_while_held(), name=f"claim renewal {self.job_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop_renewing()
        if self.state == "serving":
            try:
                await self.records.release(self.job_id, self.owner)
            except RedisError as exc:
                log.warning("job %s: claim not released (%s); it lapses by its TTL", self.job_id, exc)

    @property
    def answered(self) -> bool:
        """The job's result was published before this delivery: skip it."""
        return self.state == "answered"

    async def publishing(self, partition: int, offset_lower_bound: int | None) -> bool:
        """About to produce the result (`IdempotencyRecords.publishing`). False: another owner holds the claim,
        and this one must not publish."""
        outcome = await self.records.publishing(self.job_id, self.owner, partition, offset_lower_bound)
        if outcome == "lost":
            self.state = "lost"
            return False
        if outcome == "rewritten":
            log.warning("job %s: Redis had lost its claim; claimed again to publish", self.job_id)
        self.state = "publishing"
        return True

    async def done(self) -> bool:
        """The result is on the topic (`IdempotencyRecords.done`); renewals end."""
        await self._stop_renewing()
        self.state = "done"
        return await self.records.done(self.job_id, self.owner)

    async def _stop_renewing(self) -> None:
        # NOTE: the flag, not only the cancellation, ends the loop: redis-py lets a command in flight finish and
        # may drop the cancellation that came meanwhile (redis/redis-py#2666).
        self._leaving = True
        if self._renewer is not None:
            renewer, self._renewer = self._renewer, None
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_while_held(self) -> None:
        """Every third of the TTL; a Redis error is retried sooner (the claim outlives a blip shorter than its TTL,
        and one that lapses meanwhile is caught by `publishing()`)."""
        interval_s = self.records.claim_ttl_s / 3
        wait_s = interval_s
        while not self._leaving:
            await asyncio.sleep(wait_s)
            try:
                outcome = await self.records.renew(self.job_id, self.owner)
            except RedisError as exc:
                log.warning("job %s: claim renewal failed (%s); retrying", self.job_id, exc)
                wait_s = min(interval_s, RENEW_RETRY_S)
                continue
            wait_s = interval_s
            if self._leaving:
                return
            if outcome == "rewritten":
                log.warning("job %s: Redis had lost its claim; claimed again", self.job_id)
            elif outcome == "lost":
                log.warning("job %s: claim taken over by a worker that presumed this one dead", self.job_id)
                return


async def published_before(settings: Settings, topic: str, partition: int, from_offset: int | None, key: bytes) -> bool:
    """Whether a record with `key` lies in `topic`/`partition` between `from_offset` (None: the beginning) and the
    high watermark. The high watermark comes from fetch responses, which the local broker reports correctly."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(**aiokafka_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        if from_offset is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, from_offset)
        while True:
            batches = await consumer.getmany(tp, timeout_ms=READ_BACK_POLL_MS)
            if any(record.key == key for record in batches.get(tp, [])):
                return True
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater:
                return False
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
