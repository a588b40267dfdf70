-- Remove policy ARGV[1] from the served set KEYS[1] (ledger::redis::SERVED_POLICIES_KEY) if no
-- replica noted serving it since ARGV[2] (Unix seconds): a replica that serves it again
-- meanwhile keeps it. Returns 1 if removed.
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if at and tonumber(at) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
