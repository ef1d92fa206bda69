//! The shared state on Redis (see `conveyor_core::state`): the cache, sorted sets, rate
//! limiters and circuit breakers, under the deployment's tag `T` like the queue. Key layout:
//!
//! - `T:c:<key>` — a cached JSON value, with Redis' own expiry; `T:ck` — every cache key
//!   (zset, score 0), for prefix invalidation by lexical range and for pruning;
//! - `T:z:<set>` — a sorted set, stored with negated scores, so that Redis' order (score
//!   ascending, ties by member ascending) is the API's (score descending, ties by member);
//! - `T:rl:<key>` — a rate limiter's theoretical arrival time in µs, expiring when it no
//!   longer matters, and `T:rls:<key>` — the latest clock reading the key has seen;
//! - `T:b:<name>` — a breaker (hash: state, opened_at, probes, probe_successes, changed_at),
//!   `T:bc:<name>` — its calls per time bucket (`s<bucket>` / `f<bucket>`), `T:breakers` —
//!   the names;
//! - `T:fk:` / `T:fs:` / `T:fw:` / `T:fkeys` — per-key concurrency (see `flow.rs`);
//! - `T:applied` — ids of deferred operations applied (zset by time, kept 10 minutes), so an
//!   operation relayed twice from the store's outbox applies once.
//!
//! Every read-modify-write is one script; plain reads and writes are single commands or one
//! MULTI.

use std::sync::Arc;

use redis::{Script, Value};

use conveyor_core::backend::{BackendError, Result};
use conveyor_core::state::{BreakerDecision, BreakerRules, BreakerState, Deferred, SharedState};

use super::conn::{int, items, text, Pool};

const PRELUDE: &str = r#"
local T = ARGV[1]
local function forget_prefix(p)
  local n = 0
  while true do
    local keys = redis.call('ZRANGEBYLEX', T..':ck', '['..p, '('..p..'\255', 'LIMIT', 0, 500)
    if #keys == 0 then return n end
    for _, k in ipairs(keys) do n = n + redis.call('DEL', T..':c:'..k) end
    redis.call('ZREM', T..':ck', unpack(keys))
  end
end
local function fmt(x) return string.format('%.0f', x) end
local function refund(key, t, now)
  local k = T..':rl:'..key
  local tat = tonumber(redis.call('GET', k) or '')
  if not tat then return end
  tat = tat - t
  if tat > now then redis.call('SET', k, fmt(tat), 'PX', math.ceil((tat - now) / 1000) + 1000) else redis.call('DEL', k) end
end
"#;

pub(super) fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

struct Scripts {
    forget_prefix: Script,
    prune: Script,
    rate_take: Script,
    apply: Script,
    breaker_allow: Script,
    breaker_record: Script,
    breaker_state: Script,
}

