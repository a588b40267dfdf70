-- Shared by reserve.lua, settle.lua and release.lua (prepended to each when loaded): uint256
-- amounts as decimal strings, key lifetimes, and closing one reservation record.
--
-- Token amounts are uint256: they do not fit Redis integers or Lua numbers, so they are kept as
-- decimal strings without leading zeros ("0" for zero) and added, subtracted and compared here.

-- The largest integer Lua numbers (doubles) hold exactly: budget counters stay below it.
local MAX_EXACT = 9007199254740991

-- How many userOpHashes a reservation extended many times keeps (the latest).
local MAX_HASHES = 8

local function dec_cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end

local function dec_trim(digits)
  local s = table.concat(digits):gsub('^0+', '')
  if s == '' then
    return '0'
  end
  return s
end

local function dec_add(a, b)
  local out, carry = {}, 0
  local i, j = #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + a:byte(i) - 48; i = i - 1 end
    if j > 0 then d = d + b:byte(j) - 48; j = j - 1 end
    table.insert(out, 1, d % 10)
    carry = math.floor(d / 10)
  end
  return dec_trim(out)
end

-- a - b, never below zero.
local function dec_sub(a, b)
  if dec_cmp(a, b) <= 0 then
    return '0'
  end
  local out, borrow = {}, 0
  local i, j = #a, #b
  while i > 0 do
    local d = a:byte(i) - 48 - borrow
    if j > 0 then d = d - (b:byte(j) - 48); j = j - 1 end
    if d < 0 then d = d + 10; borrow = 1 else borrow = 0 end
    table.insert(out, 1, d)
    i = i - 1
  end
  return dec_trim(out)
end

-- Set a key's TTL to `ttl` seconds unless it already lives longer: a key shared by several
-- records (a nonce's landing index) lives as long as the longest-lived of them.
local function extend_ttl(key, ttl)
  if redis.call('TTL', key) < tonumber(ttl) then
    redis.call('EXPIRE', key, ttl)
  end
end

local function lines(text)
  local out = {}
  for line in string.gmatch(text or '', '[^\n]+') do
    out[#out + 1] = line
  end
  return out
end

-- Close an open reservation record, once: 'settle' it to `actual` gwei (the operation ran),
-- or 'release' it (it never will: its cost, its op count and its token spending come back).
-- Every key it touches carries the record's {policy} hash tag (one Cluster slot). Returns 1
-- if closed now, 0 if unknown or already closed.
local function close_record(record, open_key, mode, actual)
  local f = redis.call('HMGET', record, 'state', 'cost', 'scopes', 'session', 'spend')
  if f[1] ~= 'open' then
    return 0
  end
  local reserved = tonumber(f[2])
  if mode ~= 'settle' then
    actual = 0
  end
  local delta = string.format('%d', actual - reserved)
  for _, scope in ipairs(lines(f[3])) do
    -- A counter whose window is over and forgotten is not brought back (with no TTL).
    if redis.call('EXISTS', scope) == 1 then
      redis.call('HINCRBY', scope, 'cost', delta)
      redis.call('HINCRBY', scope, 'open', string.format('%d', -reserved))
      if mode ~= 'settle' then
        redis.call('HINCRBY', scope, 'ops', -1)
      end
    end
  end
  if mode ~= 'settle' and f[4] and redis.call('EXISTS', f[4]) == 1 then
    for _, entry in ipairs(lines(f[5])) do
      local field, amount = string.match(entry, '^(%S+) (%d+)$')
      local spent = redis.call('HGET', f[4], field) or '0'
      redis.call('HSET', f[4], field, dec_sub(spent, amount))
    end
  end
  redis.call('HSET', record, 'state', mode == 'settle' and 'settled' or 'released',
    'actual', string.format('%d', actual))
  redis.call('ZREM', open_key, record)
  return 1
end


-- A released reservation whose operation landed after all (the release went by a block time
-- that a reorg undid, or the watcher came late): charge its cost back, once. Returns 1 if
-- charged now, 0 if the record is not released.
local function charge_back(record, actual)
  local f = redis.call('HMGET', record, 'state', 'scopes', 'session', 'spend')
  if f[1] ~= 'released' then
    return 0
  end
  for _, scope in ipairs(lines(f[2])) do
    if redis.call('EXISTS', scope) == 1 then
      redis.call('HINCRBY', scope, 'cost', string.format('%d', actual))
      redis.call('HINCRBY', scope, 'ops', 1)
    end
  end
  if f[3] and redis.call('EXISTS', f[3]) == 1 then
    for _, entry in ipairs(lines(f[4])) do
      local field, amount = string.match(entry, '^(%S+) (%d+)$')
      redis.call('HSET', f[3], field, dec_add(redis.call('HGET', f[3], field) or '0', amount))
    end
  end
  redis.call('HSET', record, 'state', 'settled', 'actual', string.format('%d', actual))
  return 1
end
