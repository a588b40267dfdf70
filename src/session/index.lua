-- List a new grant under its account. KEYS[1] = the account's index bucket (one of 65,536, by
-- keccak256 of the account): a sorted set, every score 0 so it is ordered by member, of
-- `account(20) ‖ createdAt u32 ‖ expiry u32 ‖ session id(32)`, big-endian (60 bytes: Redis
-- keeps a bucket of up to 128 of them compact). ARGV[1] = the new member, ARGV[2] = now,
-- ARGV[3] = the new grant's TTL, seconds.
-- The account's members of expired grants leave here (only this account's: another account's
-- listing is never shifted under its cursor), so an account keeps about its live grants. The
-- bucket lives as long as its longest-lived grant.
local account = string.sub(ARGV[1], 1, 20)
local now = tonumber(ARGV[2])
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], '[' .. account, '[' .. account .. string.rep('\255', 40), 'BYLEX')) do
  if struct.unpack('>I4', m, 25) < now then
    redis.call('ZREM', KEYS[1], m)
  end
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
