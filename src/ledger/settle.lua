-- Settle an operation that landed (a UserOperationEvent of our paymaster), and release the
-- other reservations of its nonce, which can never land now. Loaded after lib.lua.
--
-- A nonce may have reservations under several policies (each in its own slot), so the caller
-- first asks every policy whether one of its records carries the event's userOpHash
-- ('probe'), then settles in each ('settle') knowing whether any did.
--
-- KEYS[1]   the landing index of the event's (EntryPoint, sender, nonce): the set of records
--           reserved for that nonce under this policy
-- KEYS[2]   the policy's set of open reservations
-- ARGV[1]   'probe' or 'settle'
-- ARGV[2]   the event's userOpHash
-- ARGV[3]   actual cost, gwei
-- ARGV[4]   '1' when some policy holds a record with the event's hash
--
-- probe: returns 1 if an open record here has the event's hash, else 0.
-- settle: with a match somewhere, the matching record is settled to the actual cost and every
-- other open record of the nonce released; with none (the EntryPoint hashed the operation
-- differently from us), every open record of the nonce is settled to the actual cost: a cost
-- is counted more than once rather than forgotten. Returns {settled, released}. Closed records
-- are skipped: reading an event twice changes nothing.
local open, match = {}, nil
for _, record in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', record, 'state', 'hash')
  if f[1] == 'open' then
    open[#open + 1] = record
    -- `hash` lists the userOpHash of every answer the record was extended to.
    for _, hash in ipairs(lines(f[2])) do
      if hash == ARGV[2] then
        match = record
      end
    end
  end
end
if ARGV[1] == 'probe' then
  return match and 1 or 0
end
local actual = tonumber(ARGV[3])
local matched_anywhere = ARGV[4] == '1'
local settled, released = 0, 0
for _, record in ipairs(open) do
  if record == match or not matched_anywhere then
    settled = settled + close_record(record, KEYS[2], 'settle', actual)
  else
    released = released + close_record(record, KEYS[2], 'release', 0)
  end
end
return {settled, released}
