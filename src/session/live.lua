-- Count a new grant among its policy's live ones, unless that makes more than the policy
-- allows. KEYS[1] = the policy's count: a hash of the UTC day a grant ends (its validUntil,
-- in days) to how many grants end that day. ARGV[1] = today (days), ARGV[2] = the new grant's
-- day, ARGV[3] = most live grants (0: no bound, the grant is counted all the same), ARGV[4] =
-- the hash's TTL (s). Days before today leave it (their grants have ended). Returns
-- {1, live} when counted (live including it), {0, live} when refused.
-- (A grant revoked early counts until its end; a grant counted whose create then fails is
-- counted until its end too, unless the caller takes it back: over, never under.)
local today = tonumber(ARGV[1])
local live = 0
local days = redis.call('HGETALL', KEYS[1])
for i = 1, #days, 2 do
  if tonumber(days[i]) < today then
    redis.call('HDEL', KEYS[1], days[i])
  else
    live = live + tonumber(days[i + 1])
  end
end
local most = tonumber(ARGV[3])
if most > 0 and live >= most then
  return {0, live}
end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {1, live + 1}
