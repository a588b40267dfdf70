-- Release the open reservations listed in one expiry bucket whose signatures expired unused
-- (a confirmed block is past their validUntil), a slice at a time. Loaded after lib.lua.
--
-- KEYS[1]   the expiry bucket: a string of 20-byte nonce ids (a nonce is listed once per
--           signature whose validUntil falls in the bucket; its records may since have been
--           extended, settled or released)
-- KEYS[2]   the policy's expiry index
-- ARGV[1]   the confirmed block's time: a record is released only if its validUntil is still
--           before it (a repeat may have extended it since)
-- ARGV[2]   this bucket's number (its member in the index)
-- ARGV[3]   byte offset of the slice to read
-- ARGV[4]   most nonces to read
-- ARGV[5]   open records of this bucket still valid, seen in the slices read before
-- Returns {released, next offset or -1 when the bucket is done, open records left}. A bucket
-- whose nonces hold no open record any more is deleted and leaves the index.
local from = tonumber(ARGV[3])
local slice = redis.call('GETRANGE', KEYS[1], from, from + tonumber(ARGV[4]) * 20 - 1)
local nonces = policy_prefix(KEYS[1]) .. 'n:'
local confirmed = tonumber(ARGV[1])
local bucket = tonumber(ARGV[2])
local released, left = 0, tonumber(ARGV[5])
-- A nonce listed twice in the bucket (several signatures in these 10 s) is read once.
local seen = {}
for i = 1, #slice - 19, 20 do
  local id = string.sub(slice, i, i + 19)
  if not seen[id] then
    seen[id] = true
    local nonce = nonces .. id
    local entries, closed, returns = load_nonce(nonce), 0, {}
    for _, e in ipairs(entries) do
      local r = e[2]
      if r.state == OPEN then
        if r.valid_until < confirmed then
          closed = closed + close_record(nonce, r, 'release', 0, returns)
        elseif math.floor(r.valid_until / BUCKET_SECS) <= bucket then
          -- Still valid, and listed here (a later validUntil is listed in its own bucket).
          left = left + 1
        end
      end
    end
    if closed > 0 then
      save_nonce(nonce, entries)
      give_back(returns)
      released = released + closed
    end
  end
end
if #slice < tonumber(ARGV[4]) * 20 then
  if left == 0 then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[2])
  end
  return {released, -1, left}
end
return {released, from + #slice, left}
