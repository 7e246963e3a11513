#!lua name=shellq
-- shellq's atomic steps (docs/design.md "Guarantees"). Each checks before it writes, so a replay changes nothing, and
-- every step of a worker is fenced by its lease token: a worker that lost its lease can neither take nor commit.

-- The library's version, raised with every change to it. Every call passes 'shellq/<version>' first (ARGV[1],
-- not shown below): a caller of another version is refused with a VERSION error instead of having its arguments
-- misread. shellq never replaces a newer library with an older one (see worker/protocol.py).
local VERSION = 9
local CALLER = 'shellq/' .. VERSION

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Fenced: nobody else holds the lease. An expired lease nobody took (a slow heartbeat) still lets its last
-- holder go on; the heartbeat takes it again.
local function holds_lease(lease_key, token)
  local holder = redis.call('GET', lease_key)
  return holder == false or holder == token
end

-- shellq:{S}:<name> from shellq:{S}:cmd
local function session_key(cmd_key, name)
  return string.sub(cmd_key, 1, #cmd_key - 3) .. name
end

-- Accept a command unless its id was accepted before or the session's queue is full. The session's meta is read,
-- not declared: a producer's user may read it but not write it (FCALL needs write access to every declared key),
-- and it shares the session's hash slot.
-- KEYS: cmd, jrnl:<id>, seq   ARGV: journal ttl, default queue cap, command id, field, value, ...
-- -> {1, entry id} new | {0, entry id} known | {-1, depth, cap} queue full | {-2, state} session lost or gone
local function submit(keys, args)
  local known = redis.call('HGET', keys[2], 'entry')
  if known then return {0, known} end
  local meta = redis.call('HMGET', session_key(keys[1], 'meta'), 'state', 'queue_cap', 'settled')
  if meta[1] == 'lost' or meta[1] == 'gone' then return {-2, meta[1]} end
  local cap = tonumber(meta[2] or args[2])
  local depth = tonumber(redis.call('GET', keys[3]) or 0) - tonumber(meta[3] or 0)
  if depth >= cap then return {-1, depth, cap} end
  local eid = redis.call('XADD', keys[1], '*', unpack(args, 4))
  redis.call('INCR', keys[3])
  redis.call('HSET', keys[2], 'entry', eid)
  redis.call('EXPIRE', keys[2], args[1])
  -- shellq:{S}:jrnl:<entry id> -> command id: a worker can name the command of an entry trimmed before it ran
  local by_entry = string.sub(keys[2], 1, #keys[2] - #args[3]) .. eid
  redis.call('SET', by_entry, args[3], 'EX', args[1])
  return {1, eid}
end

-- The id a command entry answers to (protocol.command_id): its client `id` when valid, else its entry id.
local function command_id(eid, fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then
      local v = fields[i + 1]
      if #v <= 64 and string.find(v, '^[%w][%w_%-]*$') and not string.find(v, '^%d+%-%d+$') then return v end
      return eid
    end
  end
  return eid
end

-- shellq:{S}:jrnl:<id> from shellq:{S}:cmd (the journal keys are named by the command id, not known in advance)
local function journal_key(cmd_key, id)
  return string.sub(cmd_key, 1, #cmd_key - 3) .. 'jrnl:' .. id
end

-- Take the next new command for the lease holder (XREADGROUP ... COUNT 1 >, never blocking). An entry answered
-- before it was taken is acknowledged and skipped: it never runs. Given the journal ttl (the worker), the command id
-- is claimed for the entry (journal `entry`) unless another entry holds it, and the reply names the id's owner: when
-- that is another entry, the worker answers this one `rejected` as a duplicate; and why a producer cancelled the
-- command before it was taken (journal `cancelled`), if it did: the worker then commits it `cancelled`, unrun.
-- Without the ttl (a reaper answering what is left), the reply is XREADGROUP's own.
-- KEYS: cmd, lease   ARGV: token, group, consumer[, journal ttl]
-- -> {XREADGROUP reply, entry id owning the command id, cancel reason or false} with the ttl, else the XREADGROUP
--    reply | nil
local function take(keys, args)
  if not holds_lease(keys[2], args[1]) then return redis.error_reply('FENCED lease lost') end
  while true do
    local reply = redis.call('XREADGROUP', 'GROUP', args[2], args[3], 'COUNT', 1, 'STREAMS', keys[1], '>')
    if not reply then return nil end
    local eid, fields = reply[1][2][1][1], reply[1][2][1][2]
    local jrnl = journal_key(keys[1], command_id(eid, fields))
    local meta = redis.call('HMGET', jrnl, 'entry', 'res', 'cancelled')
    if meta[1] == eid and meta[2] then
      redis.call('XACK', keys[1], args[2], eid)
    elseif not args[4] then
      return reply
    else
      if not meta[1] then  -- written by hand (no submit counted it): counted now, as its commit settles it
        redis.call('HSET', jrnl, 'entry', eid)
        redis.call('EXPIRE', jrnl, args[4])
        redis.call('INCR', session_key(keys[1], 'seq'))
      end
      return {reply, meta[1] or eid, meta[1] == eid and meta[3]}
    end
  end
end

-- Has the consumer group delivered entry `eid` (is it at or below the group's last-delivered-id)? No group yet
-- (no worker ever served the session) or no stream: not delivered.
local function delivered(cmd_key, group, eid)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', cmd_key)
  if not ok then return false end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      local last_ms, last_seq = string.match(info['last-delivered-id'], '^(%d+)-(%d+)$')
      local ms, seq = string.match(eid, '^(%d+)-(%d+)$')
      last_ms, last_seq, ms, seq = tonumber(last_ms), tonumber(last_seq), tonumber(ms), tonumber(seq)
      return ms < last_ms or (ms == last_ms and seq <= last_seq)
    end
  end
  return false
end

-- Cancel a command no worker has taken yet: note why in its journal (`cancelled`) so that no worker ever runs it (the
-- worker that takes it commits it `cancelled`, unrun, and only then it stops counting against the queue cap). A
-- command already taken cannot be cancelled here: it counts as started. Only a worker writes the result stream
-- and the session's meta.
-- KEYS: cmd, jrnl:<id>   ARGV: group, entry id, journal ttl, reason
-- -> {1} cancelled now | {0, result id} answered before | {3, reason} cancelled before | {2} taken: started
--    | {-1} not this entry's id
local function cancel(keys, args)
  local meta = redis.call('HMGET', keys[2], 'entry', 'res', 'cancelled')
  if meta[2] then return {0, meta[2]} end
  if meta[1] ~= args[2] then return {-1} end
  if meta[3] then return {3, meta[3]} end
  if delivered(keys[1], args[1], args[2]) then return {2} end
  redis.call('HSET', keys[2], 'cancelled', args[4])
  redis.call('EXPIRE', keys[2], args[3])
  return {1}
end

-- Publish a command's one result, record it in the journal and acknowledge the command entry.
-- A running session is idle from now until a heartbeat says otherwise (one on its way about this command won't).
-- KEYS: res, jrnl:<id>, cmd, lease, meta
-- ARGV: token, group, entry id, journal ttl, results maxlen, command id, field, value, ...
-- -> {1, result id} published | {0, result id} published before (only acknowledged now)
local function commit(keys, args)
  if not holds_lease(keys[4], args[1]) then return redis.error_reply('FENCED lease lost') end
  local rid = redis.call('HGET', keys[2], 'res')
  local new = 0
  if not rid then
    rid = redis.call('XADD', keys[1], 'MAXLEN', '~', args[5], '*', unpack(args, 7))
    -- an entry already named (by the submit or the take) counted against the queue cap: it is settled now
    if redis.call('HSETNX', keys[2], 'entry', args[3]) == 0 then redis.call('HINCRBY', keys[5], 'settled', 1) end
    redis.call('HSET', keys[2], 'res', rid)
    redis.call('EXPIRE', keys[2], args[4])
    new = 1
  end
  redis.pcall('XACK', keys[3], args[2], args[3])  -- the group may be gone (Redis came back empty)
  if redis.call('HGET', keys[5], 'state') == 'running' then
    redis.call('HSET', keys[5], 'last_done', args[6], 'state', 'idle', 'current', '')
  else
    redis.call('HSET', keys[5], 'last_done', args[6])
  end
  return {new, rid}
end

-- Take or keep the session's lease. A new holder bumps the fencing epoch.
-- KEYS: lease, meta   ARGV: token, ttl ms   -> {1, epoch} held | {0, ms until the current holder's lease expires}
local function acquire(keys, args)
  local holder = redis.call('GET', keys[1])
  if holder and holder ~= args[1] then return {0, redis.call('PTTL', keys[1])} end
  redis.call('SET', keys[1], args[1], 'PX', args[2])
  if not holder then
    return {1, redis.call('HINCRBY', keys[2], 'fence', 1)}
  end
  return {1, tonumber(redis.call('HGET', keys[2], 'fence') or 0)}
end

-- Renew the lease (or take it again if it expired with nobody else taking it, e.g. across a Redis restart) and
-- beat the heartbeat, stamped with the server's clock so no two clocks are compared.
-- KEYS: lease, meta   ARGV: token, ttl ms, field, value, ...   -> 1 renewed | 0 the lease is someone else's
local function heartbeat(keys, args)
  local holder = redis.call('GET', keys[1])
  if holder and holder ~= args[1] then return 0 end
  redis.call('SET', keys[1], args[1], 'PX', args[2])
  if not holder then redis.call('HINCRBY', keys[2], 'fence', 1) end
  local now = now_ms()
  redis.call('HSET', keys[2], 'heartbeat_ms', now, unpack(args, 3))
  -- Since when the worker can take nothing because Redis refuses it (its field `refused`); '' while it takes.
  local refused = redis.call('HGET', keys[2], 'refused') or ''
  local since = redis.call('HGET', keys[2], 'refused_ms') or ''
  if refused ~= '' and since == '' then
    redis.call('HSET', keys[2], 'refused_ms', now)
  elseif refused == '' and since ~= '' then
    redis.call('HSET', keys[2], 'refused_ms', '')
  end
  local current = redis.call('HGET', keys[2], 'current')
  if current and current ~= '' and current == redis.call('HGET', keys[2], 'last_done') then
    redis.call('HSET', keys[2], 'state', 'idle', 'current', '')  -- stamped running before that command's commit
  end
  return 1
end

-- KEYS: meta   -> {server time ms, last heartbeat ms or false, worker state or false, since when Redis refuses the
-- worker's takes (ms; false or '' while it takes), Redis's words}
local function alive(keys, args)
  local meta = redis.call('HMGET', keys[1], 'heartbeat_ms', 'state', 'refused_ms', 'refused')
  return {now_ms(), meta[1], meta[2], meta[3], meta[4]}
end

local function versioned(fn)
  return function(keys, args)
    if args[1] ~= CALLER then
      return redis.error_reply('VERSION the shellq functions in Redis are version ' .. VERSION ..
        '; the caller is another version of shellq (' .. tostring(args[1]) .. ')')
    end
    table.remove(args, 1)
    return fn(keys, args)
  end
end

-- -> the library's version
local function version(keys, args)
  return VERSION
end

-- At maxmemory (noeviction), Redis refuses new work (submit, take) but not what settles work already done: the result
-- of a command that ran is recorded (one result a session beyond the limit at most: nothing more is taken), and the
-- lease and heartbeat go on, so the session is not taken for dead. A cancel settles a command too.
local settles = {'allow-oom'}
redis.register_function('shellq_submit', versioned(submit))
redis.register_function('shellq_take', versioned(take))
redis.register_function{function_name = 'shellq_commit', callback = versioned(commit), flags = settles}
redis.register_function{function_name = 'shellq_cancel', callback = versioned(cancel), flags = settles}
redis.register_function{function_name = 'shellq_acquire', callback = versioned(acquire), flags = settles}
redis.register_function{function_name = 'shellq_heartbeat', callback = versioned(heartbeat), flags = settles}
redis.register_function{function_name = 'shellq_alive', callback = versioned(alive), flags = {'no-writes'}}
redis.register_function{function_name = 'shellq_version', callback = version, flags = {'no-writes'}}
