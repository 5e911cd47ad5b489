-- A worker reports a run running under a fence the store issued, but the store lost the claim
-- and the start (a host crash inside AOF's window, a failover to a lagging replica): it holds
-- the run queued, or dispatched under another hand-off that has not started. A worker only
-- runs a flow after its fenced start was recorded, so the report is the truth: the run becomes
-- running on the reporting machine (its slot taken), leaves its queue or the other hand-off
-- (whose fenced start is refused from now on: the run is not dispatched any more), and the
-- fence counter moves past the reported fence so that no later hand-off re-uses it.
-- KEYS: run, queue, lane, lanes, deadlines, targets, assigned (reporter), assigned (the other
--       hand-off's machine), outbox, running_deadlines, fence counter
-- ARGV: 1 run_id, 2 machine_id, 3 fence, 4 now, 5 tl_entry, 6 seconds from now to the run
--       deadline, 7 worker_id, 8 lane_name, 9 target, 10 assigned value (mode|fence|user)
local run, queue, lane, lanes, deadlines, targets, assigned, held, stream, running, counter =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11]
local state = redis.call('HMGET', run, 'status', 'machine_id', 'fence')
local here = state[2] == '"' .. ARGV[2] .. '"' and state[3] == ARGV[3]
if state[1] == '"queued"' then
  unqueue(ARGV[1], queue, lane, lanes, ARGV[8], deadlines, targets, ARGV[9])
elseif state[1] == '"dispatched"' and not here then
  redis.call('HDEL', held, ARGV[1])
else
  -- Running or ended (nothing to repair, or too late), or this very hand-off (start.lua).
  return {'refused', state[1] or 'null', state[3] or 'null'}
end
redis.call('HSET', run, 'status', '"running"', 'machine_id', '"' .. ARGV[2] .. '"',
  'fence', ARGV[3], 'started_at', ARGV[4], '_worker', '"' .. ARGV[7] .. '"')
redis.call('HSETNX', run, 'dispatched_at', ARGV[4])
redis.call('HSET', assigned, ARGV[1], ARGV[10])
local clock = redis.call('TIME')
local deadline = tonumber(clock[1]) + tonumber(clock[2]) / 1000000 + tonumber(ARGV[6])
redis.call('ZADD', running, string.format('%.6f', deadline), ARGV[1])
if tonumber(redis.call('GET', counter) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', counter, ARGV[3])
end
append_timeline(run, ARGV[5])
return {'ok', event(stream, run, 'started')}
