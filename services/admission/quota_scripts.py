"""Lua scripts of the admission decision, the settlement and the usage report.

Every script takes the same KEYS, all of one tenant and sharing its
``{tenant}`` hash tag, so each runs atomically on one Redis server or
cluster shard:

1. ``{tenant}:limits``: hash of the tenant's limits (see tenant_limits.py).
2. ``{tenant}:rpm``: sorted set, request id scored by admission time (the
   sliding-window log of requests per minute).
3. ``{tenant}:tpm``: sorted set, ``TOKENS:REQUEST_ID`` scored by admission
   time (the sliding-window log of reserved tokens per minute).
4. ``{tenant}:tpm_sum``: the sum of TOKENS over ``{tenant}:tpm``.
5. ``{tenant}:streams``: sorted set, request id scored by the expiry of its
   concurrency lease.
6. ``{tenant}:reservations``: hash, request id to
   ``PROMPT_TOKENS,MAX_TOKENS,DAY,MONTH`` of each unsettled reservation.
7. ``{tenant}:budget``: hash with the current UTC ``day`` and ``month``
   numbers and the tokens counted against them (``day_tokens``,
   ``month_tokens``); a new day or month starts again from 0.
8. ``{tenant}:usage``: hash of settled usage: ``requests``,
   ``prompt_tokens``, ``completion_tokens``, and ``reclaimed_requests`` and
   ``reclaimed_tokens`` for reservations whose lease expired unsettled.
9. ``{tenant}:settled``: sorted set, request id scored by settlement time:
   the idempotency markers, kept for ``SETTLED_RETENTION_SECONDS``.
10. ``{tenant}:reclaimed``: hash, request id to the reservation of each
    reclaimed request, kept as long as its marker.

Times are microseconds of the Redis server's clock (``TIME``). A lease that
expired unsettled (its admission process died or lost Redis for longer than
the lease) is reclaimed by the next script run for the tenant. Its full
reservation stays charged to the token windows and budgets, it is counted
under ``reclaimed_*``, and its request id is marked settled. When the
admission process was alive after all and settles the request before the
marker expires, that settlement replaces the full charge by the usage, once.
"""

from __future__ import annotations

SETTLED_RETENTION_SECONDS = 3600
MAX_RECLAIMS_PER_RUN = 100

# Shared by every script: time, calendar periods, trimming and reclaiming.
PRELUDE = """
local K_LIMITS, K_RPM, K_TPM, K_TPM_SUM, K_STREAMS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_RESERVATIONS, K_BUDGET, K_USAGE, K_SETTLED, K_RECLAIMED = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local WINDOW = 60000000
local DAY = 86400000000

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local today = math.floor(now / DAY)

-- Civil date of a day number since 1970-01-01 (H. Hinnant's algorithm).
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return year, month
end

local function days_from_civil(year, month)
  if month <= 2 then year = year - 1 end
  local era = math.floor(year / 400)
  local yoe = year - era * 400
  local mp = month > 2 and month - 3 or month + 9
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

local year, month_of_year = civil_from_days(today)
local this_month = year * 12 + month_of_year - 1
local next_month_start
if month_of_year == 12 then
  next_month_start = days_from_civil(year + 1, 1) * DAY
else
  next_month_start = days_from_civil(year, month_of_year + 1) * DAY
end

local function parse_reservation(value)
  local prompt, max_tokens, day, month = string.match(value, '^(%d+),(%d+),(%d+),(%d+)$')
  return tonumber(prompt), tonumber(max_tokens), tonumber(day), tonumber(month)
end

-- Tokens counted against today and this month; a new period starts at 0.
local function budget_used()
  local stored = redis.call('HMGET', K_BUDGET, 'day', 'day_tokens', 'month', 'month_tokens')
  local day_tokens, month_tokens = 0, 0
  if tonumber(stored[1]) == today then day_tokens = tonumber(stored[2]) end
  if tonumber(stored[3]) == this_month then month_tokens = tonumber(stored[4]) end
  return day_tokens, month_tokens
end

local function add_budget(tokens)
  local day_tokens, month_tokens = budget_used()
  redis.call('HSET', K_BUDGET, 'day', today, 'day_tokens', day_tokens + tokens,
    'month', this_month, 'month_tokens', month_tokens + tokens)
end

local function trim_rate()
  redis.call('ZREMRANGEBYSCORE', K_RPM, '-inf', now - WINDOW)
  return redis.call('ZCARD', K_RPM)
end

local function trim_tokens()
  local expired = redis.call('ZRANGEBYSCORE', K_TPM, '-inf', now - WINDOW)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + tonumber(string.match(member, '^(%d+):'))
    end
    redis.call('ZREMRANGEBYSCORE', K_TPM, '-inf', now - WINDOW)
    redis.call('DECRBY', K_TPM_SUM, freed)
  end
  if redis.call('ZCARD', K_TPM) == 0 then
    redis.call('DEL', K_TPM_SUM)
    return 0
  end
  return tonumber(redis.call('GET', K_TPM_SUM) or '0')
end

-- Drop markers older than the retention, and the reclaimed reservations they guard.
local function trim_settled(retention)
  local old = redis.call('ZRANGEBYSCORE', K_SETTLED, '-inf', now - retention)
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', K_SETTLED, '-inf', now - retention)
    for _, request_id in ipairs(old) do redis.call('HDEL', K_RECLAIMED, request_id) end
  end
end

local function mark_settled(request_id, retention)
  trim_settled(retention)
  redis.call('ZADD', K_SETTLED, now, request_id)
end

-- Reclaim leases that expired unsettled; returns the number of live leases.
local function reclaim_expired(retention)
  local expired = redis.call('ZRANGEBYSCORE', K_STREAMS, '-inf', now, 'LIMIT', 0, MAX_RECLAIMS)
  for _, request_id in ipairs(expired) do
    local reservation = redis.call('HGET', K_RESERVATIONS, request_id)
    if reservation then
      local prompt, max_tokens = parse_reservation(reservation)
      redis.call('HINCRBY', K_USAGE, 'reclaimed_requests', 1)
      redis.call('HINCRBY', K_USAGE, 'reclaimed_tokens', prompt + max_tokens)
      redis.call('HDEL', K_RESERVATIONS, request_id)
      redis.call('HSET', K_RECLAIMED, request_id, reservation)
    end
    redis.call('ZREM', K_STREAMS, request_id)
    mark_settled(request_id, retention)
  end
  return redis.call('ZCOUNT', K_STREAMS, '(' .. now, '+inf')
end
""".replace("MAX_RECLAIMS", str(MAX_RECLAIMS_PER_RUN))

