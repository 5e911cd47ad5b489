-- Change a queued run's priority or move it to the top: new score, possibly a new lane.
-- KEYS: run, queue, old_lane, new_lane, lanes
-- ARGV: 1 run_id, 2 new score, 3 old lane name, 4 new lane name, 5 priority fragment, 6 tl_entry
local run, queue, old_lane, new_lane, lanes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local status = redis.call('HGET', run, 'status')
if status ~= '"queued"' then return {'conflict', status or 'null'} end
redis.call('ZREM', old_lane, ARGV[1])
refresh_lane(lanes, old_lane, ARGV[3])
redis.call('ZADD', queue, ARGV[2], ARGV[1])
redis.call('ZADD', new_lane, ARGV[2], ARGV[1])
refresh_lane(lanes, new_lane, ARGV[4])
redis.call('HSET', run, '_score', ARGV[2], '_lane', '"' .. ARGV[4] .. '"', 'priority', ARGV[5])
append_timeline(run, ARGV[6])
return {'ok'}
