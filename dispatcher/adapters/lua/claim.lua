-- Hand a queued run to a machine: the atomic, fenced claim. Checks that the run is still
-- queued and that the machine still has room for it (another replica may have filled it),
-- then records the run under the fencing token reserved for this hand-off (the sealed secret
-- is bound to it, see transitions.reserve_handoffs) and the event and the assignment in the
-- outbox.
-- KEYS: run, queue, lane, lanes, deadlines, targets, assigned, outbox
-- ARGV: 1 run_id, 2 machine_id, 3 now, 4 mode, 5 user (case-folded), 6 slots,
--       7 lane_name, 8 target, 9 tl_entry, 10 assignment head (JSON members, see
--       codec.assignment_head; the assignment is codec.assignment_json spliced here),
--       11 fence
-- The machine's ``assigned`` hash maps run_id -> mode|fence|user (codec.encode_assigned).
local run, queue, lane, lanes, deadlines, targets, assigned, stream =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local run_id, machine_id, now, mode, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local slots = tonumber(ARGV[6])

if redis.call('HGET', run, 'status') ~= '"queued"' then return {'not_queued'} end

local unattended = 0
local others = redis.call('HVALS', assigned)
for _, value in ipairs(others) do
  local other_mode, _, other_user = string.match(value, '^([^|]*)|([^|]*)|(.*)$')
  if other_user == user then return {'user_busy'} end
  if other_mode == 'unattended' then unattended = unattended + 1 end
end
if mode == 'unattended' and unattended >= slots then return {'no_slot'} end

local fence = tonumber(ARGV[11])
redis.call('HSET', run, 'status', '"dispatched"', 'machine_id', '"' .. machine_id .. '"',
  'fence', fence, 'dispatched_at', now)
unqueue(run_id, queue, lane, lanes, ARGV[7], deadlines, targets, ARGV[8])
redis.call('HSET', assigned, run_id, mode .. '|' .. fence .. '|' .. user)
append_timeline(run, ARGV[9])
local req = redis.call('HGET', run, 'req')
local assignment = '{"fence":' .. fence .. ',' .. ARGV[10] .. ',"request":' .. req .. '}'
return {'ok', fence, event(stream, run, 'dispatched'), outbox(stream, 'assign', machine_id, assignment)}
