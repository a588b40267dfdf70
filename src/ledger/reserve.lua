-- Reserve an operation's worst-case cost in every budget scope, atomically (DESIGN §5).
--
-- KEYS[1]   reservation record of this operation (idempotency key)
-- KEYS[2..] one hash per budget scope, fields `cost` (gwei) and `ops`
-- ARGV[1]   "1": check only (ERC-7677 stub), reserve nothing
-- ARGV[2]   cost to reserve, gwei (rounded up from wei)
-- ARGV[3]   payload to store for an idempotent repeat (the signed answer)
-- ARGV[4]   reservation record TTL, seconds
-- ARGV[5..] per scope, four values: cost limit (-1: none), ops limit (-1: none), TTL seconds, name
--
-- Returns {1, payload} when this operation was already reserved (nothing changes),
-- {2, scope, resource, limit, used, requested} when a budget would be exceeded (nothing
-- changes), {0} when reserved (or, in check-only mode, when it would fit).
-- Every key carries the same {policy} hash tag, so this runs unchanged on Redis Cluster.
local existing = redis.call('HGET', KEYS[1], 'payload')
if existing then
  return {1, existing}
end
local cost = tonumber(ARGV[2])
for i = 2, #KEYS do
  local base = 4 + (i - 2) * 4
  local cost_limit = tonumber(ARGV[base + 1])
  local ops_limit = tonumber(ARGV[base + 2])
  local used_cost = tonumber(redis.call('HGET', KEYS[i], 'cost') or '0')
  local used_ops = tonumber(redis.call('HGET', KEYS[i], 'ops') or '0')
  if cost_limit >= 0 and used_cost + cost > cost_limit then
    return {2, ARGV[base + 4], 'cost', tostring(cost_limit), tostring(used_cost), tostring(cost)}
  end
  if ops_limit >= 0 and used_ops + 1 > ops_limit then
    return {2, ARGV[base + 4], 'ops', tostring(ops_limit), tostring(used_ops), '1'}
  end
end
if ARGV[1] == '1' then
  return {0}
end
for i = 2, #KEYS do
  local base = 4 + (i - 2) * 4
  redis.call('HINCRBY', KEYS[i], 'cost', cost)
  redis.call('HINCRBY', KEYS[i], 'ops', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[base + 3])
end
redis.call('HSET', KEYS[1], 'payload', ARGV[3], 'cost', cost)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {0}
