"""The Lua side of the token budget: every operation is one script, so Redis runs it atomically.

Each script is `PRELUDE` followed by its body. The prelude reads the server clock, notices when the pool's state
is new (Redis lost it), reclaims expired leases and vanished waiters, and defines the helpers the bodies share.
All keys of a pool carry one hash tag, so the scripts also run on Redis Cluster.

KEYS (in this order, see `KEY_NAMES`): capacity, used, leases, costs, holders, queue, alive, seq, epoch, recovering.
ARGV[1..3] of every script: the configured capacity, the lease TTL in ms, the epoch the caller last saw ('' none).
Every script answers {status, epoch, server time in ms, a, b}; the bodies say what a and b are.
"""

from __future__ import annotations

KEY_NAMES = ("capacity", "used", "leases", "costs", "holders", "queue", "alive", "seq", "epoch", "recovering")
"""capacity: live override of the configured capacity (set_capacity); used: sum of the costs in `leases`;
leases: zset lease id -> expiry ms; costs / holders: hash lease id -> cost / holder; queue: zset ticket ->
arrival number (`seq`); alive: zset ticket -> ms by which its waiter must poll again; epoch: server time in µs at
which this incarnation of the pool's state began; recovering: ms until which grants wait after Redis lost the state."""

PRELUDE = """
local K_CAPACITY, K_USED, K_LEASES, K_COSTS, K_HOLDERS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_QUEUE, K_ALIVE, K_SEQ, K_EPOCH, K_RECOVERING = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl_ms = tonumber(ARGV[2])
local known_epoch = ARGV[3]
local stored = redis.call('MGET', K_EPOCH, K_RECOVERING, K_USED, K_CAPACITY)

-- NOTE: Redis may lose the pool's state (a restart without persistence, a flush) while holders still use
-- their leases. Grants then wait one lease TTL, long enough for every live holder to renew, and a renewal in
-- that window registers its lease again (see RENEW). Two signs of a loss: the state is new while the server
-- started less than a TTL ago (whoever calls first), or a caller knew another epoch.
local epoch = stored[1]
local recovering_until = tonumber(stored[2] or '0')
local function recover_until(until_ms)
  if until_ms > recovering_until then
    recovering_until = until_ms
    redis.call('SET', K_RECOVERING, until_ms)
  end
end
if not epoch then
  epoch = clock[1] .. string.format('%06d', tonumber(clock[2]))
  redis.call('SET', K_EPOCH, epoch)
  local uptime_s = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
  recover_until(now - uptime_s * 1000 + ttl_ms)
end
if known_epoch ~= '' and known_epoch ~= epoch then
  recover_until(math.floor(tonumber(epoch) / 1000) + ttl_ms)
end
local recovering = recovering_until > now
local used = tonumber(stored[3] or '0')
local capacity = tonumber(stored[4] or ARGV[1])

local function drop_lease(id)
  local cost = tonumber(redis.call('HGET', K_COSTS, id) or '0')
  used = used - cost
  redis.call('DECRBY', K_USED, cost)
  redis.call('ZREM', K_LEASES, id)
  redis.call('HDEL', K_COSTS, id)
  redis.call('HDEL', K_HOLDERS, id)
end

local function grant(id, cost, holder)
  used = used + cost
  redis.call('INCRBY', K_USED, cost)
  redis.call('ZADD', K_LEASES, now + ttl_ms, id)
  redis.call('HSET', K_COSTS, id, cost)
  redis.call('HSET', K_HOLDERS, id, holder)
  return now + ttl_ms
end

local function dequeue(ticket)
  redis.call('ZREM', K_QUEUE, ticket)
  redis.call('ZREM', K_ALIVE, ticket)
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
  drop_lease(id)
end
for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', K_ALIVE, '-inf', now)) do
  dequeue(ticket)
end
"""

RESERVE = """
-- ARGV[4] cost, [5] holder, [6] lease id, [7] ticket ('' = do not queue), [8] waiter TTL in ms.
-- granted: a = expiry ms, b = used; too_large: a = capacity; wait: a = place in the queue (0 = next).
local cost, holder, id, ticket = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local expiry = redis.call('ZSCORE', K_LEASES, id)
if expiry then
  -- NOTE: a retried call whose first answer was lost finds its lease granted already.
  if ticket ~= '' then dequeue(ticket) end
  return {'granted', epoch, now, tonumber(expiry), used}
end
if cost > capacity then
  if ticket ~= '' then dequeue(ticket) end
  return {'too_large', epoch, now, capacity, used}
end
-- First come, first served: only the head of the queue takes tokens, and a caller not in the queue takes them
-- only while nobody waits, so a large cost is never overtaken by later small ones.
local queued = ticket ~= '' and redis.call('ZSCORE', K_QUEUE, ticket)
local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
local turn = (head == nil) or (queued and head == ticket)
if turn and not recovering and used + cost <= capacity then
  if queued then dequeue(ticket) end
  return {'granted', epoch, now, grant(id, cost, holder), used}
end
if ticket == '' then
  return {'wait', epoch, now, redis.call('ZCARD', K_QUEUE), used}
end
if not queued then
  redis.call('ZADD', K_QUEUE, redis.call('INCR', K_SEQ), ticket)
end
redis.call('ZADD', K_ALIVE, now + tonumber(ARGV[8]), ticket)
return {'wait', epoch, now, redis.call('ZRANK', K_QUEUE, ticket), used}
"""

RENEW = """
-- ARGV[4] lease id, [5] cost, [6] holder, [7] epoch that granted the lease.
-- renewed: a = new expiry ms; lost: the lease is gone (expired and reclaimed, or lost with Redis' data).
local id, cost = ARGV[4], tonumber(ARGV[5])
if redis.call('ZSCORE', K_LEASES, id) then
  redis.call('ZADD', K_LEASES, 'XX', now + ttl_ms, id)
  return {'renewed', epoch, now, now + ttl_ms, used}
end
if ARGV[7] ~= epoch and recovering and used + cost <= capacity then
  return {'renewed', epoch, now, grant(id, cost, ARGV[6]), used}
end
return {'lost', epoch, now, 0, used}
"""

RELEASE = """
-- ARGV[4] lease id, [5] ticket to withdraw from the queue ('' none). a = 1 when tokens were freed.
if ARGV[5] ~= '' then dequeue(ARGV[5]) end
if redis.call('ZSCORE', K_LEASES, ARGV[4]) then
  drop_lease(ARGV[4])
  return {'released', epoch, now, 1, used}
end
return {'released', epoch, now, 0, used}
"""

STATE = """
-- a = used, b = {capacity, leases, waiters, recovering-until ms}.
return {'state', epoch, now, used, {capacity, redis.call('ZCARD', K_LEASES), redis.call('ZCARD', K_QUEUE),
  recovering_until}}
"""

SET_CAPACITY = """
-- ARGV[4] the new capacity. Leases already granted stay; new grants wait until they fit under it.
redis.call('SET', K_CAPACITY, ARGV[4])
return {'set', epoch, now, tonumber(ARGV[4]), used}
"""
