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
- Taken over from `publishing`, the job is *in doubt*: the dead worker may have published its result and died
  before `done`. `published_before` reads the result's partition from the offset the dead worker recorded (the
  end of that partition before it produced) to the high watermark, looking for the job_id. Found: the record is
  marked done and the job skipped. Not found: the result never landed and the job is served again. So a consumer
  of `vlm.jobs.result` sees exactly one result per job even when a worker is killed between publish and `done`.

Every step is one Lua script over a hash, using Redis server time, so workers' clocks do not matter.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from schemas.connections import aiokafka_options
from schemas.settings import Settings

ClaimState = Literal["claimed", "done", "busy", "taken_over"]
KEY_PREFIX = "vlmflow:job:"
READ_BACK_POLL_MS = 500

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

_RENEW = """
local now_s = redis.call('TIME')
local now = tonumber(now_s[1]) * 1000 + math.floor(tonumber(now_s[2]) / 1000)
local owner, state = unpack(redis.call('HMGET', KEYS[1], 'owner', 'state'))
if owner ~= ARGV[1] or state == 'done' then return 0 end
redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[2]))
return 1
"""

_PUBLISHING = """
local now_s = redis.call('TIME')
local now = tonumber(now_s[1]) * 1000 + math.floor(tonumber(now_s[2]) / 1000)
local owner, state = unpack(redis.call('HMGET', KEYS[1], 'owner', 'state'))
if owner ~= ARGV[1] or state ~= 'serving' then return 0 end
local live_until = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'publishing', 'until', live_until, 'partition', ARGV[3], 'offset', ARGV[4])
return 1
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

    async def renew(self, job_id: str, owner: str) -> bool:
        """Keep the claim alive; False when it was lost (this owner was presumed dead and taken over)."""
        return bool(await self._renew(keys=[self.key(job_id)], args=[owner, self._claim_ttl_ms]))

    async def publishing(self, job_id: str, owner: str, partition: int, offset_lower_bound: int | None) -> bool:
        """About to produce the result to `partition`, whose end is at least `offset_lower_bound` (None: unknown,
        read from the beginning). False when the claim was lost: then the job must not be published."""
        offset = -1 if offset_lower_bound is None else offset_lower_bound
        return bool(
            await self._publishing(keys=[self.key(job_id)], args=[owner, self._claim_ttl_ms, partition, offset])
        )

    async def done(self, job_id: str, owner: str) -> bool:
        """The result is on the topic. False when another owner took the claim over meanwhile (it will find the
        result by reading back and not publish a second one)."""
        return bool(await self._done(keys=[self.key(job_id)], args=[owner, self._record_ttl_s]))

    async def release(self, job_id: str, owner: str) -> None:
        """Give up a claim that published nothing (the job went to the retry topic, or the worker stops)."""
        await self._release(keys=[self.key(job_id)], args=[owner])


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
