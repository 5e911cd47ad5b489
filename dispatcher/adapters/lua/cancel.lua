-- Ask the worker of a running run to stop it: mark the run, note it in its timeline and
-- record the cancel message for its machine in the outbox, in one step (codec.cancel_body
-- builds the same message).
-- KEYS: run, outbox
-- ARGV: 1 run_id (JSON fragment), 2 reason (JSON fragment), 3 tl_entry
local run, stream = KEYS[1], KEYS[2]
local state = redis.call('HMGET', run, 'status', 'machine_id', 'fence')
if state[1] ~= '"running"' or not state[2] then return {'conflict', state[1] or 'null'} end
redis.call('HSET', run, 'cancel_requested', 'true')
append_timeline(run, ARGV[3])
local body = '{"run_id": ' .. ARGV[1] .. ', "fence": ' .. (state[3] or 'null') ..
  ', "reason": ' .. ARGV[2] .. '}'
return {'ok', outbox(stream, 'cancel', string.sub(state[2], 2, -2), body)}
