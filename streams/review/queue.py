"""The correction queue in Redis: hard cases served highest priority first, each claimed under a lease.

A reviewer claims the top case and holds it until the lease ends; an abandoned claim returns to the queue by
itself. A renewal extends a lease and never shortens it, so a step that only needs the claim to outlive it (a
submission's publish) cannot cut a reviewer's time short. Every operation is one Lua script that reads Redis's
own clock (`TIME`), so the workers' and reviewers' clocks never matter, and every script first hands expired
leases back to the queue. All keys of one queue share
the hash tag `{review:<name>}`, so the scripts run unchanged on Redis Cluster.

Keys (`vlmflow:{review:<name>}:<part>`):

| part          | type | holds                                                                    |
| ------------- | ---- | ------------------------------------------------------------------------ |
| `pending`     | zset | case_id → priority (served highest first; ties by case_id, descending)    |
| `leases`      | zset | case_id → lease end (ms, Redis time)                                      |
| `cases`       | hash | case_id → `HardCase` JSON, while not submitted                           |
| `priorities`  | hash | case_id → priority, to put a lapsed or skipped case back in its place    |
| `claims`      | hash | case_id → `{reviewer, token, claimed_at_ms}` of the live lease            |
| `suggestions` | hash | case_id → a model's suggested answer (JSON)                               |
| `skips`       | hash | case_id → reviewers who skipped it, one a line (they are not served it again) |
| `done`        | hash | case_id → `{reviewer, at_ms}`: submitted cases are never queued again     |
| `counters`    | hash | enqueued, claimed, lapsed, skipped, submitted                             |
| `arrivals`    | zset | case_id → when it was first queued (ms, Redis time), until it is submitted |

Enqueueing is idempotent per case_id: a queued case is updated in place, a claimed one stays claimed, a submitted
one is never queued again, and `enqueued` counts each case once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from schemas.cases import HardCase
from schemas.errors import VlmflowError

SCAN_LIMIT = 100
"""How many of the top pending cases a claim looks through for one the reviewer has not skipped."""

_KEY_PARTS = (
    "pending", "leases", "cases", "priorities", "claims", "suggestions", "skips", "done", "counters", "arrivals"
)  # fmt: skip
ARRIVALS_SCAN_LIMIT = 1_000
"""How many of the earliest-queued cases `stats` looks through for the oldest one still pending (the others
before it are claimed, so this bounds the reviewers at work, not the queue)."""

# NOTE: every script gets the keys in `_KEY_PARTS` order and starts with this prelude.
_PRELUDE = """
local pending, leases, cases, priorities, claims, suggestions, skips, done, counters, arrivals =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  redis.call('ZREM', leases, id)
  redis.call('HDEL', claims, id)
  redis.call('ZADD', pending, tonumber(redis.call('HGET', priorities, id) or '0'), id)
  redis.call('HINCRBY', counters, 'lapsed', 1)
end
-- a live claim of ARGV[1] (the case) held with token ARGV[2]: the decoded claim, or nil and why not
local function live_claim()
  local raw = redis.call('HGET', claims, ARGV[1])
  if not raw then
    if redis.call('HEXISTS', done, ARGV[1]) == 1 then return nil, 'submitted' end
    return nil, 'not_claimed'
  end
  local claim = cjson.decode(raw)
  if claim.token ~= ARGV[2] then return nil, 'claimed_by_other' end
  return claim, nil
end
"""

# One case (its id, priority, JSON): 0 (already submitted), 1 (queued anew), 2 (updated, stays claimed) or 3
# (updated in the queue).
_ENQUEUE_CASE = """
local function enqueue(id, priority, case)
  if redis.call('HEXISTS', done, id) == 1 then return 0 end
  redis.call('HSET', cases, id, case)
  redis.call('HSET', priorities, id, priority)
  redis.call('ZADD', arrivals, 'NX', now, id)
  if redis.call('ZSCORE', leases, id) then return 2 end
  if redis.call('ZADD', pending, tonumber(priority), id) == 0 then return 3 end
  redis.call('HINCRBY', counters, 'enqueued', 1)
  return 1
