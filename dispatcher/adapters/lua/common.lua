-- Shared helpers, prepended to every script. A run is a hash whose values are JSON
-- fragments; its record is assembled here by splicing them, so no JSON is parsed in Lua.

local function record_json(key, with_timeline)
  local h = redis.call('HGETALL', key)
  local req = '{}'
  local parts = {}
  for i = 1, #h, 2 do
    local k, v = h[i], h[i + 1]
    if k == 'req' then
      req = v
    elseif k == 'tl' then
      if with_timeline then parts[#parts + 1] = '"timeline":' .. v end
    elseif string.sub(k, 1, 1) ~= '_' then
      parts[#parts + 1] = '"' .. k .. '":' .. v
    end
  end
  local inner = string.sub(req, 2, -2)
  if #parts == 0 then return req end
  if inner == '' then return '{' .. table.concat(parts, ',') .. '}' end
  return '{' .. inner .. ',' .. table.concat(parts, ',') .. '}'
end

-- A run's timeline is bounded (TL_MAX_BYTES): past it, the oldest entries after the first
-- (``queued``) are dropped, so that a run waiting for days with changing reasons neither grows
-- without end nor makes every append rewrite more than the bound. Entries start '{"at":'.
local TL_MAX_BYTES = 16384

local function append_timeline(key, entry)
  if entry == nil or entry == '' then return end
  local tl = redis.call('HGET', key, 'tl')
  if not tl or tl == '[]' then
    tl = '[' .. entry .. ']'
  else
    tl = string.sub(tl, 1, -2) .. ',' .. entry .. ']'
    local first = string.find(tl, ',{"at":', 2, true)
    if #tl > TL_MAX_BYTES and first then
      local cut = first
      while #tl - (cut - first) > TL_MAX_BYTES do
        local nxt = string.find(tl, ',{"at":', cut + 1, true)
        if not nxt then break end
        cut = nxt
      end
      if cut > first then tl = string.sub(tl, 1, first - 1) .. string.sub(tl, cut) end
    end
  end
  redis.call('HSET', key, 'tl', tl)
end

-- Record a message to publish in the outbox stream; returns {id, kind, routing key, body}.
local function outbox(stream, kind, routing_key, body)
  local id = redis.call('XADD', stream, '*', 'k', kind, 'r', routing_key, 'b', body)
  return {id, kind, routing_key, body}
end

-- The routing key names the run's submitter (names.NO_SUBMITTER when none): broker topic
-- permissions then keep a submitter to its own runs' events.
local function event(stream, key, status)
  local submitter = redis.call('HGET', key, '_sub') or '-'
  return outbox(stream, 'event', 'run.' .. status .. '.' .. submitter, record_json(key, false))
end

-- Add a run to a finished index and drop (at most 100 per call, so a script stays short) the
-- entries older than the retention: their runs have expired, and the index stays bounded.
local function index_finished(index, at, run_id, retention)
  redis.call('ZADD', index, at, run_id)
  local cutoff = tonumber(at) - tonumber(retention)
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. cutoff, 'LIMIT', 0, 100)
  if #old > 0 then redis.call('ZREM', index, unpack(old)) end
end

-- Keep the lanes index pointing at the score of each lane's head run.
local function refresh_lane(lanes, lane_key, lane_name)
  local head = redis.call('ZRANGE', lane_key, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', lanes, lane_name)
  else
    redis.call('ZADD', lanes, head[2], lane_name)
  end
end

local function unqueue(run_id, queue, lane_key, lanes, lane_name, deadlines, targets, target)
  redis.call('ZREM', queue, run_id)
  redis.call('ZREM', lane_key, run_id)
  redis.call('ZREM', deadlines, run_id)
  refresh_lane(lanes, lane_key, lane_name)
  if redis.call('ZCARD', queue) == 0 then redis.call('SREM', targets, target) end
end
