//! A key-value cache with TTLs and `remember`, and sorted sets (scores per member, top N,
//! rank, atomic rebuild) for leaderboards — on the relational store, or on the backend's
//! shared state (Redis) when it has one (see [`crate::state`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{BackendError, QueueBackend, QueueBackendExt, Result, RowExt, SqlValue};
use crate::clock::now_ms;
use crate::state::{blocking, Deferred, SharedState};

#[derive(Clone)]
pub struct Cache {
    backend: Arc<dyn QueueBackend>,
}

impl Cache {
    pub fn new(backend: Arc<dyn QueueBackend>) -> Self {
        Cache { backend }
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        if let Some(st) = self.backend.shared_state() {
            let key = key.to_string();
            let json = blocking(st, move |s| s.cache_get(&key)).await?;
            return Ok(json.and_then(|v| serde_json::from_str(&v).ok()));
        }
        let rows = self
            .backend
            .query("SELECT value FROM cache WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)", vec![key.into(), now_ms().into()])
            .await?;
        Ok(rows.first().and_then(|r| r.text(0)).and_then(|v| serde_json::from_str(v).ok()))
    }

    /// Stores `value` for `ttl` (`None`: until forgotten).
    pub async fn put<T: Serialize>(&self, key: &str, value: &T, ttl: Option<Duration>) -> Result<()> {
        let json = serde_json::to_string(value).map_err(|e| BackendError::Invalid(e.to_string()))?;
        let expires = ttl.map(|t| now_ms() + t.as_millis() as i64);
        let key = key.to_string();
        if let Some(st) = self.backend.shared_state() {
            return blocking(st, move |s| s.cache_put(&key, &json, expires)).await;
        }
        self.backend
            .transact(move |tx| {
                tx.execute(
                    "INSERT INTO cache (key, value, expires_at) VALUES ($1, $2, $3)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                    &[key.into(), json.into(), expires.into()],
                )
            })
            .await?;
        Ok(())
    }

    pub async fn forget(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        if let Some(st) = self.backend.shared_state() {
            return blocking(st, move |s| s.cache_forget(&key)).await;
        }
        Ok(self.backend.transact(move |tx| tx.execute("DELETE FROM cache WHERE key = $1", &[key.into()])).await? > 0)
    }

    /// Forgets every key starting with `prefix` (invalidating a family of cached values).
    pub async fn forget_prefix(&self, prefix: &str) -> Result<u64> {
        if let Some(st) = self.backend.shared_state() {
            let prefix = prefix.to_string();
            return blocking(st, move |s| s.cache_forget_prefix(&prefix)).await;
        }
        // A character-wise comparison: unlike a range scan it does not depend on the collation.
        let (p, n) = (prefix.to_string(), prefix.chars().count() as i64);
        self.backend.transact(move |tx| tx.execute("DELETE FROM cache WHERE substr(key, 1, $2) = $1", &[p.into(), n.into()])).await
    }

    /// The cached value, or `compute()`'s, stored for `ttl`. Concurrent misses may each compute;
    /// the last one stored wins (values are derived, so any of them is right).
    pub async fn remember<T, F, Fut>(&self, key: &str, ttl: Option<Duration>, compute: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if let Some(v) = self.get(key).await? {
            return Ok(v);
        }
        let v = compute().await?;
        self.put(key, &v, ttl).await?;
        Ok(v)
    }

    /// Deletes expired entries.
    pub async fn prune(&self) -> Result<u64> {
        if let Some(st) = self.backend.shared_state() {
            return blocking(st, |s| s.cache_prune()).await;
        }
        let now = now_ms();
        self.backend.transact(move |tx| tx.execute("DELETE FROM cache WHERE expires_at <= $1", &[now.into()])).await
    }
}

/// A named sorted set: members with scores, ordered by score descending and, on equal scores,
/// by member ascending (so ties always rank the same way).
#[derive(Clone)]
pub struct SortedSet {
    backend: Arc<dyn QueueBackend>,
    name: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ranked {
    /// From 1.
    pub rank: u64,
    pub member: String,
    pub score: f64,
}

impl SortedSet {
    pub fn new(backend: Arc<dyn QueueBackend>, name: impl Into<String>) -> Self {
        SortedSet { backend, name: name.into() }
    }

