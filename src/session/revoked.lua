-- A revocation, written to the feed every replica reads to drop its copies of the grant
-- (session::cache): an entry with the grant's 32-byte id. Entries older than the feed keeps are
-- trimmed by Redis' own clock (stream ids are its milliseconds), and the feed is kept to at
-- most about MAX_ENTRIES whatever the clock did: a reader that had not read what is trimmed
-- finds its count short (follow.lua) and begins again.
-- KEYS[1] = the feed (a stream); ARGV[1] = the grant's id; ARGV[2] = seconds an entry is kept;
-- ARGV[3] = MAX_ENTRIES.
local now = redis.call('TIME')
local keep_from = (tonumber(now[1]) - tonumber(ARGV[2])) * 1000
if keep_from < 0 then
  keep_from = 0
end
redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%d', keep_from), '*', 'id', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[3])
return 1
