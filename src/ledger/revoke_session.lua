-- Mark a session revoked in the ledger, where reserve.lua reads it: KEYS[1] = the session's
-- state hash, ARGV[1] = its TTL (s, the grant's end plus grace). Status and TTL in one step: two
-- commands left, on a failure between them, a key that never expires and an admin told 503
-- for a revocation that had been written.
--
-- Where the session's budget is shared, reserve.lua reads its status in that budget's hash
-- instead: KEYS[2] = the hash (of the policy's sessions that end that day), ARGV[2] = the
-- status field. Written there too, and the hash made to live at least as long as the session
-- (`until` as reserve.lua keeps it: a hash without one would be taken for new, and given the
-- TTL of the next session that reserves in it, which may end sooner).
local ttl = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'revoked')
redis.call('EXPIRE', KEYS[1], ttl)
if KEYS[2] then
  redis.call('HSET', KEYS[2], ARGV[2], 'revoked')
  local now = tonumber(redis.call('TIME')[1])
  local noted = tonumber(redis.call('HGET', KEYS[2], 'until') or '0')
  if noted < now + ttl then
    redis.call('HSET', KEYS[2], 'until', now + ttl)
  end
  -- (-1: no TTL yet, the hash new; GT would leave it so.)
  if redis.call('TTL', KEYS[2]) < ttl then
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
return 1
