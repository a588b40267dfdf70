-- Record token spending under a session: compare-and-set of every total it changes, so two
-- concurrent sponsorships can never both spend the same remainder. Amounts are decimal
-- strings (uint256 does not fit Redis integers); the caller computed them from the totals it read.
-- KEYS[1] = the session hash; ARGV = field, before, after, field, before, after, ...
-- Returns 1 if recorded, 0 if a total changed since it was read (or the session is gone).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i]) or '0'
  if current ~= ARGV[i + 1] then
    return 0
  end
end
for i = 1, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
end
return 1
