"""Lua scripts of the write-behind queue (see `write_behind`), run with EVAL / EVALSHA.

Each script touches the keys of one partition only (one hash tag, one Cluster slot).
"""

from __future__ import annotations

import hashlib

# The commit record of one transaction in one partition, atomically with its queued
# images in the entity cache (and, for a transaction that did no database work, its
# prepare records). KEYS: stream, entity keys; ARGV: tx, n, n prepare records, entries.
COMMIT = """local n = tonumber(ARGV[2])
for i = 1, n do redis.call('XADD', KEYS[1], '*', 't', 'p', 'x', ARGV[1], 'c', ARGV[2 + i]) end
redis.call('XADD', KEYS[1], '*', 't', 'c', 'x', ARGV[1])
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[1 + n + i]) end
return #KEYS - 1"""
COMMIT_SHA = hashlib.sha1(COMMIT.encode()).hexdigest()

# After a batch's database COMMIT: acknowledge and delete its records, and turn each
# queued cache entry that still holds the applied image into an ordinary one.
# KEYS: stream, entity keys; ARGV: group, n, n ids, then per key: expected, final, px
FINALIZE = """local n = tonumber(ARGV[2])
if n > 0 then
  local ids = {}
  for i = 1, n do ids[i] = ARGV[2 + i] end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
local a = 3 + n
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[a] then
    if ARGV[a + 1] == '' then redis.call('DEL', KEYS[i])
    elseif ARGV[a + 2] == '' then redis.call('SET', KEYS[i], ARGV[a + 1])
    else redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a + 2]) end
  end
  a = a + 3
end
return 1"""

# KEYS: lease, stream; ARGV: me, ttl ms, group, count. Only the lease holder reads, so a
# worker that lost its partition cannot take records out of the new owner's order.
READ = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local r = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[1], 'COUNT', ARGV[4],
  'STREAMS', KEYS[2], '>')
if not r then return {1} end
return {1, r}"""

# KEYS: lease; ARGV: me. Give a partition up only if this worker still holds it.
RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""
