-- A worker starts a run: allowed only for the dispatched run, on this machine, under the
-- current fencing token. A stale or redelivered assignment is refused here. The worker that
-- started it may ask again (its answer was lost on the way): 'ok', and nothing changes.
-- KEYS: run, outbox, running_deadlines
-- ARGV: 1 run_id, 2 machine_id, 3 fence, 4 now, 5 tl_entry, 6 seconds from now to the run
--       deadline, 7 worker_id
-- The deadline is Redis's clock + those seconds: a worker's clock (which set ``now``) may be
-- off by minutes; the dispatchers enforce deadlines with Redis's clock.
local run, stream, running = KEYS[1], KEYS[2], KEYS[3]
local state = redis.call('HMGET', run, 'status', 'machine_id', 'fence', '_worker')
local here = state[2] == '"' .. ARGV[2] .. '"' and state[3] == ARGV[3]
if state[1] == '"running"' and here and state[4] == '"' .. ARGV[7] .. '"' then
  return {'ok'}
end
if state[1] ~= '"dispatched"' or not here then
  return {'refused', state[1] or 'null', state[3] or 'null'}
end
redis.call('HSET', run, 'status', '"running"', 'started_at', ARGV[4],
  '_worker', '"' .. ARGV[7] .. '"')
local clock = redis.call('TIME')
local deadline = tonumber(clock[1]) + tonumber(clock[2]) / 1000000 + tonumber(ARGV[6])
redis.call('ZADD', running, string.format('%.6f', deadline), ARGV[1])
append_timeline(run, ARGV[5])
return {'ok', event(stream, run, 'started')}
