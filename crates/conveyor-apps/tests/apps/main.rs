//! The applications end to end on a real store with the real worker runtime, on SQLite and on
//! PostgreSQL (each test on a database of its own; without a PostgreSQL server the PostgreSQL
//! runs skip outside CI and fail under it).

mod conflicts;
mod notify;
mod notify_failover;
mod orders;
mod outbound;
mod receivers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_backends::postgres::testing::TestDatabase;
use conveyor_backends::postgres::{PgBackend, PgOptions};
use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_core::QueueBackend;

pub(crate) struct Store {
    pub(crate) backend: Arc<dyn QueueBackend>,
    _guard: Box<dyn std::any::Any + Send>,
}

async fn migrated(backend: Arc<dyn QueueBackend>, guard: Box<dyn std::any::Any + Send>) -> Store {
    conveyor_apps::migrate(backend.as_ref()).await.unwrap();
    Store { backend, _guard: guard }
}

pub(crate) async fn sqlite() -> Option<Store> {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(SqliteOptions::new(dir.path().join("apps.db").to_string_lossy().to_string())).unwrap();
    Some(migrated(Arc::new(backend), Box::new(dir)).await)
}

pub(crate) async fn postgres() -> Option<Store> {
    let db = TestDatabase::create()?;
    let backend = PgBackend::open(PgOptions::new(db.url.clone())).unwrap();
    Some(migrated(Arc::new(backend), Box::new(db)).await)
}

/// One `#[tokio::test]` per application test and store.
macro_rules! on_every_store {
    ($($module:ident :: $test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(s) = crate::sqlite().await {
                        crate::$module::$test(s).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(s) = crate::postgres().await {
                        crate::$module::$test(s).await;
                    }
                }
            )*
        }
    };
}

on_every_store!(
    orders::every_order_settles_and_stock_money_and_leaderboards_add_up,
    orders::bad_csv_lines_are_reported_by_line_and_good_orders_imported,
    orders::split_rejected_and_oversized_orders_never_store_a_part,
    orders::an_order_split_across_batches_keeps_its_first_lines,
    orders::rejected_lines_are_listed_up_to_the_cap_and_counted_beyond,
    orders::the_simulated_gateway_charges_and_refunds_once_per_key,
    notify::registration_sends_the_welcome_email_and_an_inbox_message,
    notify::slack_webhook_and_sms_reach_their_receivers_with_conditions_and_signature,
    notify::preferences_and_the_rate_limit_hold_back_notifications,
    notify::fifty_concurrent_duplicates_notify_once,
    notify::a_failing_provider_is_retried_then_failed_with_its_error,
    notify::rules_and_templates_are_validated_and_previewed,
    notify::digests_delays_and_quiet_hours_defer_without_dropping,
    notify_failover::sms_fails_over_and_a_dead_gateways_breaker_opens,
    notify_failover::with_every_provider_down_deliveries_wait_without_spending_attempts,
    outbound::callers_urls_never_reach_loopback_in_any_spelling,
    outbound::allowed_destinations_get_deliveries_but_no_redirects,
    notify::a_hostile_template_is_a_recorded_failure_not_a_hang,
    conflicts::taken_keys_fail_as_unique_violations,
);

pub(crate) async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