end
"""
# ARGV: case_id, priority, case JSON. Returns what `enqueue` does.
_ENQUEUE = _PRELUDE + _ENQUEUE_CASE + "return enqueue(ARGV[1], ARGV[2], ARGV[3])"
# ARGV: case_id, priority, case JSON of each case in turn. Returns how many were queued anew.
_ENQUEUE_MANY = (
    _PRELUDE
    + _ENQUEUE_CASE
    + """
local anew = 0
for i = 1, #ARGV, 3 do
  if enqueue(ARGV[i], ARGV[i + 1], ARGV[i + 2]) == 1 then anew = anew + 1 end
end
return anew
"""
)

# ARGV: reviewer, token, lease_ms, scan limit. Returns false or {case_id, case JSON, suggestion or '', lease end}.
_CLAIM = (
    _PRELUDE
    + """
for _, id in ipairs(redis.call('ZREVRANGE', pending, 0, tonumber(ARGV[4]) - 1)) do
  local skipped = redis.call('HGET', skips, id)
  if not skipped or not string.find('\\n' .. skipped .. '\\n', '\\n' .. ARGV[1] .. '\\n', 1, true) then
    local ends = now + tonumber(ARGV[3])
    redis.call('ZREM', pending, id)
    redis.call('ZADD', leases, ends, id)
    redis.call('HSET', claims, id, cjson.encode({reviewer = ARGV[1], token = ARGV[2], claimed_at_ms = now}))
    redis.call('HINCRBY', counters, 'claimed', 1)
    return {id, redis.call('HGET', cases, id), redis.call('HGET', suggestions, id) or '', tostring(ends)}
  end
end
return false
"""
)

# ARGV: case_id, token, lease_ms. Returns {'ok', case JSON, suggestion or '', lease end, reviewer} or {reason}.
# The lease ends at the later of its current end and now + lease_ms.
_RENEW = (
    _PRELUDE
    + """
local claim, why = live_claim()
if not claim then return {why} end
local ends = math.max(now + tonumber(ARGV[3]), tonumber(redis.call('ZSCORE', leases, ARGV[1]) or '0'))
redis.call('ZADD', leases, ends, ARGV[1])
return {'ok', redis.call('HGET', cases, ARGV[1]), redis.call('HGET', suggestions, ARGV[1]) or '', tostring(ends),
        claim.reviewer}
"""
)

# ARGV: case_id, token. Returns {'ok'} or {reason}.
_COMPLETE = (
    _PRELUDE
    + """
local claim, why = live_claim()
if not claim then return {why} end
local id = ARGV[1]
redis.call('ZREM', leases, id)
redis.call('ZREM', arrivals, id)
for _, key in ipairs({claims, cases, priorities, suggestions, skips}) do redis.call('HDEL', key, id) end
redis.call('HSET', done, id, cjson.encode({reviewer = claim.reviewer, at_ms = now}))
redis.call('HINCRBY', counters, 'submitted', 1)
return {'ok'}
"""
)

# ARGV: case_id, token. Returns {'ok'} or {reason}.
_SKIP = (
    _PRELUDE
    + """
local claim, why = live_claim()
if not claim then return {why} end
local id = ARGV[1]
redis.call('ZREM', leases, id)
redis.call('HDEL', claims, id)
local skipped = redis.call('HGET', skips, id)
redis.call('HSET', skips, id, skipped and (skipped .. '\\n' .. claim.reviewer) or claim.reviewer)
redis.call('ZADD', pending, tonumber(redis.call('HGET', priorities, id) or '0'), id)
redis.call('HINCRBY', counters, 'skipped', 1)
return {'ok'}
"""
)

# ARGV: case_id, suggestion JSON. Returns 1, or 0 when the case is no longer in the queue.
_SUGGEST = (
    _PRELUDE
    + """
