//! The backend conformance suite: every backend must pass these, unchanged.
//!
//! Each test is a plain `async fn(Backend)` that uses only the public [`QueueBackend`] trait and
//! the engine's public API, so the same functions run against SQLite, PostgreSQL, Redis and
//! RabbitMQ. A backend instantiates the suite with [`conformance_suite!`]:
//!
//! ```ignore
//! conformance_suite!(sqlite, async {
//!     let dir = tempfile::tempdir().unwrap();
//!     let backend = SqliteBackend::open(SqliteOptions::new(dir.path().join("q.db").to_str().unwrap())).unwrap();
//!     Some((Arc::new(backend) as Arc<dyn QueueBackend>, dir))
//! });
//! ```
//!
//! The factory is an `async` block evaluated once per test; it yields the backend and a guard
//! (a temp dir, a database to drop, …) kept alive until the test ends, or `None` when the
//! backend's server is unavailable outside CI (the test then skips, having said why).
//!
//! Tests never rely on being alone in the store: each uses its own queue names, unique keys,
//! table names and worker ids, so backends that share a server across tests work too.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use conveyor_core::backend::{
    BackendError, JobFilter, MetricsQuery, Page, QueueBackend, QueueBackendExt, QueueStats, ReserveRequest, SqlValue, SupervisorInfo, Tx,
    WorkerInfo,
};
pub use conveyor_core::clock::now_ms;
pub use conveyor_core::job::{Backoff, Completion, EnqueueOutcome, Job, JobId, JobState, NewJob, Outcome};
pub use serde_json::{json, Value};

mod admin;
mod batches;
mod cache;
mod events;
mod fair;
mod flow;
mod leases;
mod lifecycle;
mod limits;
mod middleware;
mod runtime;
mod runtime_shutdown;
mod setwise;
mod support;
mod transactions;
mod workflows;

pub use admin::*;
pub use batches::*;
pub use cache::*;
pub use events::*;
pub use fair::*;
pub use flow::*;
pub use leases::*;
pub use lifecycle::*;
pub use limits::*;
pub use middleware::*;
pub use runtime::*;
pub use runtime_shutdown::*;
pub use setwise::*;
pub use transactions::*;
pub use workflows::*;

/// What every conformance test receives.
pub type Backend = Arc<dyn QueueBackend>;

