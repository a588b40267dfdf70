-- Close an open reservation: settle it to the cost the chain charged, or release it when the
-- operation can no longer land. Once only: a closed record is never adjusted again, so a
-- watcher that re-reads blocks after a restart cannot double-settle.
--
-- KEYS[1]   the reservation record
-- KEYS[2]   the policy's set of open reservations
-- KEYS[3..] the scopes it reserved in (as its record lists them)
-- ARGV[1]   "settle" or "release"
-- ARGV[2]   actual cost, gwei (ignored for release: 0)
-- Returns 1 if closed now, 0 if unknown or already closed.
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then
  return 0
end
local reserved = tonumber(redis.call('HGET', KEYS[1], 'cost'))
local actual = 0
if ARGV[1] == 'settle' then
  actual = tonumber(ARGV[2])
end
local delta = string.format('%d', actual - reserved)
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'cost', delta)
  redis.call('HINCRBY', KEYS[i], 'open', string.format('%d', -reserved))
  if ARGV[1] == 'release' then
    -- The operation never ran: it does not count against operation limits either.
    redis.call('HINCRBY', KEYS[i], 'ops', -1)
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1] == 'release' and 'released' or 'settled',
  'actual', string.format('%d', actual))
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
