-- A revocation, written to the feed every replica reads to drop its copies of the grant
-- (session::cache): an entry with the grant's 32-byte id, entries older than the feed keeps
-- trimmed by Redis' own clock (stream ids are its milliseconds).
-- KEYS[1] = the feed (a stream); ARGV[1] = the grant's id; ARGV[2] = seconds an entry is kept.
local now = redis.call('TIME')
local keep_from = (tonumber(now[1]) - tonumber(ARGV[2])) * 1000
if keep_from < 0 then
  keep_from = 0
end
redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%d', keep_from), '*', 'id', ARGV[1])
return 1
