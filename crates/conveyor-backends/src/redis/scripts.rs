//! The Lua scripts: every state change of the queue is one of these, run atomically by Redis
//! (EVALSHA; the driver falls back to EVAL once after a restart flushed the script cache).
//!
//! Every key a script touches starts with the deployment's tag (`{conveyor}` by default), so
//! all of them hash to one Redis Cluster slot — the slot of `KEYS[1]`, which every call passes.
//! The tag is `ARGV[1]`. Key layout (ARCHITECTURE.md has the full table):
//!
//! - `T:d` — hash, job id → the immutable part, packed with U+001F between fields: queue,
//!   score (−priority), max attempts, created at, unique key, hooks (`1` when the job belongs to
//!   a batch or workflow), then the rest as compact JSON (kind, payload, backoff, timeout,
//!   tags, batch, workflow).
//! - `T:s` — hash, job id → the mutable part: attempts, available at, lease token (empty unless
//!   reserved), reserved at, worker.
//! - `T:e` — hash, job id → last error; `T:x` — hash, failed job id → failed at, runtime.
//! - `T:q:<queue>:r` ready (score −priority; ties by id, which is time-ordered), `:d` delayed
//!   (score = due time), `:l` leased (score = lease end), `:f` failed (score = failed at).
//! - `T:queues`, `T:paused` (sets), `T:failed` (every failed job, by time), `T:done` (the
//!   completed history, newest first, capped), `T:u:<key>` (unique locks, with a TTL),
//!   `T:h` (outcome records waiting for the store's hooks), `T:relayed` (outbox ids relayed
//!   in the last minutes), `T:m:<minute>` + `T:mi` (metrics), `T:w` + `T:ws` (workers).
//!
//! Jobs live as fields of a few big hashes rather than a key each, so a script reads or writes
//! a whole batch with one command (`HMGET T:s id1 id2 …`): the cost per job is a few C-level
//! field operations, not a Lua-to-Redis call. Scripts never walk a collection: promotion and
//! reaping take at most `limit` members per call, and callers send at most 2,000 jobs per call
//! (Lua's `unpack` takes 8,000 values).

