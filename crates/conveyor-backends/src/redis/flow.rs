//! Per-key concurrency on the shared state (`conveyor_core::flow`), the same steps as the
//! relational form, each one script:
//!
//! - `T:fk:<key>` — the key's limit, while the key is busy;
//! - `T:fs:<key>` — the slots held (zset: job id → expiry, unix ms);
//! - `T:fw:<key>` — the parked jobs in line (zset: job id → since), first in line first;
//! - `T:fkeys` — the busy keys, for the dashboard;
//! - `T:fwkeys` — the keys with jobs in line, for the sweep.

use redis::{Script, Value};

use conveyor_core::backend::Result;

use super::conn::{int, items, text};
use super::state::{script, RedisState};

struct Scripts {
    acquire: Script,
    wait: Script,
    release: Script,
    keys: Script,
    waiting: Script,
}

static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    // ARGV: tag, key, job, limit, authoritative (1/0), now, expires_at. Returns {taken, held, limit}.
    acquire: script(
        r#"
local key, job, limit, now, exp = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6]), ARGV[7]
local kk, ks = T..':fk:'..key, T..':fs:'..key
local lim = tonumber(redis.call('GET', kk) or '')
if not lim or ARGV[5] == '1' then
  lim = limit
  redis.call('SET', kk, lim)
end
redis.call('SADD', T..':fkeys', key)
redis.call('ZREMRANGEBYSCORE', ks, '-inf', now)
if redis.call('ZSCORE', ks, job) then
  redis.call('ZADD', ks, exp, job)
  return {1, redis.call('ZCARD', ks), lim}
end
local n = redis.call('ZCARD', ks)
if n >= lim then return {0, n, lim} end
redis.call('ZADD', ks, exp, job)
if redis.call('ZREM', T..':fw:'..key, job) == 1 and redis.call('EXISTS', T..':fw:'..key) == 0 then
  redis.call('SREM', T..':fwkeys', key)
end
return {1, n + 1, lim}
"#,
    ),
    // ARGV: tag, key, job, now. Returns 1 when the job is in line, 0 when a slot is free.
    wait: script(
        r#"
local key, job, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local lim = tonumber(redis.call('GET', T..':fk:'..key) or '')
if not lim then return 0 end
local ks = T..':fs:'..key
redis.call('ZREMRANGEBYSCORE', ks, '-inf', now)
if redis.call('ZCARD', ks) < lim then return 0 end
redis.call('ZADD', T..':fw:'..key, 'NX', now, job)
redis.call('SADD', T..':fwkeys', key)
return 1
"#,
    ),
    // ARGV: tag, key, job ('' for none), now, handover expiry. Returns the job handed a slot, or nil.
    release: script(
        r#"
local key, job, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local kk, ks, kw = T..':fk:'..key, T..':fs:'..key, T..':fw:'..key
local lim = tonumber(redis.call('GET', kk) or '')
if not lim then return false end
if job ~= '' then redis.call('ZREM', ks, job) end
redis.call('ZREMRANGEBYSCORE', ks, '-inf', now)
local n = redis.call('ZCARD', ks)
if n < lim then
  local first = redis.call('ZRANGE', kw, 0, 0)
  if #first > 0 then
    redis.call('ZREM', kw, first[1])
    if redis.call('EXISTS', kw) == 0 then redis.call('SREM', T..':fwkeys', key) end
    redis.call('ZADD', ks, ARGV[5], first[1])
    return first[1]
  end
  redis.call('SREM', T..':fwkeys', key)
  if n == 0 then
    redis.call('DEL', kk)
    redis.call('SREM', T..':fkeys', key)
  end
end
return false
"#,
    ),
    // ARGV: tag, now. Returns key, limit, running, waiting for each busy key (up to 10,000).
    keys: script(
        r#"
local now, out = ARGV[2], {}
for _, key in ipairs(redis.call('SRANDMEMBER', T..':fkeys', 10000)) do
  local lim = redis.call('GET', T..':fk:'..key)
  if lim then
    out[#out+1] = key
    out[#out+1] = lim
    out[#out+1] = redis.call('ZCOUNT', T..':fs:'..key, '('..now, '+inf')
    out[#out+1] = redis.call('ZCARD', T..':fw:'..key)
  end
end
return out
"#,
    ),
    // ARGV: tag, key, job, now. Returns {limit, running} when the job is in line, or nil.
    waiting: script(
        r#"
local key, job, now = ARGV[2], ARGV[3], ARGV[4]
if not redis.call('ZSCORE', T..':fw:'..key, job) then return false end
return {tonumber(redis.call('GET', T..':fk:'..key) or '0'), redis.call('ZCOUNT', T..':fs:'..key, '('..now, '+inf')}
"#,
    ),
});

fn s(v: impl ToString) -> String {
    v.to_string()
}

impl RedisState {
    pub(super) fn flow_acquire(&self, key: &str, job: &str, limit: i64, auth: bool, now: i64, expires_at: i64) -> Result<(bool, i64, i64)> {
        let r = items(self.run(&SCRIPTS.acquire, &[s(key), s(job), s(limit), s(auth as u8), s(now), s(expires_at)])?);
        Ok((r.first().map_or(0, int) == 1, r.get(1).map_or(0, int), r.get(2).map_or(limit, int)))
    }

    pub(super) fn flow_wait(&self, key: &str, job: &str, now: i64) -> Result<bool> {
        Ok(int(&self.run(&SCRIPTS.wait, &[s(key), s(job), s(now)])?) == 1)
    }

    pub(super) fn flow_release(&self, key: &str, job: &str, now: i64) -> Result<Option<String>> {
        let handover = conveyor_core::flow::handover_expiry(now);
        Ok(match self.run(&SCRIPTS.release, &[s(key), s(job), s(now), s(handover)])? {
            Value::Nil => None,
            v => Some(text(&v)).filter(|t| !t.is_empty()),
        })
    }

    pub(super) fn flow_waited(&self) -> Result<Vec<String>> {
        let key = format!("{}:fwkeys", self.tag());
        self.pool().with(|c| redis::cmd("SMEMBERS").arg(&key).query::<Vec<String>>(c))
    }

    pub(super) fn flow_extend(&self, slots: &[(String, String)], expires_at: i64) -> Result<()> {
        let tag = self.tag().to_string();
        self.pool().with(|c| {
            let mut p = redis::pipe();
            for (key, job) in slots {
                p.cmd("ZADD").arg(format!("{tag}:fs:{key}")).arg("XX").arg(expires_at).arg(job).ignore();
            }
            p.query::<()>(c)
        })
    }

    pub(super) fn flow_keys(&self, max: usize, now: i64) -> Result<Vec<(String, i64, i64, i64)>> {
        let r = items(self.run(&SCRIPTS.keys, &[s(now)])?);
        let mut out: Vec<(String, i64, i64, i64)> = r.chunks_exact(4).map(|c| (text(&c[0]), int(&c[1]), int(&c[2]), int(&c[3]))).collect();
        out.sort_by(|a, b| (b.2 + b.3).cmp(&(a.2 + a.3)).then_with(|| a.0.cmp(&b.0)));
        out.truncate(max);
        Ok(out)
    }

    pub(super) fn flow_waiting(&self, key: &str, job: &str, now: i64) -> Result<Option<(i64, i64)>> {
        let r = items(self.run(&SCRIPTS.waiting, &[s(key), s(job), s(now)])?);
        Ok((r.len() == 2).then(|| (int(&r[0]), int(&r[1]))))
    }
}
