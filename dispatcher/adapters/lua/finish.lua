-- End a dispatched or running run (worker outcome, cancellation, lost machine).
-- KEYS: run, outbox, assigned, running_deadlines, finished_index
-- ARGV: 1 run_id, 2 fence ('' = any), 3 allowed statuses (space separated, JSON fragments),
--       4 new status, 5 error ('' = none), 6 outputs ('' = none), 7 now, 8 tl_entry, 9 retention,
--       10 machine id (JSON fragment, '' = any)
-- A machine ends only a run that is its own: the slot entry it deletes is its own, never the
-- entry of another machine that holds the run now (a fence can repeat after lost writes).
local run, stream, assigned, running, finished = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local state = redis.call('HMGET', run, 'status', 'fence', 'machine_id')
if not state[1] then return {'missing'} end
if ARGV[2] ~= '' and state[2] ~= ARGV[2] then return {'stale', state[1], state[2] or 'null'} end
if ARGV[10] ~= '' and state[3] ~= ARGV[10] then
  return {'stale', state[1], state[2] or 'null'}
end
if not string.find(' ' .. ARGV[3] .. ' ', ' ' .. state[1] .. ' ', 1, true) then
  return {'conflict', state[1]}
end
redis.call('HSET', run, 'status', '"' .. ARGV[4] .. '"', 'finished_at', ARGV[7])
if ARGV[5] ~= '' then redis.call('HSET', run, 'error', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', run, 'outputs', ARGV[6]) end
redis.call('HDEL', assigned, ARGV[1])
redis.call('ZREM', running, ARGV[1])
index_finished(finished, ARGV[7], ARGV[1], ARGV[9])
append_timeline(run, ARGV[8])
redis.call('EXPIRE', run, ARGV[9])
return {'ok', event(stream, run, ARGV[4])}
