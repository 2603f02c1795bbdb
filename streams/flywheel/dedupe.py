"""Duplicates and repeats: content hashes (pure) and the Redis state that remembers them.

Why Redis and not a Faust table: the state is global (any member of the group can answer for any hash, so raw
logs need no repartitioning by hash), bounded by a TTL, survives restarts without replaying a changelog (the local
broker's ListOffsets defect would cut such a recovery short), and is shared with the correction queue's Redis.

Redelivery is not duplication: each hash remembers the lineage (topic:partition:offset) of the first log that
carried it, so the same record delivered twice after a crash is recognized as itself and passes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.logs import Lineage, NormalizedLog

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Waits between tries while Redis does not answer; the last one repeats (the stream pauses, nothing is lost)."""

# KEYS[1]: the request's sightings (hash: lineage -> how many came before it). ARGV: lineage, ttl seconds.
# Returns how many other logs of the same request were seen before this one; a redelivery gets its first answer.
_COUNT_SIGHTING = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
if not before then
  before = redis.call('HLEN', KEYS[1])
  redis.call('HSET', KEYS[1], ARGV[1], before)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return tonumber(before)
"""


def _digest(parts: list[object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_hash(log: NormalizedLog) -> str:
    """Image URIs + prompt + output: two logs with the same hash teach the same example."""
    output = log.output if log.output is not None else log.output_text
    return _digest([[image.uri for image in log.images], log.prompt.strip(), output])


def request_fingerprint(log: NormalizedLog) -> str:
    """Tenant + image URIs + prompt: the same question asked again (a retry), whatever the answer."""
    return _digest([log.tenant, [image.uri for image in log.images], log.prompt.strip()])


def lineage_text(lineage: Lineage) -> str:
    return f"{lineage.topic}:{lineage.partition}:{lineage.offset}"


@dataclass(frozen=True)
class Sighting:
    """What the state knows about one log."""

    first_lineage: str
    """The lineage of the first log with this content; this log's own lineage when it is the first."""
    earlier_tries: int
    """How many other logs asked the same request before this one."""

    def is_duplicate_of(self, lineage: Lineage) -> bool:
        return self.first_lineage != lineage_text(lineage)


class SeenStore:
    """Content hashes and request sightings in Redis, under `<prefix>:`, each with its TTL."""

    def __init__(self, redis: Redis, *, prefix: str, dedupe_ttl_s: int, retry_window_s: int):
        self.redis = redis
        self.prefix = prefix
        self.dedupe_ttl_s = dedupe_ttl_s
        self.retry_window_s = retry_window_s
        self._count_sighting = redis.register_script(_COUNT_SIGHTING)

    async def sight(self, logs: list[tuple[NormalizedLog, Lineage]]) -> list[Sighting]:
        """Record each log (idempotent per lineage) and say whether its content was seen first elsewhere; one
        round trip for the whole batch, applied in order (so the first of two equal logs in a batch wins)."""
        if not logs:
            return []

        async def batch() -> list[Sighting]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for log, lineage in logs:
                    where = lineage_text(lineage)
                    content_key = f"{self.prefix}:content:{content_hash(log)}"
                    request_key = f"{self.prefix}:request:{request_fingerprint(log)}"
                    pipe.set(content_key, where, nx=True, get=True, ex=self.dedupe_ttl_s)
                    await self._count_sighting(keys=[request_key], args=[where, self.retry_window_s], client=pipe)
                replies = await pipe.execute()
            return [
                Sighting(
                    first_lineage=first.decode() if first is not None else lineage_text(lineage),
                    earlier_tries=int(before),
                )
                for (_, lineage), first, before in zip(logs, replies[0::2], replies[1::2], strict=True)
            ]

        return await retrying(batch, "Redis (dedupe)")


async def retrying(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `operation` until Redis answers it, waiting longer after each failure (logged as a warning). Any Redis
    error pauses the stream rather than failing the batch: a failover's READONLY or LOADING passes, and a defect
    shows as a repeating warning instead of lost records."""
    for attempt in itertools.count(1):
        try:
            return await operation()
        except (RedisError, OSError) as exc:
            wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1]
            log.warning("%s failed (try %d, next in %.1f s): %s", what, attempt, wait, exc)
            await asyncio.sleep(wait)
    raise AssertionError("itertools.count never ends")
