-- Settle an operation that landed (a UserOperationEvent of our paymaster), and release the
-- other reservations of its nonce, which can never land now. Loaded after lib.lua.
--
-- A nonce may have reservations under several policies (each in its own slot), so the caller
-- first asks every policy whether one of its records carries the event's userOpHash
-- ('probe'), then settles in each ('settle') knowing where the match is.
--
-- KEYS[1]   the key of the event's (EntryPoint, sender, nonce) under this policy: its
--           reservation records (see lib.lua)
-- ARGV[1]   'probe' or 'settle'
-- ARGV[2]   the event's userOpHash (its first 8 bytes)
-- ARGV[3]   actual cost, gwei
-- ARGV[4]   where some policy holds the event's hash: 'open' (an open record), 'released' (only
--           a released one), or 'none'
--
-- probe: returns {1 if an open record here has the event's hash, 2 if only a released one has,
-- else 0; how many records of the nonce are here}.
-- settle, by ARGV[4]: 'open': the matching record is settled to the actual cost and every other
-- open record of the nonce released; 'released': the matching released record (its signature
-- was thought expired, yet it landed) has its cost charged back, and the open ones are
-- released (also under 'open', for a match released since the probe); 'none' (the EntryPoint hashed the operation differently from us): every open record
-- of the nonce is settled to the actual cost, a cost counted more than once rather than
-- forgotten. Returns {settled, released, charged back}. Closed records are skipped: reading an
-- event twice changes nothing.
local entries = load_nonce(KEYS[1])
local open, match, released_match = {}, nil, nil
for _, e in ipairs(entries) do
  -- A record keeps the userOpHash of every answer it was extended to.
  local matches = has_hash(e[2], ARGV[2])
  if e[2].state == OPEN then
    open[#open + 1] = e
    if matches and not match then
      match = e
    end
  elseif e[2].state == RELEASED and matches and not released_match then
    released_match = e
  end
end
if ARGV[1] == 'probe' then
  local found = 0
  if match then
    found = 1
  elseif released_match then
    found = 2
  end
  return {found, #entries}
end
local actual = tonumber(ARGV[3])
local settled, released, charged = 0, 0, 0
local returns = {}
-- A released record with the event's hash landed after all: charged back, also when the probe
-- saw it open (another replica's watcher released it since).
if released_match and not match and ARGV[4] ~= 'none' then
  charged = charge_back(KEYS[1], released_match[2], actual)
end
for _, e in ipairs(open) do
  if ARGV[4] == 'none' or e == match then
    settled = settled + close_record(KEYS[1], e[2], 'settle', actual, returns)
  else
    released = released + close_record(KEYS[1], e[2], 'release', 0, returns)
  end
end
if settled + released + charged > 0 then
  save_nonce(KEYS[1], entries)
end
give_back(returns)
return {settled, released, charged}
