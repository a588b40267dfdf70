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
-- probe: returns {1 if an open record here has the event's hash (or a settled one: the event
-- read before), 2 if only a released one has, else 0; how many records of the nonce are here}.
-- settle, by ARGV[4]: 'open': the matching record is settled to the actual cost and every other
-- open record of the nonce released; 'released': the matching released record (its signature
-- was thought expired, yet it landed) has its cost charged back, and the open ones are
-- released (also under 'open', for a match released since the probe); 'none' (the EntryPoint
-- hashed the operation differently from us): every open record of the nonce is settled to the
-- actual cost, a cost counted more than once rather than forgotten. Returns {settled,
-- released, charged back, ambiguous}. Closed records are skipped: reading an event again
-- charges nothing again (below).
--
-- Records keep only the first 8 bytes of each hash (lib.lua). On EntryPoint v0.9 the hash of an
-- operation whose signature of ours sits in the suffix leaves that signature out, so a client
-- can compute it before asking us to sign, and grind two operations of one nonce whose prefixes
-- agree (about 2^32 hashes each): a harmless one reserved first, and one that spends (under a
-- session with token caps, or charged to a session's budget). Were the first match settled,
-- the harmless one would be charged at the landed one's cost and the one that landed released:
-- its session's spending and budget given back. So the matches are taken per operation (their
-- ids' first 20 bytes: a record kept aside adds its window; one charge covers an operation):
-- each operation's first open match is settled at the actual cost (its other records
-- released), and each operation with no open match has its first released match charged back
-- (unless 'none'); where they are of more than one operation, `ambiguous` is 1. A cost is
-- counted twice, never forgotten. (The memory ledger keeps full hashes, which name one
-- operation, and takes them the same way.)
local entries = load_nonce(KEYS[1])
-- The open records; the open and the released ones whose hashes include the event's (a record
-- keeps the userOpHash of every answer it was extended to); the operations of the settled ones
-- that do (this event, read before: after a rewind, or by two watchers over one range).
local open, open_matches, released_matches = {}, {}, {}
local landed, read_before = {}, false
-- The first record of each operation in `list`, in order.
local function first_of_each(list)
  local seen, firsts = {}, {}
  for _, e in ipairs(list) do
    local op = string.sub(e[1], 1, 20)
    if not seen[op] then
      seen[op] = true
      firsts[#firsts + 1] = e
    end
  end
  return firsts
end
for _, e in ipairs(entries) do
  if e[2].state == OPEN then
    open[#open + 1] = e
    if has_hash(e[2], ARGV[2]) then
      open_matches[#open_matches + 1] = e
    end
  elseif e[2].state == RELEASED and has_hash(e[2], ARGV[2]) then
    released_matches[#released_matches + 1] = e
  elseif e[2].state == SETTLED and has_hash(e[2], ARGV[2]) then
    landed[string.sub(e[1], 1, 20)], read_before = true, true
  end
end
-- An operation with a settled record carrying the hash was charged when the event was read
-- before: its other records are not matches (they are released with the rest). Where no
-- other operation's record matches, the event was read before whole, and every record of the
-- nonce open then was closed then: one open now was made since (anyone may ask for an
-- operation of a nonce that has landed), cannot land, and is released; nothing is settled or
-- charged back again. (Taken for no match, it would have settled every such record at the
-- event's cost: a stranger's request for a sender's landed nonce, charged to that sender for
-- good.) Where another operation's record matches (in Redis, 8 bytes ground to agree, and a
-- reorganisation that landed it in place of the one settled), the matches go on as below.
if read_before then
  local function not_landed(list)
    local kept = {}
    for _, e in ipairs(list) do
      if not landed[string.sub(e[1], 1, 20)] then
        kept[#kept + 1] = e
      end
    end
    return kept
  end
  open_matches, released_matches = not_landed(open_matches), not_landed(released_matches)
  read_before = #open_matches == 0 and #released_matches == 0
end
if ARGV[1] == 'probe' then
  local found = 0
  if #open_matches > 0 or read_before then
    found = 1
  elseif #released_matches > 0 then
    found = 2
  end
  return {found, #entries}
end
local actual = tonumber(ARGV[3])
local settled, released, charged = 0, 0, 0
local ambiguous = 0
-- Each operation's first open match, settled; each other operation's first released match
-- (one whose op has no open match: landed after all), charged back, also when the probe saw it
-- open (another replica's watcher released it since).
local settle, has_open = {}, {}
local firsts = first_of_each(open_matches)
for _, e in ipairs(firsts) do
  settle[e], has_open[string.sub(e[1], 1, 20)] = true, true
end
local back = {}
if ARGV[4] ~= 'none' then
  for _, e in ipairs(first_of_each(released_matches)) do
    if not has_open[string.sub(e[1], 1, 20)] then
      back[#back + 1] = e
    end
  end
end
if #firsts + #back > 1 then
  ambiguous = 1
end
local returns = {}
for _, e in ipairs(back) do
  charged = charged + charge_back(KEYS[1], e[2], actual)
end
for _, e in ipairs(open) do
  if ARGV[4] == 'none' or settle[e] then
    settled = settled + close_record(KEYS[1], e[2], 'settle', actual, returns)
  else
    released = released + close_record(KEYS[1], e[2], 'release', 0, returns)
  end
end
if settled + released + charged > 0 then
  save_nonce(KEYS[1], entries)
end
give_back(returns)
return {settled, released, charged, ambiguous}