/// The shared helpers every script starts with.
const PRELUDE: &str = r#"
local T = ARGV[1]
local function push(t, k, ...)
  local l = t[k]
  if not l then l = {}; t[k] = l end
  for _, v in ipairs({...}) do l[#l+1] = v end
end
local function each(t, f)
  for k, l in pairs(t) do if #l > 0 then f(k, l) end end
end
local function release_unique(u, id)
  if u ~= '' and redis.call('GET', T..':u:'..u) == id then redis.call('DEL', T..':u:'..u) end
end
local D = '^([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$'
local S = '^([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$'
-- The header of packed data without copying its JSON: queue, score, max attempts, unique key.
local H = '^([^\31]*)\31([^\31]*)\31([^\31]*)\31[^\31]*\31([^\31]*)\31'
"#;

fn with_prelude(body: &str) -> String {
    format!("{PRELUDE}{body}")
}

/// Enqueues jobs that need a check first: a unique key, an outbox id that may have been
/// relayed already, or a fairness key (the rest go in one MULTI, see `RedisBackend::push`).
/// ARGV: tag, now, then 11 per job: id, queue, score, packed data, packed state ('' for a job
/// available since its creation: no state until its first reservation), ready ('1' or ''),
/// due time, unique key ('' = none), unique TTL ms, relayed ('1' when the job comes from the
/// store's outbox and may already have been relayed), fairness key ('' = none). Returns, per
/// job, '' when it was enqueued or the id of the job holding its unique key.
///
/// A job with a fairness key gets its turn (`conveyor_core::fair`) here: its score becomes
/// −priority + turn / 2³³ (exact while |priority| < 2²⁰ and turns < 2³³), in the ready set
/// and in its packed data, so a retry or a promotion keeps it. `T:q:<queue>:fk` holds each
/// key's last turn (field `<−priority>␟<key>`), `T:q:<queue>:ft` the highest turn handed out
/// per priority (the queue's current turn when no keyed job of the priority is ready).
pub(crate) fn enqueue() -> String {
    with_prelude(
        r#"
local now = ARGV[2]
local res, dh, sh, ready, delayed, known, wake = {}, {}, {}, {}, {}, {}, false
local floors, TURN = {}, 8589934592
-- The key's next turn: after its last, and not before the queue's current turn.
local function turn(q, score, fk)
  local qk, base = T..':q:'..q, tonumber(score)
  local fq = q..'\31'..score
  local floor = floors[fq]
  if not floor then
    local h = redis.call('ZRANGEBYSCORE', qk..':r', '('..score, '('..(base + 1), 'WITHSCORES', 'LIMIT', 0, 1)
    if h[2] then floor = math.floor((tonumber(h[2]) - base) * TURN + 0.5) - 1
    else floor = tonumber(redis.call('HGET', qk..':ft', score) or '0') end
    floors[fq] = floor
  end
  local last = tonumber(redis.call('HGET', qk..':fk', score..'\31'..fk) or '0')
  if last < floor then last = floor end
  last = last + 1
  redis.call('HSET', qk..':fk', score..'\31'..fk, last)
  if last > tonumber(redis.call('HGET', qk..':ft', score) or '0') then redis.call('HSET', qk..':ft', score, last) end
  return string.format('%.17g', base + last / TURN)
end
for i = 3, #ARGV, 11 do
  local id, q, score, d, s, r, due, u, uttl, rel = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6], ARGV[i+7], ARGV[i+8], ARGV[i+9]
  local fk = ARGV[i+10]
  local dup = nil
  if rel == '1' and redis.call('ZSCORE', T..':relayed', id) then dup = '' end
  if not dup and u ~= '' then
    local holder = redis.call('GET', T..':u:'..u)
    if holder and holder ~= id then dup = holder elseif not holder then redis.call('SET', T..':u:'..u, id, 'PX', uttl) end
  end
  if dup then
    res[#res+1] = dup
  else
    if fk ~= '' then
      local turned = turn(q, score, fk)
      d = q..'\31'..turned..string.sub(d, #q + #score + 2)
      score = turned
    end
    dh[#dh+1] = id; dh[#dh+1] = d
    if s ~= '' then sh[#sh+1] = id; sh[#sh+1] = s end
    if r == '1' then push(ready, q, score, id); wake = true else push(delayed, q, due, id) end
    if not known[q] then redis.call('SADD', T..':queues', q); known[q] = true end
    if rel == '1' then redis.call('ZADD', T..':relayed', now, id) end
    res[#res+1] = ''
  end
end
if #dh > 0 then redis.call('HSET', T..':d', unpack(dh)) end
if #sh > 0 then redis.call('HSET', T..':s', unpack(sh)) end
each(ready, function(q, z) redis.call('ZADD', T..':q:'..q..':r', unpack(z)) end)
each(delayed, function(q, z) redis.call('ZADD', T..':q:'..q..':d', unpack(z)) end)
if wake then redis.call('PUBLISH', T..':wake', '1') end
return res
"#,
    )
}

/// Reserves up to `max` jobs from the queues in order, promoting due delayed jobs of each
/// queue first (at most 1,000 per queue per call). ARGV: tag, now, lease end, token, worker,
/// max, queues…. Returns, flat, 4 values per job: id, attempt, available at ('' when the job
/// has no state yet: it became available when it was created), packed data.
pub(crate) fn reserve() -> String {
    with_prelude(
        r#"
local now, lease, token, worker, max = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local out, sh = {}, {}
-- A leased state is `attempt␟available␟token␟reserved at␟worker`; a job never reserved before
-- (no state) gets attempt 1 and an empty available time (its creation time), one shared string.
local lease_tail = '\31'..token..'\31'..now..'\31'..worker
local fresh = '1\31'..lease_tail
for i = 7, #ARGV do
  if #out / 4 >= max then break end
  local q = ARGV[i]
  if redis.call('SISMEMBER', T..':paused', q) == 0 then
    local qk = T..':q:'..q
    local due = redis.call('ZRANGEBYSCORE', qk..':d', '-inf', now, 'LIMIT', 0, 1000)
    if #due > 0 then
      local ds = redis.call('HMGET', T..':d', unpack(due))
      local z = {}
      for j, id in ipairs(due) do
        z[#z+1] = (ds[j] and string.match(ds[j], '^[^\31]*\31([^\31]*)')) or '0'; z[#z+1] = id
      end
      redis.call('ZADD', qk..':r', unpack(z))
      redis.call('ZREM', qk..':d', unpack(due))
    end
    -- ZRANGE + ZREMRANGEBYRANK rather than ZPOPMIN: no scores to format and convert.
    local ids = redis.call('ZRANGE', qk..':r', 0, max - #out / 4 - 1)
    if #ids > 0 then
      redis.call('ZREMRANGEBYRANK', qk..':r', 0, #ids - 1)
      local ss = redis.call('HMGET', T..':s', unpack(ids))
      local ds = redis.call('HMGET', T..':d', unpack(ids))
      local leased = {}
      for j, id in ipairs(ids) do
        local d = ds[j]
        if d then
          local a, av, st = 1, '', fresh
          if ss[j] then
            a, av = string.match(ss[j], '^([^\31]*)\31([^\31]*)')
            a = tonumber(a) + 1
            st = a..'\31'..av..lease_tail
          end
          local n = #sh
          sh[n+1] = id; sh[n+2] = st
          n = #leased
          leased[n+1] = lease; leased[n+2] = id
          n = #out
          out[n+1] = id; out[n+2] = a; out[n+3] = av; out[n+4] = d
        end
      end
      if #leased > 0 then redis.call('ZADD', qk..':l', unpack(leased)) end
    end
  end
end
if #sh > 0 then redis.call('HSET', T..':s', unpack(sh)) end
return out
"#,
    )
}

/// Leases delayed jobs by id, so that an outcome can be applied to them (`act_on_delayed`:
/// run now = release, fail = failed, delete = failed then forgotten). ARGV: tag, now, lease
/// end, token, worker, bump ('1': count an attempt, as a reservation does — a release gives it
/// back; '': leave the attempts as they are), ids…. A job that is not in its queue's delayed set
/// is left alone. Returns, flat, 4 values per leased job, as `reserve` does: id, attempt,
/// available at, packed data.
pub(crate) fn lease_delayed() -> String {
    with_prelude(
        r#"
local now, lease, token, worker, bump = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1'
local out = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local d = redis.call('HGET', T..':d', id)
  if d then
    local q = string.match(d, '^([^\31]*)')
    local qk = T..':q:'..q
    if redis.call('ZREM', qk..':d', id) == 1 then
      local a, av = 0, ''
      local s = redis.call('HGET', T..':s', id)
      if s then
        a, av = string.match(s, '^([^\31]*)\31([^\31]*)')
        a = tonumber(a)
      end
      if bump then a = a + 1 end
      redis.call('HSET', T..':s', id, a..'\31'..av..'\31'..token..'\31'..now..'\31'..worker)
      redis.call('ZADD', qk..':l', lease, id)
      out[#out+1] = id; out[#out+1] = a; out[#out+1] = av; out[#out+1] = d
    end
  end
end
return out
"#,
    )
}

/// Frees a unique key if the given job holds it. ARGV: tag, key, job id.
pub(crate) fn unique_release() -> String {
    with_prelude("release_unique(ARGV[2], ARGV[3])\nreturn 1")
}

/// Applies outcomes. ARGV: tag, now, history size, then 10 per completion: id, token, type
/// (`c` completed, `r` retry, `f` failed, `l` release), at (retry / release time), error,
/// record (the outcome as JSON for the store's hooks, or ''), runtime ms, wait ms, queue, unique
/// key. An outcome applies only while the job is reserved under `token`.
///
/// A completed job keeps its data in `T:d` while it is in the history: its state becomes
/// `attempts␟available␟␟reserved at␟worker␟finished at␟runtime␟wait` and its id goes to the
/// front of `T:done`; the ids pushed out of the history lose their fields. So a completion
/// reads no job data (the caller knows the queue and unique key), and the history costs a
/// list entry per job, not a copy of the job. Returns {positions (from 1) of the outcomes that did
/// not apply, hook record members}.
pub(crate) fn complete() -> String {
    with_prelude(
        r#"
local now, keep = ARGV[2], tonumber(ARGV[3])
local ids = {}
for i = 4, #ARGV, 10 do ids[#ids+1] = ARGV[i] end
local ss = redis.call('HMGET', T..':s', unpack(ids))
-- Retries, failures and releases need the job's priority: read the data of those only.
local other, at_other = {}, {}
for n, id in ipairs(ids) do
  if ss[n] and ARGV[6 + (n - 1) * 10] ~= 'c' then other[#other+1] = id; at_other[n] = #other end
end
local ds = {}
if #other > 0 then ds = redis.call('HMGET', T..':d', unpack(other)) end
local missed, records, unleased, done, sh, eh, xh, ready, delayed, failed, wake = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, false
for n, id in ipairs(ids) do
  local i = 4 + (n - 1) * 10
  local token, kind, at, err, rec, rt, wt, q, u = ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6], ARGV[i+7], ARGV[i+8], ARGV[i+9]
  local applied = 0
  local s = ss[n]
  if s and kind == 'c' then
    -- The token is the third field: compare it in place (no captures), and keep the state
    -- around it for the history.
    local p1 = string.find(s, '\31', 1, true)
    local p2 = p1 and string.find(s, '\31', p1 + 1, true)
    if p2 and string.find(s, token, p2 + 1, true) == p2 + 1 and string.byte(s, p2 + 1 + #token) == 31 then
      applied = 1
      local l = unleased[q]
      if not l then l = {}; unleased[q] = l end
      l[#l+1] = id
      if u ~= '' then release_unique(u, id) end
      local m = #sh
      sh[m+1] = id; sh[m+2] = string.sub(s, 1, p2)..string.sub(s, p2 + 1 + #token)..'\31'..now..'\31'..rt..'\31'..wt
      done[#done+1] = id
    end
  elseif s then
    local a, av, t, ra, w = string.match(s, S)
    local d = at_other[n] and ds[at_other[n]]
    if t == token and d then
      applied = 1
      local score, _m
      q, score, _m, u = string.match(d, H)
      local l = unleased[q]
      if not l then l = {}; unleased[q] = l end
      l[#l+1] = id
      if kind == 'f' then
        release_unique(u, id)
        sh[#sh+1] = id; sh[#sh+1] = a..'\31'..av..'\31\31'..ra..'\31'..w
        eh[#eh+1] = id; eh[#eh+1] = err
        xh[#xh+1] = id; xh[#xh+1] = now..'\31'..rt
        push(failed, q, now, id)
      else
        if kind == 'l' then a = tonumber(a) - 1 else eh[#eh+1] = id; eh[#eh+1] = err end
        sh[#sh+1] = id; sh[#sh+1] = a..'\31'..at..'\31\31\31'
        if tonumber(at) > tonumber(now) then push(delayed, q, at, id) else push(ready, q, score, id); wake = true end
      end
    end
  end
  if applied == 1 and rec ~= '' then
    local member = redis.call('INCR', T..':hs')..'\31'..rec
    redis.call('ZADD', T..':h', now, member)
    records[#records+1] = member
  end
  if applied == 0 then missed[#missed+1] = n end
end
each(unleased, function(q, l) redis.call('ZREM', T..':q:'..q..':l', unpack(l)) end)
if #sh > 0 then redis.call('HSET', T..':s', unpack(sh)) end
if #eh > 0 then redis.call('HSET', T..':e', unpack(eh)) end
if #xh > 0 then redis.call('HSET', T..':x', unpack(xh)) end
each(ready, function(q, z) redis.call('ZADD', T..':q:'..q..':r', unpack(z)) end)
each(delayed, function(q, z) redis.call('ZADD', T..':q:'..q..':d', unpack(z)) end)
each(failed, function(q, z)
  redis.call('ZADD', T..':q:'..q..':f', unpack(z))
  redis.call('ZADD', T..':failed', unpack(z))
end)
if #done > 0 then
  local gone = done
  if keep > 0 then
    redis.call('LPUSH', T..':done', unpack(done))
    gone = redis.call('LRANGE', T..':done', keep, -1)
    if #gone > 0 then redis.call('LTRIM', T..':done', 0, keep - 1) end
  end
  local errors = redis.call('EXISTS', T..':e') == 1
  for j = 1, #gone, 4000 do
    local part = gone
    if #gone > 4000 then part = {unpack(gone, j, math.min(j + 3999, #gone))} end
    redis.call('HDEL', T..':d', unpack(part))
    redis.call('HDEL', T..':s', unpack(part))
    if errors then redis.call('HDEL', T..':e', unpack(part)) end
  end
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return {missed, records}
"#,
    )
}

/// Whether a job is reserved under a token. ARGV: tag, id, token. Returns 1 or 0.
pub(crate) fn holds() -> String {
    with_prelude(
        r#"
local s = redis.call('HGET', T..':s', ARGV[2])
if s and select(3, string.match(s, S)) == ARGV[3] then return 1 end
return 0
"#,
    )
}

/// The leased jobs of every queue (at most `limit` per queue, from the lease sets: bounded by
/// what is in flight, not by the backlog), each passed with its holder to `f`, 1,000 per HMGET.
const EACH_LEASED: &str = r#"
local function each_leased(limit, f)
  for _, q in ipairs(redis.call('SMEMBERS', T..':queues')) do
    local lk = T..':q:'..q..':l'
    local ids = redis.call('ZRANGE', lk, 0, limit - 1)
    for from = 1, #ids, 1000 do
      local chunk = {unpack(ids, from, math.min(from + 999, #ids))}
      local ss = redis.call('HMGET', T..':s', unpack(chunk))
      for n, id in ipairs(chunk) do
        if ss[n] then
          local _, _, t, _, w = string.match(ss[n], S)
          if t and t ~= '' and w ~= '' then f(lk, id, w) end
        end
      end
    end
  end
end
"#;

/// The processes holding reservations. ARGV: tag, limit per queue. Returns their names.
pub(crate) fn holders() -> String {
    with_prelude(&format!(
        r#"{EACH_LEASED}
local seen, out = {{}}, {{}}
each_leased(tonumber(ARGV[2]), function(_, _, w)
  if not seen[w] then seen[w] = true; out[#out+1] = w end
end)
return out
"#
    ))
}

/// Ends the leases of dead holders (the reaper returns their jobs next). ARGV: tag, limit per
/// queue, holders. Returns the leases ended.
pub(crate) fn expire_holders() -> String {
    with_prelude(&format!(
        r#"{EACH_LEASED}
local dead, n = {{}}, 0
for i = 3, #ARGV do dead[ARGV[i]] = true end
each_leased(tonumber(ARGV[2]), function(lk, id, w)
  if dead[w] then redis.call('ZADD', lk, 'XX', 0, id); n = n + 1 end
end)
return n
"#
    ))
}

/// Extends leases. ARGV: tag, lease end, then pairs of id, token.
pub(crate) fn extend() -> String {
    with_prelude(
        r#"
local lease, ids, toks = ARGV[2], {}, {}
for i = 3, #ARGV, 2 do ids[#ids+1] = ARGV[i]; toks[#toks+1] = ARGV[i+1] end
local ss = redis.call('HMGET', T..':s', unpack(ids))
local ds = redis.call('HMGET', T..':d', unpack(ids))
local leased = {}
for n, id in ipairs(ids) do
  if ss[n] and ds[n] and select(3, string.match(ss[n], S)) == toks[n] then
    push(leased, string.match(ds[n], '^([^\31]*)'), lease, id)
  end
end
each(leased, function(q, z) redis.call('ZADD', T..':q:'..q..':l', 'XX', unpack(z)) end)
return 0
"#,
    )
}

/// Returns expired leases: to the queue, or to the failed store when no attempt is left.
/// ARGV: tag, now, limit. Returns {reclaimed jobs as {id, queue, data, outcome, wait, runtime},
/// hook record members}; jobs with hooks get a record whose JSON the script writes itself.
pub(crate) fn reap() -> String {
    with_prelude(
        r#"
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, records, wake = {}, {}, false
for _, q in ipairs(redis.call('SMEMBERS', T..':queues')) do
  local lk = T..':q:'..q..':l'
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', '('..ARGV[2], 'LIMIT', 0, limit)
  if #expired > 0 then
    redis.call('ZREM', lk, unpack(expired))
    local ss = redis.call('HMGET', T..':s', unpack(expired))
    local ds = redis.call('HMGET', T..':d', unpack(expired))
    for n, id in ipairs(expired) do
      if ss[n] and ds[n] then
        local a, av, t, ra, w = string.match(ss[n], S)
        local _, score, m, created, u, h, json = string.match(ds[n], D)
        if t ~= '' then
          a = tonumber(a)
          ra = tonumber(ra) or now
          local err = 'lease expired: the worker running attempt '..a..' stopped responding'
          local outcome = 'retry'
          redis.call('HSET', T..':e', id, err)
          if a >= tonumber(m) then
            outcome = 'failed'
            release_unique(u, id)
            redis.call('HSET', T..':s', id, a..'\31'..av..'\31\31'..ARGV[2]..'\31'..w)
            redis.call('HSET', T..':x', id, ARGV[2]..'\31'..(now - ra))
            redis.call('ZADD', T..':q:'..q..':f', now, id)
            redis.call('ZADD', T..':failed', now, id)
          else
            redis.call('HSET', T..':s', id, a..'\31'..ARGV[2]..'\31\31\31')
            redis.call('ZADD', T..':q:'..q..':r', score, id)
            wake = true
          end
          local wait = math.max(0, ra - (tonumber(av) or tonumber(created) or ra))
          if h == '1' then
            local rec = cjson.encode({id = id, queue = q, data = json, outcome = outcome, at = now, error = err, wait_ms = wait, runtime_ms = math.max(0, now - ra)})
            local member = redis.call('INCR', T..':hs')..'\31'..rec
            redis.call('ZADD', T..':h', now, member)
            records[#records+1] = member
          end
          out[#out+1] = {id, q, json, outcome, wait, math.max(0, now - ra)}
        end
      end
    end
  end
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return {out, records}
"#,
    )
}

/// Moves failed jobs back to their queues with a fresh attempt count. ARGV: tag, now, ids….
/// Returns {retried ids, hook record members (jobs of a batch, whose counts the store fixes)}.
pub(crate) fn retry_failed() -> String {
    with_prelude(
        r#"
local now = ARGV[2]
local ids, records, wake = {}, {}, false
for i = 3, #ARGV do
  local id = ARGV[i]
  local d = redis.call('HGET', T..':d', id)
  if redis.call('ZREM', T..':failed', id) == 1 and d then
    local q, score, _, _, _, h, json = string.match(d, D)
    redis.call('ZREM', T..':q:'..q..':f', id)
    redis.call('HSET', T..':s', id, '0\31'..now..'\31\31\31')
    redis.call('HDEL', T..':x', id)
    redis.call('ZADD', T..':q:'..q..':r', score, id)
    if h == '1' then
      local rec = cjson.encode({id = id, queue = q, data = json, outcome = 'failed_retry', at = tonumber(now), error = '', wait_ms = 0, runtime_ms = 0})
      local member = redis.call('INCR', T..':hs')..'\31'..rec
      redis.call('ZADD', T..':h', now, member)
      records[#records+1] = member
    end
    ids[#ids+1] = id
    wake = true
  end
end
if wake then redis.call('PUBLISH', T..':wake', '1') end
return {ids, records}
"#,
    )
}

/// Deletes failed jobs. ARGV: tag, ids…. Returns how many were in the failed store.
pub(crate) fn forget_failed() -> String {
    with_prelude(
        r#"
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', T..':failed', id) == 1 then
    local d = redis.call('HGET', T..':d', id)
    if d then redis.call('ZREM', T..':q:'..string.match(d, '^([^\31]*)')..':f', id) end
    for _, h in ipairs({':d', ':s', ':e', ':x'}) do redis.call('HDEL', T..h, id) end
    n = n + 1
  end
end
return n
"#,
    )
}

/// Deletes up to `limit` pending and delayed jobs of a queue. ARGV: tag, queue, limit.
pub(crate) fn clear() -> String {
    with_prelude(
        r#"
local q, limit = ARGV[2], tonumber(ARGV[3])
local n = 0
for _, set in ipairs({':r', ':d'}) do
  local k = T..':q:'..q..set
  local ids = redis.call('ZRANGE', k, 0, limit - n - 1)
  if #ids > 0 then
    local ds = redis.call('HMGET', T..':d', unpack(ids))
    for j, id in ipairs(ids) do
      if ds[j] then release_unique(select(4, string.match(ds[j], H)), id) end
    end
    for _, h in ipairs({':d', ':s', ':e'}) do redis.call('HDEL', T..h, unpack(ids)) end
    redis.call('ZREM', k, unpack(ids))
  end
  n = n + #ids
  if n >= limit then break end
end
return n
"#,
    )
}

/// Adds per-minute metric deltas. ARGV: tag, then per row: minute, queue, kind, runtime max,
/// count of pairs, then that many (column, delta) pairs.
pub(crate) fn metrics() -> String {
    with_prelude(
        r#"
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
"#,
    )
}

/// Takes a named lock for an owner, or extends it for its holder. ARGV: tag, key, owner, TTL ms.
/// Returns 1 when the owner holds it now, 0 when another does.
pub(crate) fn lock_acquire() -> String {
    with_prelude(
        r#"
local k = T..':lock:'..ARGV[2]
local holder = redis.call('GET', k)
if holder == false or holder == ARGV[3] then
  redis.call('SET', k, ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"#,
    )
}

/// Releases a named lock if the owner holds it. ARGV: tag, key, owner. Returns 1 or 0.
pub(crate) fn lock_release() -> String {
    with_prelude(
        r#"
local k = T..':lock:'..ARGV[2]
if redis.call('GET', k) == ARGV[3] then
  redis.call('DEL', k)
  return 1
end
return 0
"#,
    )
}
