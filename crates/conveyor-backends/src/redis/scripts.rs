//! The Lua scripts: every state change of the queue is one of these, run atomically by Redis
//! (EVALSHA; the driver falls back to EVAL once after a restart flushed the script cache).
//!
//! Every key a script touches starts with the deployment's tag (`{conveyor}` by default), so
//! all of them hash to one Redis Cluster slot — the slot of `KEYS[1]`, which every call passes.
//! The tag is `ARGV[1]`. Key layout (ARCHITECTURE.md has the full table):
//!
//! - `T:j:<id>` — a job's hash: `q` queue, `pr` priority, `m` max attempts, `a` attempts,
//!   `av` available at, `c` created at, `d` the immutable rest (compact JSON: kind, payload,
//!   backoff, timeout, tags, batch, workflow), `u` unique key, `h` = 1 when the job has engine
//!   hooks (batch / workflow), `s` state (`w` waiting, `r` reserved, `f` failed), `t` lease
//!   token, `ra` reserved at, `w` worker, `e` last error, `fa` failed at, `rt` runtime.
//! - `T:q:<queue>:r` ready (score −priority; ties by id, which is time-ordered), `:d` delayed
//!   (score = due time), `:l` leased (score = lease end), `:f` failed (score = failed at).
//! - `T:queues`, `T:paused` (sets), `T:failed` (every failed job, by time), `T:done` (the
//!   completed history, newest first, capped), `T:u:<key>` (unique locks, with a TTL),
//!   `T:h` (outcome records waiting for the store's hooks), `T:relayed` (outbox ids relayed
//!   in the last minutes), `T:m:<minute>` + `T:mi` (metrics), `T:w` + `T:ws` (workers).
//!
//! Scripts never walk a collection: promotion and reaping take at most `limit` members per call.

