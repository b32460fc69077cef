-- dedupe_claim.lua: claim message ids for one claim call of a Deduplicator.
--
-- KEYS[i]  record key of message i (one hash tag per call, so one slot).
-- ARGV[1]  owner token of this claim call, chosen by the client before its first send.
-- ARGV[2]  lease in ms; >= the TTL means "never lapses", written as 9999999999999
--          (NEVER_MS in buttress.dedupe.redis_store), as the single-claim SET NX path writes it.
-- ARGV[3]  record TTL in ms.
-- ARGV[4]  payload fingerprints, 16 hex digits per key, concatenated in KEYS order.
-- Returns one code per key, comma-separated:
--   n > 0  claimed by this call as attempt n (n > 1: taken over after attempt n - 1's lease
--          lapsed), or found already claimed by this same call (same token): an earlier copy
--          of this call, resent after a client timeout, ran first.  That claim is the caller's
--          own; its lease is renewed and its attempt answered.
--   0      duplicate (a done record)
--   -1     in progress (another owner's lease is live)
--   -2     conflict (the record holds another fingerprint)
-- Record value: state|attempt|lease_until_ms|fingerprint|token, state 'c' claimed or 'd' done.
-- SET NX decides every race between two consumers: Redis runs one command at a time.
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local token, ttl, fingerprints = ARGV[1], ARGV[3], ARGV[4]
local lease_until = string.format('%d', now + tonumber(ARGV[2]))
if tonumber(ARGV[2]) >= tonumber(ttl) then lease_until = '9999999999999' end
local fresh_head, fresh_tail = 'c|1|' .. lease_until .. '|', '|' .. token
local codes = {}
for i, key in ipairs(KEYS) do
  local fingerprint = string.sub(fingerprints, 16 * i - 15, 16 * i)
  if redis.call('SET', key, fresh_head .. fingerprint .. fresh_tail, 'NX', 'PX', ttl) then
    codes[i] = 1
  else
    local state, attempt, until_ms, held, holder = string.match(
      redis.call('GET', key), '^(%a)|(%d+)|(%d+)|(%x+)|(.*)$')
    if held ~= fingerprint then
      codes[i] = -2
    elseif state == 'd' then
      codes[i] = 0
    elseif holder == token then
      redis.call('SET', key, 'c|' .. attempt .. '|' .. lease_until .. '|' .. fingerprint
        .. '|' .. token, 'PX', ttl)
      codes[i] = tonumber(attempt)
    elseif tonumber(until_ms) > now then
      codes[i] = -1
    else
      local next_attempt = tonumber(attempt) + 1
      redis.call('SET', key, 'c|' .. next_attempt .. '|' .. lease_until .. '|' .. fingerprint
        .. '|' .. token, 'PX', ttl)
      codes[i] = next_attempt
    end
  end
end
return table.concat(codes, ',')
