-- Settle an operation that landed (a UserOperationEvent of our paymaster), and release the
-- other reservations of its nonce, which can never land now. Loaded after lib.lua.
--
-- A nonce may have reservations under several policies (each in its own slot), so the caller
-- first asks every policy whether one of its records carries the event's userOpHash
-- ('probe'), then settles in each ('settle') knowing where the match is.
--
-- KEYS[1]   the landing index of the event's (EntryPoint, sender, nonce): the set of records
--           reserved for that nonce under this policy
-- KEYS[2]   the policy's set of open reservations
-- ARGV[1]   'probe' or 'settle'
-- ARGV[2]   the event's userOpHash
-- ARGV[3]   actual cost, gwei
-- ARGV[4]   where some policy holds the event's hash: 'open' (an open record), 'released' (only
--           a released one), or 'none'
--
-- probe: returns 1 if an open record here has the event's hash, 2 if only a released one has,
-- else 0.
-- settle, by ARGV[4]: 'open': the matching record is settled to the actual cost and every other
-- open record of the nonce released; 'released': the matching released record (its signature
-- was thought expired, yet it landed) has its cost charged back, and the open ones are
-- released; 'none' (the EntryPoint hashed the operation differently from us): every open record
-- of the nonce is settled to the actual cost, a cost counted more than once rather than
-- forgotten. Returns {settled, released, charged back}. Closed records are skipped: reading an
-- event twice changes nothing.
local open, match, released_match = {}, nil, nil
for _, record in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', record, 'state', 'hash')
  -- `hash` lists the userOpHash of every answer the record was extended to.
  local matches = false
  for _, hash in ipairs(lines(f[2])) do
    if hash == ARGV[2] then
      matches = true
    end
  end
  if f[1] == 'open' then
    open[#open + 1] = record
    if matches then
      match = record
    end
  elseif f[1] == 'released' and matches then
    released_match = record
  end
end
if ARGV[1] == 'probe' then
  if match then
    return 1
  end
  return released_match and 2 or 0
end
local actual = tonumber(ARGV[3])
local settled, released, charged = 0, 0, 0
if ARGV[4] == 'released' and released_match then
  charged = charge_back(released_match, actual)
end
for _, record in ipairs(open) do
  if ARGV[4] == 'none' or record == match then
    settled = settled + close_record(record, KEYS[2], 'settle', actual)
  else
    released = released + close_record(record, KEYS[2], 'release', 0)
  end
end
return {settled, released, charged}
