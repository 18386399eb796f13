"""Lua scripts of the Redis backends: each one is atomic on the server.

Standalone Redis runs `COMMIT` (everything a database commit sends) in one call; a
Cluster runs the single-key scripts in one pipeline per node.
"""

from __future__ import annotations

import hashlib

# Backend.advance: clock = max(server time in us, clock + 1); stamp KEYS[2:] with it. A
# clock that is not a number in [0, 2^53) (garbage) counts as absent.
ADVANCE = """local t = redis.call('TIME')
local clock, current = t[1] * 1000000 + t[2], tonumber(redis.call('GET', KEYS[1]))
if current and (current < 0 or current >= 9007199254740992) then current = nil end
if current and clock <= current then clock = current + 1 end
local text = string.format('%d', clock)
redis.call('SET', KEYS[1], text)
for i = 2, #KEYS do redis.call('SET', KEYS[i], text .. ':' .. ARGV[1]) end
return text"""
ADVANCE_SHA = hashlib.sha1(ADVANCE.encode()).hexdigest()
# KEYS[1]; ARGV: expect mode ("0" absent, "1" equal), expected, set mode ("0" delete,
# "1" set), value, px ("" for no expiry)
CAS = """local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if cur then return 0 end
elseif cur ~= ARGV[2] then
  return 0
end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
elseif ARGV[5] == '' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
return 1"""
CAS_SHA = hashlib.sha1(CAS.encode()).hexdigest()
# Many CAS in one script (one server): KEYS[i]; ARGV[1] is a msgpack array holding, per
# key, expect mode (0 absent, 1 equal), expected, value (false: delete), px (0: none).
# One argument instead of five per key: redis-py packs arguments one by one in Python.
CAS_BATCH = """local spec = cmsgpack.unpack(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local b = (i - 1) * 4
  local cur = redis.call('GET', KEYS[i])
  local ok = 1
  if spec[b + 1] == 0 then
    if cur then ok = 0 end
  elseif cur ~= spec[b + 2] then
    ok = 0
  end
  if ok == 1 then
    local value, px = spec[b + 3], spec[b + 4]
    if value == false then
      redis.call('DEL', KEYS[i])
    elseif px == 0 then
      redis.call('SET', KEYS[i], value)
    else
      redis.call('SET', KEYS[i], value, 'PX', px)
    end
  end
  out[i] = ok
end
return out"""
CAS_BATCH_SHA = hashlib.sha1(CAS_BATCH.encode()).hexdigest()
# Backend.commit, standalone: KEYS = clock, gens..., cas keys..., deletes...;
# ARGV = n gens, m cas, nonce, then 5 per cas item as in _CAS. A failed CAS deletes.
COMMIT = """local n, m, nonce = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local tomb, tpx = ARGV[4], ARGV[5]
local function drop(key)
  if tomb == '' then redis.call('DEL', key) else redis.call('SET', key, tomb, 'PX', tpx) end
end
local out, a = {}, 6
for i = 1, m do
  local key = KEYS[1 + n + i]
  local cur = redis.call('GET', key)
  local ok = 1
  if ARGV[a] == '0' then
    if cur then ok = 0 end
  elseif cur ~= ARGV[a + 1] then
    ok = 0
  end
  if ok == 0 or ARGV[a + 2] == '0' then
    drop(key)
  elseif ARGV[a + 4] == '' then
    redis.call('SET', key, ARGV[a + 3])
  else
    redis.call('SET', key, ARGV[a + 3], 'PX', ARGV[a + 4])
  end
  out[i] = ok
  a = a + 5
end
for i = 2 + n + m, #KEYS do drop(KEYS[i]) end
if n > 0 then
  local t = redis.call('TIME')
  local clock, current = t[1] * 1000000 + t[2], tonumber(redis.call('GET', KEYS[1]))
  if current and (current < 0 or current >= 9007199254740992) then current = nil end
  if current and clock <= current then clock = current + 1 end
  local text = string.format('%d', clock)
  redis.call('SET', KEYS[1], text)
  for i = 2, n + 1 do redis.call('SET', KEYS[i], text .. ':' .. nonce) end
end
return out"""
COMMIT_SHA = hashlib.sha1(COMMIT.encode()).hexdigest()
# The single-key form for Cluster pipelines: _CAS, but a failed compare deletes (or, with
# ARGV[6] non-empty, leaves that tombstone for ARGV[7] ms).
CAS_OR_DELETE = """local cur = redis.call('GET', KEYS[1])
local ok = 1
if ARGV[1] == '0' then
  if cur then ok = 0 end
elseif cur ~= ARGV[2] then
  ok = 0
end
if (ok == 0 or ARGV[3] == '0') and ARGV[6] and ARGV[6] ~= '' then
  redis.call('SET', KEYS[1], ARGV[6], 'PX', ARGV[7])
elseif ok == 0 or ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
elseif ARGV[5] == '' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
return ok"""
# Backend.swap_many_later: KEYS = keys to swap..., keys to read...; ARGV = how many to
# swap, the value, px. Returns what every key held before.
SWAP = """local n, out = tonumber(ARGV[1]), {}
for i = 1, #KEYS do
  out[i] = redis.call('GET', KEYS[i])
  if i <= n then redis.call('SET', KEYS[i], ARGV[2], 'PX', ARGV[3]) end
end
return out"""
