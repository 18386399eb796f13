"""Lua scripts of the write-behind queue (see `write_behind`), run with EVAL / EVALSHA.

Each script touches the keys of one partition only (one hash tag, one Cluster slot).
"""

from __future__ import annotations

import hashlib

# Where field k + 1 of an entry starts (1-based), after the array header and its first
# k fields (`codec.encode`: seven header fields, then the value); nil for bytes of
# another form. The header holds only nil, booleans, ints, floats, strings, binaries,
# arrays and maps.
_FIELD_AT = """local function field_at(s, k)
  local b = string.byte(s, 1)
  local pos
  if b == nil then return nil end
  if b >= 0x90 and b <= 0x9f then pos = 2 elseif b == 0xdc then pos = 4 else return nil end
  local need = k
  while need > 0 do
    b = string.byte(s, pos)
    if b == nil then return nil end
    need = need - 1
    local n8 = string.byte(s, pos + 1) or 0
    local n16 = n8 * 256 + (string.byte(s, pos + 2) or 0)
    if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3 then pos = pos + 1
    elseif b >= 0xa0 and b <= 0xbf then pos = pos + 1 + (b - 0xa0)
    elseif b >= 0x90 and b <= 0x9f then need = need + (b - 0x90); pos = pos + 1
    elseif b >= 0x80 and b <= 0x8f then need = need + 2 * (b - 0x80); pos = pos + 1
    elseif b == 0xcc or b == 0xd0 then pos = pos + 2
    elseif b == 0xcd or b == 0xd1 then pos = pos + 3
    elseif b == 0xca or b == 0xce or b == 0xd2 then pos = pos + 5
    elseif b == 0xcb or b == 0xcf or b == 0xd3 then pos = pos + 9
    elseif b == 0xd9 or b == 0xc4 then pos = pos + 2 + n8
    elseif b == 0xda or b == 0xc5 then pos = pos + 3 + n16
    elseif b == 0xdc then need = need + n16; pos = pos + 3
    elseif b == 0xde then need = need + 2 * n16; pos = pos + 3
    else return nil end
  end
  return pos
end
"""

_VALUE_AT = (
    _FIELD_AT
    + """local function value_at(s) return field_at(s, 7) end
-- the same row image: equal bytes, or equal version byte and value (the worker turns
-- a queued entry into an ordinary one without changing its value)
local function same(cur, want)
  if cur == want then return true end
  if not cur then return false end
  local a, b = value_at(cur), value_at(want)
  if a == nil or b == nil or string.byte(cur, 6) ~= string.byte(want, 6) then return false end
  return string.sub(cur, a) == string.sub(want, b)
end
"""
)

# The commit record of one transaction in one partition, atomically with its queued
# images in the entity cache (and its prepare records: all of them for a transaction
# that did no database work, those made again otherwise). KEYS: stream, m entity keys,
# f keys of the same rows under other live key versions (`write_behind_versions`);
# ARGV: tx, n, f, the expiry (ms) of those, the confirm deadline (ms, Redis's clock;
# 0: none), n prepare records, per other key the position of the entity key whose
# entry it takes (negative: a marker instead), an entry per entity key, then per key
# the entry its image was merged over ('' no check; '\0' none; see
# `write_behind_merge`). When one of those is not there any more nothing is written,
# and the answer is {0, index, current entry, ...} instead of {1}. Past the deadline
# nothing is written and the answer is an error (`WriteBehind.confirm_by`: the worker
# may have dead-lettered the prepare records already).
COMMIT = (
    _VALUE_AT
    + """local n = tonumber(ARGV[2])
local f = tonumber(ARGV[3])
local m = #KEYS - 1 - f
local px = ARGV[4]
local deadline = tonumber(ARGV[5])
if deadline > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > deadline then
    return redis.error_reply('SACLATE prepared too long ago to confirm: ' .. ARGV[1])
  end
end
local a = 5 + n + f
local bad = {}
for i = 1, m do
  local want = ARGV[a + m + i]
  if want and want ~= '' then
    local cur = redis.call('GET', KEYS[1 + i])
    if want == '\0' then
      if cur then bad[#bad + 1] = i; bad[#bad + 1] = cur end
    elseif not same(cur, want) then
      bad[#bad + 1] = i; bad[#bad + 1] = cur or false
    end
  end
end
if #bad > 0 then return {0, unpack(bad)} end
for i = 1, n do redis.call('XADD', KEYS[1], '*', 't', 'p', 'x', ARGV[1], 'c', ARGV[5 + i]) end
redis.call('XADD', KEYS[1], '*', 't', 'c', 'x', ARGV[1])
for i = 1, m do redis.call('SET', KEYS[1 + i], ARGV[a + i]) end
for j = 1, f do
  local at = tonumber(ARGV[5 + n + j])
  local value = 'sac-lease:wb:' .. ARGV[1]
  if at > 0 then value = ARGV[a + at] end
  redis.call('SET', KEYS[1 + m + j], value, 'PX', px)
end
return {1}"""
)
COMMIT_SHA = hashlib.sha1(COMMIT.encode()).hexdigest()

# After a batch's database COMMIT: acknowledge and delete its records, and turn each
# queued cache entry that still holds the applied image into an ordinary one (or delete
# it). A key holding something else is deleted too unless it is a queued entry or a
# write-behind marker (a newer change's): a row cached from the database while the
# change was queued is older than what was applied (`write_behind_versions`).
# KEYS: stream, entity keys; ARGV: group, n, n ids, then per key: expected, final, px
FINALIZE = (
    _FIELD_AT
    + """local function queued(s)
  if string.sub(s, 1, 13) == 'sac-lease:wb:' then return true end
  local pos = field_at(s, 6)
  if pos == nil then return false end
  local b = string.byte(s, pos)
  return b ~= nil and b >= 0x81 and b <= 0x8f and string.sub(s, pos + 1, pos + 3) == '\\162wb'
end
local n = tonumber(ARGV[2])
if n > 0 then
  local ids = {}
  for i = 1, n do ids[i] = ARGV[2 + i] end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
local a = 3 + n
for i = 2, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur == ARGV[a] then
    if ARGV[a + 1] == '' then redis.call('DEL', KEYS[i])
    elseif ARGV[a + 2] == '' then redis.call('SET', KEYS[i], ARGV[a + 1])
    else redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a + 2]) end
  elseif cur and not queued(cur) then
    redis.call('DEL', KEYS[i])
  end
  a = a + 3
end
return 1"""
)

# KEYS: lease, stream; ARGV: me, ttl ms, group, count, the last record id the worker
# has. Only the lease holder reads, so a worker that lost its partition cannot take
# records out of the new owner's order. Records delivered to it after that id first
# (a read whose reply it never got: they wait in its pending list, and '>' would
# never return them; the answer is then {2, ...}), then new ones: a read run twice
# returns the same records.
READ = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local own = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[1], 'COUNT', ARGV[4],
  'STREAMS', KEYS[2], ARGV[5])
if own and own[1] and #own[1][2] > 0 then return {2, own} end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[1], 'COUNT', ARGV[4],
  'STREAMS', KEYS[2], '>')
if not r then return {1} end
return {1, r}"""

# KEYS: lease; ARGV: me. Give a partition up only if this worker still holds it.
RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""