/// The longest any single conformance test may take before it is reported as hung.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Generates one `#[tokio::test]` per conformance test inside `mod $backend`, each calling
/// `$factory` (an `async` block yielding `Some((Arc<dyn QueueBackend>, guard))`, or `None` to skip) for a fresh backend.
macro_rules! conformance_suite {
    ($backend:ident, $factory:expr $(,)?) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            conformance_suite!(@tests $factory;
                // lifecycle
                enqueue_reserve_complete,
                enqueue_many_returns_outcomes_in_order,
                enqueue_and_reserve_hands_on_what_it_enqueued,
                higher_priority_first_then_fifo,
                queues_are_served_in_strict_order,
                delayed_jobs_wait_until_due,
                delayed_jobs_run_now_are_deleted_or_failed_by_id,
                retry_keeps_attempts_and_failed_moves_to_failed_store,
                release_does_not_consume_an_attempt,
                stale_lease_tokens_change_nothing,
                enqueue_and_resume_wake_idle_workers,
                jobs_listing_filters_by_state,
                jobs_cursor_pages_list_every_job_once,
                // leases
                expired_lease_returns_job_to_queue,
                expired_lease_without_attempts_left_fails_job,
                extended_lease_is_not_reaped,
                a_dead_holders_leases_end_at_once,
                // administration
                unique_key_refuses_duplicates_until_job_ends,
                unique_key_ttl_expires,
                unique_key_freed_by_its_holder_only,
                unique_key_holds_under_concurrent_enqueues,
                failed_store_retry_forget_flush,
                failed_cursor_pages_list_every_job_once,
                pause_resume_and_clear,
                metrics_count_every_processed_attempt,
                metrics_since_counts_the_minute_that_holds_it,
                worker_registry_heartbeat_and_gone,
                // transactions
                transactional_enqueue_commits_or_rolls_back_with_the_sql,
                transactional_completion_is_atomic,
                panicking_transaction_closure_leaves_backend_usable,
                insert_many_inserts_every_row_in_chunks_and_returns_them,
                deferred_statements_run_in_order_and_their_failure_fails_the_transaction,
                unique_violations_are_a_kind_with_the_driver_error_as_source,
                // worker runtime
                runtime_runs_every_job_exactly_once,
                runtime_retries_panics_timeouts_and_errors_then_fails,
                runtime_release_keeps_attempts_and_abort_fails_at_once,
                runtime_graceful_shutdown_finishes_running_jobs,
                runtime_shutdown_grace_over_releases_running_jobs,
                runtime_complete_with_commits_once,
                // set-wise completion
                set_wise_completion_acts_for_held_jobs_only,
                set_wise_steps_run_workflows_exactly_once,
                runtime_registers_itself_and_reaps_abandoned_jobs,
                runtime_heartbeat_keeps_long_jobs_leased,
                runtime_retry_after_waits_before_the_next_attempt,
                // batches
                batch_of_ten_thousand_counts_exactly_and_calls_back_once,
                batch_failure_cancels_it_and_skips_the_rest,
                batch_cancelled_by_a_failure_runs_no_job_started_after_it,
                batch_allowing_failures_runs_every_job_and_counts_failures,
                batch_cancelled_before_it_runs_skips_its_jobs,
                batch_add_jobs_grows_an_open_batch_only,
                batch_job_extends_its_own_batch_in_its_acknowledgement,
                batch_list_pages_newest_first,
                // workflows
                workflow_failure_compensates_completed_steps_in_reverse,
                workflow_runs_steps_in_order_and_completes,
                workflow_compensation_survives_a_dead_worker,
                workflow_definition_is_shared_and_input_reaches_every_job,
                a_declined_step_fails_its_workflow_without_a_fault,
                // events
                event_listeners_get_each_emit_once_inline_after_commit,
                event_emitted_in_a_rolled_back_transaction_is_neither_logged_nor_delivered,
                event_guarded_wildcard_listener_gets_only_what_its_guard_accepts,
                // cache and sorted sets
                cache_put_get_expire_forget_and_remember,
                cache_forget_prefix_forgets_keys_with_any_suffix,
                sorted_set_scores_ranks_and_ties,
                sorted_set_rebuild_is_atomic_and_incr_in_follows_the_transaction,
                // rate limits and breakers
                rate_limiter_admits_exactly_the_limit_under_concurrency,
                rate_limit_middleware_releases_jobs_over_the_limit,
                rate_limiter_clock_readings_out_of_order_keep_the_burst,
                // flow control
                concurrency_keys_limit_running_jobs_across_workers,
                a_key_at_its_limit_holds_up_no_other_job,
                a_crashed_workers_slot_comes_back_with_its_lease,
                a_kept_slot_serves_its_workers_next_job_and_goes_back_when_another_waits,
                fairness_keys_take_turns_within_a_queue_and_priority,
                fairness_holds_for_keys_enqueued_concurrently,
                a_duplicate_takes_no_turn,
                only_the_last_job_of_a_debounced_burst_runs,
                breaker_opens_probes_and_closes,
                breaker_with_a_lost_probe_lets_another_probe_through,
                breaker_middleware_releases_jobs_while_open,
                // locks and middleware
                locks_have_one_owner_extend_and_expire,
                without_overlapping_runs_one_job_per_key_at_a_time,
                retry_on_retries_only_matching_errors,
                timeout_middleware_applies_to_jobs_without_their_own,
                jobs_released_after_the_breaker_are_not_breaker_calls,
            );
        }
    };
    (@tests $factory:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let Some((backend, _guard)) = $factory.await else { return };
                let backend: ::std::sync::Arc<dyn ::conveyor_core::backend::QueueBackend> = backend;
                ::tokio::time::timeout($crate::conformance::TEST_TIMEOUT, $crate::conformance::$test(backend))
                    .await
                    .expect(concat!(stringify!($test), " did not finish in time"));
            }
        )*
    };
}

// --- helpers ----------------------------------------------------------------------------------

/// A name no other test (or earlier run against a shared server) uses.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A fresh queue name.
pub fn queue_name() -> String {
    unique_name("conf")
}

/// A fresh SQL table name (an identifier on every database).
pub fn table_name() -> String {
    format!("conformance_{}", uuid::Uuid::now_v7().simple())
}

/// Polls `cond` until it holds, failing the test if it does not within `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A job of `kind` on `queue` with a small JSON payload.
pub fn new_job(queue: &str, kind: &str, n: u64) -> NewJob {
    NewJob::new(kind, &json!({ "n": n })).queue(queue)
}