# ARGV: 1 request id, 2 model, 3 service class name, 4 prompt tokens,
# 5 max_tokens, 6 lease time to live in microseconds, 7 marker retention in
# microseconds. Returns {outcome, limit name, limit value, used,
# retry_after_us, limits version}. Outcomes: 0 admitted, 1 a quota is
# exhausted, 2 permission denied, 3 invalid argument, 4 no stored limits.
# Nothing is written unless the request is admitted, except the reclaiming
# of expired leases and the trimming of expired log entries.
DECIDE_SCRIPT = PRELUDE + """
local request_id, model, service_class = ARGV[1], ARGV[2], ARGV[3]
local prompt, max_tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease_ttl, retention = tonumber(ARGV[6]), tonumber(ARGV[7])
local need = prompt + max_tokens

local names = {'version', 'disabled', 'allowed_models', 'allowed_service_classes', 'requests_per_minute',
  'tokens_per_minute', 'max_concurrent_streams', 'daily_token_budget', 'monthly_token_budget',
  'max_prompt_tokens', 'max_tokens'}
local overridable = {'requests_per_minute', 'tokens_per_minute', 'max_concurrent_streams', 'max_prompt_tokens', 'max_tokens'}
local fields = {}
for _, name in ipairs(names) do table.insert(fields, name) end
for _, name in ipairs(overridable) do table.insert(fields, service_class .. '.' .. name) end
local values = redis.call('HMGET', K_LIMITS, unpack(fields))
if not values[1] then
  return {4, '', 0, 0, 0, 0}
end
local limit = {}
for i, name in ipairs(names) do limit[name] = values[i] end
for i, name in ipairs(overridable) do
  local override = values[#names + i]
  if override then limit[name] = override end
end
local version = tonumber(limit.version)
for _, name in ipairs({'requests_per_minute', 'tokens_per_minute', 'max_concurrent_streams',
    'daily_token_budget', 'monthly_token_budget', 'max_prompt_tokens', 'max_tokens'}) do
  limit[name] = tonumber(limit[name] or '0')
end

-- HMGET returns false for a missing field, which allows all, as an empty list does.
local function listed(list, name)
  return not list or list == '' or string.find(',' .. list .. ',', ',' .. name .. ',', 1, true) ~= nil
end

-- Checks of the request alone: permissions and sizes.
if limit.disabled == '1' then return {2, 'disabled', 0, 0, 0, version} end
if not listed(limit.allowed_models, model) then return {2, 'allowed_models', 0, 0, 0, version} end
if not listed(limit.allowed_service_classes, service_class) then
  return {2, 'allowed_service_classes', 0, 0, 0, version}
end
if limit.max_prompt_tokens > 0 and prompt > limit.max_prompt_tokens then
  return {3, 'max_prompt_tokens', limit.max_prompt_tokens, prompt, 0, version}
end
if limit.max_tokens > 0 and max_tokens > limit.max_tokens then
  return {3, 'max_tokens', limit.max_tokens, max_tokens, 0, version}
end
for _, name in ipairs({'tokens_per_minute', 'daily_token_budget', 'monthly_token_budget'}) do
  if limit[name] > 0 and need > limit[name] then return {3, name, limit[name], need, 0, version} end
end

-- Checks against the counters, each after dropping what has expired.
local num_streams = reclaim_expired(retention)
if num_streams >= limit.max_concurrent_streams then
  return {1, 'max_concurrent_streams', limit.max_concurrent_streams, num_streams, 0, version}
end
local num_requests = trim_rate()
if num_requests >= limit.requests_per_minute then
  local oldest = redis.call('ZRANGE', K_RPM, 0, 0, 'WITHSCORES')
  return {1, 'requests_per_minute', limit.requests_per_minute, num_requests, tonumber(oldest[2]) + WINDOW - now, version}
end
local window_tokens = trim_tokens()
if limit.tokens_per_minute > 0 and window_tokens + need > limit.tokens_per_minute then
  -- Retry when enough of the oldest reservations leave the window.
  local retry_after, freed = 0, 0
  for _, entry in ipairs(redis.call('ZRANGE', K_TPM, 0, -1, 'WITHSCORES')) do
    if type(entry) == 'string' and string.find(entry, ':', 1, true) then
      freed = freed + tonumber(string.match(entry, '^(%d+):'))
    elseif window_tokens - freed + need <= limit.tokens_per_minute then
      retry_after = tonumber(entry) + WINDOW - now
      break
    end
  end
  return {1, 'tokens_per_minute', limit.tokens_per_minute, window_tokens, retry_after, version}
end
local day_tokens, month_tokens = budget_used()
if limit.daily_token_budget > 0 and day_tokens + need > limit.daily_token_budget then
  return {1, 'daily_token_budget', limit.daily_token_budget, day_tokens, (today + 1) * DAY - now, version}
end
if limit.monthly_token_budget > 0 and month_tokens + need > limit.monthly_token_budget then
  return {1, 'monthly_token_budget', limit.monthly_token_budget, month_tokens, next_month_start - now, version}
end

-- Every check passed: reserve a rate slot, the tokens and a lease.
redis.call('ZADD', K_RPM, now, request_id)
redis.call('PEXPIRE', K_RPM, WINDOW / 1000)
redis.call('ZADD', K_TPM, now, need .. ':' .. request_id)
redis.call('INCRBY', K_TPM_SUM, need)
redis.call('PEXPIRE', K_TPM, WINDOW / 1000)
redis.call('PEXPIRE', K_TPM_SUM, WINDOW / 1000)
add_budget(need)
redis.call('ZADD', K_STREAMS, now + lease_ttl, request_id)
redis.call('HSET', K_RESERVATIONS, request_id, prompt .. ',' .. max_tokens .. ',' .. today .. ',' .. this_month)
return {0, '', 0, 0, 0, version}
"""

