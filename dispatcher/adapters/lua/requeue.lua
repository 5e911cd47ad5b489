-- Put a dispatched, never-started run back in its queue at its old position.
-- KEYS: run, queue, lane, lanes, deadlines, targets, assigned, outbox
-- ARGV: 1 run_id, 2 fence, 3 tl_entry, 4 target
local run, queue, lane, lanes, deadlines, targets, assigned, stream =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local state = redis.call('HMGET', run, 'status', 'fence', '_score', '_lane', 'queue_deadline')
if state[1] ~= '"dispatched"' or state[2] ~= ARGV[2] then return {'conflict', state[1] or 'null'} end
local lane_name = string.sub(state[4], 2, -2)
redis.call('HSET', run, 'status', '"queued"')
redis.call('HDEL', run, 'machine_id', 'fence', 'dispatched_at')
redis.call('HDEL', assigned, ARGV[1])
redis.call('ZADD', queue, state[3], ARGV[1])
redis.call('ZADD', lane, state[3], ARGV[1])
redis.call('ZADD', lanes, 'LT', state[3], lane_name)
redis.call('ZADD', deadlines, state[5], ARGV[1])
redis.call('SADD', targets, ARGV[4])
append_timeline(run, ARGV[3])
return {'ok', event(stream, run, 'queued')}
