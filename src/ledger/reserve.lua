-- Reserve an operation's worst-case cost in every budget scope, atomically (DESIGN §5).
--
-- KEYS[1]   reservation record of this operation (idempotency key)
-- KEYS[2]   the policy's set of open reservations (score: validUntil), for release on expiry
-- KEYS[3]   index from the op's userOpHash to its record, for settlement
-- KEYS[4..] one hash per budget scope: `cost` (gwei: open reservations at their worst case
--           plus settled ones at their actual cost), `ops`, and `open` (the open part of cost)
-- ARGV[1]   "1": check only (ERC-7677 stub), reserve nothing
-- ARGV[2]   cost to reserve, gwei (rounded up from wei), an integer string
-- ARGV[3]   payload to store for an idempotent repeat (the signed answer)
-- ARGV[4]   reservation record TTL, seconds
-- ARGV[5]   validUntil of the signature (after it, the operation can no longer land)
-- ARGV[6..] per scope, four values: cost limit (-1: none), ops limit (-1: none), TTL seconds, name
--
-- Returns {1, payload} when this operation was already reserved (nothing changes),
-- {2, scope, resource, limit, used, requested} when a budget would be exceeded (nothing
-- changes), {0} when reserved (or, in check-only mode, when it would fit).
-- Every key carries the same {policy} hash tag, so this runs unchanged on Redis Cluster.
-- Numbers stay below 2^53 (gwei), exact in Lua; they are written back with %d, never as floats.
local existing = redis.call('HGET', KEYS[1], 'payload')
if existing then
  return {1, existing}
end
local cost = tonumber(ARGV[2])
for i = 4, #KEYS do
  local base = 5 + (i - 4) * 4
  local cost_limit = tonumber(ARGV[base + 1])
  local ops_limit = tonumber(ARGV[base + 2])
  local used_cost = tonumber(redis.call('HGET', KEYS[i], 'cost') or '0')
  local used_ops = tonumber(redis.call('HGET', KEYS[i], 'ops') or '0')
  if cost_limit >= 0 and used_cost + cost > cost_limit then
    return {2, ARGV[base + 4], 'cost', string.format('%d', cost_limit), string.format('%d', used_cost), ARGV[2]}
  end
  if ops_limit >= 0 and used_ops + 1 > ops_limit then
    return {2, ARGV[base + 4], 'ops', string.format('%d', ops_limit), string.format('%d', used_ops), '1'}
  end
end
if ARGV[1] == '1' then
  return {0}
end
local scopes = {}
for i = 4, #KEYS do
  local base = 5 + (i - 4) * 4
  redis.call('HINCRBY', KEYS[i], 'cost', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'open', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'ops', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[base + 3])
  scopes[#scopes + 1] = KEYS[i]
end
redis.call('HSET', KEYS[1], 'payload', ARGV[3], 'cost', ARGV[2], 'state', 'open',
  'validUntil', ARGV[5], 'scopes', table.concat(scopes, '\n'))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], KEYS[1])
redis.call('SET', KEYS[3], KEYS[1], 'EX', ARGV[4])
return {0}
