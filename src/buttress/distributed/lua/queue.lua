-- The distributed fair queue: every operation of buttress.distributed, one script.
--
-- Loaded once and run by SHA.  ARGV[1] names the operation; the rest of ARGV is the
-- operation's own contract, written above each function below.  Every call declares
-- one key:
--
--   KEYS[1] = "buttress:{<name>}:meta"
--
-- and builds the queue's other key names from its prefix "buttress:{<name>}:":
--   meta     hash: seq, depth, state, shed_since, water marks, counters
--   ring     list: tenants with ready work, in DRR order (head = current turn)
--   deficit  hash: tenant -> DRR deficit counter
--   weights  hash: tenant -> weight (quantum per turn); absent = 1
--   leases   zset: task id, score = lease expiry (ms, Redis server time)
--   delayed  zset: failed task id waiting to be retried, score = when (ms)
--   depth    hash: "tenant\npriority" -> ready tasks
--   dead     list: dead-lettered task ids, newest first
--   done     list: "tenant\nid" of acknowledged tasks (only if completion_log > 0)
--   wake     list: tokens that wake idle workers blocked in BLPOP
--   req:<request id>  string, with a TTL: what a mutating call did, so that a resend of
--               the same call (same request id) is recognised and answered the same way
--   t:<tenant>  zset: the tenant's ready task ids, score = -priority
--   task:<id>   hash: name, payload, tenant, priority, score, deadline, attempts, lease, ...
-- Which tenant and task keys a call touches is only known inside the script (DRR picks
-- the tenant), so they cannot all be declared; every one carries the hash tag {<name>},
-- so all live in KEYS[1]'s Redis Cluster slot, which is what Redis Cluster requires.
--
-- The resend rule: a command that timed out on the client may still run, once or twice.
-- Every mutating operation carries a request id chosen by the client before its first
-- send; the first run records its outcome under req:<request id>, and a later run of
-- the same request returns that outcome instead of acting again.
--
-- Task ids are zero-padded sequence numbers: members with equal score (equal priority)
-- sort by id, which is FIFO order.

local META = KEYS[1]
local PREFIX = string.sub(META, 1, -5)  -- strip "meta"
local RING, DEFICIT, WEIGHTS = PREFIX .. 'ring', PREFIX .. 'deficit', PREFIX .. 'weights'
local LEASES, DEPTH, DEAD = PREFIX .. 'leases', PREFIX .. 'depth', PREFIX .. 'dead'
local DONE, WAKE, DELAYED = PREFIX .. 'done', PREFIX .. 'wake', PREFIX .. 'delayed'

-- Work an idle worker can be woken for: enqueues push at most this many wake tokens.
local MAX_WAKE_TOKENS = 64
-- A lease call reclaims at most this many expired leases and due retries (keeps it short).
local RECLAIM_PER_CALL = 100
-- Sanity bound on DRR visits in one lease call (fractional weights rotate without serving).
local MAX_VISITS = 10000
-- The Retry-After hint's drain rate is measured over the last 1-2 windows of this length.
local RATE_WINDOW_MS = 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function task_key(id) return PREFIX .. 'task:' .. id end
local function tenant_key(tenant) return PREFIX .. 't:' .. tenant end
-- The resend record of a call: PREFIX .. 'req:' .. its request id (a string with a TTL).
local REQUEST = PREFIX .. 'req:' .. (ARGV[2] or '')

-- Put a task into its tenant's queue; a tenant that had no ready work joins the ring's tail.
-- `depth`: the ready depth before this task, when the caller knows it (enqueue); the caller
-- then stores the new depth itself, and pushes a wake token only below MAX_WAKE_TOKENS
-- ready tasks: idle workers leased nothing when they went idle, so a backlog that long
-- has already pushed a token for each of the first MAX_WAKE_TOKENS tasks after it.
-- (Every redis.call costs about 2 us in the script: the enqueue path counts them.)
local function make_ready(id, tenant, score, priority, depth)
  local q = tenant_key(tenant)
  if redis.call('ZADD', q, score, id) == 1 and redis.call('ZCARD', q) == 1 then
    redis.call('RPUSH', RING, tenant)
  end
  redis.call('HINCRBY', DEPTH, tenant .. '\n' .. priority, 1)
  if depth then
    if depth < MAX_WAKE_TOKENS and redis.call('RPUSH', WAKE, '1') > MAX_WAKE_TOKENS then
      redis.call('LTRIM', WAKE, 0, MAX_WAKE_TOKENS - 1)
    end
    return
  end
  redis.call('HINCRBY', META, 'depth', 1)
  if redis.call('LLEN', WAKE) < MAX_WAKE_TOKENS then
    redis.call('RPUSH', WAKE, '1')
  end
