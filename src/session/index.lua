-- List a new grant under its account. KEYS[1] = the account's index bucket (one of 65,536, by
-- keccak256 of the account): a sorted set, every score 0 so it is ordered by member, of
-- `account(20) ‖ createdAt u32 ‖ expiry u32 ‖ session id(32)`, big-endian (60 bytes: Redis
-- keeps a bucket of up to 128 of them compact). ARGV[1] = the new member, ARGV[2] = now,
-- ARGV[3] = the new grant's TTL, seconds.
-- Members whose grant is forgotten (their expiry passed) leave here: those among the account's
-- SAMPLE oldest, and among SAMPLE members of the bucket drawn at random, whatever their account
-- (one that never gets another grant would otherwise keep its member for as long as any
-- account of the bucket gets new ones). Each grant created then removes about SAMPLE times the
-- bucket's share of ended members, so they stay a small share of it, and the work a call does
-- is bounded by SAMPLE, not by the bucket or the account. Listings resume after a member, not
-- at an offset, so none shifts. The bucket lives as long as its longest-lived grant.
local SAMPLE = 64
local account = string.sub(ARGV[1], 1, 20)
local now = tonumber(ARGV[2])
local function ended(m)
  return #m == 60 and struct.unpack('>I4', m, 25) < now
end
local gone = {}
-- (The account's oldest SAMPLE: ended grants are mostly its oldest, and an account with
-- thousands of live grants costs no more.)
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], '[' .. account, '[' .. account .. string.rep('\255', 40), 'BYLEX', 'LIMIT', 0, SAMPLE)) do
  if ended(m) then
    gone[m] = true
  end
end
for _, m in ipairs(redis.call('ZRANDMEMBER', KEYS[1], SAMPLE)) do
  if ended(m) then
    gone[m] = true
  end
end
for m in pairs(gone) do
  redis.call('ZREM', KEYS[1], m)
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