# ARGV: 1 request id, 2 completion tokens, 3 "1" when the request started
# (its prompt reached the model), 4 "1" when admission reserved it in Redis,
# 5 prompt tokens (for a request admitted without a reservation), 6 marker
# retention in microseconds. Returns {outcome, tokens returned}: 0 settled
# (a reclaimed request included), 1 already settled, 2 no reservation and no
# marker (the marker expired), so nothing is changed.
SETTLE_SCRIPT = PRELUDE + """
local request_id, completion = ARGV[1], tonumber(ARGV[2])
local started, reserved = ARGV[3] == '1', ARGV[4] == '1'
local retention = tonumber(ARGV[6])
trim_settled(retention)

local function record_usage(prompt, completion_tokens)
  redis.call('HINCRBY', K_USAGE, 'requests', 1)
  redis.call('HINCRBY', K_USAGE, 'prompt_tokens', prompt)
  redis.call('HINCRBY', K_USAGE, 'completion_tokens', completion_tokens)
end

local reservation
if redis.call('ZSCORE', K_SETTLED, request_id) then
  reservation = reserved and redis.call('HGET', K_RECLAIMED, request_id)
  if not reservation then return {1, 0} end
  -- Settled after its lease was reclaimed: undo the reclaim, then settle as usual.
  local prompt, max_tokens = parse_reservation(reservation)
  redis.call('HDEL', K_RECLAIMED, request_id)
  redis.call('HINCRBY', K_USAGE, 'reclaimed_requests', -1)
  redis.call('HINCRBY', K_USAGE, 'reclaimed_tokens', -(prompt + max_tokens))
end

if not reserved then
  -- Admitted while Redis was unreachable: count what it used, once.
  local prompt = tonumber(ARGV[5])
  if started then
    record_usage(prompt, completion)
    add_budget(prompt + completion)
  end
  mark_settled(request_id, retention)
  return {0, 0}
end

reservation = reservation or redis.call('HGET', K_RESERVATIONS, request_id)
if not reservation then return {2, 0} end
local prompt, max_tokens, day, month = parse_reservation(reservation)
if completion > max_tokens then completion = max_tokens end
local used = 0
if started then used = prompt + completion end
local unused = prompt + max_tokens - used

-- Replace the reservation in the token window with the tokens used.
local member = (prompt + max_tokens) .. ':' .. request_id
local score = redis.call('ZSCORE', K_TPM, member)
if score then
  redis.call('ZREM', K_TPM, member)
  if used > 0 then redis.call('ZADD', K_TPM, score, used .. ':' .. request_id) end
  redis.call('DECRBY', K_TPM_SUM, unused)
end
-- Return the unused tokens to the budgets of the period they were taken from.
local stored = redis.call('HMGET', K_BUDGET, 'day', 'month')
if tonumber(stored[1]) == day then redis.call('HINCRBY', K_BUDGET, 'day_tokens', -unused) end
if tonumber(stored[2]) == month then redis.call('HINCRBY', K_BUDGET, 'month_tokens', -unused) end

if started then
  record_usage(prompt, completion)
else
  redis.call('ZREM', K_RPM, request_id)
end
redis.call('HDEL', K_RESERVATIONS, request_id)
redis.call('ZREM', K_STREAMS, request_id)
mark_settled(request_id, retention)
return {0, unused}
"""