    /// Runs `f` with this set's name on the shared state, if the backend has one.
    async fn shared<R, F>(&self, f: F) -> Option<Result<R>>
    where
        R: Send + 'static,
        F: FnOnce(&dyn SharedState, &str) -> Result<R> + Send + 'static,
    {
        let st = self.backend.shared_state()?;
        let name = self.name.clone();
        Some(blocking(st, move |s| f(s, &name)).await)
    }

    /// Adds `delta` to a member's score (creating it at `delta`); returns the new score.
    pub async fn incr(&self, member: &str, delta: f64) -> Result<f64> {
        let m = member.to_string();
        if let Some(r) = self.shared(move |s, set| s.z_incr(set, &m, delta)).await {
            return r;
        }
        let (set, member) = (self.name.clone(), member.to_string());
        self.backend.transact(move |tx| incr_in(tx, &set, &member, delta)).await
    }

    pub async fn set(&self, member: &str, score: f64) -> Result<()> {
        let m = member.to_string();
        if let Some(r) = self.shared(move |s, set| s.z_set(set, &m, score)).await {
            return r;
        }
        let (set, member) = (self.name.clone(), member.to_string());
        self.backend
            .transact(move |tx| {
                tx.execute(
                    "INSERT INTO zsets (zset, member, score) VALUES ($1, $2, $3) ON CONFLICT (zset, member) DO UPDATE SET score = excluded.score",
                    &[set.into(), member.into(), score.into()],
                )
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&self, member: &str) -> Result<bool> {
        let m = member.to_string();
        if let Some(r) = self.shared(move |s, set| s.z_remove(set, &m)).await {
            return r;
        }
        let (set, member) = (self.name.clone(), member.to_string());
        Ok(self
            .backend
            .transact(move |tx| tx.execute("DELETE FROM zsets WHERE zset = $1 AND member = $2", &[set.into(), member.into()]))
            .await?
            > 0)
    }

    pub async fn score(&self, member: &str) -> Result<Option<f64>> {
        let m = member.to_string();
        if let Some(r) = self.shared(move |s, set| s.z_score(set, &m)).await {
            return r;
        }
        let rows = self
            .backend
            .query("SELECT score FROM zsets WHERE zset = $1 AND member = $2", vec![self.name.clone().into(), member.into()])
            .await?;
        Ok(rows.first().map(|r| r.real(0)))
    }

    /// The first `n` members by rank.
    pub async fn top(&self, n: usize) -> Result<Vec<Ranked>> {
        if let Some(r) = self.shared(move |s, set| s.z_top(set, n)).await {
            return Ok(r?.into_iter().enumerate().map(|(i, (member, score))| Ranked { rank: i as u64 + 1, member, score }).collect());
        }
        let rows = self
            .backend
            .query(
                "SELECT member, score FROM zsets WHERE zset = $1 ORDER BY score DESC, member ASC LIMIT $2",
                vec![self.name.clone().into(), (n as i64).into()],
            )
            .await?;
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, r)| Ranked { rank: i as u64 + 1, member: r.text(0).unwrap_or_default().to_string(), score: r.real(1) })
            .collect())
    }

    /// A member's rank (from 1), or `None` if it is not in the set.
    pub async fn rank(&self, member: &str) -> Result<Option<Ranked>> {
        let m = member.to_string();
        if let Some(r) = self.shared(move |s, set| s.z_rank(set, &m)).await {
            return Ok(r?.map(|(rank, score)| Ranked { rank, member: member.to_string(), score }));
        }
        let Some(score) = self.score(member).await? else { return Ok(None) };
        let ahead = self
            .backend
            .query(
                "SELECT count(*) FROM zsets WHERE zset = $1 AND (score > $2 OR (score = $2 AND member < $3))",
                vec![self.name.clone().into(), score.into(), member.into()],
            )
            .await?;
        Ok(Some(Ranked { rank: ahead.first().map_or(0, |r| r.int(0)) as u64 + 1, member: member.to_string(), score }))
    }

