-- End a queued run: queue deadline passed, cancelled, or failed before hand-off.
-- KEYS: run, queue, lane, lanes, deadlines, targets, outbox, finished_index
-- ARGV: 1 run_id, 2 new status, 3 error, 4 now, 5 tl_entry, 6 retention, 7 lane_name,
--       8 target, 9 only_if_deadline_passed ('1' or '0')
local run, queue, lane, lanes, deadlines, targets, stream, finished =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local state = redis.call('HMGET', run, 'status', 'queue_deadline')
if state[1] ~= '"queued"' then
  redis.call('ZREM', deadlines, ARGV[1])
  return {'conflict', state[1] or 'null'}
end
if ARGV[9] == '1' and tonumber(state[2]) > tonumber(ARGV[4]) then return {'not_due'} end
unqueue(ARGV[1], queue, lane, lanes, ARGV[7], deadlines, targets, ARGV[8])
redis.call('HSET', run, 'status', '"' .. ARGV[2] .. '"', 'finished_at', ARGV[4], 'error', ARGV[3])
index_finished(finished, ARGV[4], ARGV[1], ARGV[6])
append_timeline(run, ARGV[5])
redis.call('EXPIRE', run, ARGV[6])
return {'ok', event(stream, run, ARGV[2])}
