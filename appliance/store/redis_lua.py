"""The Lua scripts the Redis store runs (EVALSHA; loaded with SCRIPT LOAD on
every new connection before the connection is used, see ``redis.py``).

Every write goes through one script so that guards, type checks, the writes
and the change-feed ``PUBLISH`` happen in one atomic step on the server.
"""

from __future__ import annotations

import hashlib

__all__ = ["Script", "WRITE", "SET"]

_WRITE_SCRIPT = r"""
-- ARGV[1] = length of the key namespace prefix, ARGV[2] = channel prefix,
-- then: nguards, (keyidx, present '0'|'1', value)*, nops,
-- (kind, keyidx, nargs, arg*)*
local nslen = tonumber(ARGV[1])
local chg = ARGV[2]
local i = 3
local types = {}
local function ktype(k)
  local t = types[k]
  if t == nil then
    t = redis.call('TYPE', k)['ok']
    types[k] = t
  end
  return t
end
local function wrongtype(k)
  return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value: '
                           .. string.sub(k, nslen + 1))
end
local ng = tonumber(ARGV[i]); i = i + 1
for g = 1, ng do
  local k = KEYS[tonumber(ARGV[i])]
  local present = ARGV[i + 1] == '1'
  local want = ARGV[i + 2]
  i = i + 3
  local t = ktype(k)
  if t ~= 'string' and t ~= 'none' then return wrongtype(k) end
  local cur = redis.call('GET', k)
  if present then
    if cur ~= want then return {0} end
  elseif cur then
    return {0}
  end
end
local nops = tonumber(ARGV[i]); i = i + 1
local ops = {}
for o = 1, nops do
  local n = tonumber(ARGV[i + 2])
  ops[o] = {ARGV[i], KEYS[tonumber(ARGV[i + 1])], i + 3, n}
  i = i + 3 + n
end
if nops > 1 then
  local sim = {}
  for o = 1, nops do
    local kind, k = ops[o][1], ops[o][2]
    local t = sim[k]
    if t == nil then t = ktype(k) end
    if kind == 'set' then
      sim[k] = 'string'
    elseif kind == 'delete' then
      sim[k] = 'none'
    elseif kind == 'hset' or kind == 'hdel' then
      if t ~= 'hash' and t ~= 'none' then return wrongtype(k) end
      if kind == 'hset' and ops[o][4] > 0 then sim[k] = 'hash' else sim[k] = t end
    elseif kind == 'zadd' or kind == 'zrem' then
      if t ~= 'zset' and t ~= 'none' then return wrongtype(k) end
      if kind == 'zadd' and ops[o][4] > 0 then sim[k] = 'zset' else sim[k] = t end
    elseif kind == 'expire' then
      sim[k] = t
    else
      return redis.error_reply('ERR unknown store op ' .. kind)
    end
  end
end
local function chunked(cmd, k, s, n)
  local total, j = 0, 0
  while j < n do
    local m = math.min(1000, n - j)
    total = total + redis.call(cmd, k, unpack(ARGV, s + j, s + j + m - 1))
    j = j + m
  end
  return total
end
local out = {1}
for o = 1, nops do
  local kind, k, s, n = ops[o][1], ops[o][2], ops[o][3], ops[o][4]
  local r, pub = 0, false
  if kind == 'set' then
    if ARGV[s + 1] ~= '' then
      redis.call('SET', k, ARGV[s], 'PX', ARGV[s + 1])
    else
      redis.call('SET', k, ARGV[s])
    end
    r, pub = 1, true
  elseif kind == 'delete' then
    r = redis.call('DEL', k); pub = r > 0
  elseif kind == 'expire' then
    r = redis.call('PEXPIRE', k, ARGV[s]); pub = r > 0
  elseif n > 0 then
    if kind == 'hset' then
      r = chunked('HSET', k, s, n); pub = true
    elseif kind == 'hdel' then
      r = chunked('HDEL', k, s, n); pub = r > 0
    elseif kind == 'zadd' then
      r = chunked('ZADD', k, s, n); pub = true
    elseif kind == 'zrem' then
      r = chunked('ZREM', k, s, n); pub = r > 0
    end
  end
  if pub then redis.call('PUBLISH', chg .. string.sub(k, nslen + 1), kind) end
  out[o + 1] = r
end
return out
"""


# The hot path: one plain SET (+ PUBLISH).  KEYS[1] = key; ARGV = value, px or '', channel
_SET_SCRIPT = r"""
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', ARGV[3], 'set')
return 1
"""



class Script:
    """A Lua script run with EVALSHA; ``sha`` is what SCRIPT LOAD answers."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


WRITE = Script(_WRITE_SCRIPT)
SET = Script(_SET_SCRIPT)


# Owner leases of the cluster's Redis witness (appliance/cluster/lease_witness.py).
# Claimed with a plain ``SET key value NX PX ttl``; these two compare the holder's
# value first, in one atomic step, so a node never extends or deletes a lease
# someone else holds now (its own expired and was taken meanwhile).
# KEYS[1] = lease key; ARGV = expected value, new value, ttl ms -> 1 renewed, 0 not ours
LEASE_RENEW_SOURCE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] = lease key; ARGV[1] = expected value -> 1 deleted, 0 not ours (or gone)
LEASE_RELEASE_SOURCE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
