-- Revoke a session: rewrite the status byte of its record with 'r' (codec::REVOKED), keeping its
-- TTL, but only if it exists (never create a partial record).
-- KEYS[1] = the grant's record. Returns 1 if revoked (or already), 0 if unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('SETRANGE', KEYS[1], 0, 'r')
return 1
