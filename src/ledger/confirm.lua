-- Before a wait for replicas (ledger::redis::replicated): confirm that the primary this runs on
-- holds what the call before it wrote, then write the marker the wait covers. A failover
-- between the two (the call's primary lost, a replica without its write promoted, the client
-- sent here) would otherwise have the replicas acknowledge a marker, and not the write.
-- KEYS[1]: the marker (`sp:{P}:replicated`); KEYS[2..]: the keys written, each with ARGV[i - 1]:
-- `revoked` for a session state whose status must be it, else the 65-byte signature a
-- reservation is answered with, which its record in the nonce key must hold (a record extended
-- or replaced keeps its operation's id: the id would find the record as it was before). One
-- that does not: an error, nothing written.
for i = 2, #KEYS do
  local want = ARGV[i - 1]
  if want == 'revoked' then
    if redis.call('HGET', KEYS[i], 'status') ~= 'revoked' then
      return redis.error_reply('ledger: a revocation is not on this primary (lost in a failover?)')
    end
  else
    local data = redis.call('GET', KEYS[i])
    if not data or not string.find(data, want, 1, true) then
      return redis.error_reply('ledger: a reservation is not on this primary (lost in a failover?)')
    end
  end
end
redis.call('SET', KEYS[1], '1', 'EX', 3600)
return 1
