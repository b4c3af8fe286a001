-- Admission of one request: rate limits (GCRA) and a budget hold, in one atomic call.
-- KEYS: 1 limits hash, 2 GCRA requests, 3 GCRA tokens, 4 day spend, 5 month spend,
--       6 holds (zset: request id -> expiry ms), 7 hold amounts (hash), 8 held total
-- ARGV: 1 request id, 2 reserved tokens, 3 hold ms, 4 ms to day end, 5 ms to month end,
--       6 '1': requests/min only (count_tokens: no tokens/min, no budget, no hold)
-- Returns {code, retry_after_ms}, admitted {0, 0, requests/min, tokens/min} (the runtime keeps
-- them for its per-replica fallback while Redis is away): 0 admitted, 1 suspended, 2 no limits
-- provisioned,
--   3 requests/min, 4 tokens/min, 5 daily budget, 6 monthly budget,
--   7 one request's reservation exceeds tokens/min (never admissible)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = 60000

local lim = redis.call('HMGET', KEYS[1], 'daily_tokens', 'monthly_tokens', 'overage_allowed',
                       'requests_per_minute', 'tokens_per_minute', 'suspended')
if not lim[1] then return {2, 0} end
if lim[6] == '1' then return {1, 0} end
local daily, monthly = tonumber(lim[1]), tonumber(lim[2])
local overage = lim[3] == '1'
local rpm, tpm = tonumber(lim[4]), tonumber(lim[5])
local reserve = tonumber(ARGV[2])

-- Holds of requests whose runtime died expire here: a hold never leaks.
local held = tonumber(redis.call('GET', KEYS[8]) or '0')
local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 1000)
for _, rid in ipairs(expired) do
  held = held - tonumber(redis.call('HGET', KEYS[7], rid) or '0')
  redis.call('HDEL', KEYS[7], rid)
  redis.call('ZREM', KEYS[6], rid)
end
if held < 0 then held = 0 end
if #expired > 0 then redis.call('SET', KEYS[8], held) end

-- GCRA with a burst of one minute's allowance: returns the new TAT, or nil and the wait.
local function gcra(key, rate, cost)
  if rate <= 0 then return nil, minute end
  local interval = minute / rate
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local wait = new_tat - minute - now
  if wait > 0 then return nil, math.ceil(wait) end
  return new_tat, 0
end

local req_tat, req_wait = gcra(KEYS[2], rpm, 1)
if not req_tat then return {3, req_wait} end
if ARGV[6] == '1' then
  redis.call('SET', KEYS[2], req_tat, 'PX', math.ceil(req_tat - now) + 1)
  return {0, 0, rpm, tpm}
end
if tpm > 0 and reserve > tpm then return {7, 0} end
local tok_tat, tok_wait = gcra(KEYS[3], tpm, reserve)
if not tok_tat then return {4, tok_wait} end

-- Budgets: spent + in-flight holds + this reservation. With overage, a request starts while
-- anything is left, so the budget is exceeded by at most one reservation.
local function refused(spent, budget, period_end_ms)
  local over
  if overage then over = spent + held >= budget else over = spent + held + reserve > budget end
  if not over then return nil end
  -- Spent alone exhausts it: wait for the period's end; else in-flight holds may free it.
  if spent >= budget or (not overage and spent + reserve > budget) then return period_end_ms end
  return 1000
end
local wait = refused(tonumber(redis.call('GET', KEYS[4]) or '0'), daily, tonumber(ARGV[4]))
if wait then return {5, wait} end
wait = refused(tonumber(redis.call('GET', KEYS[5]) or '0'), monthly, tonumber(ARGV[5]))
if wait then return {6, wait} end

redis.call('SET', KEYS[2], req_tat, 'PX', math.ceil(req_tat - now) + 1)
redis.call('SET', KEYS[3], tok_tat, 'PX', math.ceil(tok_tat - now) + 1)
local hold_ms = tonumber(ARGV[3])
redis.call('ZADD', KEYS[6], now + hold_ms, ARGV[1])
redis.call('HSET', KEYS[7], ARGV[1], reserve)
redis.call('SET', KEYS[8], held + reserve)
for i = 6, 8 do redis.call('PEXPIRE', KEYS[i], hold_ms * 2) end
return {0, 0, rpm, tpm}
