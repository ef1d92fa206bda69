//! Conveyor's applications, built only on the engine's public API: [`orders`] (import, the
//! order workflow with rollback, KPIs and leaderboards), [`notify`] (rules, templates, channels,
//! preferences, rate limits, delivery logs) and [`sync`] (incremental product ingestion from a
//! partner API, resilient price/stock pushes, run tracking, audit and replay).
//!
//! Applications are HTTP-free: the server crate maps its routes onto the functions here.

pub mod kinds;
pub mod notify;
pub mod orders;
pub mod outbound;
pub mod signing;
pub mod sync;

use std::sync::Arc;

use conveyor_core::backend::{QueueBackend, Result};
use conveyor_core::Registry;

/// What the applications need to be configured with.
#[derive(Clone, Debug, Default)]
pub struct AppsConfig {
    pub payment: orders::payment::SimulatorConfig,
    pub notify: notify::NotifyConfig,
    pub sync: sync::SyncConfig,
    /// `[[kinds]]` with a `url`.
    pub kinds: Vec<kinds::HttpKind>,
}

/// Runs every application's migrations.
pub async fn migrate(backend: &dyn QueueBackend) -> Result<()> {
    orders::migrate(backend).await?;
    notify::migrate(backend).await?;
    sync::migrate(backend).await?;
    Ok(())
}

/// Every application's built-in schedules.
pub fn schedules(config: &AppsConfig) -> Vec<conveyor_core::scheduler::Schedule> {
    let mut out = orders::schedules();
    out.extend(sync::schedules(&config.sync));
    out
}

/// Registers every application's job kinds and listeners.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: &AppsConfig) -> Result<(), String> {
    orders::register(registry, backend.clone(), config.payment.clone());
    sync::register(registry, backend.clone(), config.sync.clone());
    notify::register(registry, backend.clone(), config.notify.clone())?;
    kinds::register(registry, backend, &config.kinds)
}