static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    // ARGV: tag, prefix. Returns how many live entries were forgotten.
    forget_prefix: script("return forget_prefix(ARGV[2])"),
    // ARGV: tag, offset. Drops up to 500 index entries from `offset` whose value expired;
    // returns {dropped, next offset (0 when done)}.
    prune: script(
        r#"
local off = tonumber(ARGV[2])
local keys = redis.call('ZRANGE', T..':ck', off, off + 499)
local gone = {}
for _, k in ipairs(keys) do
  if redis.call('EXISTS', T..':c:'..k) == 0 then gone[#gone+1] = k end
end
if #gone > 0 then redis.call('ZREM', T..':ck', unpack(gone)) end
if #keys < 500 then return {#gone, 0} end
return {#gone, off + 500 - #gone}
"#,
    ),
    // ARGV: tag, key, now µs, cost µs, tolerance µs. GCRA: allowed when
    // max(tat, now) + cost - now <= tolerance; then tat moves on by cost. `now` is at least the
    // latest the key has seen (kept beside it, `:rls:`). Returns {allowed, tat, now}.
    rate_take: script(
        r#"
local k, ks, now, t, tol = T..':rl:'..ARGV[2], T..':rls:'..ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
now = math.max(now, tonumber(redis.call('GET', ks) or '') or 0)
local tat = tonumber(redis.call('GET', k) or '') or now
local base = math.max(tat, now)
local allowed = 0
if base + t - now <= tol then
  tat = base + t
  allowed = 1
end
local ttl = math.ceil((math.max(tat, now) - now) / 1000) + 1000
redis.call('SET', ks, fmt(now), 'PX', ttl)
if allowed == 1 then redis.call('SET', k, fmt(tat), 'PX', ttl) end
return {allowed, fmt(tat), fmt(now)}
"#,
    ),
    // ARGV: tag, now ms, then 5 per operation: id, op, a, b, c. Applies each deferred
    // operation whose id was not applied yet; returns how many it applied.
    apply: script(
        r#"
local now, n = ARGV[2], 0
for i = 3, #ARGV, 5 do
  local id, op, a, b, c = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  if not redis.call('ZSCORE', T..':applied', id) then
    redis.call('ZADD', T..':applied', now, id)
    if op == 'zincr' then
      redis.call('ZINCRBY', T..':z:'..a, b, c)
    elseif op == 'forget' then
      forget_prefix(a)
    elseif op == 'refund' then
      refund(a, tonumber(b), tonumber(now) * 1000)
    end
    n = n + 1
  end
end
return n
"#,
    ),
    // ARGV: tag, name, now, open ms, probes. Returns {retry after ms or '', new state or ''}.
    breaker_allow: script(
        r#"
local name, now, open_ms, max_probes = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local k = T..':b:'..name
redis.call('SADD', T..':breakers', name)
local st = redis.call('HMGET', k, 'state', 'opened_at', 'probes', 'changed_at')
if not st[1] then
  redis.call('HSET', k, 'state', 'closed', 'probes', 0, 'probe_successes', 0, 'changed_at', now)
  return {'', ''}
end
local state, opened, probes, changed = st[1], tonumber(st[2]) or 0, tonumber(st[3]) or 0, tonumber(st[4]) or 0
if state == 'open' then
  if now < opened + open_ms then return {fmt(opened + open_ms - now), ''} end
  redis.call('HSET', k, 'state', 'half_open', 'probes', 1, 'probe_successes', 0, 'changed_at', now)
  return {'', 'half_open'}
elseif state == 'half_open' then
  if probes < max_probes then
    redis.call('HINCRBY', k, 'probes', 1)
    return {'', ''}
  elseif now >= changed + open_ms then
    -- The probes never reported: let a fresh round through rather than stay stuck.
    redis.call('HSET', k, 'probes', 1, 'probe_successes', 0, 'changed_at', now)
    return {'', ''}
  end
  return {fmt(math.max(math.floor(open_ms / 4), 100)), ''}
end
return {'', ''}
"#,
    ),
    // ARGV: tag, name, success ('1'/'0'), now, bucket ms, buckets, probes, failure rate, min
    // calls. Returns the new state or ''.
    breaker_record: script(
        r#"
local name, ok, now, bms, nb = ARGV[2], ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local probes, rate, min_calls = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local k, ck = T..':b:'..name, T..':bc:'..name
local bucket = math.floor(now / bms)
redis.call('SADD', T..':breakers', name)
redis.call('HINCRBY', ck, (ok and 's' or 'f')..fmt(bucket), 1)
local fields = redis.call('HKEYS', ck)
local old = {}
for _, f in ipairs(fields) do
  if tonumber(string.sub(f, 2)) < bucket - 2 * nb then old[#old+1] = f end
end
if #old > 0 then redis.call('HDEL', ck, unpack(old)) end
local st = redis.call('HMGET', k, 'state', 'probe_successes')
local state, ps = st[1] or 'closed', tonumber(st[2]) or 0
if not st[1] then redis.call('HSET', k, 'state', 'closed', 'probes', 0, 'probe_successes', 0, 'changed_at', now) end
local function to(s, opened)
  redis.call('HSET', k, 'state', s, 'probes', 0, 'probe_successes', 0, 'changed_at', now)
  if opened then redis.call('HSET', k, 'opened_at', now) end
  return s
end
if state == 'half_open' then
  if not ok then return to('open', true) end
  if ps + 1 >= probes then
    redis.call('DEL', ck)
    return to('closed', false)
  end
  redis.call('HINCRBY', k, 'probe_successes', 1)
elseif state == 'closed' and not ok then
  local s, f = 0, 0
  local all = redis.call('HGETALL', ck)
  for i = 1, #all, 2 do
    if tonumber(string.sub(all[i], 2)) >= bucket - nb + 1 then
      if string.sub(all[i], 1, 1) == 's' then s = s + tonumber(all[i+1]) else f = f + tonumber(all[i+1]) end
    end
  end
  if s + f >= min_calls and f >= rate * (s + f) then return to('open', true) end
end
return ''
"#,
    ),
    // ARGV: tag, name, from bucket. Returns {state or '', opened at or '', successes, failures}.
    breaker_state: script(
        r#"
local from = tonumber(ARGV[3])
local st = redis.call('HMGET', T..':b:'..ARGV[2], 'state', 'opened_at')
local s, f = 0, 0
local all = redis.call('HGETALL', T..':bc:'..ARGV[2])
for i = 1, #all, 2 do
  if tonumber(string.sub(all[i], 2)) >= from then
    if string.sub(all[i], 1, 1) == 's' then s = s + tonumber(all[i+1]) else f = f + tonumber(all[i+1]) end
  end
end
return {st[1] or '', st[2] or '', s, f}
"#,
    ),
});

/// How long ids of applied deferred operations are kept.
pub(crate) const APPLIED_KEEP_MS: i64 = 600_000;

/// The shared state of one deployment (`tag`) on Redis.
pub struct RedisState {
    pool: Arc<Pool>,
    tag: String,
}

/// A finite score as Redis takes it, negated (see the module docs).
fn negated(score: f64, what: &str) -> Result<String> {
    if !score.is_finite() {
        return Err(BackendError::Invalid(format!("{what} must be a finite number, not {score}")));
    }
    Ok((0.0 - score).to_string())
}

fn score_of(v: &Value) -> Option<f64> {
    match v {
        Value::Nil => None,
        Value::Double(d) => Some(0.0 - d),
        other => text(other).parse::<f64>().ok().map(|d| 0.0 - d),
    }
}

impl RedisState {
    pub(crate) fn new(pool: Arc<Pool>, tag: String) -> Self {
        RedisState { pool, tag }
    }

    pub(super) fn tag(&self) -> &str {
        &self.tag
    }

    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(super) fn run(&self, s: &Script, args: &[String]) -> Result<Value> {
        let key = format!("{}:queues", self.tag);
        self.pool.with(|c| {
            let mut inv = s.key(&key);
            inv.arg(&self.tag);
            for a in args {
                inv.arg(a);
            }
            inv.invoke::<Value>(c)
        })
    }

    fn cmd<R: redis::FromRedisValue>(&self, f: impl Fn(&str) -> redis::Cmd) -> Result<R> {
        self.pool.with(|c| f(&self.tag).query::<R>(c))
    }

    /// Applies deferred operations, each once: the ids are their outbox ids. Returns how many
    /// were applied now (not before).
    pub(crate) fn apply_once(&self, ops: &[(String, Deferred)], now: i64) -> Result<u64> {
        let mut applied = 0;
        for chunk in ops.chunks(500) {
            let mut args = vec![now.to_string()];
            for (id, op) in chunk {
                let (kind, a, b, c) = match op {
                    Deferred::ZIncr { set, member, delta } => ("zincr", set.clone(), negated(*delta, "a score increment")?, member.clone()),
                    Deferred::CacheForgetPrefix { prefix } => ("forget", prefix.clone(), String::new(), String::new()),
                    Deferred::RateRefund { key, t } => ("refund", key.clone(), t.to_string(), String::new()),
                };
                args.extend([id.clone(), kind.to_string(), a, b, c]);
            }
            applied += int(&self.run(&SCRIPTS.apply, &args)?).max(0) as u64;
        }
        Ok(applied)
    }
}

impl SharedState for RedisState {
    fn cache_get(&self, key: &str) -> Result<Option<String>> {
        self.cmd(|t| redis::cmd("GET").arg(format!("{t}:c:{key}")).clone())
    }

    fn cache_put(&self, key: &str, json: &str, expires_at: Option<i64>) -> Result<()> {
        let ttl = expires_at.map(|at| at - conveyor_core::clock::now_ms());
        let tag = self.tag.clone();
        self.pool.with(|c| {
            let mut p = redis::pipe();
            p.atomic();
            let k = format!("{tag}:c:{key}");
            match ttl {
                Some(ms) if ms <= 0 => {
                    p.cmd("DEL").arg(&k).ignore();
                }
                Some(ms) => {
                    p.cmd("SET").arg(&k).arg(json).arg("PX").arg(ms).ignore();
                }
                None => {
                    p.cmd("SET").arg(&k).arg(json).ignore();
                }
            }
            p.cmd("ZADD").arg(format!("{tag}:ck")).arg(0).arg(key).ignore();
            p.query::<()>(c)
        })
    }

    fn cache_forget(&self, key: &str) -> Result<bool> {
        let tag = self.tag.clone();
        let (n,): (i64,) = self.pool.with(|c| {
            redis::pipe().atomic().cmd("DEL").arg(format!("{tag}:c:{key}")).cmd("ZREM").arg(format!("{tag}:ck")).arg(key).ignore().query(c)
        })?;
        Ok(n > 0)
    }

    fn cache_forget_prefix(&self, prefix: &str) -> Result<u64> {
        Ok(int(&self.run(&SCRIPTS.forget_prefix, &[prefix.to_string()])?).max(0) as u64)
    }

    fn cache_prune(&self) -> Result<u64> {
        let (mut off, mut total) = (0i64, 0u64);
        loop {
            let r = items(self.run(&SCRIPTS.prune, &[off.to_string()])?);
            total += r.first().map_or(0, int).max(0) as u64;
            off = r.get(1).map_or(0, int);
            if off == 0 {
                return Ok(total);
            }
        }
    }

    fn z_incr(&self, set: &str, member: &str, delta: f64) -> Result<f64> {
        let d = negated(delta, "a score increment")?;
        let v: Value = self.cmd(|t| redis::cmd("ZINCRBY").arg(format!("{t}:z:{set}")).arg(&d).arg(member).clone())?;
        score_of(&v).ok_or_else(|| BackendError::Storage("ZINCRBY returned no score".into()))
    }

    fn z_set(&self, set: &str, member: &str, score: f64) -> Result<()> {
        let s = negated(score, "a score")?;
        self.cmd::<i64>(|t| redis::cmd("ZADD").arg(format!("{t}:z:{set}")).arg(&s).arg(member).clone()).map(|_| ())
    }

    fn z_remove(&self, set: &str, member: &str) -> Result<bool> {
        Ok(self.cmd::<i64>(|t| redis::cmd("ZREM").arg(format!("{t}:z:{set}")).arg(member).clone())? > 0)
    }

    fn z_score(&self, set: &str, member: &str) -> Result<Option<f64>> {
        let v: Value = self.cmd(|t| redis::cmd("ZSCORE").arg(format!("{t}:z:{set}")).arg(member).clone())?;
        Ok(score_of(&v))
    }

    fn z_top(&self, set: &str, n: usize) -> Result<Vec<(String, f64)>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let v: Value = self.cmd(|t| redis::cmd("ZRANGE").arg(format!("{t}:z:{set}")).arg(0).arg(n as i64 - 1).arg("WITHSCORES").clone())?;
        let flat: Vec<Value> = items(v).into_iter().flat_map(|x| if matches!(x, Value::Array(_)) { items(x) } else { vec![x] }).collect();
        Ok(flat.chunks_exact(2).map(|p| (text(&p[0]), score_of(&p[1]).unwrap_or(0.0))).collect())
    }

    fn z_rank(&self, set: &str, member: &str) -> Result<Option<(u64, f64)>> {
        let k = format!("{}:z:{set}", self.tag);
        let (rank, score): (Option<i64>, Value) =
            self.pool.with(|c| redis::pipe().atomic().cmd("ZRANK").arg(&k).arg(member).cmd("ZSCORE").arg(&k).arg(member).query(c))?;
        Ok(match (rank, score_of(&score)) {
            (Some(r), Some(s)) => Some((r as u64 + 1, s)),
            _ => None,
        })
    }

    fn z_len(&self, set: &str) -> Result<u64> {
        Ok(self.cmd::<i64>(|t| redis::cmd("ZCARD").arg(format!("{t}:z:{set}")).clone())?.max(0) as u64)
    }

    fn z_rebuild(&self, set: &str, entries: &[(String, f64)]) -> Result<()> {
        let mut members = Vec::with_capacity(entries.len());
        for (m, s) in entries {
            members.push((negated(*s, "a score")?, m.as_str()));
        }
        let k = format!("{}:z:{set}", self.tag);
        // One MULTI: readers see the old set or the new one.
        self.pool.with(|c| {
            let mut p = redis::pipe();
            p.atomic();
            p.cmd("DEL").arg(&k).ignore();
            for chunk in members.chunks(1_000) {
                p.cmd("ZADD").arg(&k).arg(chunk).ignore();
            }
            p.query::<()>(c)
        })
    }

    fn rate_take(&self, key: &str, now_us: i64, t: i64, tolerance: i64) -> Result<(bool, i64, i64)> {
        let r = items(self.run(&SCRIPTS.rate_take, &[key.to_string(), now_us.to_string(), t.to_string(), tolerance.to_string()])?);
        Ok((r.first().map_or(0, int) == 1, r.get(1).map_or(now_us, int), r.get(2).map_or(now_us, int)))
    }

    fn slot_acquire(&self, key: &str, job: &str, limit: i64, authoritative: bool, now: i64, expires_at: i64) -> Result<(bool, i64, i64)> {
        self.flow_acquire(key, job, limit, authoritative, now, expires_at)
    }

    fn slot_wait(&self, key: &str, job: &str, now: i64) -> Result<bool> {
        self.flow_wait(key, job, now)
    }

    fn slot_release(&self, key: &str, job: &str, now: i64) -> Result<Option<String>> {
        self.flow_release(key, job, now)
    }

    fn slot_extend(&self, slots: &[(String, String)], expires_at: i64) -> Result<()> {
        self.flow_extend(slots, expires_at)
    }

    fn slot_keys(&self, max: usize, now: i64) -> Result<Vec<(String, i64, i64, i64)>> {
        self.flow_keys(max, now)
    }

    fn slot_waiting(&self, key: &str, job: &str, now: i64) -> Result<Option<(i64, i64)>> {
        self.flow_waiting(key, job, now)
    }

    fn slot_waited(&self) -> Result<Vec<String>> {
        self.flow_waited()
    }

    fn breaker_allow(&self, name: &str, now: i64, rules: &BreakerRules) -> Result<BreakerDecision> {
        let r = items(
            self.run(&SCRIPTS.breaker_allow, &[name.to_string(), now.to_string(), rules.open_ms.to_string(), rules.probes.to_string()])?,
        );
        let retry = r.first().map(text).filter(|s| !s.is_empty()).and_then(|s| s.parse::<i64>().ok());
        let transition = r.get(1).map(text).filter(|s| !s.is_empty());
        Ok(BreakerDecision { retry_after_ms: retry, transition })
    }

    fn breaker_record(&self, name: &str, success: bool, now: i64, rules: &BreakerRules) -> Result<Option<String>> {
        let args = [
            name.to_string(),
            if success { "1" } else { "0" }.to_string(),
            now.to_string(),
            rules.bucket_ms.to_string(),
            rules.buckets.to_string(),
            rules.probes.to_string(),
            rules.failure_rate.to_string(),
            rules.min_calls.to_string(),
        ];
        Ok(Some(text(&self.run(&SCRIPTS.breaker_record, &args)?)).filter(|s| !s.is_empty()))
    }

    fn breaker_state(&self, name: &str, from_bucket: i64) -> Result<Option<BreakerState>> {
        let r = items(self.run(&SCRIPTS.breaker_state, &[name.to_string(), from_bucket.to_string()])?);
        if r.len() < 4 {
            return Ok(None);
        }
        let state = text(&r[0]);
        let (successes, failures) = (int(&r[2]), int(&r[3]));
        if state.is_empty() && successes + failures == 0 {
            return Ok(None);
        }
        Ok(Some(BreakerState {
            state: if state.is_empty() { "closed".into() } else { state },
            opened_at: text(&r[1]).parse::<f64>().ok().map(|v| v as i64),
            successes,
            failures,
        }))
    }

    fn breaker_names(&self) -> Result<Vec<String>> {
        self.cmd(|t| redis::cmd("SMEMBERS").arg(format!("{t}:breakers")).clone())
    }

    fn apply(&self, op: &Deferred) -> Result<()> {
        match op {
            Deferred::ZIncr { set, member, delta } => self.z_incr(set, member, *delta).map(|_| ()),
            Deferred::CacheForgetPrefix { prefix } => self.cache_forget_prefix(prefix).map(|_| ()),
            Deferred::RateRefund { .. } => {
                let id = format!("refund:{}", rand::random::<u64>());
                self.apply_once(&[(id, op.clone())], conveyor_core::clock::now_ms()).map(|_| ())
            }
        }
    }
}
