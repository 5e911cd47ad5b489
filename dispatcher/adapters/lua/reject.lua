-- Record a run rejected at admission (or keep the existing run: duplicate run id).
-- KEYS: run, outbox, rejected_index
-- ARGV: 1 run_id, 2 now, 3 error, 4 tl_rejected, 5 retention_s, 6.. field/value pairs
local run, stream, rejected = KEYS[1], KEYS[2], KEYS[3]
local existing = redis.call('HGET', run, 'status')
if existing then return {'duplicate', existing} end
for i = 6, #ARGV, 2 do
  redis.call('HSET', run, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', run, 'status', '"rejected"', 'error', ARGV[3], 'finished_at', ARGV[2])
append_timeline(run, ARGV[4])
redis.call('EXPIRE', run, ARGV[5])
index_finished(rejected, ARGV[2], ARGV[1], ARGV[5])
return {'rejected', event(stream, run, 'rejected')}
