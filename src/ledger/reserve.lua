-- Reserve an operation's worst-case cost in every budget scope, atomically (DESIGN §1, §5).
-- Loaded after lib.lua.
--
-- KEYS[1]   reservation record of this operation (idempotency key)
-- KEYS[2]   the policy's set of open reservations (score: validUntil), for release on expiry
-- KEYS[3]   the landing index of the operation's (EntryPoint, sender, nonce): a set of the
--           records reserved for that nonce, for settlement
-- KEYS[4]   the session's state (hash: `status`, `spent:<token>` decimal totals), or, without
--           a session, KEYS[1] again (unused)
-- KEYS[5..] one hash per budget scope: `cost` (gwei: open reservations at their worst case
--           plus settled ones at their actual cost), `ops`, and `open` (the open part of cost)
-- ARGV[1]   "1": check only (ERC-7677 stub), reserve nothing
-- ARGV[2]   cost to reserve, gwei (rounded up from wei), an integer string
-- ARGV[3]   reservation record TTL, seconds
-- ARGV[4]   validUntil of the signature (after it, the operation can no longer land)
-- ARGV[5]   validAfter of the signature
-- ARGV[6]   the signature (65 raw bytes): with the window, the answer a repeat gets
-- ARGV[7]   refresh bound: a stored answer whose validUntil is below it (and below the fresh
--           one's) is not handed out again; the reservation is extended to the fresh answer
-- ARGV[8]   the userOpHash we expect on chain
-- ARGV[9]   "1" under a session
-- ARGV[10]  session state TTL, seconds
-- ARGV[11]  most open reservations one (EntryPoint, sender, nonce) may have under one session
-- ARGV[12]  trim bound: open-set entries whose validUntil is below it are gone (their records
--           expired an hour after it) and are dropped, so the set stays bounded without a
--           watcher
-- ARGV[13]  number of token caps T
-- ARGV[14..] per token cap, three values: field (`spent:<token>`), amount, limit (decimal)
-- then      per scope, four values: cost limit (-1: none), ops limit (-1: none), TTL, name
--
-- Returns {0} when reserved (or, in check-only mode, when it would fit);
-- {1, validUntil, validAfter, signature} when this operation was already reserved and its
-- answer is still good (or it landed): nothing changes;
-- {2, scope, resource, limit, used, requested} when a budget would be exceeded;
-- {3} when the session is revoked; {4, field, limit, spent, requested} when a token cap would
-- be exceeded; {5, open} when the nonce already has that many open reservations under the
-- session.
-- Only {0} outside check-only mode changes anything.
-- Numbers of gwei stay below 2^53 (MAX_EXACT: larger is refused like an exhausted budget),
-- exact in Lua; they are written back with %d, never as floats.
local check_only = ARGV[1] == '1'
local existing = redis.call('HMGET', KEYS[1], 'state', 'validUntil', 'validAfter', 'sig')
local state = existing[1]
local stored_until = tonumber(existing[2] or '0')
if state == 'settled' or (state == 'open' and (stored_until >= tonumber(ARGV[7])
    or stored_until >= tonumber(ARGV[4]))) then
  -- Landed (a repeat can change nothing), still valid long enough, or valid longer than a
  -- fresh answer would be: the same answer.
  return {1, existing[2], existing[3], existing[4]}
end

local session = ARGV[9] == '1'
if session and redis.call('HGET', KEYS[4], 'status') == 'revoked' then
  return {3}
end

local scope_list = {}
for i = 5, #KEYS do
  scope_list[#scope_list + 1] = KEYS[i]
end
scope_list = table.concat(scope_list, '\n')
local session_key = session and KEYS[4] or false

if state == 'open' then
  local mine = redis.call('HMGET', KEYS[1], 'scopes', 'session', 'hash')
  if mine[1] == scope_list and mine[2] == session_key then
    -- The stored answer is about to expire: extend this reservation to a fresh one. Both
    -- signatures stay valid for a while, but they are for one operation and one nonce, so one
    -- charge covers both; it is released only once the later has expired, and the event of
    -- either settles it (the record keeps the latest MAX_HASHES hashes; an event matching none
    -- settles every open reservation of its nonce, so a dropped hash over-counts, never under).
    if check_only then
      return {0}
    end
    local hashes = lines(mine[3])
    hashes[#hashes + 1] = ARGV[8]
    while #hashes > MAX_HASHES do
      table.remove(hashes, 1)
    end
    redis.call('HSET', KEYS[1], 'validUntil', ARGV[4], 'validAfter', ARGV[5], 'sig', ARGV[6],
      'hash', table.concat(hashes, '\n'))
    redis.call('ZADD', KEYS[2], ARGV[4], KEYS[1])
    extend_ttl(KEYS[1], ARGV[3])
    extend_ttl(KEYS[3], ARGV[3])
    return {0}
  end
  -- Another budget window or another session than the reservation was made in: it stays as it
  -- is (its signature may still land) under a key of its own, and this request is a new
  -- reservation, checked and charged where it is made now.
  if not check_only then
    local kept = KEYS[1] .. ':' .. existing[2]
    redis.call('RENAME', KEYS[1], kept)
    redis.call('ZREM', KEYS[2], KEYS[1])
    redis.call('ZADD', KEYS[2], existing[2], kept)
    redis.call('SREM', KEYS[3], KEYS[1])
    redis.call('SADD', KEYS[3], kept)
  end
end

-- Only one reservation of a nonce can land: under a session (whose proof a stranger may have
-- seen), more open ones of that session only hold its budget. Entries whose record is gone are
-- pruned here (released ones stay: a late event may still charge them back).
local open = 0
for _, record in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local f = redis.call('HMGET', record, 'state', 'session')
  if f[1] == 'open' then
    if session and record ~= KEYS[1] and f[2] == KEYS[4] then
      open = open + 1
    end
  elseif not f[1] then
    redis.call('SREM', KEYS[3], record)
  end
end
if open >= tonumber(ARGV[11]) then
  return {5, string.format('%d', open)}
end

local spend_count = tonumber(ARGV[13])
local scope_base = 14 + spend_count * 3
local cost = tonumber(ARGV[2])
for i = 5, #KEYS do
  local base = scope_base + (i - 5) * 4
  local cost_limit = tonumber(ARGV[base])
  local ops_limit = tonumber(ARGV[base + 1])
  local used = redis.call('HMGET', KEYS[i], 'cost', 'ops')
  local used_cost = tonumber(used[1] or '0')
  local used_ops = tonumber(used[2] or '0')
  -- Counters stay exact integers in Lua (below 2^53), whatever the limits.
  if used_cost + cost > MAX_EXACT then
    return {2, ARGV[base + 3], 'cost', string.format('%d', MAX_EXACT), string.format('%d', used_cost), ARGV[2]}
  end
  if cost_limit >= 0 and used_cost + cost > cost_limit then
    return {2, ARGV[base + 3], 'cost', string.format('%d', cost_limit), string.format('%d', used_cost), ARGV[2]}
  end
  if ops_limit >= 0 and used_ops + 1 > ops_limit then
    return {2, ARGV[base + 3], 'ops', string.format('%d', ops_limit), string.format('%d', used_ops), '1'}
  end
end

local totals = {}
for t = 0, spend_count - 1 do
  local field, amount, limit = ARGV[14 + t * 3], ARGV[15 + t * 3], ARGV[16 + t * 3]
  local spent = redis.call('HGET', KEYS[4], field) or '0'
  local total = dec_add(spent, amount)
  if dec_cmp(total, limit) > 0 then
    return {4, field, limit, spent, amount}
  end
  totals[#totals + 1] = {field, amount, total}
end

if check_only then
  return {0}
end

for i = 5, #KEYS do
  local base = scope_base + (i - 5) * 4
  redis.call('HINCRBY', KEYS[i], 'cost', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'open', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'ops', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[base + 2])
end
if state == 'released' then
  -- A released record (its signature expired unused): this is a new reservation.
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'state', 'open', 'cost', ARGV[2], 'validUntil', ARGV[4],
  'validAfter', ARGV[5], 'sig', ARGV[6], 'hash', ARGV[8], 'scopes', scope_list)
if session then
  local spend_lines = {}
  for _, t in ipairs(totals) do
    redis.call('HSET', KEYS[4], t[1], t[3])
    spend_lines[#spend_lines + 1] = t[1] .. ' ' .. t[2]
  end
  redis.call('EXPIRE', KEYS[4], ARGV[10])
  redis.call('HSET', KEYS[1], 'session', KEYS[4], 'spend', table.concat(spend_lines, '\n'))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[12])
redis.call('SADD', KEYS[3], KEYS[1])
extend_ttl(KEYS[3], ARGV[3])
return {0}