if redis.call('HEXISTS', cases, ARGV[1]) == 0 then return 0 end
redis.call('HSET', suggestions, ARGV[1], ARGV[2])
return 1
"""
)

# ARGV: limit. Returns {case JSON, suggestion or '', ...} of the top pending cases.
_PEEK = (
    _PRELUDE
    + """
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', pending, 0, tonumber(ARGV[1]) - 1)) do
  table.insert(out, redis.call('HGET', cases, id))
  table.insert(out, redis.call('HGET', suggestions, id) or '')
end
return out
"""
)

# ARGV: arrivals scan limit. Returns {pending, leased, submitted, top priority or '', ms the oldest pending case has
# been queued or '', counters as name, value, ...}.
_STATS = (
    _PRELUDE
    + """
local top = redis.call('ZREVRANGE', pending, 0, 0, 'WITHSCORES')
local oldest = ''
local earliest = redis.call('ZRANGE', arrivals, 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
for i = 1, #earliest, 2 do
  if redis.call('ZSCORE', pending, earliest[i]) then
    oldest = tostring(now - tonumber(earliest[i + 1]))
    break
  end
end
return {redis.call('ZCARD', pending), redis.call('ZCARD', leases), redis.call('HLEN', done), top[2] or '', oldest,
        unpack(redis.call('HGETALL', counters))}
"""
)


class ClaimLost(VlmflowError):
    """The claim named is not live any more: its lease lapsed, another reviewer holds it, or it was submitted."""

    def __init__(self, case_id: str, reason: str):
        self.case_id = case_id
        self.reason = reason
        hints = {
            "not_claimed": "its lease lapsed and it went back to the queue; claim it again with `vlmflow review next`",
            "claimed_by_other": "its lease lapsed and another reviewer claimed it",
            "submitted": "it was already submitted",
        }
        super().__init__(f"case {case_id}: {hints.get(reason, reason)}")


@dataclass(frozen=True)
class Claim:
    """A case held by one reviewer until `lease_ends`; `token` proves the claim on renew, submit and skip."""

    case: HardCase
    reviewer: str
    token: str
    lease_ends: datetime
    suggestion: dict[str, Any] | None
    """A model's pre-filled answer (`vlmflow review suggest`); a person confirms or replaces it."""


@dataclass(frozen=True)
class QueueStats:
    pending: int
    leased: int
    submitted: int
    top_priority: int | None
    """Priority of the case `next` would serve; None when the queue is empty."""
    counters: dict[str, int]
    """Totals since the queue began: enqueued, claimed, lapsed, skipped, submitted."""
    oldest_pending_age_s: float | None = None
    """How long (Redis time) the pending case queued first has been waiting since it was first queued; None when
    nothing is pending."""


def _ms_to_datetime(ms: bytes | str) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CorrectionQueue:
    """One named queue on one Redis (or Redis Cluster: every key carries the queue's hash tag)."""

    def __init__(self, redis: Redis, name: str = "corrections"):
        if not name or any(char in name for char in "{}\n"):
            raise ValueError(f"queue name {name!r} must be non-empty without braces or newlines")
        self.redis = redis
        self.name = name
        self.keys = [f"vlmflow:{{review:{name}}}:{part}" for part in _KEY_PARTS]
        self._enqueue = redis.register_script(_ENQUEUE)
        self._enqueue_many = redis.register_script(_ENQUEUE_MANY)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._complete = redis.register_script(_COMPLETE)
        self._skip = redis.register_script(_SKIP)
        self._suggest = redis.register_script(_SUGGEST)
        self._peek = redis.register_script(_PEEK)
        self._stats = redis.register_script(_STATS)

    async def enqueue(self, case: HardCase) -> bool:
        """Queue `case` at its priority (or update a queued one); False when it was already submitted."""
        result = await self._enqueue(keys=self.keys, args=[case.case_id, case.priority, case.model_dump_json()])
        return int(result) != 0

    async def enqueue_many(self, cases: Sequence[HardCase]) -> int:
        """`enqueue` for every case, in one round trip (one script call each, pipelined); how many were queued
        anew (not submitted before, not already queued or claimed)."""
        return await self.enqueue_encoded([(case.case_id, case.priority, case.model_dump_json()) for case in cases])

    async def enqueue_encoded(self, cases: Sequence[tuple[str, int, bytes | str]]) -> int:
        """`enqueue_many` for cases already encoded, as (case id, priority, the `HardCase` JSON): the raw-log
        stage has each case's JSON from screening and does not parse it back into a model. One script call for
        all of them (a script call each, pipelined, cost the stage about 20 µs of CPU a case in redis-py)."""
        if not cases:
            return 0
        args = [part for case_id, priority, case_json in cases for part in (case_id, priority, case_json)]
        return int(await self._enqueue_many(keys=self.keys, args=args))

    async def claim(self, reviewer: str, lease_s: float) -> Claim | None:
        """The highest-priority case this reviewer has not skipped, leased for `lease_s`; None when none is left."""
        if not reviewer or "\n" in reviewer:
            raise ValueError("reviewer must be a non-empty name without newlines")
        token = uuid.uuid4().hex
        result = await self._claim(keys=self.keys, args=[reviewer, token, round(lease_s * 1000), SCAN_LIMIT])
        if not result:
            return None
        _, case_json, suggestion, ends = result
        return Claim(
            case=HardCase.model_validate_json(case_json),
            reviewer=reviewer,
            token=token,
            lease_ends=_ms_to_datetime(ends),
            suggestion=json.loads(suggestion) if suggestion else None,
        )

    async def held(self, case_id: str, token: str) -> Claim:
        """A live claim as it stands, unchanged. `ClaimLost` otherwise."""
        return await self.renew(case_id, token, 0.0)

    async def renew(self, case_id: str, token: str, lease_s: float) -> Claim:
        """Extend a live claim to at least `lease_s` from now (never shortening it) and return it as it stands.
        `ClaimLost` otherwise."""
        result = await self._renew(keys=self.keys, args=[case_id, token, round(lease_s * 1000)])
        if _text(result[0]) != "ok":
            raise ClaimLost(case_id, _text(result[0]))
        _, case_json, suggestion, ends, reviewer = result
        return Claim(
            case=HardCase.model_validate_json(case_json),
            reviewer=_text(reviewer),
            token=token,
            lease_ends=_ms_to_datetime(ends),
            suggestion=json.loads(suggestion) if suggestion else None,
        )

    async def complete(self, case_id: str, token: str) -> None:
        """Take a claimed case out of the queue for good (its correction is published). `ClaimLost` otherwise."""
        result = await self._complete(keys=self.keys, args=[case_id, token])
        if _text(result[0]) != "ok":
            raise ClaimLost(case_id, _text(result[0]))

    async def skip(self, case_id: str, token: str) -> None:
        """Give a claimed case back at its priority; the reviewer who skipped it is not served it again."""
        result = await self._skip(keys=self.keys, args=[case_id, token])
        if _text(result[0]) != "ok":
            raise ClaimLost(case_id, _text(result[0]))

    async def suggest(self, case_id: str, suggestion: dict[str, Any]) -> bool:
        """Attach a model's answer to a queued or claimed case; False when the case is no longer queued."""
        result = await self._suggest(keys=self.keys, args=[case_id, json.dumps(suggestion, sort_keys=True)])
        return int(result) == 1

    async def peek(self, limit: int) -> list[tuple[HardCase, dict[str, Any] | None]]:
        """The top `limit` pending cases in serving order, each with its suggestion (None when it has none)."""
        flat = await self._peek(keys=self.keys, args=[limit])
        return [
            (HardCase.model_validate_json(flat[i]), json.loads(flat[i + 1]) if flat[i + 1] else None)
            for i in range(0, len(flat), 2)
        ]

    async def stats(self) -> QueueStats:
        pending, leased, submitted, top, oldest, *counters = await self._stats(
            keys=self.keys, args=[ARRIVALS_SCAN_LIMIT]
        )
        pairs = dict(zip(counters[::2], counters[1::2], strict=True))
        return QueueStats(
            pending=int(pending),
            leased=int(leased),
            submitted=int(submitted),
            top_priority=int(float(top)) if top else None,
            counters={_text(name): int(value) for name, value in pairs.items()},
            oldest_pending_age_s=int(oldest) / 1000 if oldest else None,
        )
