//! Concurrency slots (`conveyor_core::flow`) for jobs handed to remote workers, as Conveyor's
//! own workers take them: a keyed job takes its key's slot when `FETCH` hands it out (a job in
//! the hub's buffer holds none); at the key's limit it is parked — released without spending
//! an attempt, then put in line — and `FETCH` looks for another job. `ACK`, `FAIL` and a
//! reservation taken back give the slot back (handing it to the first in line); the slot lasts
//! as long as the store's lease and is renewed with it, so a crashed server's slots come back.

use tracing::{debug, warn};

use conveyor_core::clock::now_ms;
use conveyor_core::flow::{self, Concurrency};
use conveyor_core::job::Outcome;
use conveyor_core::{Completion, Job};

use super::{Hub, STORE_LEASE};

/// Whether a job may be handed out, as far as its key goes.
pub(super) enum Slot {
    /// No key.
    Free,
    /// The key's slot, held for the job.
    Held(String),
    /// At the key's limit (or the slots were unavailable): the job went back to its queue.
    Parked,
}

impl Hub {
    pub(super) async fn take_slot(&self, job: &Job) -> Slot {
        let Some(c) = Concurrency::of_job(self.conveyor.registry(), job) else { return Slot::Free };
        let backend = self.conveyor.backend();
        let expires_at = now_ms() + STORE_LEASE.as_millis() as i64;
        match flow::acquire(backend.as_ref(), &c, job.id, expires_at).await {
            Ok(true) => Slot::Held(c.key),
            Ok(false) => {
                debug!(key = %c.key, job = %job.id, "concurrency key at its limit; parked before FETCH");
                if let Err((_, e)) = flow::park(backend.as_ref(), Completion::of(job, Outcome::Completed), &c.key).await {
                    warn!(error = %e, key = %c.key, "parking a job failed; the store's lease returns it");
                }
                Slot::Parked
            }
            Err(e) => {
                warn!(error = %e, key = %c.key, "concurrency slots unavailable; released");
                if let Err(e) = self.record(Completion::of(job, Outcome::Release { at: now_ms() + 1000 })).await {
                    warn!(error = %e, "releasing a job failed; the store's lease returns it");
                }
                Slot::Parked
            }
        }
    }

    /// Gives back the slot a held job took, if any.
    pub(super) async fn give_slot(&self, key: Option<&str>, job: &Job) {
        let Some(key) = key else { return };
        if let Err(e) = flow::release(self.conveyor.backend().as_ref(), key, job.id).await {
            warn!(error = %e, %key, "giving back a concurrency slot failed; it expires with the lease");
        }
    }
}
