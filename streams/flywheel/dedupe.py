"""Duplicates and repeats: content hashes (pure) and the Redis state that remembers them.

Why Redis and not a Faust table: the state is global (any member of the group can answer for any hash, so raw
logs need no repartitioning by hash), bounded by a TTL, survives restarts without replaying a changelog (the local
broker's ListOffsets defect would cut such a recovery short), and is shared with the correction queue's Redis.

Redelivery is not duplication: each hash remembers the lineage (topic:partition:offset) of the first log that
carried it, so the same record delivered twice after a crash is recognized as itself and passes again.

A batch is sighted with one script call (every key under the app's hash tag `{streams:<app_id>}`, so the call is
valid on Redis Cluster, where the app's dedupe state then lives on one shard). Needs Redis ≥ 7 (`SET NX GET`).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.logs import Lineage, NormalizedLog
from streams.flywheel.jsontext import canonical

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Waits between tries while Redis does not answer; the last one repeats (the stream pauses, nothing is lost)."""

# KEYS[1]: a key under the app's hash tag, which the script does not touch: it builds every key from ARGV[1], the
# prefix, so on Redis Cluster they all live on KEYS[1]'s slot. ARGV: prefix, content TTL s, request TTL s, then one
# text with a line per log: content hash, request fingerprint and lineage, space-separated (hex digests, and a
# lineage has no spaces: Kafka topic names cannot). A key and an argument per log cost the stage ~17 µs of CPU per
# log in redis-py's command packing; one text costs it nothing. Returns one text, a line per answer: per log, the
# lineage of the first log with its content, then how many other logs of its request came before it (a
# redelivery gets its first answers). One text rather than an array of two items per log: the client parses a
# reply item by item in Python. 4 commands per log.
_SIGHT = """
local prefix = ARGV[1]
local out = {}
for content, request, where in string.gmatch(ARGV[4], '(%S+) (%S+) (%S+)\\n') do
  local first = redis.call('SET', prefix .. ':content:' .. content, where, 'NX', 'GET', 'EX', ARGV[2])
  local key = prefix .. ':request:' .. request
  local before = redis.call('HGET', key, where)
  if not before then
    before = redis.call('HLEN', key)
    redis.call('HSET', key, where, before)
  end
  redis.call('EXPIRE', key, ARGV[3])
  out[#out + 1] = first or where
  out[#out + 1] = tonumber(before)
end
return table.concat(out, '\\n')
"""


def _digest(parts: list[object]) -> str:
    return hashlib.sha256(canonical(parts)).hexdigest()


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
        self._sight = redis.register_script(_SIGHT)

    async def sight(
        self, logs: list[tuple[str, str, str]], *, on_retry: Callable[[], None] | None = None
    ) -> list[Sighting]:
        """Record each log, given as (`content_hash`, `request_fingerprint`, `lineage_text`), idempotent per
        lineage, and say whether its content was seen first elsewhere; one script call for the whole batch, applied in
        order (so the first of two equal logs in a batch wins)."""
        if not logs:
            return []
        text = "".join(f"{content} {request} {where}\n" for content, request, where in logs)
        args: list[str | int] = [self.prefix, self.dedupe_ttl_s, self.retry_window_s, text]
        keys = [f"{self.prefix}:sightings"]
        reply = await retrying(lambda: self._sight(keys=keys, args=args), "Redis (dedupe)", on_retry=on_retry)
        lines = (reply.decode() if isinstance(reply, bytes) else str(reply)).split("\n")
        return [
            Sighting(first_lineage=first, earlier_tries=int(tries))
            for first, tries in zip(lines[0::2], lines[1::2], strict=True)
        ]


async def retrying(
    operation: Callable[[], Awaitable[T]], what: str, *, on_retry: Callable[[], None] | None = None
) -> T:
    """Run `operation` until Redis answers it, waiting longer after each failure (logged as a warning, and
    `on_retry` called, e.g. to count it). Any Redis error pauses the stream rather than failing the batch: a
    failover's READONLY or LOADING passes, and a defect shows as a repeating warning instead of lost records."""
    for attempt in itertools.count(1):
        try:
            return await operation()
        except (RedisError, OSError) as exc:
            wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1]
            log.warning("%s failed (try %d, next in %.1f s): %s", what, attempt, wait, exc)
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(wait)
    raise AssertionError("itertools.count never ends")
