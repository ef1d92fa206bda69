//! A worker process's kept slots: when a keyed job ends and nobody waits for its key, the
//! worker keeps the job's slot for the key's next job instead of giving it back, so a busy key
//! whose limit is never reached costs no store transaction per job (the store still counts the
//! kept slot, so the limit holds across processes).
//!
//! A kept slot goes back to the store (and to the first job in line) when it was not used for
//! [`KEEP_IDLE`], when a job of its key had to be parked here, when the sweep sees jobs of
//! its key in line anywhere, and when the worker stops. A key is *contended* for
//! [`PARK_RECHECK`](super::PARK_RECHECK) after that: its slots go straight back, so parked
//! jobs are handed their slots at once. Kept slots keep the name of the job that took them
//! from the store and are renewed with the worker's leases; a job never reuses a slot that
//! bears its own name while another job holds it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a kept slot waits for its key's next job.
pub const KEEP_IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct KeyBank {
    /// Kept slots (by the name they bear in the store) and since when.
    spare: Vec<(String, Instant)>,
    /// Slots in use by this worker's jobs, by name.
    in_use: Vec<String>,
    contended_until: Option<Instant>,
}

impl KeyBank {
    fn contended(&self, now: Instant) -> bool {
        self.contended_until.is_some_and(|t| now < t)
    }
}

/// The kept slots of one worker process (see the module docs).
#[derive(Default)]
pub struct Bank {
    keys: Mutex<HashMap<String, KeyBank>>,
}

impl Bank {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyBank>> {
        self.keys.lock().expect("slot bank poisoned")
    }

    /// A kept slot of `key` for a job about to start, if there is one and nobody waits.
    pub fn take(&self, key: &str) -> Option<String> {
        let mut keys = self.keys();
        let k = keys.get_mut(key)?;
        if k.contended(Instant::now()) {
            return None;
        }
        let (name, _) = k.spare.pop()?;
        k.in_use.push(name.clone());
        Some(name)
    }

    /// The name to take a new slot from the store under for `job`: its own, unless a job of
    /// this worker holds a slot by that name (a retry of the job that took it).
    pub fn fresh_name(&self, key: &str, job: &str) -> String {
        let keys = self.keys();
        match keys.get(key) {
            Some(k) if k.in_use.iter().any(|n| n == job) || k.spare.iter().any(|(n, _)| n == job) => {
                format!("{job}#{}", crate::job::JobId::new())
            }
            _ => job.to_string(),
        }
    }

    /// Records a slot taken from the store as in use.
    pub fn taken(&self, key: &str, name: &str) {
        self.keys().entry(key.to_string()).or_default().in_use.push(name.to_string());
    }

    /// A job ended: keeps its slot (`true`), or, when its key is contended, lets it go
    /// (`false`: the caller gives it back to the store).
    pub fn ended(&self, key: &str, name: &str) -> bool {
        let mut keys = self.keys();
        let Some(k) = keys.get_mut(key) else { return false };
        k.in_use.retain(|n| n != name);
        let keep = !k.contended(Instant::now());
        if keep {
            k.spare.push((name.to_string(), Instant::now()));
        } else if k.in_use.is_empty() && k.spare.is_empty() && !k.contended(Instant::now()) {
            keys.remove(key);
        }
        keep
    }

    /// Jobs of `key` wait for a slot: the key is contended for `for_`; returns its kept slots,
    /// which the caller gives back to the store.
    pub fn contend(&self, key: &str, for_: Duration) -> Vec<String> {
        let mut keys = self.keys();
        let k = keys.entry(key.to_string()).or_default();
        k.contended_until = Some(Instant::now() + for_);
        k.spare.drain(..).map(|(n, _)| n).collect()
    }

    /// Kept slots unused for `idle` (every kept slot with `Duration::ZERO`), taken out for the
    /// caller to give back; forgets keys with nothing kept, in use or contended.
    pub fn idle(&self, idle: Duration) -> Vec<(String, String)> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut keys = self.keys();
        for (key, k) in keys.iter_mut() {
            k.spare.retain(|(n, since)| {
                let old = now.duration_since(*since) >= idle;
                if old {
                    out.push((key.clone(), n.clone()));
                }
                !old
            });
        }
        keys.retain(|_, k| !k.spare.is_empty() || !k.in_use.is_empty() || k.contended(now));
        out
    }

    /// The keys with kept slots.
    pub fn keeping(&self) -> Vec<String> {
        self.keys().iter().filter(|(_, k)| !k.spare.is_empty()).map(|(key, _)| key.clone()).collect()
    }

    /// Every kept slot (key, name), to renew with the leases.
    pub fn kept(&self) -> Vec<(String, String)> {
        self.keys().iter().flat_map(|(key, k)| k.spare.iter().map(move |(n, _)| (key.clone(), n.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_kept_reused_and_given_back_when_contended_or_idle() {
        let bank = Bank::default();
        assert_eq!(bank.take("k"), None, "nothing kept yet");
        bank.taken("k", "job-1");
        assert!(bank.ended("k", "job-1"), "kept");
        assert_eq!(bank.take("k").as_deref(), Some("job-1"), "the next job of the key reuses it");
        // job-1 retried while its slot is in use by another job: a fresh name.
        assert_ne!(bank.fresh_name("k", "job-1"), "job-1");
        assert_eq!(bank.fresh_name("k", "job-2"), "job-2");
        assert!(bank.ended("k", "job-1"));
        assert_eq!(bank.contend("k", Duration::from_secs(60)), vec!["job-1".to_string()], "contended: kept slots go back");
        bank.taken("k", "job-3");
        assert!(!bank.ended("k", "job-3"), "a contended key's slots go straight back");
        assert_eq!(bank.take("k"), None);
        bank.taken("j", "job-4");
        assert!(bank.ended("j", "job-4"));
        assert_eq!(bank.keeping(), vec!["j".to_string()]);
        assert_eq!(bank.kept(), vec![("j".to_string(), "job-4".to_string())]);
        assert_eq!(bank.idle(Duration::ZERO), vec![("j".to_string(), "job-4".to_string())]);
        assert!(bank.kept().is_empty());
    }
}
