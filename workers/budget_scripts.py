"""The Lua side of the token budget: every operation is one script, so Redis runs it atomically.

Each script is `source(body, ...)`: a header with the caller's constants (configured capacity, lease TTL, waiter
TTL), `PRELUDE`, then its body. The constants sit in the source rather than in ARGV, so a call packs and parses
only what changes per call. The prelude reads the server clock, notices when the pool's state is new (Redis lost
it), and defines the helpers the bodies share. All keys of a pool carry one hash tag, so the scripts also run on
Redis Cluster.

KEYS (in this order, `keys(pool)`): meta, leases, queue, waiters.
ARGV[1] of every script: the epoch the caller last saw ('' none); the bodies say what follows. A lease and its
reservation are named by one string, the member "<lease id>|<cost>|<holder>": in the lease set and in the queue.
Every script answers one string, "<status> <epoch> <numbers...>"; the bodies say which numbers.
NOTE: one string rather than an array: a client without hiredis parses it in a fraction of the time. It holds only
the numbers the caller uses: Lua formats each with sprintf.

Expired leases are reclaimed when their tokens matter: before a grant that does not fit without them, before a
renewal or confirmation is accepted, and in STATE. Until then they still count as used, which errs on the safe side.

Waiters are served by whichever script frees or finds tokens: `serve_queue` grants the head of the queue, then the
next, while they fit, and publishes the lease ids it granted on the pool's channel (`GRANTED_CHANNEL`), so their
waiters need not poll. Such a grant runs for the waiter TTL only, until its waiter confirms it (RESERVE again),
so a waiter that vanished holds its tokens no longer than a waiter that stopped asking holds its place.

NOTE: each redis.call costs about a microsecond inside Redis (Valkey 8 here), more than all the Lua around it, so
the common paths make few: a reservation that fits while nobody waits makes 4 (TIME, HMGET, HINCRBY, ZADD), and so
does a release while nobody waits (TIME, HMGET, ZREM, HINCRBY); the costs live in the members, so no hash of costs
needs reading or writing, and the count of waiters lives in meta, so nobody looks at the queue while it is empty.
"""

from __future__ import annotations

KEY_NAMES = ("meta", "leases", "queue", "waiters")
"""meta: hash of `used` (sum of the costs of `leases`), `capacity` (live override of the configured one, from
set_capacity), `epoch` (server time in µs at which this incarnation of the pool's state began), `recovering`
(ms until which grants wait after a loss), `seq` (arrival counter of the queue) and `waiting` (members of
`queue`); leases: zset member -> expiry ms; queue: zset member -> arrival number; waiters: hash member -> ms by
which its waiter must ask again."""

LAYOUT_VERSION = 2
"""Part of every key: state written in another layout (version 1 kept costs in a `held` hash and bare lease ids in
`leases`) is out of reach rather than misread. Workers of two layouts must not serve one pool at once."""

GRANTED_CHANNEL = "granted"
"""Pub/sub channel `<key prefix>granted`: the lease ids `serve_queue` granted, separated by spaces. A channel is not
a key, so Redis Cluster lets a script publish to it; Cluster delivers it to subscribers on every node."""

HEADER = "local configured_capacity, ttl_ms, waiter_ttl_ms = {capacity:d}, {ttl_ms:d}, {waiter_ttl_ms:d}\n"

