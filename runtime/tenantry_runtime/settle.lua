-- Settlement of one request: drop its hold, charge the real tokens, give back unused
-- tokens/min, and append the usage event, atomically.
-- KEYS: as admit.lua, plus 9 usage stream, 10 the "settled" bucket (a hash of the request ids
--       settled in the same few seconds; before ARGV[7] existed: a marker key per request)
-- ARGV: 1 request id, 2 charged tokens, 3 day key ttl s, 4 month key ttl s,
--       5 the usage event (JSON), 6 the marker's ttl s (a bucket's: plus its width), 7 "bucket"
-- Idempotent per request id: a settlement replayed from the spool after Redis ran it (its
-- reply lost) finds its id, changes nothing and returns -2. Spool lines written before the
-- marker existed have 9 keys and settle as before.
if ARGV[7] then
  if redis.call('HSETNX', KEYS[10], ARGV[1], 1) == 0 then
    return -2
  end
  -- The bucket's first id sets its lifetime, for all the ids of its few seconds.
  if redis.call('HLEN', KEYS[10]) == 1 then
    redis.call('EXPIRE', KEYS[10], ARGV[6])
  end
elseif KEYS[10] and not redis.call('SET', KEYS[10], '1', 'NX', 'EX', ARGV[6]) then
  return -2
end
local reserved = tonumber(redis.call('HGET', KEYS[7], ARGV[1]) or '-1')
if reserved >= 0 then
  redis.call('HDEL', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  local held = tonumber(redis.call('GET', KEYS[8]) or '0') - reserved
  if held < 0 then held = 0 end
  redis.call('SET', KEYS[8], held)
end
-- An expired hold is still charged: the tokens were spent.
local charged = tonumber(ARGV[2])
if charged > 0 then
  redis.call('INCRBY', KEYS[4], charged)
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('INCRBY', KEYS[5], charged)
  redis.call('EXPIRE', KEYS[5], ARGV[4])
end
if reserved >= 0 and reserved ~= charged then
  local tpm = tonumber(redis.call('HGET', KEYS[1], 'tokens_per_minute') or '0')
  local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tpm > 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if tat < now then tat = now end
    -- Unused tokens are given back; tokens beyond the reservation (a small body naming a
    -- PDF or image by URL, a server tool's results) are charged, or tokens/min would
    -- only ever see the reservation.
    local back = tat - (reserved - charged) * 60000 / tpm
    if back > now then
      redis.call('SET', KEYS[3], back, 'PX', math.ceil(back - now) + 1)
    else
      redis.call('DEL', KEYS[3])
    end
  end
end
redis.call('XADD', KEYS[9], '*', 'request_id', ARGV[1], 'event', ARGV[5])
return reserved
