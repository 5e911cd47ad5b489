-- Record a batch of heartbeats in one call (each machine's steps as before, in order).
-- KEYS[1] heartbeat index (zset), KEYS[2] offline marks, KEYS[3] pinned keys,
-- KEYS[4] key mismatches, KEYS[4 + i] machine i's live record.
-- ARGV[1] received_at, then per machine i: ARGV[3i - 1] machine id, ARGV[3i] public key
-- ('' when the heartbeat has none), ARGV[3i + 1] the compact live record.
-- Per machine, three replies: 'k' (its key is not the pinned one: nothing recorded),
-- 's' (record unchanged), 'n' (first record) or 'c' (changed); 1 when it was marked
-- offline, else 0; the previous record when changed, else ''.
-- The record is rewritten only when it changed: a heartbeat that only proves the machine
-- alive costs a ZADD and an HDEL.
local received_at = ARGV[1]
local out = {}
for i = 1, #KEYS - 4 do
  local machine_id = ARGV[3 * i - 1]
  local key = ARGV[3 * i]
  local record = ARGV[3 * i + 1]
  local refused = false
  if key ~= '' then
    redis.call('HSETNX', KEYS[3], machine_id, key)
    if redis.call('HGET', KEYS[3], machine_id) ~= key then
      redis.call('HSET', KEYS[4], machine_id, received_at)
      refused = true
    end
  end
  if refused then
    out[#out + 1] = 'k'
    out[#out + 1] = 0
    out[#out + 1] = ''
  else
    local previous = redis.call('GET', KEYS[4 + i])
    local code = 's'
    if not previous then
      code = 'n'
      previous = ''
      redis.call('SET', KEYS[4 + i], record)
    elseif previous ~= record then
      code = 'c'
      redis.call('SET', KEYS[4 + i], record)
    else
      previous = ''
    end
    redis.call('ZADD', KEYS[1], received_at, machine_id)
    out[#out + 1] = code
    out[#out + 1] = redis.call('HDEL', KEYS[2], machine_id)
    out[#out + 1] = previous
  end
end
return out
