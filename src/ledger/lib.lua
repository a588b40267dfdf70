-- The head of the ledger's library of Redis Functions (ledger::redis::library), run once when
-- the library loads, before the three functions reserve.lua, settle.lua and release.lua (each
-- script's text the body of one): uint256 amounts as decimal strings, key lifetimes, the
-- packed reservation record, and closing one, which they share; reserve.lua's formats and
-- writes, made here so that they are made once.
--
-- Token amounts are uint256: they do not fit Redis integers or Lua numbers, so they are kept as
-- decimal strings without leading zeros ("0" for zero) and added, subtracted and compared here.

-- The largest integer Lua numbers (doubles) hold exactly: budget counters stay below it.
local MAX_EXACT = 9007199254740991
-- A limit of none, as the service sends it (2^64 - 1, which a Lua number holds as 2^64).
local NO_LIMIT = 18446744073709551615

-- How many userOpHashes one reservation keeps (ledger::MAX_HASHES): an answer that would pass it
-- is a new reservation, the old one kept aside (reserve.lua).
local MAX_HASHES = 8

-- Most live records one nonce's key holds, whatever their state (ledger::MAX_RECORDS_PER_NONCE):
-- released and landed ones stay until their grace ends, and every call on the nonce reads them
-- all.
local MAX_RECORDS = 64

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
-- records (a nonce's hash, an expiry bucket) lives as long as the longest-lived of them.
local function extend_ttl(key, ttl)
  if redis.call('TTL', key) < tonumber(ttl) then
    redis.call('EXPIRE', key, ttl)
  end
end

-- The reservations of one (EntryPoint, sender, nonce) live in one string key,
-- `sp:{P}:n:<20-byte landing id>`: a sequence of entries `id length u8 ‖ id ‖ record length u16
-- ‖ record`, the id being the operation's 20-byte idempotency id (26 bytes for a reservation
-- kept aside, see reserve.lua). A string, not a hash: records are longer than a hash keeps
-- compact, and most nonces have one. A record is packed (big-endian):
--   state u8 (0 open, 1 settled, 2 released), cost u64 (gwei), validUntil u48,
--   validUntil − validAfter u32, signature [65], n u8 + n userOpHash prefixes [8] (of every
--   answer it was extended to, at most MAX_HASHES: reserve.lua keeps a record aside rather
--   than drop one; 64 bits tell a nonce's few reservations apart, settle.lua),
--   n u8 + n scope names (u8 length + bytes; the budget key is `sp:{P}:budget:<name>`),
--   session u8: NO_SESSION (0), or under a session SESSION_BY_ID (2): the session's 32-byte
--   id, its state key being `sp:{P}:session:0x<id>` of the nonce key's policy, and a scope name
--   of the one byte SESSION_SCOPE standing for `session:0x<id>` (its budget, where its grant
--   keeps it in a key of its own: a budget shared in its end day's hash is named in full,
--   `s:0x<20 bytes>:d<day>`, see counter_of); or
--   SESSION_BY_KEY (1, as 0.3.0 wrote every record, and 0.3.1 does until the operator says
--   no 0.3.0 replica runs, and while a library of 0.3.0's ledger is loaded, see
--   ledger::redis::SESSION_RECORDS_BY_ID_KEY): its state key (u8 length + bytes), scope names
--   in full; then n u8 + n token amounts (field and decimal amount, each u8 length + bytes).
--   Names are packed by pack_name.
-- The service packs a new reservation's record the same way (ledger::redis::pack_entry and
-- pack_name mirror pack_record and pack_name here; a test compares them byte for byte).
local OPEN, SETTLED, RELEASED = 0, 1, 2

-- A record's session byte. By id, the record is 56 bytes and the policy's name shorter than
-- by key: a reservation under a session takes 352 bytes of Redis, 439 by key, 384 by id with
-- the session's budget shared (its name in full) (`cargo test --test it
-- ledger::a_reservation_takes_at_most_400_bytes_550_with_a_new_sender -- --nocapture`).
local NO_SESSION, SESSION_BY_KEY, SESSION_BY_ID = 0, 1, 2
-- The line below tells a replica that this library reads records by id (it writes them only
-- while every ledger library loaded does: ledger::redis::RECORDS_BY_ID_MARK). Keep it as is.
-- records-by-id: this ledger reads records under a session by id
-- The line below tells a replica that the replicas of this library read session grants whose
-- budget is shared (version 2: ledger::redis::SHARED_BUDGETS_MARK; such a budget is counted as
-- a sender of a window is, see counter_of, so every library since 0.3 closes it where it was
-- counted). Keep it as is.
-- shared-session-budgets: this ledger's replicas read grants whose budget is shared
-- In a record by id, the scope name that stands for its session's budget. (Byte 3: pack_name's
-- markers are 1 and 2, and no scope name is one byte.)
local SESSION_SCOPE = '\3'

-- `sp:{P}:` of any key of policy P.
local function policy_prefix(key)
  return string.match(key, '^(sp:{[^}]*}:)')
end

-- Seconds of validUntil one expiry bucket covers (ledger::redis::BUCKET_SECS).
local BUCKET_SECS = 10

-- The bytes of an even number of hex digits.
local function unhex(digits)
  return (string.gsub(digits, '..', function(b)
    return string.char(tonumber(b, 16))
  end))
end

-- Names (scope names, the session key, token fields) are stored with each lowercase `0x` +
-- 40 or 64 hex digits (an address, a session id) as a marker byte 1 or 2 and its raw bytes.
local function pack_name(name)
  return (string.gsub(name, '0x(%x+)', function(h)
    if (#h == 40 or #h == 64) and h == string.lower(h) then
      return string.char(#h == 40 and 1 or 2) .. unhex(h)
    end
  end))
end

-- The lowercase hex digits of raw bytes.
local function hex_of(raw)
  return (string.gsub(raw, '.', function(ch)
    return string.format('%02x', string.byte(ch))
  end))
end

local function unpack_name(s)
  local out, i = {}, 1
  while i <= #s do
    local c = string.byte(s, i)
    if c == 1 or c == 2 then
      local n = (c == 1) and 20 or 32
      out[#out + 1] = '0x' .. hex_of(string.sub(s, i + 1, i + n))
      i = i + 1 + n
    else
      out[#out + 1] = string.char(c)
      i = i + 1
    end
  end
  return table.concat(out)
end

-- The name of the budget of the session whose raw id is `id` (ledger::session_scope_name).
local function session_scope_of(id)
  return 'session:0x' .. hex_of(id)
end

-- A record (its packed bytes) of nonce key `key`. `r.session` is the session's state key (nil
-- without a session); `r.session_id` its raw id where the record is by id (SESSION_BY_ID,
-- which pack_record keeps).
local function unpack_record(data, key)
  local r, n, pos = {}, 0, 1
  local span
  r.state, r.cost, r.valid_until, span, r.sig, n, pos = struct.unpack('>BI8I6I4c65B', data)
  r.valid_after = r.valid_until - span
  r.hashes = {}
  for i = 1, n do
    r.hashes[i], pos = struct.unpack('>c8', data, pos)
  end
  n, pos = struct.unpack('>B', data, pos)
  r.scopes = {}
  for i = 1, n do
    local name
    name, pos = struct.unpack('>Bc0', data, pos)
    r.scopes[i] = name
  end
  local session
  session, pos = struct.unpack('>B', data, pos)
  local budget = nil
  if session == SESSION_BY_ID then
    r.session_id, pos = struct.unpack('>c32', data, pos)
    budget = session_scope_of(r.session_id)
    -- (`sp:{P}:session:0x<id>`: the budget's name after the policy's prefix.)
    r.session = policy_prefix(key) .. budget
  elseif session == SESSION_BY_KEY then
    local state
    state, pos = struct.unpack('>Bc0', data, pos)
    r.session = unpack_name(state)
  elseif session ~= NO_SESSION then
    -- (A later format: read as none, its session would be given back nothing, or charged.)
    error('ledger record with session byte ' .. session)
  end
  for i, name in ipairs(r.scopes) do
    -- (SESSION_SCOPE is a name only in a record by id.)
    if budget and name == SESSION_SCOPE then
      r.scopes[i] = budget
    else
      r.scopes[i] = unpack_name(name)
    end
  end
  r.spend = {}
  if r.session then
    n, pos = struct.unpack('>B', data, pos)
    for i = 1, n do
      local field, amount
      field, pos = struct.unpack('>Bc0', data, pos)
      amount, pos = struct.unpack('>Bc0', data, pos)
      r.spend[i] = {unpack_name(field), amount}
    end
  end
  return r
end

-- A u8-length-prefixed string; refuses (a script error, nothing written) what does not fit.
local function short(text)
  if #text > 255 then
    error('ledger record field over 255 bytes')
  end
  return struct.pack('>Bc0', #text, text)
end

local function pack_record(r)
  local parts = {struct.pack('>BI8I6I4c65B', r.state, r.cost, r.valid_until,
    r.valid_until - r.valid_after, r.sig, #r.hashes)}
  for _, h in ipairs(r.hashes) do
    parts[#parts + 1] = h
  end
  parts[#parts + 1] = struct.pack('>B', #r.scopes)
  if #r.scopes > 255 or #r.spend > 255 then
    error('ledger record with over 255 scopes or token amounts')
  end
  local budget = r.session_id and session_scope_of(r.session_id)
  for _, name in ipairs(r.scopes) do
    if name == budget then
      parts[#parts + 1] = short(SESSION_SCOPE)
    else
      parts[#parts + 1] = short(pack_name(name))
    end
  end
  if r.session_id then
    parts[#parts + 1] = struct.pack('>B', SESSION_BY_ID) .. r.session_id
      .. struct.pack('>B', #r.spend)
  elseif r.session then
    parts[#parts + 1] = struct.pack('>B', SESSION_BY_KEY) .. short(pack_name(r.session))
      .. struct.pack('>B', #r.spend)
  else
    parts[#parts + 1] = struct.pack('>B', NO_SESSION)
  end
  if r.session then
    for _, t in ipairs(r.spend) do
      parts[#parts + 1] = short(pack_name(t[1])) .. short(t[2])
    end
  end
  return table.concat(parts)
end

-- A budget counter keeps its totals packed in one field: COUNTER of a scope's own hash
-- (`sp:{P}:budget:<scope>`), or a sender's 20 bytes in its window's hash (see counter_of):
-- cost (gwei), ops and open (gwei), each a big-endian signed 64-bit integer, so a reservation
-- reads and writes one field, with no decimals to parse or format. Versions before 0.3 kept
-- them as decimal fields `cost`, `ops` and `open` (a sender's in a hash of its own): a
-- counter's totals are the packed ones plus those, which this version reads and leaves as
-- they are. Closing a reservation such a version made in a scope's own hash goes to the packed
-- field, which may so go below zero: the sum stays right.
local COUNTER = 'c'
local COUNTER_FORMAT = '>i8i8i8'

-- A counter's packed totals (cost, ops, open), zeros for none (`v` false or nil).
local function counter_unpack(v)
  if v then
    local cost, ops, open = struct.unpack(COUNTER_FORMAT, v)
    return cost, ops, open
  end
  return 0, 0, 0
end

-- A total plus a legacy decimal field (false or nil: none).
local function plus(total, decimal)
  if decimal then
    return total + tonumber(decimal)
  end
  return total
end

-- Where a record's scope `name` (of the policy whose keys start with `prefix`) was counted,
-- as ledger::redis::counter_slot says (the two must agree): a sender counted since 0.3
-- (`s:0x<40 hex>…`) in its field, the address's 20 bytes, of one hash per window shared
-- by every sender (`sender` and what follows the address); a sender counted by an earlier
-- version (`sender:0x<40 hex>…`) in a hash of its own under its name, decimal fields (the field
-- is nil); any other scope in field COUNTER of its own hash.
local function counter_of(prefix, name)
  local digits, rest = string.match(name, '^s:0x(%x+)(.*)$')
  if digits and #digits == 40 then
    return prefix .. 'budget:sender' .. rest, unhex(digits)
  end
  digits = string.match(name, '^sender:0x(%x+)')
  if digits and #digits == 40 then
    return prefix .. 'budget:' .. name, nil
  end
  return prefix .. 'budget:' .. name, COUNTER
end

-- Add `cost`, `ops` and `open` to the counter a record's scope `name` was counted in (closing
-- or charging back the reservation), where it was counted. A counter whose window is over and
-- forgotten is not brought back (with no TTL).
local function counter_add(prefix, name, cost, ops, open)
  local key, field = counter_of(prefix, name)
  if not field then
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'cost', string.format('%d', cost))
      redis.call('HINCRBY', key, 'ops', string.format('%d', ops))
      redis.call('HINCRBY', key, 'open', string.format('%d', open))
    end
    return
  end
  local v = redis.call('HGET', key, field)
  -- A sender's field is gone with its window's hash; a counter an earlier version wrote has
  -- only decimal fields, and the packed field starts here.
  if not v and (field ~= COUNTER or redis.call('EXISTS', key) == 0) then
    return
  end
  local c, o, p = counter_unpack(v)
  redis.call('HSET', key, field, struct.pack(COUNTER_FORMAT, c + cost, o + ops, p + open))
end

local function has_hash(r, hash)
  for _, h in ipairs(r.hashes) do
    if h == hash then
      return true
    end
  end
  return false
end

-- reserve.lua's packed numbers (an operation's args[1]: fourteen big-endian u64) and one
-- scope's arguments (its args[3]). (Written out: the library's own code runs without Lua's
-- `string` when it loads.)
local RESERVE_NUMBERS = '>I8I8I8I8I8I8I8I8I8I8I8I8I8I8'
local SCOPE_FORMAT = '>I8I8I8Bc0Bc0B'

-- The slots of reserve.lua's list for one scope: its arguments (SCOPE_FORMAT: cost and ops
-- limits, TTL, counter field, name in records; the key an earlier version kept the sender's
-- counter in, or false, and false again once reading it found nothing there), then what
-- reading its counter finds (the counter's hash as the call knows it, whether it is new, its
-- packed totals, its `until`).
local S_COST_LIMIT, S_OPS_LIMIT, S_TTL, S_FIELD, S_NAME, S_LEGACY = 1, 2, 3, 4, 5, 6
local S_KNOWN, S_NEW, S_OWN_COST, S_OWN_OPS, S_OWN_OPEN, S_NOTED = 7, 8, 9, 10, 11, 12
-- Where the scope is the budget of a session that shares it (its counter a field of its end
-- day's hash), the field of that hash that holds the session's status: its counter's field
-- and `r` (ledger::redis::STATUS_SUFFIX); else false.
local S_STATUS = 13
local STATUS_SUFFIX = 'r'

-- The scopes of one reserve.lua operation (`keys` and `args` as reserve.lua describes them),
-- each a list of the slots above, and the place among them of the one whose hash holds the
-- operation's session's status (nil: its state key holds it, or there is no session). A
-- scope's last argument byte: 1 for a sender an earlier version may have counted in a key of
-- its own, 2 for the budget of the operation's session where its hash holds the session's
-- status (a shared one), else 0; another is an error (the operation fails alone).
local function parse_scopes(keys, args)
  local scopes, at, status_at = {}, 1, nil
  for i = 5, #keys do
    local cost_limit, ops_limit, ttl, field, name, kind
    cost_limit, ops_limit, ttl, field, name, kind, at = struct.unpack(SCOPE_FORMAT, args[3], at)
    local legacy, status = false, false
    if kind == 1 then
      -- (`s:0x…` in records: the key was `sender:0x…`.)
      legacy = policy_prefix(keys[1]) .. 'budget:sender' .. string.sub(name, #'s' + 1)
    elseif kind == 2 and not status_at and field ~= COUNTER then
      status, status_at = field .. STATUS_SUFFIX, i - 4
    elseif kind ~= 0 then
      error('reserve.lua: scope ' .. (i - 4) .. ' of kind ' .. kind)
    end
    -- Every slot the steps of reserve.lua set, given here: a list made at its size once,
    -- cheaper than a table of named fields (`python3 benches/reserve_lua.py parts`: three of
    -- twelve named fields 1.3 µs, three lists of twelve 0.8 µs, over an empty script; thirteen
    -- slots since the status's).
    scopes[i - 4] = {cost_limit, ops_limit, ttl, field, name, legacy, false, false, 0, 0, 0, 0,
      status}
  end
  if at ~= #args[3] + 1 then
    error('reserve.lua: ' .. #args[3] .. ' bytes of scope arguments for ' .. (#keys - 4)
      .. ' scopes')
  end
  return scopes, status_at
end

-- The senders' fields of a window's hash that several operations of one reserve.lua call
-- (`ops`: each with its `keys` and `scopes`) read, with its `until`, in one HMGET, into the call's
-- `counters` (reserve.lua's `shared.counters`: a field read and missing is false, one not
-- read nil); a session's status field where its budget's hash holds it (S_STATUS) with them,
-- so such a scope is read here even by one operation alone (its field and status are two).
-- A hash that cannot be read (a key of another type) is left out: the operations that need it
-- read it themselves, and fail alone.
local function prefetch_senders(ops, counters)
  local fields, order = {}, {}
  for _, op in ipairs(ops) do
    for j, s in ipairs(op.scopes) do
      if s[S_FIELD] ~= COUNTER then
        local key = op.keys[j + 4]
        local f = fields[key]
        if not f then
          f = {'until'}
          fields[key] = f
          order[#order + 1] = key
        end
        f[#f + 1] = s[S_FIELD]
        if s[S_STATUS] then
          f[#f + 1] = s[S_STATUS]
        end
      end
    end
  end
  for _, key in ipairs(order) do
    local f = fields[key]
    -- (`until` and two fields or more: a field one operation alone reads, it reads itself.)
    if #f > 2 then
      local ok, got = pcall(redis.call, 'HMGET', key, unpack(f))
      if ok then
        local known = {['until'] = got[1] and tonumber(got[1])}
        for k = 2, #f do
          known[f[k]] = got[k] or false
        end
        counters[key] = known
      end
    end
  end
end

-- The reply of an operation that failed with an error (ledger::redis::RESERVE_FAILED).
local FAILED = 9

local function failed(err)
  return {FAILED, type(err) == 'table' and tostring(err.err) or tostring(err)}
end

-- reserve.lua's reply for an operation reserved (or, checked only, that would fit): one table
-- for every such reply (Redis only reads it).
local RESERVED = {0}

-- A counter is made to live longer only when that gains more than this many seconds: the
-- TTLs the service sends for one end differ by a second from one call to the next, and some
-- ends move every second (the deposit's, a budget's without an end). Its life may fall short
-- of the latest end by this much; every end already has an hour of grace.
local EXTEND_SLACK = 60

-- A counter is made to live `ttl` seconds more, by Redis' clock (a replica's clock does not
-- decide how long a counter lives), when it is new, or when that is more than EXTEND_SLACK
-- past `noted`, its `until` (how long it was last made to live; 0 when an earlier version
-- wrote it). `now` is Redis' TIME in seconds if the caller has read it, else nil (read here,
-- once per call: the caller keeps the second value). Returns its new `until` (a number: Redis
-- writes an integer below 2^53 as all its digits), or nil: it lives long enough, no TTL to
-- set; and `now`.
local function extension(now, new, noted, ttl)
  now = now or tonumber(redis.call('TIME')[1])
  if not new and now + ttl <= noted + EXTEND_SLACK then
    return nil, now
  end
  return now + ttl, now
end

-- The counters a reserve.lua call of several operations charged, written: one HSET per hash,
-- of every field its operations changed, once they have all run, where each operation wrote
-- each of its scopes' counters with an HSET of its own (the policy's counter, a field every
-- operation of the call changes, as often as the call has operations). Each HSET called from
-- Lua costs redis-server about 3,500 instructions before it writes anything; held, a call of
-- 28 reservations under sessions takes 6 % fewer instructions a reservation (0.3.17 in
-- docs/performance.md). `shared`, the call's (reserve.lua): `writes`, the hashes in the
-- order first charged, and `writes[key]`, a hash's senders' fields and their packed totals in
-- turn (a field charged twice is there twice, the later last, which HSET keeps), `own` where
-- its scope's own counter was charged (COUNTER) and `noted` where its `until` changed;
-- `counters[key]`, what the call knows of the hash, which holds the totals and `until` written;
-- `expires`, the TTLs to set (nil: none), in order, each {key, ttl, gt} (gt: `EXPIRE … GT`, to
-- live longer only), after the HSETs (a new hash exists only once written). Empties them once
-- written. (A call of one operation has no `writes`: it writes as it charges, which costs it
-- less.)
-- It cannot fail: each hash was read as a hash by the call (a key of another type fails the
-- operation that reads it before it charges anything), and the call wrote its nonce's key
-- before it charged (Redis refuses no write for memory once a function has written).
local UNPACK_MAX = 1000
local function write_counters(shared)
  local writes, expires = shared.writes, shared.expires
  if writes then
    for _, key in ipairs(writes) do
      local w, known = writes[key], shared.counters[key]
      local n = #w
      if w.own then
        w[n + 1], w[n + 2] = COUNTER, known[COUNTER]
        n = n + 2
      end
      if w.noted then
        w[n + 1], w[n + 2] = 'until', known['until']
        n = n + 2
      end
      -- (In pieces of at most UNPACK_MAX values, an even number, so that a field and its value
      -- go together: `unpack` fails past Lua's stack, about 8,000.)
      for at = 1, n, UNPACK_MAX do
        local last = at + UNPACK_MAX - 1
        redis.call('HSET', key, unpack(w, at, last < n and last or n))
      end
    end
  end
  if expires then
    for _, e in ipairs(expires) do
      if e[3] then
        redis.call('EXPIRE', e[1], e[2], 'GT')
      else
        redis.call('EXPIRE', e[1], e[2])
      end
    end
  end
  shared.writes, shared.expires = writes and {}, nil
end

-- The entries of the value of nonce key `key`: a list of {id, record} (records unpacked).
local function parse_nonce(key, data)
  local entries, pos = {}, 1
  while pos <= #data do
    local id, body
    id, pos = struct.unpack('>Bc0', data, pos)
    body, pos = struct.unpack('>Hc0', data, pos)
    entries[#entries + 1] = {id, unpack_record(body, key)}
  end
  return entries
end

-- The entries of a nonce's key (see parse_nonce), none if it has none.
local function load_nonce(key)
  local data = redis.call('GET', key)
  if not data then
    return {}
  end
  return parse_nonce(key, data)
end


-- One entry of a nonce's key: the id and the packed record.
local function entry(id, body)
  if #body > 65535 then
    error('ledger record over 65535 bytes')
  end
  return short(id) .. struct.pack('>Hc0', #body, body)
end

-- Write the entries back, keeping the key's TTL. A new record from reserve.lua, given as its
-- whole entry (`{entry = bytes}`), is written as it is.
local function save_nonce(key, entries)
  local parts = {}
  for _, e in ipairs(entries) do
    parts[#parts + 1] = e[2].entry or entry(e[1], pack_record(e[2]))
  end
  redis.call('SET', key, table.concat(parts), 'KEEPTTL')
end

-- reserve.lua's writes of a reservation (`keys` an operation's, as reserve.lua describes them):
-- the nonce's records, `entries`, live `nonce_ttl` or longer (for a nonce whose key is new,
-- `fresh`, unused: reserve.lua wrote its one record, its args[2], as it began); its expiry
-- bucket lists it (unless it is `listed` there already), the bucket is indexed, all live long
-- enough. A bucket's TTL is the same for every record in it (its end plus grace), so the
-- reservation that creates it sets it and indexes it (and trims the index below
-- `trim_below`); release.lua deletes a bucket and its index entry together, so an existing
-- bucket is always indexed.
local function schedule(keys, fresh, entries, nonce_ttl, listed, bucket, bucket_ttl, trim_below)
  -- Listed before a nonce's records are saved: a failure between leaves a bucket naming a
  -- nonce with no record of it (the release finds nothing), never a record no bucket lists
  -- (never released: counted over). A nonce's new key was written before this, as its
  -- operation began: a failure here fails the operation, and reserve.lua's call deletes the
  -- key, which so holds a record only once it is listed. (The nonce's 20-byte id ends its
  -- key.)
  if not listed and redis.call('APPEND', keys[3], string.sub(keys[1], -20)) == 20 then
    redis.call('EXPIRE', keys[3], bucket_ttl)
    redis.call('ZADD', keys[2], bucket, bucket)
    redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', '(' .. string.format('%d', trim_below))
  end
  -- (A nonce's new key holds the new record already: reserve.lua wrote it up front.)
  if not fresh then
    save_nonce(keys[1], entries)
    extend_ttl(keys[1], nonce_ttl)
  end
end

-- Close an open reservation record (unpacked; the caller saves it), once: 'settle' it to
-- `actual` gwei (the operation ran), or 'release' it (it never will: its cost, its op count and
-- its token spending come back). What comes back is queued in `returns`, for give_back once the
-- record is saved: a script that fails midway keeps what it wrote (a Cluster refusing a key
-- whose slot is migrating, say), and a record saved closed with a cost not given back counts
-- over, where a cost given back with the record left open would be given back again by the
-- next try. Returns 1 if closed now, 0 if already closed.
local function close_record(key, r, mode, actual, returns)
  if r.state ~= OPEN then
    return 0
  end
  if mode ~= 'settle' then
    actual = 0
  end
  local prefix = policy_prefix(key)
  local ops = (mode == 'settle') and 0 or -1
  for _, name in ipairs(r.scopes) do
    returns[#returns + 1] = {prefix, name, actual - r.cost, ops, -r.cost}
  end
  if mode ~= 'settle' and r.session then
    returns[#returns + 1] = {session = r.session, spend = r.spend}
  end
  r.state = (mode == 'settle') and SETTLED or RELEASED
  return 1
end

-- What close_record queued, given back (after the records are saved). Every key touched
-- carries the {policy} hash tag of the record's key (one Cluster slot).
local function give_back(returns)
  for _, g in ipairs(returns) do
    if g.session then
      if redis.call('EXISTS', g.session) == 1 then
        for _, t in ipairs(g.spend) do
          local spent = redis.call('HGET', g.session, t[1]) or '0'
          redis.call('HSET', g.session, t[1], dec_sub(spent, t[2]))
        end
      end
    else
      counter_add(g[1], g[2], g[3], g[4], g[5])
    end
  end
end

-- A released reservation whose operation landed after all (the release went by a block time
-- that a reorg undid, or the watcher came late): charge its cost back, once (the caller saves
-- it, after: a failure between counts over, never under). Returns 1 if charged now, 0 if the
-- record is not released.
local function charge_back(key, r, actual)
  if r.state ~= RELEASED then
    return 0
  end
  local prefix = policy_prefix(key)
  for _, name in ipairs(r.scopes) do
    counter_add(prefix, name, actual, 1, 0)
  end
  if r.session and redis.call('EXISTS', r.session) == 1 then
    for _, t in ipairs(r.spend) do
      redis.call('HSET', r.session, t[1], dec_add(redis.call('HGET', r.session, t[1]) or '0', t[2]))
    end
  end
  r.state = SETTLED
  return 1
end