/// Enqueues jobs. ARGV: tag, now, then 10 per job: id, queue, priority, max attempts,
/// available at, data, unique key ('' = none), unique TTL ms, hooks ('1' / ''), relayed ('1'
/// when the job comes from the store's outbox and may already have been relayed). Returns, per
/// job, '' when it was enqueued or the id of the job holding its unique key.
pub(crate) const ENQUEUE: &str = r#"
local T, now = ARGV[1], tonumber(ARGV[2])
local res, ready, wake, known = {}, {}, false, {}
for i = 3, #ARGV, 10 do
  local id, q, pr, m, av, d, u, uttl, h, rel = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6], ARGV[i+7], ARGV[i+8], ARGV[i+9]
  local dup = nil
  if rel == '1' and redis.call('ZSCORE', T..':relayed', id) then dup = '' end
  if not dup and u ~= '' then
    local holder = redis.call('GET', T..':u:'..u)
    if holder and holder ~= id then dup = holder elseif not holder then redis.call('SET', T..':u:'..u, id, 'PX', uttl) end
  end
  if dup then
    res[#res+1] = dup
  else
    local f = {'q', q, 'pr', pr, 'm', m, 'a', 0, 'av', av, 'c', now, 'd', d, 's', 'w'}
    if u ~= '' then f[#f+1] = 'u'; f[#f+1] = u end
    if h == '1' then f[#f+1] = 'h'; f[#f+1] = '1' end
    redis.call('HSET', T..':j:'..id, unpack(f))
    if tonumber(av) > now then
      redis.call('ZADD', T..':q:'..q..':d', av, id)
    else
      local z = ready[q]
      if not z then z = {}; ready[q] = z end
      z[#z+1] = -tonumber(pr); z[#z+1] = id
      if #z >= 1000 then redis.call('ZADD', T..':q:'..q..':r', unpack(z)); ready[q] = {} end
      wake = true
    end
    if not known[q] then redis.call('SADD', T..':queues', q); known[q] = true end
    if rel == '1' then redis.call('ZADD', T..':relayed', now, id) end
    res[#res+1] = ''
  end
end
for q, z in pairs(ready) do
  if #z > 0 then redis.call('ZADD', T..':q:'..q..':r', unpack(z)) end
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return res
"#;

/// Reserves up to `max` jobs from the queues in order, promoting due delayed jobs of each
/// queue first (at most 1,000 per queue per call). ARGV: tag, now, lease end, token, worker,
/// max, queues…. Returns per job {id, attempt, max attempts, priority, available at, created
/// at, data, unique key, queue}.
pub(crate) const RESERVE: &str = r#"
local T, now, lease, token, worker, max = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local out = {}
for i = 7, #ARGV do
  if #out >= max then break end
  local q = ARGV[i]
  if redis.call('SISMEMBER', T..':paused', q) == 0 then
    local qk = T..':q:'..q
    local due = redis.call('ZRANGEBYSCORE', qk..':d', '-inf', now, 'LIMIT', 0, 1000)
    if #due > 0 then
      local z = {}
      for _, id in ipairs(due) do
        z[#z+1] = -tonumber(redis.call('HGET', T..':j:'..id, 'pr') or 0); z[#z+1] = id
      end
      redis.call('ZADD', qk..':r', unpack(z))
      redis.call('ZREM', qk..':d', unpack(due))
    end
    local popped = redis.call('ZPOPMIN', qk..':r', max - #out)
    if #popped > 0 then
      local leased = {}
      for j = 1, #popped, 2 do
        local id = popped[j]
        local jk = T..':j:'..id
        local v = redis.call('HMGET', jk, 'a', 'm', 'pr', 'av', 'c', 'd', 'u')
        if v[6] then
          local a = tonumber(v[1]) + 1
          redis.call('HSET', jk, 'a', a, 's', 'r', 't', token, 'ra', now, 'w', worker)
          leased[#leased+1] = lease; leased[#leased+1] = id
          out[#out+1] = {id, a, v[2], v[3], v[4], v[5], v[6], v[7] or '', q}
        end
      end
      if #leased > 0 then redis.call('ZADD', qk..':l', unpack(leased)) end
    end
  end
end
return out
"#;

/// Applies outcomes. ARGV: tag, now, history size, then 6 per completion: id, token, type
/// (`c` completed, `r` retry, `f` failed, `l` release), at (retry / release time), error,
/// record (the outcome as JSON for the store's hooks, or ''). An outcome applies only while the
/// job is reserved under `token`. Returns {applied flags (1/0), hook record members}.
pub(crate) const COMPLETE: &str = r#"
local T, now, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local flags, records, unleased, gone, done, wake = {}, {}, {}, {}, {}, false
local function release_unique(u, id)
  if u and redis.call('GET', T..':u:'..u) == id then redis.call('DEL', T..':u:'..u) end
end
for i = 4, #ARGV, 6 do
  local id, token, kind, at, err, rec = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5]
  local jk = T..':j:'..id
  local v = redis.call('HMGET', jk, 's', 't', 'q', 'u', 'pr', 'a', 'ra', 'w', 'c', 'd', 'av')
  if v[1] == 'r' and v[2] == token then
    local q = v[3]
    local l = unleased[q]
    if not l then l = {}; unleased[q] = l end
    l[#l+1] = id
    if kind == 'c' then
      release_unique(v[4], id)
      gone[#gone+1] = jk
      if keep > 0 then
        local rt = now - tonumber(v[7] or now)
        done[#done+1] = table.concat({id, q, now, rt, tonumber(v[7] or now) - tonumber(v[11] or now), v[6], v[8] or '', v[7] or '', v[9], v[5], v[10]}, '\31')
      end
    elseif kind == 'f' then
      release_unique(v[4], id)
      redis.call('HSET', jk, 's', 'f', 'e', err, 'fa', now, 'rt', now - tonumber(v[7] or now), 't', '')
      redis.call('ZADD', T..':q:'..q..':f', now, id)
      redis.call('ZADD', T..':failed', now, id)
    else
      local a = tonumber(v[6])
      if kind == 'l' then a = a - 1 end
      redis.call('HSET', jk, 's', 'w', 'av', at, 'a', a, 't', '')
      if kind == 'r' then redis.call('HSET', jk, 'e', err) end
      if tonumber(at) > now then
        redis.call('ZADD', T..':q:'..q..':d', at, id)
      else
        redis.call('ZADD', T..':q:'..q..':r', -tonumber(v[5]), id)
        wake = true
      end
    end
    if rec ~= '' then
      local member = redis.call('INCR', T..':hs') .. '\31' .. rec
      redis.call('ZADD', T..':h', now, member)
      records[#records+1] = member
    end
    flags[#flags+1] = 1
  else
    flags[#flags+1] = 0
  end
end
for q, l in pairs(unleased) do redis.call('ZREM', T..':q:'..q..':l', unpack(l)) end
if #gone > 0 then redis.call('DEL', unpack(gone)) end
if #done > 0 then
  redis.call('LPUSH', T..':done', unpack(done))
  redis.call('LTRIM', T..':done', 0, keep - 1)
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return {flags, records}
"#;

/// Whether a job is reserved under a token. ARGV: tag, id, token. Returns 1 or 0.
pub(crate) const HOLDS: &str = r#"
local v = redis.call('HMGET', ARGV[1]..':j:'..ARGV[2], 's', 't')
if v[1] == 'r' and v[2] == ARGV[3] then return 1 end
return 0
"#;

/// Extends leases. ARGV: tag, lease end, then pairs of id, token.
pub(crate) const EXTEND: &str = r#"
local T, lease = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local v = redis.call('HMGET', T..':j:'..ARGV[i], 's', 't', 'q')
  if v[1] == 'r' and v[2] == ARGV[i+1] then redis.call('ZADD', T..':q:'..v[3]..':l', lease, ARGV[i]) end
end
return 0
"#;

/// Returns expired leases: to the queue, or to the failed store when no attempt is left.
/// ARGV: tag, now, limit. Returns {reclaimed jobs as {id, queue, data, outcome}, hook record
/// members}; jobs with hooks get a record whose JSON the script writes itself.
pub(crate) const REAP: &str = r#"
local T, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, records, wake = {}, {}, false
for _, q in ipairs(redis.call('SMEMBERS', T..':queues')) do
  local lk = T..':q:'..q..':l'
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', '('..now, 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    local jk = T..':j:'..id
    local v = redis.call('HMGET', jk, 's', 'a', 'm', 'pr', 'u', 'h', 'd', 't', 'ra', 'av')
    redis.call('ZREM', lk, id)
    if v[1] == 'r' then
      local a = tonumber(v[2])
      local err = 'lease expired: the worker running attempt ' .. a .. ' stopped responding'
      local outcome = 'retry'
      if a >= tonumber(v[3]) then
        outcome = 'failed'
        if v[5] and redis.call('GET', T..':u:'..v[5]) == id then redis.call('DEL', T..':u:'..v[5]) end
        redis.call('HSET', jk, 's', 'f', 'e', err, 'fa', now, 'rt', now - tonumber(v[9] or now), 't', '')
        redis.call('ZADD', T..':q:'..q..':f', now, id)
        redis.call('ZADD', T..':failed', now, id)
      else
        redis.call('HSET', jk, 's', 'w', 'av', now, 'e', err, 't', '')
        redis.call('ZADD', T..':q:'..q..':r', -tonumber(v[4]), id)
        wake = true
      end
      if v[6] == '1' then
        local rec = cjson.encode({id = id, queue = q, data = v[7], outcome = outcome, at = now, error = err,
          wait_ms = math.max(0, tonumber(v[9] or now) - tonumber(v[10] or now)), runtime_ms = math.max(0, now - tonumber(v[9] or now))})
        local member = redis.call('INCR', T..':hs') .. '\31' .. rec
        redis.call('ZADD', T..':h', now, member)
        records[#records+1] = member
      end
      out[#out+1] = {id, q, v[7], outcome, tonumber(v[9] or now) - tonumber(v[10] or now), now - tonumber(v[9] or now)}
    end
  end
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return {out, records}
"#;

/// Moves failed jobs back to their queues with a fresh attempt count. ARGV: tag, now, ids….
/// Returns {retried ids, hook record members (jobs of a batch, whose counts the store fixes)}.
pub(crate) const RETRY_FAILED: &str = r#"
local T, now = ARGV[1], ARGV[2]
local ids, records, wake = {}, {}, false
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', T..':failed', id) == 1 then
    local jk = T..':j:'..id
    local v = redis.call('HMGET', jk, 'q', 'pr', 'h', 'd')
    redis.call('ZREM', T..':q:'..v[1]..':f', id)
    redis.call('HSET', jk, 's', 'w', 'a', 0, 'av', now)
    redis.call('HDEL', jk, 'fa', 'rt')
    redis.call('ZADD', T..':q:'..v[1]..':r', -tonumber(v[2]), id)
    if v[3] == '1' then
      local rec = cjson.encode({id = id, queue = v[1], data = v[4], outcome = 'failed_retry', at = tonumber(now), error = '', wait_ms = 0, runtime_ms = 0})
      local member = redis.call('INCR', T..':hs') .. '\31' .. rec
      redis.call('ZADD', T..':h', now, member)
      records[#records+1] = member
    end
    ids[#ids+1] = id
    wake = true
  end
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return {ids, records}
"#;

/// Deletes failed jobs. ARGV: tag, ids…. Returns how many were in the failed store.
pub(crate) const FORGET_FAILED: &str = r#"
local T, n = ARGV[1], 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', T..':failed', id) == 1 then
    local jk = T..':j:'..id
    local q = redis.call('HGET', jk, 'q')
    if q then redis.call('ZREM', T..':q:'..q..':f', id) end
    redis.call('DEL', jk)
    n = n + 1
  end
end
return n
"#;

/// Deletes up to `limit` pending and delayed jobs of a queue. ARGV: tag, queue, limit.
pub(crate) const CLEAR: &str = r#"
local T, q, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = 0
for _, set in ipairs({':r', ':d'}) do
  local k = T..':q:'..q..set
  local ids = redis.call('ZRANGE', k, 0, limit - n - 1)
  for _, id in ipairs(ids) do
    local jk = T..':j:'..id
    local u = redis.call('HGET', jk, 'u')
    if u and redis.call('GET', T..':u:'..u) == id then redis.call('DEL', T..':u:'..u) end
    redis.call('DEL', jk)
  end
  if #ids > 0 then redis.call('ZREM', k, unpack(ids)) end
  n = n + #ids
  if n >= limit then break end
end
return n
"#;

/// Adds per-minute metric deltas. ARGV: tag, then per row: minute, queue, kind, runtime max,
/// count of pairs, then that many (column, delta) pairs.
pub(crate) const METRICS: &str = r#"
local T = ARGV[1]
local i = 2
while i <= #ARGV do
  local minute, q, kind, rmax, n = ARGV[i], ARGV[i+1], ARGV[i+2], tonumber(ARGV[i+3]), tonumber(ARGV[i+4])
  local mk = T..':m:'..minute
  local prefix = q..'\31'..kind..'\31'
  for j = 0, n - 1 do
    redis.call('HINCRBY', mk, prefix..ARGV[i+5+2*j], ARGV[i+6+2*j])
  end
  local cur = tonumber(redis.call('HGET', mk, prefix..'rm') or 0)
  if rmax > cur then redis.call('HSET', mk, prefix..'rm', rmax) end
  redis.call('ZADD', T..':mi', minute, minute)
  i = i + 5 + 2 * n
end
return 0
"#;
