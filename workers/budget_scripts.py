"""The Lua side of the token budget: every operation is one script, so Redis runs it atomically.

Each script is `PRELUDE` followed by its body. The prelude reads the server clock, notices when the pool's state
is new (Redis lost it), reclaims expired leases, and defines the helpers the bodies share. All keys of a pool
carry one hash tag, so the scripts also run on Redis Cluster.

KEYS (in this order, see `KEY_NAMES`): meta, leases, held, queue, alive.
ARGV[1..3] of every script: the configured capacity, the lease TTL in ms, the epoch the caller last saw ('' none).
Every script answers one string, "<status> <epoch> <server time in ms> <numbers...>"; the bodies say which numbers.
NOTE: one string rather than an array: a client without hiredis parses it in a fraction of the time.
"""

from __future__ import annotations

KEY_NAMES = ("meta", "leases", "held", "queue", "alive")
"""meta: hash of `used` (sum of the costs of `leases`), `capacity` (live override of the configured one, from
set_capacity), `epoch` (server time in µs at which this incarnation of the pool's state began), `recovering`
(ms until which grants wait after a loss) and `seq` (arrival counter of the queue); leases: zset lease id ->
expiry ms; held: hash lease id -> "<cost>|<holder>"; queue: zset ticket -> arrival number; alive: hash ticket ->
ms by which its waiter must ask again."""

PRELUDE = """
local K_META, K_LEASES, K_HELD, K_QUEUE, K_ALIVE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl_ms = tonumber(ARGV[2])
local known_epoch = ARGV[3]
local stored = redis.call('HMGET', K_META, 'epoch', 'recovering', 'used', 'capacity')

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
if known_epoch ~= '' and known_epoch ~= epoch then
  recover_until(math.floor(tonumber(epoch) / 1000) + ttl_ms)
end
local recovering = recovering_until > now
local used = tonumber(stored[3] or '0')
local capacity = tonumber(stored[4] or ARGV[1])

-- Returns the tokens freed: 0 when the lease is not held.
local function drop_lease(id)
  local held = redis.call('HGET', K_HELD, id)
  if not held then return 0 end
  local cost = tonumber(string.match(held, '^%d+'))
  used = used - cost
  redis.call('HINCRBY', K_META, 'used', -cost)
  redis.call('ZREM', K_LEASES, id)
  redis.call('HDEL', K_HELD, id)
  return cost
end

local function grant(id, cost, holder)
  used = used + cost
  redis.call('HINCRBY', K_META, 'used', cost)
  redis.call('ZADD', K_LEASES, now + ttl_ms, id)
  redis.call('HSET', K_HELD, id, cost .. '|' .. holder)
  return now + ttl_ms
end

local function answer(status, ...)
  return table.concat({status, epoch, now, ...}, ' ')
end

local function dequeue(ticket)
  redis.call('ZREM', K_QUEUE, ticket)
  redis.call('HDEL', K_ALIVE, ticket)
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
  drop_lease(id)
end
"""

RESERVE = """
-- ARGV[4] cost, [5] holder, [6] lease id, [7] ticket ('' = do not queue), [8] waiter TTL in ms.
-- granted: expiry ms, used; too_large: capacity, used; wait: place in the queue (0 = next), used.
local cost, holder, id, ticket = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local expiry = redis.call('ZSCORE', K_LEASES, id)
if expiry then
  -- NOTE: a retried call whose first answer was lost finds its lease granted already.
  if ticket ~= '' then dequeue(ticket) end
  return answer('granted', tonumber(expiry), used)
end
if cost > capacity then
  if ticket ~= '' then dequeue(ticket) end
  return answer('too_large', capacity, used)
end
local queued = ticket ~= '' and redis.call('ZSCORE', K_QUEUE, ticket)
if queued then
  redis.call('HSET', K_ALIVE, ticket, now + tonumber(ARGV[8]))
end
-- A waiter that stopped asking is gone; only the head matters, so tickets are checked as they reach it.
local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
while head and tonumber(redis.call('HGET', K_ALIVE, head) or '0') <= now do
  dequeue(head)
  head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
end
-- First come, first served: only the head of the queue takes tokens, and a caller not in the queue takes them
-- only while nobody waits, so a large cost is never overtaken by later small ones.
if (head == nil or (queued and head == ticket)) and not recovering and used + cost <= capacity then
  if queued then dequeue(ticket) end
  return answer('granted', grant(id, cost, holder), used)
end
if ticket == '' then
  return answer('wait', redis.call('ZCARD', K_QUEUE), used)
end
if not queued then
  redis.call('ZADD', K_QUEUE, redis.call('HINCRBY', K_META, 'seq', 1), ticket)
  redis.call('HSET', K_ALIVE, ticket, now + tonumber(ARGV[8]))
end
return answer('wait', redis.call('ZRANK', K_QUEUE, ticket), used)
"""

RENEW = """
-- ARGV[4] lease id, [5] cost, [6] holder, [7] epoch that granted the lease.
-- renewed: new expiry ms, used; lost: the lease is gone (expired and reclaimed, or lost with Redis' data).
local id, cost = ARGV[4], tonumber(ARGV[5])
if redis.call('ZSCORE', K_LEASES, id) then
  redis.call('ZADD', K_LEASES, 'XX', now + ttl_ms, id)
  return answer('renewed', now + ttl_ms, used)
end
if ARGV[7] ~= epoch and recovering and used + cost <= capacity then
  return answer('renewed', grant(id, cost, ARGV[6]), used)
end
return answer('lost', 0, used)
"""

RELEASE = """
-- ARGV[4] lease id, [5] ticket to withdraw from the queue ('' none). Answers tokens freed (0: not held), used.
if ARGV[5] ~= '' then dequeue(ARGV[5]) end
return answer('released', drop_lease(ARGV[4]), used)
"""

STATE = """
-- Answers used, capacity, leases, waiters, recovering-until ms; sweeps out every waiter that stopped asking.
local alive = redis.call('HGETALL', K_ALIVE)
for i = 1, #alive, 2 do
  if tonumber(alive[i + 1]) <= now then dequeue(alive[i]) end
end
return answer('state', used, capacity, redis.call('ZCARD', K_LEASES), redis.call('ZCARD', K_QUEUE),
  recovering_until)
"""

SET_CAPACITY = """
-- ARGV[4] the new capacity. Answers it, used. Leases granted stay; new grants wait until they fit under it.
redis.call('HSET', K_META, 'capacity', ARGV[4])
return answer('set', tonumber(ARGV[4]), used)
"""
