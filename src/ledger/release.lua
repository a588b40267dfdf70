-- Release one open reservation whose signature has expired unused (a confirmed block is past
-- its validUntil). Loaded after lib.lua.
-- KEYS[1] the record, KEYS[2] the policy's set of open reservations.
-- ARGV[1] the confirmed block's time: the record is released only if its validUntil is still
--         before it (a repeat may have extended it since the caller listed it).
-- Returns 1 if released now, 0 otherwise (an unknown or closed record leaves the set).
local state, valid_until = unpack(redis.call('HMGET', KEYS[1], 'state', 'validUntil'))
if state ~= 'open' then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 0
end
if tonumber(valid_until) >= tonumber(ARGV[1]) then
  return 0
end
return close_record(KEYS[1], KEYS[2], 'release', 0)
