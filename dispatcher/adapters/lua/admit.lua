-- Create a queued run, unless its run id exists (duplicate) or a shared limit refuses it.
-- Returns {'queued', event} | {'rejected', 'throttled' | 'queue_full', event} |
-- {'duplicate', status}.
-- KEYS: run, queue, lane, lanes, deadlines, targets, throttle, outbox, rejected_index
-- ARGV: 1 run_id, 2 score, 3 deadline, 4 lane_name, 5 target, 6 throttle_limit,
--       7 queue_cap, 8 now, 9 tl_queued, 10 retention_s, 11 throttled_error,
--       12 full_error, 13 tl_rejected, 14.. field/value pairs (JSON fragments, incl. req)
local run, queue, lane, lanes, deadlines, targets, throttle, stream, rejected =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local run_id, score, deadline, lane_name, target = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local throttle_limit, queue_cap, now = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]

local existing = redis.call('HGET', run, 'status')
if existing then return {'duplicate', existing} end

for i = 14, #ARGV, 2 do
  redis.call('HSET', run, ARGV[i], ARGV[i + 1])
end

-- Which limit refuses the run: the word says it to the caller, the error to the record.
local refusal, refusal_error = nil, nil
local used = tonumber(redis.call('GET', throttle) or '0')
if used >= throttle_limit then
  refusal, refusal_error = 'throttled', ARGV[11]
elseif redis.call('ZCARD', queue) >= queue_cap then
  refusal, refusal_error = 'queue_full', ARGV[12]
end

if refusal then
  redis.call('HSET', run, 'status', '"rejected"', 'error', refusal_error, 'finished_at', now)
  append_timeline(run, ARGV[13])
  redis.call('EXPIRE', run, ARGV[10])
  index_finished(rejected, now, run_id, ARGV[10])
  return {'rejected', refusal, event(stream, run, 'rejected')}
end

redis.call('INCR', throttle)
redis.call('EXPIRE', throttle, 120)
redis.call('HSET', run, 'status', '"queued"', 'queued_at', now, 'queue_deadline', deadline,
  '_score', score, '_lane', '"' .. lane_name .. '"')
append_timeline(run, ARGV[9])
redis.call('ZADD', queue, score, run_id)
redis.call('ZADD', lane, score, run_id)
redis.call('ZADD', lanes, 'LT', score, lane_name)
redis.call('ZADD', deadlines, deadline, run_id)
redis.call('SADD', targets, target)
return {'queued', event(stream, run, 'queued')}
