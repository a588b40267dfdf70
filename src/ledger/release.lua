-- Release one open reservation whose signature has expired unused (a confirmed block is past
-- its validUntil). Loaded after lib.lua.
-- KEYS[1] the record, KEYS[2] the policy's set of open reservations.
-- Returns 1 if released now, 0 if unknown or already closed (and drops it from the set).
local closed = close_record(KEYS[1], KEYS[2], 'release', 0)
if closed == 0 then
  redis.call('ZREM', KEYS[2], KEYS[1])
end
return closed
