-- Revoke a session of the layout before 0.2 (a hash): set its status, but only if it exists.
-- KEYS[1] = the session hash. Returns 1 if revoked (or already), 0 if unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'revoked')
return 1
