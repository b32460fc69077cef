-- fenced_write.lua: write a field of a fenced resource if the writer's token is current.
--
-- KEYS[1]  highest accepted token, KEYS[2] data hash (one hash tag).
-- ARGV[1]  fencing token, ARGV[2] field, ARGV[3] value.
-- Returns {1, token} if written, {0, highest accepted token} if rejected.
-- Equal tokens are accepted: a leader writes many times in one term, and a second copy of a
-- write (resent after a client timeout) writes the same value again.
local highest = redis.call('GET', KEYS[1])
if highest and tonumber(highest) > tonumber(ARGV[1]) then
    return {0, highest}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return {1, ARGV[1]}