pub async fn enqueue_one(b: &Backend, job: NewJob) -> JobId {
    let id = job.id;
    let out = b.enqueue(vec![job]).await.expect("enqueue");
    assert_eq!(out, vec![EnqueueOutcome::Enqueued { id }], "enqueue of a fresh job");
    id
}

pub fn request(queues: &[&str], max: usize, lease: Duration) -> ReserveRequest {
    ReserveRequest { queues: queues.iter().map(|q| q.to_string()).collect(), max, lease, worker: "conformance-worker".into() }
}

/// Reserves up to `max` jobs from one queue under a 30 s lease.
pub async fn reserve(b: &Backend, queue: &str, max: usize) -> Vec<Job> {
    b.reserve(request(&[queue], max, Duration::from_secs(30))).await.expect("reserve")
}

/// Reserves exactly one job from `queue`.
pub async fn reserve_one(b: &Backend, queue: &str) -> Job {
    let mut jobs = reserve(b, queue, 1).await;
    assert_eq!(jobs.len(), 1, "expected one job to be reservable from {queue}");
    jobs.remove(0)
}

/// Polls `reserve` until it returns something, failing after `within`.
pub async fn reserve_within(b: &Backend, req: ReserveRequest, within: Duration) -> Vec<Job> {
    let deadline = Instant::now() + within;
    loop {
        let jobs = b.reserve(req.clone()).await.expect("reserve");
        if !jobs.is_empty() {
            return jobs;
        }
        if Instant::now() >= deadline {
            panic!("nothing became reservable from {:?} within {within:?}", req.queues);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn completion(job: &Job, outcome: Outcome) -> Completion {
    Completion { runtime_ms: 1, ..Completion::of(job, outcome) }
}

pub async fn complete(b: &Backend, job: &Job, outcome: Outcome) {
    b.complete(vec![completion(job, outcome)]).await.expect("complete");
}

pub fn retry_now(error: &str) -> Outcome {
    Outcome::Retry { at: now_ms(), error: error.into() }
}

pub async fn state_of(b: &Backend, id: JobId) -> Option<JobState> {
    b.job(id).await.expect("job").map(|j| j.state)
}

/// A queue's numbers; a queue the backend does not list counts as all zeros.
pub async fn stats(b: &Backend, queue: &str) -> QueueStats {
    b.queues().await.expect("queues").into_iter().find(|s| s.queue == queue).unwrap_or(QueueStats {
        queue: queue.to_string(),
        pending: 0,
        delayed: 0,
        reserved: 0,
        failed: 0,
        paused: false,
        per_minute: 0,
        oldest_wait_s: 0.0,
    })
}

/// Asserts `[pending, delayed, reserved, failed]` of `queue`.
#[track_caller]
pub fn assert_counts_eq(s: &QueueStats, expected: [u64; 4], context: &str) {
    assert_eq!([s.pending, s.delayed, s.reserved, s.failed], expected, "[pending, delayed, reserved, failed] of {}: {context}", s.queue);
}

pub async fn assert_counts(b: &Backend, queue: &str, expected: [u64; 4], context: &str) {
    let s = stats(b, queue).await;
    assert_eq!([s.pending, s.delayed, s.reserved, s.failed], expected, "[pending, delayed, reserved, failed] of {queue}: {context}");
}

pub fn payload_of(job: &Job) -> Value {
    serde_json::from_str(&job.payload).expect("payload is the JSON that was enqueued")
}

/// Creates `table (note TEXT NOT NULL)` in its own transaction.
pub async fn create_notes_table(b: &Backend, table: &str) {
    let sql = format!("CREATE TABLE IF NOT EXISTS {table} (note TEXT NOT NULL)");
    b.transact(move |tx| tx.execute(&sql, &[])).await.expect("create table");
}

/// Rows of `table` whose note is `note`.
pub async fn count_notes(b: &Backend, table: &str, note: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE note = $1");
    let note = note.to_string();
    let rows = b.transact(move |tx| tx.query(&sql, &[SqlValue::from(note)])).await.expect("count rows");
    rows[0][0].as_i64().expect("count(*) is an integer")
}

pub async fn count_all_notes(b: &Backend, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    let rows = b.transact(move |tx| tx.query(&sql, &[])).await.expect("count rows");
    rows[0][0].as_i64().expect("count(*) is an integer")
}

pub fn insert_note_sql(table: &str) -> String {
    format!("INSERT INTO {table} (note) VALUES ($1)")
}