    pub async fn len(&self) -> Result<u64> {
        if let Some(r) = self.shared(|s, set| s.z_len(set)).await {
            return r;
        }
        let rows = self.backend.query("SELECT count(*) FROM zsets WHERE zset = $1", vec![self.name.clone().into()]).await?;
        Ok(rows.first().map_or(0, |r| r.int(0)) as u64)
    }

    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Replaces the whole set in one transaction: readers see the old set or the new one.
    pub async fn rebuild(&self, entries: Vec<(String, f64)>) -> Result<()> {
        if let Some(st) = self.backend.shared_state() {
            let set = self.name.clone();
            return blocking(st, move |s| s.z_rebuild(&set, &entries)).await;
        }
        let set = self.name.clone();
        self.backend
            .transact(move |tx| {
                tx.execute("DELETE FROM zsets WHERE zset = $1", &[set.clone().into()])?;
                for (member, score) in entries {
                    tx.execute(
                        "INSERT INTO zsets (zset, member, score) VALUES ($1, $2, $3)",
                        &[set.clone().into(), member.into(), score.into()],
                    )?;
                }
                Ok(())
            })
            .await
    }
}

/// `Cache::forget_prefix` inside the caller's transaction (invalidate with the write that
/// made the cached values stale). On a shared state it happens once the transaction commits.
pub fn forget_prefix_in(tx: &mut dyn crate::backend::Tx, prefix: &str) -> Result<()> {
    if let Some(sh) = tx.shared_state() {
        return sh.after_commit(Deferred::CacheForgetPrefix { prefix: prefix.to_string() });
    }
    tx.defer("DELETE FROM cache WHERE substr(key, 1, $2) = $1", &[prefix.into(), (prefix.chars().count() as i64).into()])
}

/// Adds `delta` to a member's score inside the caller's transaction without reading the new
/// score: on a shared state, the increment is only deferred to the commit (no round trip while
/// the transaction is open).
pub fn add_in(tx: &mut dyn crate::backend::Tx, set: &str, member: &str, delta: f64) -> Result<()> {
    if let Some(sh) = tx.shared_state() {
        return sh.after_commit(Deferred::ZIncr { set: set.to_string(), member: member.to_string(), delta });
    }
    tx.defer(
        "INSERT INTO zsets (zset, member, score) VALUES ($1, $2, $3)
         ON CONFLICT (zset, member) DO UPDATE SET score = zsets.score + excluded.score",
        &[set.into(), member.into(), SqlValue::Real(delta)],
    )
}

/// [`add_in`] for many members at once: the increments are summed per (set, member) and
/// applied in that order (concurrent transactions take the rows in one order), with one
/// statement per chunk.
pub fn add_many_in(tx: &mut dyn crate::backend::Tx, increments: &[(&str, &str, f64)]) -> Result<()> {
    let mut sum: std::collections::BTreeMap<(&str, &str), f64> = std::collections::BTreeMap::new();
    for (set, member, delta) in increments {
        *sum.entry((set, member)).or_default() += delta;
    }
    if tx.shared_state().is_some() {
        return sum.into_iter().try_for_each(|((set, member), delta)| add_in(tx, set, member, delta));
    }
    let rows: Vec<Vec<SqlValue>> =
        sum.into_iter().map(|((set, member), delta)| vec![set.into(), member.into(), SqlValue::Real(delta)]).collect();
    crate::backend::insert_many(
        tx,
        "INSERT INTO zsets (zset, member, score)",
        &rows,
        "ON CONFLICT (zset, member) DO UPDATE SET score = zsets.score + excluded.score",
    )
    .map(|_| ())
}

/// `incr` inside the caller's transaction (e.g. with the order that earned the points); returns
/// the new score. On a shared state the increment is applied once the transaction commits, and
/// the score returned is the one read now plus this transaction's increments (another process
/// may add to it before the commit).
pub fn incr_in(tx: &mut dyn crate::backend::Tx, set: &str, member: &str, delta: f64) -> Result<f64> {
    if let Some(sh) = tx.shared_state() {
        let now = sh.state().z_score(set, member)?.unwrap_or(0.0) + sh.z_pending(set, member);
        sh.after_commit(Deferred::ZIncr { set: set.to_string(), member: member.to_string(), delta })?;
        return Ok(now + delta);
    }
    let rows = tx.query(
        "INSERT INTO zsets (zset, member, score) VALUES ($1, $2, $3)
         ON CONFLICT (zset, member) DO UPDATE SET score = zsets.score + excluded.score
         RETURNING score",
        &[set.into(), member.into(), SqlValue::Real(delta)],
    )?;
    Ok(rows.first().map_or(delta, |r| r.real(0)))
}
