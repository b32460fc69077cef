-- dedupe_finish.lua: mark claimed messages done, or release them, if still ours.
--
-- KEYS[i]  record key of message i (one hash tag per call).
-- ARGV[1]  owner token of the claim call.
-- ARGV[2]  the transition: 'd' marks done (kept ARGV[3] ms), 'c' releases (lease ended at
--          once, TTL kept, ARGV[3] unused).
-- ARGV[3]  record TTL in ms for 'd'.
-- ARGV[4]  the attempt each key was claimed as, comma-separated in KEYS order.
-- Applies the transition only where the record is still claimed by this token at this
-- attempt, so an owner whose lease lapsed and was taken over is fenced off.  A record that
-- already shows the transition under this token and attempt counts as applied: an earlier
-- copy of this call (resent after a client timeout) ran first.
-- Returns one character per key: 1 applied, 0 fenced.
local token, target, ttl = ARGV[1], ARGV[2], ARGV[3]
local applied, i = {}, 0
for claimed_attempt in string.gmatch(ARGV[4], '%d+') do
  i = i + 1
  applied[i] = '0'
  local record = redis.call('GET', KEYS[i])
  if record then
    local state, attempt, fingerprint, holder = string.match(
      record, '^(%a)|(%d+)|%d+|(%x+)|(.*)$')
    if attempt == claimed_attempt and holder == token then
      local value = target .. '|' .. attempt .. '|0|' .. fingerprint .. '|' .. token
      if state == 'c' and target == 'd' then
        redis.call('SET', KEYS[i], value, 'PX', ttl)
        applied[i] = '1'
      elseif state == 'c' then
        redis.call('SET', KEYS[i], value, 'KEEPTTL')
        applied[i] = '1'
      elseif state == target then
        applied[i] = '1'
      end
    end
  end
end
return table.concat(applied)
