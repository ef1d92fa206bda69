//! Conveyor's applications, built only on the engine's public API: [`orders`] (import, the
//! order workflow with rollback, KPIs and leaderboards), [`notify`] (rules, templates, channels,
//! preferences, rate limits, delivery logs) and [`sync`] (incremental product ingestion from a
//! partner API, resilient price/stock pushes, run tracking, audit and replay).
//!
//! Applications are HTTP-free: the server crate maps its routes onto the functions here.
//!
//! Each application is a cargo feature (`orders`, `notify`, `sync`; all on by default). What
//! every build has: [`kinds`] (HTTP kinds), [`signing`], [`outbound`], [`money`], [`email`], and
//! [`otlp`] (trace export).

pub mod email;
pub mod kinds;
pub mod money;
#[cfg(feature = "notify")]
pub mod notify;
#[cfg(feature = "orders")]
pub mod orders;
pub mod otlp;
pub mod outbound;
pub mod signing;
#[cfg(feature = "sync")]
pub mod sync;

use std::sync::Arc;

use conveyor_core::backend::{QueueBackend, Result};
use conveyor_core::Registry;

/// What the applications need to be configured with.
#[derive(Clone, Debug, Default)]
pub struct AppsConfig {
    #[cfg(feature = "orders")]
    pub payment: orders::payment::SimulatorConfig,
    #[cfg(feature = "notify")]
    pub notify: notify::NotifyConfig,
    #[cfg(feature = "sync")]
    pub sync: sync::SyncConfig,
    /// Where callers' URLs may lead although private (`CONVEYOR_OUTBOUND_ALLOW`).
    pub outbound: outbound::Policy,
    /// `[[kinds]]` with a `url`.
    pub kinds: Vec<kinds::HttpKind>,
}

/// Runs every application's migrations.
pub async fn migrate(backend: &dyn QueueBackend) -> Result<()> {
    #[cfg(feature = "orders")]
    orders::migrate(backend).await?;
    #[cfg(feature = "notify")]
    notify::migrate(backend).await?;
    #[cfg(feature = "sync")]
    sync::migrate(backend).await?;
    signing::migrate(backend).await?;
    Ok(())
}

/// Every application's built-in schedules.
pub fn schedules(config: &AppsConfig) -> Vec<conveyor_core::scheduler::Schedule> {
    let _ = config;
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(feature = "orders")]
    out.extend(orders::schedules());
    #[cfg(feature = "sync")]
    out.extend(sync::schedules(&config.sync));
    out
}

/// Registers every application's job kinds and listeners.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: &AppsConfig) -> Result<(), String> {
    #[cfg(feature = "orders")]
    orders::register(registry, backend.clone(), config.payment.clone());
    #[cfg(feature = "sync")]
    sync::register(registry, backend.clone(), config.sync.clone());
    #[cfg(feature = "notify")]
    notify::register(registry, backend.clone(), config.notify.clone())?;
    kinds::register(registry, backend, &config.kinds)
}
