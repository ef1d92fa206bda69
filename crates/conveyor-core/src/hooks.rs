//! What a relational backend runs inside the transaction that records a job's outcome, so that
//! engine state derived from outcomes (batch counters, workflow transitions) commits with it.

use crate::backend::{Result, Tx};
use crate::job::Completion;

/// Whether [`after_outcome`] has anything to do for this completion (backends skip the call
/// on the hot path otherwise).
pub fn wants(c: &Completion) -> bool {
    c.batch_id.is_some() || c.workflow.is_some()
}

/// Called when a failed job of a batch is put back on its queue (in that transaction): the
/// batch counts it as pending again instead of failed, so its next outcome is counted once.
pub fn after_failed_retry(tx: &mut dyn Tx, batch_id: &str) -> Result<()> {
    crate::batch::record_retry(tx, batch_id)
}

/// Called once per applied completion, inside the transaction that applied it.
pub fn after_outcome(tx: &mut dyn Tx, c: &Completion) -> Result<()> {
    crate::batch::record_outcome(tx, c)?;
    crate::workflow::record_outcome(tx, c)
}

/// [`after_outcome`] for many applied completions of one transaction, set-wise where it can be
/// ([`crate::workflow::record_outcomes`]).
pub fn after_outcomes(tx: &mut dyn Tx, cs: &[&Completion]) -> Result<()> {
    for c in cs {
        crate::batch::record_outcome(tx, c)?;
    }
    let steps: Vec<&Completion> = cs.iter().copied().filter(|c| c.workflow.is_some()).collect();
    crate::workflow::record_outcomes(tx, &steps)
}