PRELUDE = (
    """
local K_META, K_LEASES, K_QUEUE, K_WAITERS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local stored = redis.call('HMGET', K_META, 'epoch', 'recovering', 'used', 'capacity', 'waiting')

-- NOTE: Redis may lose the pool's state (a restart without persistence, a flush) while holders still use
-- their leases. Grants then wait one lease TTL, long enough for every live holder to renew, and a renewal in
-- that window registers its lease again (see RENEW). Two signs of a loss: the state is new while the server
-- started less than a TTL ago (whoever calls first), or a caller knew another epoch.
local epoch = stored[1]
local recovering_until = tonumber(stored[2] or '0')
local function recover_until(until_ms)
  if until_ms > recovering_until then
    recovering_until = until_ms
    redis.call('HSET', K_META, 'recovering', until_ms)
  end
end
if not epoch then
  epoch = clock[1] .. string.format('%06d', tonumber(clock[2]))
  redis.call('HSET', K_META, 'epoch', epoch)
  local uptime_s = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
  recover_until(now - uptime_s * 1000 + ttl_ms)
end
if ARGV[1] ~= '' and ARGV[1] ~= epoch then
  recover_until(math.floor(tonumber(epoch) / 1000) + ttl_ms)
end
local recovering = recovering_until > now
local used = tonumber(stored[3] or '0')
local capacity = tonumber(stored[4] or configured_capacity)
local waiting = tonumber(stored[5] or '0')

local function cost_of(member)
  return tonumber(string.match(member, '^[^|]*|(%d+)'))
end

local function grant(member, cost, expiry)
  used = used + cost
  redis.call('HINCRBY', K_META, 'used', cost)
  redis.call('ZADD', K_LEASES, expiry, member)
  return expiry
end

-- Returns the tokens freed: 0 when the lease is not held.
local function drop_lease(member)
  if redis.call('ZREM', K_LEASES, member) == 0 then return 0 end
  local cost = cost_of(member)
  used = used - cost
  redis.call('HINCRBY', K_META, 'used', -cost)
  return cost
end

-- Sets `used` to the sum of the costs of `leases` (O(leases)): a partial loss of Redis' data can leave the two
-- apart, which no other script would notice. Run where that matters: STATE, and a renewal that finds its lease lost.
local function recount()
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    total = total + cost_of(member)
  end
  if total ~= used then
    used = total
    redis.call('HSET', K_META, 'used', total)
  end
end

local reclaimed = false
local function reclaim()
  if reclaimed then return end
  reclaimed = true
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
    drop_lease(member)
  end
end

local function fits(cost)
  if used + cost <= capacity then return true end
  reclaim()
  return used + cost <= capacity
end

-- The lease's expiry, or nil when it is not held (an expired one is reclaimed here).
local function live_expiry(member)
  local expiry = tonumber(redis.call('ZSCORE', K_LEASES, member))
  if expiry and expiry <= now then
    drop_lease(member)
    return nil
  end
  return expiry
end

local function answer(status, numbers)
  return status .. ' ' .. epoch .. ' ' .. numbers
end

local function enqueue(member)
  waiting = waiting + 1
  redis.call('HINCRBY', K_META, 'waiting', 1)
  redis.call('ZADD', K_QUEUE, redis.call('HINCRBY', K_META, 'seq', 1), member)
  redis.call('HSET', K_WAITERS, member, now + waiter_ttl_ms)
end

local function dequeue(member)
  if redis.call('ZREM', K_QUEUE, member) == 1 then
    waiting = waiting - 1
    redis.call('HINCRBY', K_META, 'waiting', -1)
    redis.call('HDEL', K_WAITERS, member)
  end
end

-- First come, first served: grants the head of the queue while it fits, then the next, and so on; a head that
-- does not fit stops the run, so a large cost is never overtaken by later small ones. A waiter that stopped
-- asking is dropped as it reaches the head, and so is one that can no longer fit (its next ask says so).
-- Publishes the lease ids granted, except the caller's (`own`, a member or '').
local function serve_queue(own)
  if waiting == 0 or recovering then return end
  local granted = {}
  local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
  while head do
    local cost = cost_of(head)
    if tonumber(redis.call('HGET', K_WAITERS, head) or '0') > now and cost <= capacity then
      if not fits(cost) then break end
      grant(head, cost, now + waiter_ttl_ms)
      if head ~= own then granted[#granted + 1] = string.match(head, '^[^|]*') end
    end
    dequeue(head)
    head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
  end
  if #granted > 0 then
    redis.call('PUBLISH', (string.gsub(K_META, 'meta$', '"""
    + GRANTED_CHANNEL
    + """')), table.concat(granted, ' '))
  end
end
"""
)

