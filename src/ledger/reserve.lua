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
-- ARGV[7]   refresh bound: a stored answer whose validUntil is below it is not handed out
--           again (its reservation is released and a fresh one made)
-- ARGV[8]   the userOpHash we expect on chain
-- ARGV[9]   "1" under a session
-- ARGV[10]  session state TTL, seconds
-- ARGV[11]  number of token caps T
-- ARGV[12..] per token cap, three values: field (`spent:<token>`), amount, limit (decimal)
-- then      per scope, four values: cost limit (-1: none), ops limit (-1: none), TTL, name
--
-- Returns {0} when reserved (or, in check-only mode, when it would fit);
-- {1, validUntil, validAfter, signature} when this operation was already reserved and its
-- answer is still good (or it landed): nothing changes;
-- {2, scope, resource, limit, used, requested} when a budget would be exceeded;
-- {3} when the session is revoked; {4, field, limit, spent, requested} when a token cap would
-- be exceeded. Only {0} outside check-only mode changes anything.
-- Numbers of gwei stay below 2^53, exact in Lua; they are written back with %d, never as floats.
local check_only = ARGV[1] == '1'
local existing = redis.call('HMGET', KEYS[1], 'state', 'validUntil', 'validAfter', 'sig',
  'cost', 'scopes', 'spend')
local state = existing[1]
if state == 'settled' or (state == 'open' and tonumber(existing[2]) >= tonumber(ARGV[7])) then
  -- Landed (a repeat can change nothing), or still valid long enough: the same answer.
  return {1, existing[2], existing[3], existing[4]}
end

local session = ARGV[9] == '1'
if session and redis.call('HGET', KEYS[4], 'status') == 'revoked' then
  return {3}
end

-- An open answer about to expire is replaced below: its own cost, op and spending do not
-- count against the fresh one.
local refund_cost, refund_ops, refund_spend, refund_scopes = 0, 0, {}, ''
if state == 'open' then
  refund_cost, refund_ops = tonumber(existing[5]), 1
  refund_scopes = '\n' .. (existing[6] or '') .. '\n'
  for _, entry in ipairs(lines(existing[7])) do
    local field, amount = string.match(entry, '^(%S+) (%d+)$')
    refund_spend[field] = amount
  end
end

local spend_count = tonumber(ARGV[11])
local scope_base = 12 + spend_count * 3
local cost = tonumber(ARGV[2])
for i = 5, #KEYS do
  local base = scope_base + (i - 5) * 4
  local cost_limit = tonumber(ARGV[base])
  local ops_limit = tonumber(ARGV[base + 1])
  local used = redis.call('HMGET', KEYS[i], 'cost', 'ops')
  local used_cost = tonumber(used[1] or '0')
  local used_ops = tonumber(used[2] or '0')
  if refund_ops > 0 and string.find(refund_scopes, '\n' .. KEYS[i] .. '\n', 1, true) then
    used_cost, used_ops = used_cost - refund_cost, used_ops - refund_ops
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
  local field, amount, limit = ARGV[12 + t * 3], ARGV[13 + t * 3], ARGV[14 + t * 3]
  local spent = dec_sub(redis.call('HGET', KEYS[4], field) or '0', refund_spend[field] or '0')
  local total = dec_add(spent, amount)
  if dec_cmp(total, limit) > 0 then
    return {4, field, limit, spent, amount}
  end
  totals[#totals + 1] = {field, amount, total}
end

if check_only then
  return {0}
end

if state == 'open' then
  close_record(KEYS[1], KEYS[2], 'release', 0)
end

local scopes = {}
for i = 5, #KEYS do
  local base = scope_base + (i - 5) * 4
  redis.call('HINCRBY', KEYS[i], 'cost', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'open', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'ops', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[base + 2])
  scopes[#scopes + 1] = KEYS[i]
end
if state then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'state', 'open', 'cost', ARGV[2], 'validUntil', ARGV[4],
  'validAfter', ARGV[5], 'sig', ARGV[6], 'hash', ARGV[8], 'scopes', table.concat(scopes, '\n'))
if session then
  local spend_lines = {}
  for _, t in ipairs(totals) do
    -- The total was computed above net of a replaced answer's refund, which close_record has
    -- now given back: the stored total is exactly it.
    redis.call('HSET', KEYS[4], t[1], t[3])
    spend_lines[#spend_lines + 1] = t[1] .. ' ' .. t[2]
  end
  redis.call('EXPIRE', KEYS[4], ARGV[10])
  redis.call('HSET', KEYS[1], 'session', KEYS[4], 'spend', table.concat(spend_lines, '\n'))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], KEYS[1])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {0}
