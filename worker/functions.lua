#!lua name=shellq
-- shellq's atomic steps (DESIGN.md "Guarantees"). Each checks before it writes, so a replay changes nothing.

-- Accept a command unless its id was accepted before.
-- KEYS: cmd, jrnl:<id>   ARGV: journal ttl, field, value, ...   -> {1, entry id} new | {0, entry id} known
local function submit(keys, args)
  local known = redis.call('HGET', keys[2], 'entry')
  if known then return {0, known} end
  local eid = redis.call('XADD', keys[1], '*', unpack(args, 2))
  redis.call('HSET', keys[2], 'entry', eid)
  redis.call('EXPIRE', keys[2], args[1])
  return {1, eid}
end

-- Publish a command's one result, record it in the journal and acknowledge the command entry.
-- KEYS: res, jrnl:<id>, cmd   ARGV: group, entry id, journal ttl, results maxlen, field, value, ...
-- -> {1, result id} published | {0, result id} published before (only acknowledged now)
local function commit(keys, args)
  local rid = redis.call('HGET', keys[2], 'res')
  local new = 0
  if not rid then
    rid = redis.call('XADD', keys[1], 'MAXLEN', '~', args[4], '*', unpack(args, 5))
    redis.call('HSET', keys[2], 'res', rid)
    redis.call('HSETNX', keys[2], 'entry', args[2])
    redis.call('EXPIRE', keys[2], args[3])
    new = 1
  end
  redis.call('XACK', keys[3], args[1], args[2])
  return {new, rid}
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The worker's heartbeat, stamped with the server's clock so no two clocks are compared.
-- KEYS: meta   ARGV: field, value, ...   -> the heartbeat time in ms
local function heartbeat(keys, args)
  local ms = now_ms()
  redis.call('HSET', keys[1], 'heartbeat_ms', ms, unpack(args))
  return ms
end

-- KEYS: meta   -> {server time ms, last heartbeat ms or false, worker state or false}
local function alive(keys, args)
  local meta = redis.call('HMGET', keys[1], 'heartbeat_ms', 'state')
  return {now_ms(), meta[1], meta[2]}
end

redis.register_function('shellq_submit', submit)
redis.register_function('shellq_commit', commit)
redis.register_function('shellq_heartbeat', heartbeat)
redis.register_function{function_name = 'shellq_alive', callback = alive, flags = {'no-writes'}}
