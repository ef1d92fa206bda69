//! Job kinds built into the binary: small diagnostics a new user can enqueue to watch the
//! engine move (the applications register theirs as they land).

use std::time::Duration;

use serde::Deserialize;

use conveyor_core::{JobContext, JobResult, Registry};

#[derive(Deserialize)]
struct Sleep {
    /// How long the job takes.
    ms: u64,
}

pub(crate) fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("conveyor.noop", |_: serde_json::Value, _ctx: JobContext| async { JobResult::Ok(()) });
    r.register("conveyor.sleep", |p: Sleep, ctx: JobContext| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(p.ms)) => Ok(()),
            _ = ctx.cancel.cancelled() => Err(conveyor_core::JobError::release(Duration::ZERO)),
        }
    });
    r
}
