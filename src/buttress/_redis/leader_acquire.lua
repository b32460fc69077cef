-- leader_acquire.lua: start a new term of an election if no lease is held.
--
-- KEYS[1]  lease key, KEYS[2] fencing counter, KEYS[3] acquire-call key (one hash tag).
-- ARGV[1]  instance id, ARGV[2] ttl in ms,
-- ARGV[3]  call nonce, chosen by the client before the first send of this acquire and
--          reused by its retries.
-- Returns the term's fencing token (> 0); 0 if the lease is held by another call;
-- -1 if the counter was missing and a quarantine lease was set instead.
--
-- A lease held under this same nonce is this call's own: an earlier copy of the call
-- (resent after a client timeout, by redis-py or by the caller's retry) won it.  The script
-- answers that term's token and extends the lease by ttl from now, so the caller learns of
-- the lease it holds instead of being locked out by it for a ttl.
--
-- A missing counter means a first use or a Redis that lost its data (a restart without
-- persistence, a failover, a flush).  In the second case the leader elected before the loss
-- may still believe it leads until its local deadline, at most one ttl from now, so nobody
-- gets the lease for one ttl: the quarantine lease belongs to no instance ('0:').  The new
-- counter starts at the server clock in microseconds, so tokens keep increasing across the
-- loss for resources fenced outside this Redis.
if redis.call('EXISTS', KEYS[2]) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', KEYS[2], now[1] .. string.format('%06d', now[2]))
    redis.call('SET', KEYS[1], '0:', 'PX', ARGV[2])
    return -1
end
local held = redis.call('GET', KEYS[1])
if held then
    if redis.call('GET', KEYS[3]) == ARGV[3] then
        local token = tonumber(string.match(held, '^(%d+):'))
        if token and token > 0 then
            redis.call('PEXPIRE', KEYS[1], ARGV[2])
            redis.call('PEXPIRE', KEYS[3], ARGV[2])
            return token
        end
    end
    return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], string.format('%d', token) .. ':' .. ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return token
