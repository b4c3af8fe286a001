-- Budget alerts of one tenant: claim each crossed threshold once per period, atomically.
-- KEYS: 1 limits hash, 2 day spend, 3 month spend, 4 alerts stream,
--       5 the day's claims (hash), 6 the month's claims (hash)
-- ARGV: 1 day label (2026-11-27), 2 month label (2026-11), 3 day claims ttl s,
--       4 month claims ttl s, 5 now (RFC 3339), 6 the stream's approximate max length
-- Returns the alerts claimed now, flat: {budget, threshold, ...}. Every replica runs this after
-- a settlement; HSETNX in one script makes exactly one of them the sender of each alert, and
-- the alert is recorded (XADD) in the same atomic step, so a crash cannot claim without it.
local lim = redis.call('HMGET', KEYS[1], 'daily_tokens', 'monthly_tokens',
                       'included_monthly_tokens')
local day = tonumber(redis.call('GET', KEYS[2]) or '0')
local month = tonumber(redis.call('GET', KEYS[3]) or '0')
local checks = {
  {'daily', lim[1], day, KEYS[5], ARGV[1], ARGV[3]},
  {'monthly', lim[2], month, KEYS[6], ARGV[2], ARGV[4]},
  {'allowance', lim[3], month, KEYS[6], ARGV[2], ARGV[4]},
}
local fired = {}
for _, c in ipairs(checks) do
  local limit = tonumber(c[2] or '0') or 0
  if limit > 0 then
    for _, pct in ipairs({80, 100}) do
      if c[3] * 100 >= limit * pct
          and redis.call('HSETNX', c[4], c[1] .. ':' .. pct, ARGV[5]) == 1 then
        redis.call('EXPIRE', c[4], c[6])
        redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'budget', c[1],
                   'threshold', pct, 'period', c[5], 'used', c[3], 'limit', limit,
                   'at', ARGV[5])
        fired[#fired + 1] = c[1]
        fired[#fired + 1] = tostring(pct)
      end
    end
  end
end
return fired