end

-- The backpressure hysteresis, the same rule as the in-process TaskScheduler, applied
-- after every change of the ready depth: normal -> shedding when depth >= high_water,
-- shedding -> normal when depth <= low_water.  `state` is the stored state (false =
-- normal); returns the state after the rule.  No writes unless the state changes.
local function update_state(state, depth, high, low, now)
  if state == 'shedding' then
    if depth > low then return 'shedding' end
    local since = tonumber(redis.call('HGET', META, 'shed_since')) or now
    redis.call('HSET', META, 'state', 'normal')
    redis.call('HINCRBY', META, 'shedding_ms', now - since)
  elseif depth >= high then
    local leased = tonumber(redis.call('HGET', META, 'leased_total')) or 0
    redis.call('HSET', META, 'state', 'shedding', 'shed_since', now, 'shed_leased', leased)
    redis.call('HINCRBY', META, 'shed_entries', 1)
    return 'shedding'
  end
  return 'normal'
end

-- Workers do not know the producers' water marks: the last enqueue stored them.
local function update_state_from_meta(now)
  local m = redis.call('HMGET', META, 'high_water', 'low_water', 'depth', 'state')
  if m[1] then update_state(m[4], tonumber(m[3]) or 0, tonumber(m[1]), tonumber(m[2]), now) end
end

local function dead_letter(id, reason, now, max_dead)
  local key = task_key(id)
  redis.call('HSET', key, 'reason', reason, 'dead_at', now)
  redis.call('HDEL', key, 'lease', 'owner')
  redis.call('LPUSH', DEAD, id)
  redis.call('HINCRBY', META, 'dead', 1)
  if redis.call('LLEN', DEAD) > max_dead then
    redis.call('DEL', task_key(redis.call('RPOP', DEAD)))
  end
end

