//! Fair queueing: within a queue and priority, jobs that carry a fairness key (a tenant, a
//! customer) are reserved round-robin across their keys, so one key's backlog delays another
//! key's jobs by about a round, not by the backlog.
//!
//! A job carries its key as the tag `fairness:<key>`. **The order is decided when a job is
//! enqueued**, so reserving stays one ordered index read, with no scan of the backlog: each
//! keyed job gets a *turn* (a virtual time) and the ready jobs are served by
//! `(priority, turn, id)`. A key's jobs take consecutive turns from
//! `max(the key's last turn, the queue's current turn) + 1`, where the queue's current turn is
//! the turn of its next keyed job to be served (just below it), or, when it has none ready, the
//! highest turn handed out so far. So a key with a backlog of 200,000 holds turns far ahead,
//! while a key that arrives later starts at the current turn and its jobs alternate with the
//! backlog's: with `k` busy keys, a new job waits at most about `k` reservations. A key that was
//! idle gets no credit for it (it starts at the current turn, like a new key).
//!
//! **Jobs without a key are not scheduled by key**: their turn is 0, so within their priority
//! they go ahead of keyed jobs, in order of arrival (the order a queue without keys always had).
//! Give every job of a fair queue a key — or a queue of its own — when unkeyed work could be
//! a backlog of its own.
//!
//! Turns are kept per queue, priority and key: in the `fair_keys` table (SQLite, PostgreSQL,
//! the SQL in this module, run in the enqueueing transaction) and in Redis hashes (the enqueue
//! script, `redis/scripts.rs`). A retried, released or scheduled job keeps its turn. With the
//! queue on RabbitMQ the broker's queue is first in, first out, and keys change nothing.

use std::collections::BTreeMap;

use crate::backend::{Result, RowExt, SqlValue, Tx};
use crate::job::NewJob;

/// The tag that carries a job's fairness key: `fairness:<key>`.
pub const TAG: &str = "fairness:";

/// Checks a fairness key from a caller; the error names what is wrong.
pub fn check_key(key: &str) -> std::result::Result<(), String> {
    crate::flow::check_key("fairness", key)
}

/// The job's tag for `key`.
pub fn tag(key: &str) -> String {
    format!("{TAG}{key}")
}

/// The fairness key a job's tags carry, if any.
pub fn key_of(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix(TAG)).filter(|k| check_key(k).is_ok())
}

/// One job to give a turn: its queue, priority and key.
pub struct Entry<'a> {
    pub queue: &'a str,
    pub priority: i32,
    pub key: &'a str,
}

/// Each job's turn (0 without a fairness key), in the enqueueing transaction.
pub fn turns(tx: &mut dyn Tx, jobs: &[NewJob]) -> Result<Vec<i64>> {
    let mut turns = vec![0; jobs.len()];
    let (at, keyed): (Vec<usize>, Vec<Entry<'_>>) = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| Some((i, Entry { queue: &j.queue, priority: j.priority, key: j.fairness_key()? })))
        .unzip();
    if keyed.is_empty() {
        return Ok(turns);
    }
    for (i, t) in at.into_iter().zip(assign(tx, &keyed)?) {
        turns[i] = t;
    }
    Ok(turns)
}

/// Hands out turns to keyed jobs in the enqueueing transaction, in the order given (a key's
/// jobs get consecutive turns). Keys are locked in one order (queue, priority, key), so
/// concurrent enqueues on PostgreSQL cannot deadlock on them; the queue's current turn is read
/// without a lock, so enqueues of different keys never wait for each other.
pub fn assign(tx: &mut dyn Tx, jobs: &[Entry<'_>]) -> Result<Vec<i64>> {
    let mut groups: BTreeMap<(&str, i32, &str), Vec<usize>> = BTreeMap::new();
    for (i, e) in jobs.iter().enumerate() {
        groups.entry((e.queue, e.priority, e.key)).or_default().push(i);
    }
    let mut floors: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    let mut turns = vec![0; jobs.len()];
    for ((queue, priority, key), members) in groups {
        let floor = match floors.get(&(queue, priority)) {
            Some(f) => *f,
            None => {
                let f = current_turn(tx, queue, priority)?;
                floors.insert((queue, priority), f);
                f
            }
        };
        let n = members.len() as i64;
        let last = tx
            .query(
                "INSERT INTO fair_keys (queue, priority, key, last) VALUES ($1, $2, $3, CAST($4 AS BIGINT) + CAST($5 AS BIGINT))
                 ON CONFLICT (queue, priority, key)
                 DO UPDATE SET last = CASE WHEN fair_keys.last > CAST($4 AS BIGINT) THEN fair_keys.last ELSE CAST($4 AS BIGINT) END
                                      + CAST($5 AS BIGINT)
                 RETURNING last",
                &[SqlValue::Text(queue.into()), (priority as i64).into(), SqlValue::Text(key.into()), floor.into(), n.into()],
            )?
            .first()
            .map_or(floor + n, |r| r.int(0));
        for (k, i) in members.into_iter().enumerate() {
            turns[i] = last - n + 1 + k as i64;
        }
    }
    Ok(turns)
}

/// The turn just below the queue's next keyed job at `priority`, or the highest turn handed out
/// when none is ready. One statement, so both are read from one snapshot: on PostgreSQL a
/// concurrent enqueue's jobs and its keys' turns become visible together, never one without
/// the other (which would start this enqueue's keys behind jobs it cannot see).
fn current_turn(tx: &mut dyn Tx, queue: &str, priority: i32) -> Result<i64> {
    Ok(tx
        .query(
            "SELECT coalesce(
               (SELECT fair - 1 FROM jobs WHERE queue = $1 AND priority = $2 AND state = 0 AND fair > 0 ORDER BY fair, id LIMIT 1),
               (SELECT max(last) FROM fair_keys WHERE queue = $1 AND priority = $2),
               0)",
            &[SqlValue::Text(queue.into()), SqlValue::from(priority as i64)],
        )?
        .first()
        .and_then(|r| r.opt_int(0))
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_read_back_from_tags() {
        assert!(check_key("").is_err());
        assert!(check_key(&"x".repeat(crate::flow::MAX_KEY + 1)).is_err());
        assert!(check_key("a\nb").is_err());
        assert!(check_key("tenant-7").is_ok());
        let tags = vec!["other".to_string(), tag("tenant-7")];
        assert_eq!(key_of(&tags), Some("tenant-7"));
        assert_eq!(key_of(&["fairness:".to_string()]), None);
        assert_eq!(key_of(&[]), None);
    }
}
