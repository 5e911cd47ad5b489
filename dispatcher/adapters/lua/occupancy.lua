-- The unattended runs assigned to each of many machines, for the machine gauges, in one call.
-- KEYS[i] machine i's assigned runs (hash: run id -> mode|fence|user, codec.encode_assigned).
-- Reply: {i, n} for each machine i with n > 0 unattended runs (an idle machine costs no reply).
-- Counted here rather than read with HGETALL per machine: at 10,000 online machines the
-- replies alone (parsed into dicts every few seconds) were a fifth of a replica's CPU.
local out = {}
for i = 1, #KEYS do
  local n = 0
  for _, value in ipairs(redis.call('HVALS', KEYS[i])) do
    if string.sub(value, 1, 11) == 'unattended|' then
      n = n + 1
    end
  end
  if n > 0 then
    out[#out + 1] = i
    out[#out + 1] = n
  end
end
return out