-- Acknowledge `n` tasks whose (id, delivery token) pairs start at ARGV[first]; each is
-- owner-checked by its token.  Returns the ids whose lease was lost (stale acks) and the
-- number acknowledged (the caller adds it to the `completed` counter).
local function apply_acks(first, n, done_max)
  local stale, done = {}, 0
  for i = 0, n - 1 do
    local id, tok = ARGV[first + 2 * i], ARGV[first + 1 + 2 * i]
    local key = task_key(id)
    local t = redis.call('HMGET', key, 'lease', 'tenant')
    if t[1] == tok then
      redis.call('ZREM', LEASES, id)
      redis.call('DEL', key)
      done = done + 1
      if done_max > 0 then
        redis.call('RPUSH', DONE, t[2] .. '\n' .. id)
        if redis.call('LLEN', DONE) > done_max then redis.call('LPOP', DONE) end
      end
    else
      stale[#stale + 1] = id
      redis.call('HINCRBY', META, 'stale_acks', 1)
    end
  end
  return stale, done
end

-- The operations, one block each: only the called one runs (an if-chain, not functions
-- in a table: this chunk runs on every EVALSHA, and closures or a table would be built
-- each time).
local operation = ARGV[1]

-- ENQUEUE: admit one task unless SHEDDING refuses it; evaluates the hysteresis.
-- ARGV: 2 request id, 3 tenant, 4 task name, 5 payload (JSON text), 6 priority (text),
--       7 score (-priority), 8 deadline ms ("" = none), 9 sheddable "1"/"0",
--       10 high_water, 11 low_water, 12 resend window ms
-- Returns {"ok", id, depth} or {"rejected", retry_after_ms, depth}.  A resend of an
-- admitted request returns {"ok", the same id, depth} and creates nothing.
if operation == 'enqueue' then
  local m = redis.call('HMGET', META, 'depth', 'state', 'high_water', 'low_water', 'seq')
  local depth = tonumber(m[1]) or 0
  -- The id this call would take; the record is written first, so a resend finds it.
  local id = string.format('%015d', (tonumber(m[5]) or 0) + 1)
  if not redis.call('SET', REQUEST, id, 'NX', 'PX', ARGV[12]) then
    return {'ok', redis.call('GET', REQUEST), depth}
  end
  local now = now_ms()
  local high, low = tonumber(ARGV[10]), tonumber(ARGV[11])
  if m[3] ~= ARGV[10] or m[4] ~= ARGV[11] then
    redis.call('HSET', META, 'high_water', ARGV[10], 'low_water', ARGV[11])
  end
  local state = update_state(m[2], depth, high, low, now)
  if state == 'shedding' and ARGV[9] == '1' then
    redis.call('DEL', REQUEST)  -- refused: nothing to remember, a resend is judged afresh
    redis.call('HINCRBY', META, 'rejected', 1)
    -- Hint: time to drain to low_water at the recent dequeue rate.  The rate runs from
    -- a sample point 1-2 s old (two samples, rolled forward by the rejections), not
    -- from the start of the shedding: an average since then kept a slow start or a
    -- stall of the workers in every hint (20-60 s hints after workers restarted).
    local r = redis.call('HMGET', META, 'shed_since', 'shed_leased', 'leased_total',
                         'rate_at', 'rate_leased', 'rate_next_at', 'rate_next_leased')
    local total = tonumber(r[3]) or 0
    local since = tonumber(r[1]) or now
    local a_at, a_n = tonumber(r[4]), tonumber(r[5])
    local b_at, b_n = tonumber(r[6]), tonumber(r[7])
    if not b_at or b_at < since then  -- the first hint of this shedding episode
      a_at, a_n = since, tonumber(r[2]) or 0
      b_at, b_n = a_at, a_n
    end
    if now - b_at >= RATE_WINDOW_MS then
      a_at, a_n, b_at, b_n = b_at, b_n, now, total
    end
    if a_at ~= tonumber(r[4]) or b_at ~= tonumber(r[6]) then
      redis.call('HSET', META, 'rate_at', a_at, 'rate_leased', a_n,
                 'rate_next_at', b_at, 'rate_next_leased', b_n)
    end
    local elapsed = now - a_at
    local drained = total - a_n
    local retry_ms = 1000
    if drained > 0 and elapsed > 0 then
      retry_ms = math.min(60000, math.max(10, math.max(1, depth - low) * elapsed / drained))
    end
    return {'rejected', math.floor(retry_ms), depth}
  end
  redis.call('HSET', task_key(id), 'name', ARGV[4], 'payload', ARGV[5], 'tenant', ARGV[3],
    'priority', ARGV[6], 'score', ARGV[7], 'deadline', ARGV[8], 'attempts', 0,
    'enqueued_at', now)
  make_ready(id, ARGV[3], ARGV[7], ARGV[6], depth)
  -- The sequence and the depth in one write (both were read above; the script is atomic).
  redis.call('HSET', META, 'seq', tonumber(id), 'depth', depth + 1)
  update_state(state, depth + 1, high, low, now)
  return {'ok', id, depth + 1}
end

-- LEASE: acknowledge finished tasks, reclaim expired leases, then lease up to `count`
-- tasks by deficit round robin -- one round trip for a worker's whole cycle.
-- ARGV: 2 request id (also the delivery token of the tasks leased), 3 lease_ms,
--       4 max_attempts, 5 max_dead_letters, 6 completion_log, 7 owner (worker name),
--       8 count, 9 n_acks, then n_acks pairs (task id, its delivery token)
-- Returns {stale_ack_ids, task, task, ...}; task = {id, name, payload, tenant,
--         priority, attempts, deadline}.  A resend of a request that acted (acked or
--         leased) acks nothing again and returns the tasks that request leased and
--         still holds: a lease whose reply was lost is not lost.
if operation == 'lease' then
  local token = ARGV[2]
  local known = redis.call('GET', REQUEST)
  if known then
    local out = {{}}
    for id in string.gmatch(known, '[^,]+') do
      local t = redis.call('HMGET', task_key(id), 'lease', 'name', 'payload', 'tenant',
        'priority', 'attempts', 'deadline')
      if t[1] == token then out[#out + 1] = {id, t[2], t[3], t[4], t[5], t[6], t[7]} end
    end
    return out
  end
  local now = now_ms()
  local lease_ms, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4])
  local max_dead, done_max = tonumber(ARGV[5]), tonumber(ARGV[6])
  local owner, count, n_acks = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
  -- The counters this call changes are read once here and written once at the end
  -- (one HSET instead of an HINCRBY per task: the worker's cycle is the hot path).
  local m = redis.call('HMGET', META, 'depth', 'completed', 'leased_total', 'high_water',
    'low_water', 'state')
  local depth0, completed0 = tonumber(m[1]) or 0, tonumber(m[2]) or 0
  local leased0 = tonumber(m[3]) or 0
  local depth, leased = depth0, leased0

  -- 1. Acknowledgements, each owner-checked by its delivery token.
  local stale, completed = apply_acks(10, n_acks, done_max)

  -- 2. Expired leases: back to the front of their tenant's queue, or dead after the
  --    last attempt.
  local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0,
    RECLAIM_PER_CALL)
  for _, id in ipairs(expired) do
    redis.call('ZREM', LEASES, id)
    local key = task_key(id)
    local t = redis.call('HMGET', key, 'tenant', 'score', 'priority', 'attempts')
    if t[1] then
      redis.call('HDEL', key, 'lease', 'owner')
      redis.call('HINCRBY', META, 'redelivered', 1)
      if tonumber(t[4]) >= max_attempts then
        dead_letter(id, 'lease expired on attempt ' .. t[4] .. ' of ' .. max_attempts ..
          ' (worker lost or handler slower than lease_ms)', now, max_dead)
      else
        make_ready(id, t[1], t[2], t[3], depth)
        depth = depth + 1
      end
    end
  end

  -- 3. Retries whose delay is over join their tenant's queue (ahead of newer tasks).
  local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, RECLAIM_PER_CALL)
  for _, id in ipairs(due) do
    redis.call('ZREM', DELAYED, id)
    local t = redis.call('HMGET', task_key(id), 'tenant', 'score', 'priority')
    if t[1] then
      make_ready(id, t[1], t[2], t[3], depth)
      depth = depth + 1
    end
  end

  -- 4. Deficit round robin.  The ring's head is the tenant whose turn it is; a turn
  -- starts (deficit < 1) by adding its quantum (weight), each lease costs 1, and the
  -- tenant goes to the tail when its deficit is spent or leaves when it has no work.
  local out = {stale}
  local ids = {}
  local visits = 0
  while #ids < count and visits < MAX_VISITS do
    visits = visits + 1
    local tenant = redis.call('LINDEX', RING, 0)
    if not tenant then break end
    local deficit = tonumber(redis.call('HGET', DEFICIT, tenant)) or 0
    if deficit < 1 then
      deficit = deficit + (tonumber(redis.call('HGET', WEIGHTS, tenant)) or 1)
    end
    local q = tenant_key(tenant)
    if deficit >= 1 then
      local popped = redis.call('ZPOPMIN', q)
      local id = popped[1]
      if id then
        local key = task_key(id)
        local t = redis.call('HMGET', key, 'name', 'payload', 'priority', 'deadline', 'attempts')
        if t[1] then
          local field = tenant .. '\n' .. t[3]
          if redis.call('HINCRBY', DEPTH, field, -1) <= 0 then redis.call('HDEL', DEPTH, field) end
          depth = depth - 1
          if t[4] ~= '' and tonumber(t[4]) <= now then
            redis.call('HINCRBY', META, 'expired', 1)
            dead_letter(id, 'expired: deadline passed before the task started', now, max_dead)
          else
            deficit = deficit - 1
            local attempts = tonumber(t[5]) + 1
            redis.call('HSET', key, 'attempts', attempts, 'lease', token, 'owner', owner,
              'leased_at', now)
            redis.call('ZADD', LEASES, now + lease_ms, id)
            leased = leased + 1
            ids[#ids + 1] = id
            out[#out + 1] = {id, t[1], t[2], tenant, t[3], attempts, t[4]}
          end
        end
      end
    end
    if redis.call('ZCARD', q) == 0 then
      redis.call('LPOP', RING)
      redis.call('HDEL', DEFICIT, tenant)
    else
      redis.call('HSET', DEFICIT, tenant, deficit)
      if deficit < 1 then redis.call('RPUSH', RING, redis.call('LPOP', RING)) end
    end
  end
  if redis.call('LLEN', RING) == 0 then redis.call('DEL', WAKE) end
  if depth ~= depth0 or completed > 0 or leased ~= leased0 then
    redis.call('HSET', META, 'depth', depth, 'completed', completed0 + completed,
      'leased_total', leased)
  end
  if m[4] then update_state(m[6], depth, tonumber(m[4]), tonumber(m[5]), now) end
  -- A call that neither acked nor leased changed nothing: a resend may act afresh.
  if #ids > 0 or n_acks > 0 then
    redis.call('SET', REQUEST, table.concat(ids, ','), 'PX', lease_ms)
  end
  return out
end

-- RENEW: acknowledge finished tasks and extend the leases still held by their tokens
-- (a worker's keeper: long handlers, prefetched tasks waiting their turn).
-- ARGV: 2 request id, 3 lease_ms, 4 completion_log, 5 n_acks, then n_acks pairs
--       (task id, token) to acknowledge, then pairs (task id, token) to renew.
-- Returns {stale_ack_ids, renewed count}.  A resend acks nothing again.
if operation == 'renew' then
  local lease_ms, n_acks = tonumber(ARGV[3]), tonumber(ARGV[5])
  local stale = {}
  if n_acks > 0 and not redis.call('GET', REQUEST) then
    local done
    stale, done = apply_acks(6, n_acks, tonumber(ARGV[4]))
    if done > 0 then redis.call('HINCRBY', META, 'completed', done) end
    redis.call('SET', REQUEST, '1', 'PX', lease_ms)
  end
  local now, renewed = now_ms(), 0
  for i = 6 + 2 * n_acks, #ARGV, 2 do
    if redis.call('HGET', task_key(ARGV[i]), 'lease') == ARGV[i + 1] then
      redis.call('ZADD', LEASES, now + lease_ms, ARGV[i])
      renewed = renewed + 1
    end
  end
  return {stale, renewed}
end

-- FAIL: owner-checked; retry while attempts < max_attempts and the failure is
-- retryable -- after `delay` ms in the delayed set, or at once back to the front of
-- its tenant's queue -- else dead-letter.
-- ARGV: 2 request id, 3 max_attempts, 4 max_dead_letters, 5 task id, 6 token,
--       7 reason, 8 retryable "1"/"0", 9 retry delay ms, 10 resend window ms
-- Returns "retried", "dead" or "stale"; a resend returns the first run's answer.
if operation == 'fail' then
  local known = redis.call('GET', REQUEST)
  if known then return known end
  local now = now_ms()
  local id, key = ARGV[5], task_key(ARGV[5])
  local t = redis.call('HMGET', key, 'lease', 'tenant', 'score', 'priority', 'attempts')
  local outcome
  if t[1] ~= ARGV[6] then
    redis.call('HINCRBY', META, 'stale_acks', 1)
    outcome = 'stale'
  else
    redis.call('ZREM', LEASES, id)
    redis.call('HDEL', key, 'lease', 'owner')
    redis.call('HSET', key, 'last_error', ARGV[7])
    redis.call('HINCRBY', META, 'failed', 1)
    if ARGV[8] == '1' and tonumber(t[5]) < tonumber(ARGV[3]) then
      redis.call('HINCRBY', META, 'retried', 1)
      if tonumber(ARGV[9]) > 0 then
        redis.call('ZADD', DELAYED, now + tonumber(ARGV[9]), id)
      else
        make_ready(id, t[2], t[3], t[4])
        update_state_from_meta(now)
      end
      outcome = 'retried'
    else
      dead_letter(id, ARGV[7], now, tonumber(ARGV[4]))
      outcome = 'dead'
    end
  end
  redis.call('SET', REQUEST, outcome, 'PX', ARGV[10])
  return outcome
end

-- REVIVE: put a dead-lettered task back in its tenant's queue with a fresh attempt count.
-- ARGV: 2 request id, 3 task id, 4 resend window ms.
-- Returns 1, or 0 if the id is not in the dead-letter list; a resend returns the first
-- run's answer.
if operation == 'revive' then
  local known = redis.call('GET', REQUEST)
  if known then return tonumber(known) end
  local id = ARGV[3]
  local revived = 0
  if redis.call('LREM', DEAD, 1, id) == 1 then
    local key = task_key(id)
    local t = redis.call('HMGET', key, 'tenant', 'score', 'priority')
    if t[1] then
      redis.call('HDEL', key, 'reason', 'dead_at', 'last_error')
      redis.call('HSET', key, 'attempts', 0)
      make_ready(id, t[1], t[2], t[3])
      redis.call('HINCRBY', META, 'revived', 1)
      update_state_from_meta(now_ms())
      revived = 1
    end
  end
  redis.call('SET', REQUEST, revived, 'PX', ARGV[4])
  return revived
end

return redis.error_reply('buttress queue script: unknown operation ' .. tostring(operation))
