-- A read of the revocation feed (session::redis::RedisSessions::follow_revocations), in one
-- step so that what it counts and what it reads agree.
-- KEYS[1] = the feed (a stream). ARGV[1] = this replica's place (an entry id), or '' to begin;
-- ARGV[2] = most entries to return.
-- Returns {entries ever added to the feed, 1 if the entry at the place is still there (else 0),
-- the entries after the place (at most ARGV[2]; none when beginning), the newest entry's id
-- ('' for none), the run id of the Redis that answers}. Beginning on an empty feed first writes
-- an entry `begin`, so that a feed emptied later (flushed, restarted without persistence) is
-- seen to be. The run id changes when another Redis answers (a failover, a restart): one that
-- kept the place's entry but not all after it would otherwise look whole.
local feed, place = KEYS[1], ARGV[1]
if place == '' and redis.call('XLEN', feed) == 0 then
  redis.call('XADD', feed, '*', 'begin', '1')
end
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
if redis.call('EXISTS', feed) == 0 then
  return {0, 0, {}, '', run_id}
end
local info = redis.call('XINFO', 'STREAM', feed)
local added = nil
for i = 1, #info - 1, 2 do
  if info[i] == 'entries-added' then
    added = info[i + 1]
  end
end
if not added then
  return redis.error_reply('the revocation feed: XINFO STREAM gave no entries-added (Redis 7 is needed)')
end
local newest = redis.call('XREVRANGE', feed, '+', '-', 'COUNT', 1)
local newest_id = newest[1] and newest[1][1] or ''
if place == '' then
  return {added, 1, {}, newest_id, run_id}
end
local here = #redis.call('XRANGE', feed, place, place)
local page = redis.call('XRANGE', feed, '(' .. place, '+', 'COUNT', ARGV[2])
return {added, here, page, newest_id, run_id}
