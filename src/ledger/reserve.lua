-- Reserve an operation's worst-case cost in every budget scope, atomically (DESIGN §1, §5);
-- several operations of one policy in one call, in turn. Loaded after lib.lua (which
-- describes the packed record).
--
-- The call's KEYS are each operation's keys in turn, its ARGV[1] frames them: per operation, a
-- u8 count of its keys and a u8 count of its arguments, which follow ARGV[1] in turn. Returns
-- one reply per operation, in order (below; {FAILED, message} when the operation failed with
-- an error, which leaves the others as they are). An operation's `keys` and `args`, as
-- `reserve` below takes them:
--
-- keys[1]   the key of the operation's (EntryPoint, sender, nonce): its reservation records
--           (see lib.lua); settlement finds them here
-- keys[2]   the policy's expiry index: a sorted set of expiry buckets (10 s of validUntil each)
-- keys[3]   the expiry bucket of this signature's validUntil: a string of 20-byte nonce ids
-- keys[4]   the session's state (hash: `status`, `spent:<token>` decimal totals), or, without
--           a session, keys[1] again (unused); where the session's budget is shared its
--           status is also a field of that budget's hash (args[3]), which is read instead
-- keys[5..] per budget scope, the hash its counter is a field of (counter_of in lib.lua: a
--           sender's window's hash, shared by its senders, or the scope's own): the packed
--           totals (COUNTER in lib.lua: cost, gwei: open reservations at their worst case
--           plus settled ones at their actual cost; ops; open, the open part of cost), and
--           `until`: when the key was last made to expire,
--           by Redis' clock (TIME + TTL), so that a reservation whose counter already lives long
--           enough sets no TTL (EXTEND_SLACK in lib.lua)
-- args[1]   14 numbers, each a big-endian u64, in this order (struct.unpack reads them
--           without parsing decimals, which cost Lua more than the commands they feed):
--             check_only    1: check only (ERC-7677 stub), reserve nothing
--             cost          gwei to reserve (rounded up from wei)
--             nonce_ttl     TTL of the nonce's key: this record's expiry (validUntil plus grace), s
--             valid_until   the signature's window
--             valid_after
--             refresh       a stored answer whose validUntil is below it (and below the fresh
--                           one's) is not handed out again; the reservation is extended to the
--                           fresh answer
--             session       1 under a session
--             session_ttl   TTL of the session's state, s
--             max_mine      most open reservations one nonce may have under one session
--             bucket        this signature's expiry bucket number
--             bucket_ttl    TTL of the expiry bucket, s
--             trim_below    expiry buckets below it are gone (their records expired) and leave
--                           the index, so it stays bounded without a watcher
--             forget_below  records whose validUntil is below it have outlived their grace and
--                           are dropped from the nonce's key (as the memory ledger forgets them)
--             max_open      most open reservations one nonce may have, whatever the session
-- args[2]   the new open record's entry: the operation's idempotency id (20 bytes) and the
--           record, framed as lib.lua's `entry` frames them, packed by the service as
--           pack_record would pack it. Its signature (65 bytes, with the window the answer a
--           repeat gets) and its userOpHash prefixes (8 bytes each: one, or on EntryPoint v0.9
--           two, the signature inline or in the suffix) extend a reservation.
--           The nonce's 20-byte id, which the expiry bucket lists, ends keys[1].
-- args[3]   per scope (in keys order), three big-endian u64: cost limit and ops limit (2^64 - 1:
--           none; a counter never reaches it), and the counter's TTL (s); two u8-length-
--           prefixed strings: the counter's field and the scope's name in records (counter_of
--           in lib.lua); and a u8, 1 for a sender whose counter a version before 0.3 may have
--           kept in a key of its own (`sp:{P}:budget:sender:0x…`: read and summed), 2 for the
--           budget of the operation's session where its hash also holds the session's status
--           (a session whose budget is shared: the field's 20 bytes and `r`, S_STATUS in
--           lib.lua), else 0
-- args[4..] per token cap, three values: field (`spent:<token>`), amount, limit (decimal)
--
-- The common case, a new operation of a new nonce, runs few commands: SET … NX GET of the
-- nonce's key, which writes the new record there as the operation begins (and, if the
-- operation is then not reserved, a DEL of it; a check runs a GET instead), and under a
-- session HGET of its status (or, where its budget is shared, nothing more: its status is
-- read with its counter), per scope HMGET (none for a counter an operation before it in the call
-- read; the senders of a window's hash that several operations of the call read are read in
-- one HMGET before the first runs, prefetch_senders in lib.lua; a sender's field alone, an HGET,
-- of a hash the call read already), HSET of each counter (and EXPIRE when its hash is new or is
-- to live longer: a new sender makes a field, not a key), TIME once a call, then APPEND (the
-- bucket's TTL and index entry are written by the reservation that creates the bucket, once
-- per 10 s per policy). In a call of several operations the counters' HSETs and EXPIREs are
-- held until its operations have all run, then made one HSET per hash, of every field they
-- changed (write_counters in lib.lua). On a Redis 0.2
-- served, in a window begun before the first replica of 0.3 ran (or a budget without a
-- period), a sender's counter also has an HMGET of the key an earlier version kept.
--
-- An operation's reply: {0} when reserved (or, in check-only mode, when it would fit);
-- {1, validUntil, validAfter, signature} when this operation was already reserved and its
-- answer is still good (or it landed), and its session (if any) is not revoked: nothing
-- changes; {2, scope, resource, limit, used} when a budget would be exceeded (the scope's place
-- among keys[5..], from 0; the service knows what it asked); {3} when the session is revoked
-- (checked before any other check or answer, so even a repeat gets nothing);
-- {4, field, limit, spent, requested} when a token cap would be exceeded; {5, open} when the
-- nonce already has that many open reservations (under the session, or at all); {6, records}
-- when it already has MAX_RECORDS live records (lib.lua), none of them released, and this
-- would add one. Only {0} outside check-only mode changes anything (a refusal of a new nonce
-- writes its key as it begins and deletes it: nothing stays).
-- Numbers of gwei stay below 2^53 (MAX_EXACT: larger is refused like an exhausted budget; a
-- scope without a cost limit holds its open reservations to it, and counts cost up to it and
-- stays there), exact in Lua; counters are packed back as 64-bit integers, and replies written
-- with %d, never as floats.

-- An empty list, shared by the operations of a call: a nonce's with no records, the token
-- totals of an operation with none. Writing to it is an error (a library function cannot make
-- it: `setmetatable` is not there while the library loads).
local EMPTY = setmetatable({}, {__newindex = function()
  error('reserve.lua: EMPTY is shared, never written')
end})

-- `scopes`: its scopes, as parse_scopes (lib.lua) read them from args[3].
-- `shared`: what the operations of one call share: `now`, Redis' TIME in seconds once read
-- (extension in lib.lua); `counters[key]`, a counter's hash as prefetch_senders and the
-- operations before this one read and left it: `until` (false or nil when it has none), each
-- field read (its packed totals, or false: read and missing; nil: not read), and for a scope's
-- own hash the decimal `cost` and `ops` of an earlier version (which no reservation writes).
-- Each charge updates it, so it is what Redis holds once the call writes its charges
-- (`writes` and `expires`: write_counters in lib.lua, after the last operation):
-- what it knows of a hash stands, and a read from Redis adds only what it does not know.
-- `ttl` and `ttl_text`: the last nonce's TTL and its text (a number given to a command is
-- printed with `%.17g`, about 1 % of redis-server's work a reservation; the operations of a
-- call share their TTL, their signatures' window less the time). What an earlier
-- version kept in a sender's own key is read afresh by each operation (only a sender so
-- flagged reads it). `placed`, set here: the nonce's key, where this operation wrote its new
-- record to it as it began (the call deletes it unless the reply is {0}, below).
local function reserve(keys, args, scopes, status_at, shared)
  local check_only, cost, nonce_ttl, valid_until, valid_after, refresh, session_flag,
    session_ttl, max_mine, bucket, bucket_ttl, trim_below, forget_below, max_open =
    struct.unpack(RESERVE_NUMBERS, args[1])
  check_only = check_only == 1
  -- The new entry (written as it is to a nonce's new key) holds at least its framing.
  if #args[2] < 23 then
    error('reserve.lua: an entry of ' .. #args[2] .. ' bytes')
  end
  -- The operation's idempotency id, the new entry's: read where the nonce has records.
  local op_id = nil
  local session = session_flag == 1
  -- The nonce's key. Where it has none, a reservation (not a check) writes the new record's
  -- entry to a new key in the same command (`SET … NX GET`: a missing key's lookup once, where a
  -- `GET` and, at the end, a `SET` took it twice), before anything is checked: the call removes
  -- it unless this operation is reserved (`shared.placed`, below), so a refusal or an error
  -- leaves no record, as it left none before.
  local data
  if check_only then
    data = redis.call('GET', keys[1])
  else
    -- (Its TTL as text, made once for the operations of a call that share it: `ttl` below.)
    if shared.ttl ~= nonce_ttl then
      shared.ttl, shared.ttl_text = nonce_ttl, string.format('%d', nonce_ttl)
    end
    data = redis.call('SET', keys[1], args[2], 'NX', 'GET', 'EX', shared.ttl_text)
    if not data then
      shared.placed = keys[1]
    end
  end
  local fresh_key = not data
  -- Records past their grace are forgotten (any still open was never released: its charge stays,
  -- counted over rather than under), so a nonce's key holds only live ones.
  -- (A nonce's new key: the shared empty list, which nothing below adds to.)
  local entries = EMPTY
  if data then
    op_id = struct.unpack('>Bc0', args[2])
    entries = {}
    for _, e in ipairs(parse_nonce(keys[1], data)) do
      if e[2].valid_until >= forget_below then
        entries[#entries + 1] = e
      end
    end
  end
  local mine, rec = nil, nil
  local listed = false
  for i, e in ipairs(entries) do
    if e[1] == op_id then
      mine, rec = i, e[2]
    end
    -- The nonce is already listed in this signature's expiry bucket (and, with an open record
    -- there, the bucket cannot have been dropped).
    if e[2].state == OPEN and math.floor(e[2].valid_until / BUCKET_SECS) == bucket then
      listed = true
    end
  end
  -- A revoked session gets nothing, not even the answer an operation of it was given before
  -- (replicas serve grants from copies that may not show the revocation yet: this is the check).
  -- Its status is in its state key, or, where its budget is shared (`status_at`), a field of
  -- its budget's hash, which prefetch_senders read with the counters (the read here is for a
  -- hash it could not read: a key of another type, whose error fails this operation alone).
  if status_at then
    local s, key = scopes[status_at], keys[status_at + 4]
    local known = shared.counters[key]
    if not known or known[s[S_STATUS]] == nil then
      local got = redis.call('HMGET', key, 'until', s[S_FIELD], s[S_STATUS])
      -- (What the call knows of the hash stands: it may hold charges not yet written.)
      if not known then
        known = {['until'] = got[1] and tonumber(got[1])}
        shared.counters[key] = known
      end
      if known[s[S_FIELD]] == nil then
        known[s[S_FIELD]] = got[2] or false
      end
      known[s[S_STATUS]] = got[3] or false
    end
    if known[s[S_STATUS]] == 'revoked' then
      return {3}
    end
  elseif session and redis.call('HGET', keys[4], 'status') == 'revoked' then
    return {3}
  end
  if rec and (rec.state == SETTLED or (rec.state == OPEN and (rec.valid_until >= refresh
      or rec.valid_until >= valid_until))) then
    -- Landed (a repeat can change nothing), still valid long enough, or valid longer than a
    -- fresh answer would be: the same answer.
    return {1, string.format('%d', rec.valid_until), string.format('%d', rec.valid_after), rec.sig}
  end

  local session_key = session and keys[4] or nil

  if rec and rec.state == OPEN then
    local same_scopes = #rec.scopes == #keys - 4
    for i = 5, #keys do
      same_scopes = same_scopes and rec.scopes[i - 4] == scopes[i - 4][S_NAME]
    end
    -- The fresh answer: the signature and hashes of the new record's entry.
    local _, body = struct.unpack('>Bc0Hc0', args[2])
    local fresh = unpack_record(body, keys[1])
    if same_scopes and rec.session == session_key
        and #rec.hashes + #fresh.hashes <= MAX_HASHES then
      -- The stored answer is about to expire: extend this reservation to a fresh one. Both
      -- signatures stay valid for a while, but they are for one operation and one nonce, so one
      -- charge covers both; it is released only once the later has expired, and the event of
      -- either settles it: the record keeps the hash of every answer it was extended to. One
      -- whose hashes would pass MAX_HASHES is kept aside instead, as one of another window
      -- (below), and this request is a new reservation: a record that dropped the hash of an
      -- answer still valid would not know that answer's event, which then, where a client ground
      -- another operation of the nonce to the same 8 bytes (settle.lua), settles that one and
      -- releases this one, its costs given back.
      if check_only then
        return RESERVED
      end
      for _, h in ipairs(fresh.hashes) do
        rec.hashes[#rec.hashes + 1] = h
      end
      rec.valid_until, rec.valid_after, rec.sig = valid_until, valid_after, fresh.sig
      -- Its session named as the fresh entry names it: by id or by key, as the replica that
      -- extends it may now write (a record kept by id would outlive a switch back to by key).
      rec.session_id = fresh.session_id
      -- Its counters live as long as it now may land (and settle), a counter gone is not
      -- brought back (nothing is charged here). Read from Redis, which first gets what the call
      -- holds (rare: an answer about to expire): a counter's hash new in the call would read as
      -- gone and not be extended, and its held EXPIRE, made after this one's `GT`, would
      -- shorten it again.
      write_counters(shared)
      for i = 5, #keys do
        local s = scopes[i - 4]
        -- (`cost`: a scope's own hash as an earlier version wrote it; never in a window's.)
        local c = redis.call('HMGET', keys[i], 'until', s[S_FIELD], 'cost')
        local noted = nil
        if c[2] or c[3] then
          noted, shared.now = extension(shared.now, false, tonumber(c[1] or '0'), s[S_TTL])
        end
        if noted then
          redis.call('HSET', keys[i], 'until', noted)
          if shared.counters[keys[i]] then
            shared.counters[keys[i]]['until'] = noted
          end
          redis.call('EXPIRE', keys[i], s[S_TTL], 'GT')
        end
        if s[S_LEGACY] then
          -- What an earlier version counted of the sender, in the key it kept, counts as long.
          redis.call('EXPIRE', s[S_LEGACY], s[S_TTL], 'GT')
        end
      end
      schedule(keys, fresh_key, entries, nonce_ttl, listed, bucket, bucket_ttl, trim_below)
      return RESERVED
    end
    -- Another budget window or another session than the reservation was made in, or a record
    -- extended as often as it keeps hashes: it stays as it is (its signature may still land)
    -- under a field of its own, and this request is a new reservation, checked and charged where
    -- it is made now.
    if not check_only then
      entries[mine][1] = op_id .. struct.pack('>I6', rec.valid_until)
      mine = nil
    end
  end

  -- A nonce keeps at most MAX_RECORDS live records. Released and landed ones stay until their
  -- grace ends (a late event still finds them), so a client cycling short-lived variants, each
  -- released as it expires, would grow the key, and the work of every call on it, without
  -- bound. A new record that would pass the cap makes room: the released records of the
  -- earliest validUntil leave (their cost was given back; only a reorg deeper than the
  -- watcher's confirmations could still land one, whose event would then match no record).
  -- With none released (open ones are capped below; a landed one means the nonce is used) it
  -- is refused. (A released record of this operation is replaced, not added; an open one of
  -- another window or session stays, and this one is added. In this block `mine` is nil
  -- unless this is a check, which writes nothing.)
  if (not mine or rec.state == OPEN) and #entries >= MAX_RECORDS then
    local oldest = nil
    for _, e in ipairs(entries) do
      if e[2].state == RELEASED and (not oldest or e[2].valid_until < oldest) then
        oldest = e[2].valid_until
      end
    end
    if not oldest then
      return {6, string.format('%d', #entries)}
    end
    local kept = {}
    for _, e in ipairs(entries) do
      if e[2].state ~= RELEASED or e[2].valid_until ~= oldest then
        kept[#kept + 1] = e
      end
    end
    entries = kept
  end

  -- Only one reservation of a nonce can land: more open ones only hold budget (under a session
  -- whose proof a stranger may have seen, its budget), and make the nonce's key longer.
  -- (This operation's own open record, here, is one of another window or session, which stays
  -- under an id of its own: it counts, in a check too, where it is not renamed.)
  local open, open_mine = 0, 0
  for _, e in ipairs(entries) do
    if e[2].state == OPEN then
      open = open + 1
      if session and e[2].session == keys[4] then
        open_mine = open_mine + 1
      end
    end
  end
  if open >= max_open then
    return {5, string.format('%d', open)}
  end
  if session and open_mine >= max_mine then
    return {5, string.format('%d', open_mine)}
  end

  -- Each scope's counter, as an operation before it in this call left it (`shared.counters`),
  -- or read from Redis.
  for i = 5, #keys do
    local s = scopes[i - 4]
    local known = shared.counters[keys[i]]
    if not known or known[s[S_FIELD]] == nil then
      if s[S_FIELD] == COUNTER then
        -- The scope's own hash (with the decimal fields, if an earlier version wrote it, which
        -- no reservation writes); its counter, false where it has none (not read again).
        local got = redis.call('HMGET', keys[i], 'until', COUNTER, 'cost', 'ops')
        if not known then
          known = {['until'] = got[1] and tonumber(got[1])}
          shared.counters[keys[i]] = known
        end
        known.c, known.cost, known.ops = got[2] or false, got[3], got[4]
      elseif known then
        -- A sender's field of a window's hash the call knows: the field alone (its `until`, as
        -- the call knows it, may be one not yet written).
        known[s[S_FIELD]] = redis.call('HGET', keys[i], s[S_FIELD]) or false
      else
        -- A sender: its field in the window's hash.
        local got = redis.call('HMGET', keys[i], 'until', s[S_FIELD])
        known = {['until'] = got[1] and tonumber(got[1]), [s[S_FIELD]] = got[2] or false}
        shared.counters[keys[i]] = known
      end
    end
    s[S_KNOWN] = known
    -- New: a scope's own hash with no totals, a window's hash with no `until`.
    if s[S_FIELD] == COUNTER then
      s[S_NEW] = not (known.c or known.cost or known.ops)
    else
      s[S_NEW] = not known['until']
    end
    local old_cost, old_ops = known.cost, known.ops
    if s[S_LEGACY] then
      -- What an earlier version counted of the sender in the key it kept (where the service
      -- says it may have), read by every operation that may count it.
      local legacy = redis.call('HMGET', s[S_LEGACY], 'cost', 'ops')
      old_cost, old_ops = legacy[1], legacy[2]
      -- That key is made to live as long only where it counted something.
      s[S_LEGACY] = (old_cost or old_ops) and s[S_LEGACY]
    end
    local own_cost, own_ops, own_open = counter_unpack(known[s[S_FIELD]])
    s[S_OWN_COST], s[S_OWN_OPS], s[S_OWN_OPEN] = own_cost, own_ops, own_open
    -- The totals, with the decimal fields of an earlier version.
    local total_cost, total_ops = plus(own_cost, old_cost), plus(own_ops, old_ops)
    s[S_NOTED] = known['until'] or 0 -- `until`: 0 for a counter an earlier version wrote
    local cost_limit, ops_limit = s[S_COST_LIMIT], s[S_OPS_LIMIT]
    -- Counters stay exact integers in Lua (below 2^53, MAX_EXACT_GWEI in ledger/mod.rs): a cost
    -- limit counts as at most MAX_EXACT (the service sends it so), and 2^64 - 1 is none (it
    -- unpacks as 2^64). A scope without one is refused only where its open reservations would
    -- pass MAX_EXACT, and its cost counts up to MAX_EXACT and stays there (below). (A limit of
    -- 2^64 - 1 for ops is never reached.)
    if cost_limit < NO_LIMIT then
      -- (Compared, not math.min: a C function's call costs Lua more than the comparison.)
      local cost_cap = cost_limit < MAX_EXACT and cost_limit or MAX_EXACT
      if total_cost + cost > cost_cap then
        return {2, string.format('%d', i - 5), 'cost', string.format('%d', cost_cap),
          string.format('%d', total_cost)}
      end
    elseif own_open + cost > MAX_EXACT then
      return {2, string.format('%d', i - 5), 'cost', string.format('%d', MAX_EXACT),
        string.format('%d', own_open)}
    end
    if total_ops + 1 > ops_limit then
      return {2, string.format('%d', i - 5), 'ops', string.format('%d', ops_limit),
        string.format('%d', total_ops)}
    end
  end

  local totals = #args > 3 and {} or EMPTY
  for t = 4, #args, 3 do
    local field, amount, limit = args[t], args[t + 1], args[t + 2]
    local spent = redis.call('HGET', keys[4], field) or '0'
    local total = dec_add(spent, amount)
    if dec_cmp(total, limit) > 0 then
      return {4, field, limit, spent, amount}
    end
    totals[#totals + 1] = {field, amount, total}
  end

  if check_only then
    return RESERVED
  end

  -- A new counter gets its TTL; an existing one keeps the longer of its own and this one (a
  -- window's end is not in its name alone: a policy republished with another period may name
  -- the same counter with a later end), and, in the common case of a counter already living
  -- long enough, gets none (see extension).
  for i = 5, #keys do
    local s = scopes[i - 4]
    -- (At most MAX_EXACT: a scope without a cost limit stays there, see above; for one with a
    -- limit this changes nothing.)
    local own_cost = s[S_OWN_COST] + cost
    local packed = struct.pack(COUNTER_FORMAT, own_cost < MAX_EXACT and own_cost or MAX_EXACT,
      s[S_OWN_OPS] + 1, s[S_OWN_OPEN] + cost)
    local noted
    noted, shared.now = extension(shared.now, s[S_NEW], s[S_NOTED], s[S_TTL])
    -- What the next operation of this call reads.
    s[S_KNOWN][s[S_FIELD]] = packed
    if noted then
      s[S_KNOWN]['until'] = noted
    end
    local writes = shared.writes
    if not writes then
      -- The only operation of its call: written now (held, it costs more than it spares).
      if noted then
        redis.call('HSET', keys[i], s[S_FIELD], packed, 'until', noted)
        if s[S_NEW] then
          redis.call('EXPIRE', keys[i], s[S_TTL])
        else
          redis.call('EXPIRE', keys[i], s[S_TTL], 'GT')
        end
      else
        redis.call('HSET', keys[i], s[S_FIELD], packed)
      end
    else
      -- Held until the call's operations have all run (write_counters in lib.lua).
      local w = writes[keys[i]]
      if not w then
        w = {}
        writes[keys[i]] = w
        writes[#writes + 1] = keys[i]
      end
      if s[S_FIELD] == COUNTER then
        w.own = true
      else
        local n = #w
        w[n + 1], w[n + 2] = s[S_FIELD], packed
      end
      if noted then
        w.noted = true
        local expires = shared.expires or {}
        shared.expires = expires
        expires[#expires + 1] = {keys[i], s[S_TTL], not s[S_NEW]}
      end
    end
    if s[S_LEGACY] then
      -- What an earlier version counted of the sender, in the key it kept, counts as long.
      redis.call('EXPIRE', s[S_LEGACY], s[S_TTL], 'GT')
    end
  end
  -- The session's state lives to the session's end (the grant's, fixed for its id): set when
  -- its totals are written; otherwise it holds nothing this operation changed.
  if session and #totals > 0 then
    for _, t in ipairs(totals) do
      redis.call('HSET', keys[4], t[1], t[3])
    end
    redis.call('EXPIRE', keys[4], session_ttl)
  end
  -- The new record's entry is args[2], made by the service; save_nonce writes it as it is (a
  -- nonce's new key holds it already, written as the operation began).
  if not fresh_key then
    local record = {entry = args[2]}
    if mine then
      -- A released record of this operation (its signature expired unused): replaced.
      entries[mine][2] = record
    else
      entries[#entries + 1] = {op_id, record}
    end
  end
  schedule(keys, fresh_key, entries, nonce_ttl, listed, bucket, bucket_ttl, trim_below)
  return RESERVED
end

local frame, replies = ARGV[1], {}
-- Each operation's keys, arguments and scopes, as the frame counts them (an operation whose
-- scopes do not parse fails alone, answered {FAILED, message}); nothing runs before the frame
-- is read whole: a call whose keys and arguments it does not add up to runs nothing.
local ops = {}
local next_key, next_arg = 1, 2
for at = 1, #frame - 1, 2 do
  local key_count, arg_count = string.byte(frame, at, at + 1)
  -- (A table made from a list of values is made at its size once.)
  local keys = {unpack(KEYS, next_key, next_key + key_count - 1)}
  local args = {unpack(ARGV, next_arg, next_arg + arg_count - 1)}
  next_key, next_arg = next_key + key_count, next_arg + arg_count
  local ok, got, status_at = pcall(parse_scopes, keys, args)
  if ok then
    ops[#ops + 1] = {keys = keys, args = args, scopes = got, status_at = status_at,
      reply = #replies + 1}
    replies[#replies + 1] = false
  else
    replies[#replies + 1] = failed(got)
  end
end
if #frame % 2 ~= 0 or next_key ~= #KEYS + 1 or next_arg ~= #ARGV + 1 then
  error('reserve.lua: a frame of ' .. #frame .. ' bytes for ' .. (next_key - 1) .. ' keys and '
    .. (next_arg - 2) .. ' arguments, given ' .. #KEYS .. ' and ' .. (#ARGV - 1))
end
-- Then the senders' fields of each window's hash that several operations read, at once; then
-- the operations in turn, each in a protected call: an error (a script error, a command Redis
-- refused) fails that operation alone, with what it wrote or charged before it kept (as a call
-- of its own would), but for the new key it wrote as it began (`shared.placed`), and is
-- answered {FAILED, message}. What each operation reads of a counter is what the operations
-- before it charged (`shared.counters`, kept by the function above; written at the end).
-- An operation's new key is deleted unless its reply is {0}, reserved (every other reply
-- refuses, and a check writes none): a record left by a refusal or a failure would hold a
-- signed answer no counter charged, which a repeat of the operation would be given. The `DEL`
-- is outside the protected call, so that if it failed the whole call would fail (every
-- operation answered as failed), but that would leave the key: it does not fail for a key of
-- this call's slot that the call has just written (`DEL` is not refused for memory, and a
-- function that has written cannot be killed).
local shared = {now = nil, counters = {}, placed = nil, ttl = nil, ttl_text = nil,
  writes = #ops > 1 and {} or nil, expires = nil}
prefetch_senders(ops, shared.counters)
for _, op in ipairs(ops) do
  local ok, reply = pcall(reserve, op.keys, op.args, op.scopes, op.status_at, shared)
  if shared.placed then
    if not ok or reply[1] ~= 0 then
      redis.call('DEL', shared.placed)
    end
    shared.placed = nil
  end
  replies[op.reply] = ok and reply or failed(reply)
end
-- The counters charged, written, after the last operation (write_counters in lib.lua, which
-- cannot fail: see there). Were it to fail, the call would fail whole, every operation answered
-- as failed, with the records of those reserved written and their charges not: a repeat would
-- be given their answers uncharged.
write_counters(shared)
return replies
