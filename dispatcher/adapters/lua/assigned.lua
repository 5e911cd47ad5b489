-- The runs assigned to each of many machines, in one call, for the whole-fleet chores (the
-- machine gauges every few seconds, the unstarted-run sweep): only the machines with runs
-- cost a reply. Read with HGETALL per machine, 10,000 mostly idle machines were a fifth of a
-- replica's CPU for the gauges and as much again for the sweep.
-- KEYS[i] machine i's assigned runs (hash: run id -> mode|fence|user, codec.encode_assigned).
-- Reply: for each machine i with n > 0 runs: i, n, then its n run ids and values in turn.
local out = {}
for i = 1, #KEYS do
  local runs = redis.call('HGETALL', KEYS[i])
  if #runs > 0 then
    out[#out + 1] = i
    out[#out + 1] = #runs / 2
    for _, item in ipairs(runs) do
      out[#out + 1] = item
    end
  end
end
return out
