-- List a new grant under its account. KEYS[1] = the account's index bucket (one of 65,536, by
-- keccak256 of the account): a sorted set, every score 0 so it is ordered by member, of
-- `account(20) ‖ createdAt u32 ‖ expiry u32 ‖ session id(32)`, big-endian (60 bytes: Redis
-- keeps a bucket of up to 128 of them compact). ARGV[1] = the new member, ARGV[2] = now,
-- ARGV[3] = the new grant's TTL, seconds.
-- Every member of the bucket whose grant is forgotten (its expiry passed) leaves here, whatever
-- its account: an account that never gets another grant would otherwise keep its members for
-- as long as any account of the bucket gets new ones (listings resume after a member, not at an
-- offset, so none shifts). A bucket holds about the live grants of its accounts; it lives as
-- long as its longest-lived grant.
local now = tonumber(ARGV[2])
local gone = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if #m == 60 and struct.unpack('>I4', m, 25) < now then
    gone[#gone + 1] = m
  end
  -- (ZREM takes them in slices, well under Lua's limit on unpacked arguments.)
  if #gone == 1000 then
    redis.call('ZREM', KEYS[1], unpack(gone))
    gone = {}
  end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