# ARGV: 1 request id, 2 lease time to live in microseconds. Returns 1 when
# the lease was renewed, 0 when it had expired or been settled.
RENEW_SCRIPT = PRELUDE + """
local expiry = redis.call('ZSCORE', K_STREAMS, ARGV[1])
if not expiry or tonumber(expiry) <= now then return 0 end
redis.call('ZADD', K_STREAMS, now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# ARGV: 1 marker retention in microseconds. Returns {version, then for each
# of requests_per_minute, tokens_per_minute, max_concurrent_streams,
# daily_token_budget, monthly_token_budget: limit, used, reset time in
# microseconds since the epoch (0 when nothing resets), then the usage
# hash's requests, prompt_tokens, completion_tokens, reclaimed_requests,
# reclaimed_tokens}. Version 0 means the tenant has no stored limits.
REPORT_SCRIPT = PRELUDE + """
local retention = tonumber(ARGV[1])
local limits = redis.call('HMGET', K_LIMITS, 'version', 'requests_per_minute', 'tokens_per_minute',
  'max_concurrent_streams', 'daily_token_budget', 'monthly_token_budget')
local num_streams = reclaim_expired(retention)
local num_requests = trim_rate()
local window_tokens = trim_tokens()
local day_tokens, month_tokens = budget_used()

local function window_reset(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + WINDOW
end

local report = {tonumber(limits[1] or '0'),
  tonumber(limits[2] or '0'), num_requests, window_reset(K_RPM),
  tonumber(limits[3] or '0'), window_tokens, window_reset(K_TPM),
  tonumber(limits[4] or '0'), num_streams, 0,
  tonumber(limits[5] or '0'), day_tokens, (today + 1) * DAY,
  tonumber(limits[6] or '0'), month_tokens, next_month_start}
local usage = redis.call('HMGET', K_USAGE, 'requests', 'prompt_tokens', 'completion_tokens',
  'reclaimed_requests', 'reclaimed_tokens')
for i = 1, 5 do table.insert(report, tonumber(usage[i] or '0')) end
return report
"""
