-- leader_renew.lua: extend this term's lease.
--
-- KEYS[1]  lease key.
-- ARGV[1]  lease value "<token>:<instance id>", ARGV[2] ttl in ms.
-- Returns 1 if the lease was this term's and now lasts ttl from now, else 0.
-- Comparing the token too means an instance id reused by another process (or by this one in
-- a later term) cannot extend someone else's term.  Idempotent: a second copy of the call
-- (resent after a client timeout) extends the same lease again.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