RESERVE = """
-- ARGV[2] member, [3] 'try' (never queue), 'new' (the member was never sent before) or 'again' (it was: it may
-- hold a place in the queue, or a grant whose answer was lost or that serve_queue made while it waited).
-- granted: expiry ms; too_large: capacity; wait: place in the queue (0 = next); busy (try): 0.
local member, mode = ARGV[2], ARGV[3]
local cost = cost_of(member)
local queued = false
if mode == 'again' then
  queued = waiting > 0 and redis.call('ZSCORE', K_QUEUE, member)
  if queued then redis.call('HSET', K_WAITERS, member, now + waiter_ttl_ms) end
  serve_queue(member)
  if live_expiry(member) then
    -- NOTE: the caller has the grant now, so it runs for a lease TTL.
    redis.call('ZADD', K_LEASES, 'XX', now + ttl_ms, member)
    return answer('granted', now + ttl_ms)
  end
else
  serve_queue('')
end
if cost > capacity then
  if queued then dequeue(member) end
  return answer('too_large', capacity)
end
if waiting == 0 and not recovering and fits(cost) then
  return answer('granted', grant(member, cost, now + ttl_ms))
end
if mode == 'try' then
  return answer('busy', 0)
end
-- NOTE: serve_queue keeps a queued caller queued unless it granted it or dropped it as too large (both above).
if not queued then enqueue(member) end
return answer('wait', redis.call('ZRANK', K_QUEUE, member))
"""

RENEW = """
-- ARGV[2] member, [3] epoch that granted the lease, [4] its expiry ms as the holder last heard it.
-- renewed: new expiry ms (the lease registered again if Redis had lost it); lost: 0, the lease is gone (it
-- expired, or Redis lost it and lent its tokens to others meanwhile): the holder must stop using them.
local member = ARGV[2]
local status, expiry = 'lost', 0
if live_expiry(member) then
  status, expiry = 'renewed', now + ttl_ms
  redis.call('ZADD', K_LEASES, 'XX', expiry, member)
else
  -- NOTE: a lease unknown to Redis before the expiry its holder heard of was lost with Redis' latest writes while
  -- the pool's state survived (a failover to a replica that lagged, a restart that lost the last second). Grants
  -- then wait one TTL from now, so every holder of a lost lease registers it again before its tokens go to others.
  local lost_while_held = tonumber(ARGV[4]) > now
  if lost_while_held and ARGV[3] == epoch then
    recover_until(now + ttl_ms)
    recovering = true
  end
  if lost_while_held or (ARGV[3] ~= epoch and recovering) then
    recount()
    if fits(cost_of(member)) then
      status, expiry = 'renewed', grant(member, cost_of(member), now + ttl_ms)
    end
  end
end
serve_queue('')
return answer(status, expiry)
"""

RELEASE = """
-- ARGV[2] member; also withdraws it from the queue (a waiter that gives up). Answers tokens freed (0: not held).
local freed = drop_lease(ARGV[2])
if waiting > 0 then
  dequeue(ARGV[2])
  serve_queue('')
end
return answer('released', freed)
"""

STATE = """
-- Answers used, capacity, leases, waiters, recovering-until ms, server time ms; reclaims every expired lease,
-- recounts `used` and sweeps out every waiter that stopped asking.
reclaim()
recount()
local waiters = redis.call('HGETALL', K_WAITERS)
for i = 1, #waiters, 2 do
  if tonumber(waiters[i + 1]) <= now then dequeue(waiters[i]) end
end
serve_queue('')
local leases = redis.call('ZCARD', K_LEASES)
return answer('state', table.concat({used, capacity, leases, waiting, recovering_until, now}, ' '))
"""

SET_CAPACITY = """
-- ARGV[2] the new capacity. Answers it. Leases granted stay; new grants wait until they fit under it.
capacity = tonumber(ARGV[2])
redis.call('HSET', K_META, 'capacity', capacity)
serve_queue('')
return answer('set', capacity)
"""


def key_prefix(pool: str) -> str:
    """`vlmflow:{<pool>}:v2:`: the pool name in braces is the keys' hash tag, so they share one Cluster slot."""
    return f"vlmflow:{{{pool}}}:v{LAYOUT_VERSION}:"


def keys(pool: str) -> tuple[str, ...]:
    """The KEYS of every script, in `KEY_NAMES` order."""
    return tuple(key_prefix(pool) + name for name in KEY_NAMES)


def source(body: str, *, capacity: int, ttl_ms: int, waiter_ttl_ms: int) -> str:
    """The script of one operation with the caller's constants in place."""
    return HEADER.format(capacity=capacity, ttl_ms=ttl_ms, waiter_ttl_ms=waiter_ttl_ms) + PRELUDE + body
