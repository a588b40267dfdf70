-- Reserve an operation's worst-case cost in every budget scope, atomically (DESIGN §1, §5).
-- Loaded after lib.lua (which describes the packed record).
--
-- KEYS[1]   the key of the operation's (EntryPoint, sender, nonce): its reservation records
--           (see lib.lua); settlement finds them here
-- KEYS[2]   the policy's expiry index: a sorted set of expiry buckets (10 s of validUntil each)
-- KEYS[3]   the expiry bucket of this signature's validUntil: a string of 20-byte nonce ids
-- KEYS[4]   the session's state (hash: `status`, `spent:<token>` decimal totals), or, without
--           a session, KEYS[1] again (unused)
-- KEYS[5..] one hash per budget scope (`sp:{P}:budget:<name>`): `cost` (gwei: open
--           reservations at their worst case plus settled ones at their actual cost), `ops`, and
--           `open` (the open part of cost)
-- ARGV[1]   the operation's idempotency id (20 bytes)
-- ARGV[2]   "1": check only (ERC-7677 stub), reserve nothing
-- ARGV[3]   cost to reserve, gwei (rounded up from wei), an integer string
-- ARGV[4]   TTL of the nonce's key: this record's expiry (validUntil plus grace), seconds
-- ARGV[5]   validUntil of the signature (after it, the operation can no longer land)
-- ARGV[6]   validAfter of the signature
-- ARGV[7]   the signature (65 bytes): with the window, the answer a repeat gets
-- ARGV[8]   refresh bound: a stored answer whose validUntil is below it (and below the fresh
--           one's) is not handed out again; the reservation is extended to the fresh answer
-- ARGV[9]   the userOpHashes the answer may land with, 8 bytes (their first) each: one, or on
--           EntryPoint v0.9 two (the signature inline or in the suffix)
-- ARGV[10]  "1" under a session
-- ARGV[11]  session state TTL, seconds
-- ARGV[12]  most open reservations one nonce may have under one session
-- ARGV[13]  the nonce's 20-byte id (what the expiry bucket lists)
-- ARGV[14]  this signature's expiry bucket number
-- ARGV[15]  TTL of the expiry bucket, seconds
-- ARGV[16]  trim bound: expiry buckets below it are gone (their records expired) and leave
--           the index, so it stays bounded without a watcher
-- ARGV[17]  expiry bound: records whose validUntil is below it have outlived their grace and
--           are dropped from the nonce's key (as the memory ledger forgets them)
-- ARGV[18]  most open reservations one nonce may have, whatever the session
-- ARGV[19]  the new open record, packed by the service as pack_record would pack it (lib.lua)
-- ARGV[20]  number of token caps T
-- ARGV[21..] per token cap, three values: field (`spent:<token>`), amount, limit (decimal)
-- then      per scope, four values: cost limit (-1: none), ops limit (-1: none), TTL, name
--
-- The common case, a new operation of a new nonce, runs few commands: GET, per scope HMGET,
-- HSET and EXPIRE, then SET and APPEND (the bucket's TTL and index entry are written by the
-- reservation that creates the bucket, once per 10 s per policy).
--
-- Returns {0} when reserved (or, in check-only mode, when it would fit);
-- {1, validUntil, validAfter, signature} when this operation was already reserved and its
-- answer is still good (or it landed): nothing changes;
-- {2, scope, resource, limit, used, requested} when a budget would be exceeded;
-- {3} when the session is revoked; {4, field, limit, spent, requested} when a token cap would
-- be exceeded; {5, open} when the nonce already has that many open reservations (under the
-- session, or at all). Only {0} outside check-only mode changes anything.
-- Numbers of gwei stay below 2^53 (MAX_EXACT: larger is refused like an exhausted budget),
-- exact in Lua; they are written back with %d, never as floats.
local check_only = ARGV[2] == '1'
local valid_until = tonumber(ARGV[5])
-- Records past their grace are forgotten (any still open was never released: its charge stays,
-- counted over rather than under), so a nonce's key holds only live ones.
local stored = load_nonce(KEYS[1])
local fresh_key = #stored == 0
local entries = {}
for _, e in ipairs(stored) do
  if e[2].valid_until >= tonumber(ARGV[17]) then
    entries[#entries + 1] = e
  end
end
local mine, rec = nil, nil
local listed = false
for i, e in ipairs(entries) do
  if e[1] == ARGV[1] then
    mine, rec = i, e[2]
  end
  -- The nonce is already listed in this signature's expiry bucket (and, with an open record
  -- there, the bucket cannot have been dropped).
  if e[2].state == OPEN and math.floor(e[2].valid_until / BUCKET_SECS) == tonumber(ARGV[14]) then
    listed = true
  end
end
if rec and (rec.state == SETTLED or (rec.state == OPEN and (rec.valid_until >= tonumber(ARGV[8])
    or rec.valid_until >= valid_until))) then
  -- Landed (a repeat can change nothing), still valid long enough, or valid longer than a
  -- fresh answer would be: the same answer.
  return {1, string.format('%d', rec.valid_until), string.format('%d', rec.valid_after), rec.sig}
end

local session = ARGV[10] == '1'
if session and redis.call('HGET', KEYS[4], 'status') == 'revoked' then
  return {3}
end

local budget_prefix = policy_prefix(KEYS[1]) .. 'budget:'
local scope_names = {}
for i = 5, #KEYS do
  scope_names[#scope_names + 1] = string.sub(KEYS[i], #budget_prefix + 1)
end
local session_key = session and KEYS[4] or nil

-- Write the nonce's records; its expiry bucket lists it, the bucket is indexed, all live
-- long enough. A bucket's TTL is the same for every record in it (its end plus grace), so the
-- reservation that creates it sets it and indexes it (and trims the index); release.lua deletes
-- a bucket and its index entry together, so an existing bucket is always indexed.
local function schedule()
  if fresh_key then
    redis.call('SET', KEYS[1], entry(ARGV[1], ARGV[19]), 'EX', ARGV[4])
  else
    save_nonce(KEYS[1], entries)
    extend_ttl(KEYS[1], ARGV[4])
  end
  if not listed and redis.call('APPEND', KEYS[3], ARGV[13]) == #ARGV[13] then
    redis.call('EXPIRE', KEYS[3], ARGV[15])
    redis.call('ZADD', KEYS[2], ARGV[14], ARGV[14])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[16])
  end
end

if rec and rec.state == OPEN then
  if table.concat(rec.scopes, '\n') == table.concat(scope_names, '\n') and rec.session == session_key then
    -- The stored answer is about to expire: extend this reservation to a fresh one. Both
    -- signatures stay valid for a while, but they are for one operation and one nonce, so one
    -- charge covers both; it is released only once the later has expired, and the event of
    -- either settles it (the record keeps the latest MAX_HASHES hashes; an event matching none
    -- settles every open reservation of its nonce, so a dropped hash over-counts, never under).
    if check_only then
      return {0}
    end
    for i = 1, #ARGV[9], 8 do
      rec.hashes[#rec.hashes + 1] = string.sub(ARGV[9], i, i + 7)
    end
    while #rec.hashes > MAX_HASHES do
      table.remove(rec.hashes, 1)
    end
    rec.valid_until, rec.valid_after, rec.sig = valid_until, tonumber(ARGV[6]), ARGV[7]
    schedule()
    return {0}
  end
  -- Another budget window or another session than the reservation was made in: it stays as it
  -- is (its signature may still land) under a field of its own, and this request is a new
  -- reservation, checked and charged where it is made now.
  if not check_only then
    entries[mine][1] = ARGV[1] .. struct.pack('>I6', rec.valid_until)
    mine = nil
  end
end

-- Only one reservation of a nonce can land: more open ones only hold budget (under a session
-- whose proof a stranger may have seen, its budget), and make the nonce's key longer.
local open, open_mine = 0, 0
for _, e in ipairs(entries) do
  if e[1] ~= ARGV[1] and e[2].state == OPEN then
    open = open + 1
    if session and e[2].session == KEYS[4] then
      open_mine = open_mine + 1
    end
  end
end
if open >= tonumber(ARGV[18]) then
  return {5, string.format('%d', open)}
end
if session and open_mine >= tonumber(ARGV[12]) then
  return {5, string.format('%d', open_mine)}
end

local spend_count = tonumber(ARGV[20])
local scope_base = 21 + spend_count * 3
local cost = tonumber(ARGV[3])
local counters = {}
for i = 5, #KEYS do
  local base = scope_base + (i - 5) * 4
  local cost_limit = tonumber(ARGV[base])
  local ops_limit = tonumber(ARGV[base + 1])
  local used = redis.call('HMGET', KEYS[i], 'cost', 'ops', 'open')
  local used_cost = tonumber(used[1] or '0')
  local used_ops = tonumber(used[2] or '0')
  counters[i] = {used_cost, used_ops, tonumber(used[3] or '0'), used[1] == false and used[2] == false}
  -- Counters stay exact integers in Lua (below 2^53), whatever the limits.
  if used_cost + cost > MAX_EXACT then
    return {2, ARGV[base + 3], 'cost', string.format('%d', MAX_EXACT), string.format('%d', used_cost), ARGV[3]}
  end
  if cost_limit >= 0 and used_cost + cost > cost_limit then
    return {2, ARGV[base + 3], 'cost', string.format('%d', cost_limit), string.format('%d', used_cost), ARGV[3]}
  end
  if ops_limit >= 0 and used_ops + 1 > ops_limit then
    return {2, ARGV[base + 3], 'ops', string.format('%d', ops_limit), string.format('%d', used_ops), '1'}
  end
end

local totals = {}
for t = 0, spend_count - 1 do
  local field, amount, limit = ARGV[21 + t * 3], ARGV[22 + t * 3], ARGV[23 + t * 3]
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
  local c = counters[i]
  redis.call('HSET', KEYS[i], 'cost', string.format('%d', c[1] + cost),
    'ops', string.format('%d', c[2] + 1), 'open', string.format('%d', c[3] + cost))
  -- A new counter gets its TTL; an existing one keeps the longer of its own and this one (a
  -- window's end is not in its name alone: a policy republished with another period may name
  -- the same counter with a later end).
  if c[4] then
    redis.call('EXPIRE', KEYS[i], ARGV[base + 2])
  else
    redis.call('EXPIRE', KEYS[i], ARGV[base + 2], 'GT')
  end
end
if session then
  for _, t in ipairs(totals) do
    redis.call('HSET', KEYS[4], t[1], t[3])
  end
  redis.call('EXPIRE', KEYS[4], ARGV[11])
end
-- The new record is ARGV[19], packed by the service; save_nonce writes it as it is.
local record = {packed = ARGV[19]}
if mine then
  -- A released record of this operation (its signature expired unused): replaced.
  entries[mine][2] = record
else
  entries[#entries + 1] = {ARGV[1], record}
end
schedule()
return {0}
