-- A policy's live grants, counted by the UTC day each ends. KEYS[1] = the policy's count, a
-- hash: `total`, the grants live; `swept`, the last day whose ended days left it; and per end
-- day (its validUntil in days) how many grants end then.
-- ARGV[1] = 'count' or 'back'; ARGV[2] = today (days); ARGV[3] = the grant's end day.
-- 'count': ARGV[4] = most live grants (0: no bound; the grant is counted all the same),
-- ARGV[5] = the hash's TTL (s). Once a day the days before today leave it (their grants have
-- ended), a walk of its fields; otherwise a few commands whatever its size. Returns {1, live}
-- when counted (live including it), {0, live} when refused.
-- 'back': the grant counted was not stored (its id taken): taken back, if its day is still
-- counted. Returns 1 if taken back.
-- (A grant revoked early counts until its end; one counted whose create then fails midway
-- counts until its end too: over, never under.)
local today = tonumber(ARGV[2])
local day = ARGV[3]
if ARGV[1] == 'back' then
  if tonumber(redis.call('HGET', KEYS[1], day) or '0') < 1 then
    return 0
  end
  redis.call('HINCRBY', KEYS[1], day, -1)
  redis.call('HINCRBY', KEYS[1], 'total', -1)
  return 1
end
if tonumber(redis.call('HGET', KEYS[1], 'swept') or '0') < today then
  local fields = redis.call('HGETALL', KEYS[1])
  local gone = 0
  for i = 1, #fields, 2 do
    local d = tonumber(fields[i])
    if d and d < today then
      gone = gone + tonumber(fields[i + 1])
      redis.call('HDEL', KEYS[1], fields[i])
    end
  end
  if gone ~= 0 then
    redis.call('HINCRBY', KEYS[1], 'total', -gone)
  end
  redis.call('HSET', KEYS[1], 'swept', today)
end
local live = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local most = tonumber(ARGV[4])
if most > 0 and live >= most then
  return {0, live}
end
redis.call('HINCRBY', KEYS[1], day, 1)
redis.call('HINCRBY', KEYS[1], 'total', 1)
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[5]) then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return {1, live + 1}
