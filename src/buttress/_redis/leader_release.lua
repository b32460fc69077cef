-- leader_release.lua: end this term (compare-and-delete).
--
-- KEYS[1]  lease key.
-- ARGV[1]  lease value "<token>:<instance id>".
-- Returns 1 if this term's lease was deleted, 0 if it was not ours (or gone: deleted by an
-- earlier copy of this call resent after a client timeout, or expired).  Never deletes
-- another term's lease, whatever the number of copies.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
