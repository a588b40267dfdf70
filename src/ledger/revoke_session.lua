-- Mark a session revoked in the ledger, where reserve.lua reads it: KEYS[1] = the session's
-- state hash, ARGV[1] = its TTL (s, the grant's end plus grace). Status and TTL in one step: two
-- commands left, on a failure between them, a key that never expires and an admin told 503
-- for a revocation that had been written.
redis.call('HSET', KEYS[1], 'status', 'revoked')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
