//! Opening the queue on Redis checks how that Redis is set up: one that may evict keys is
//! refused (queued jobs would vanish), one that persists nothing is warned about. Each test
//! starts a redis-server of its own with the setting under test.

#![cfg(all(feature = "redis", feature = "sqlite"))]

use std::sync::Arc;

use conveyor_backends::redis::testing::TestRedisServer;
use conveyor_backends::redis::{RedisBackend, RedisOptions};
use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_backends::tls::testing::required;
use conveyor_core::backend::Store;

/// The queue on a redis-server of its own started with `settings`; `None` when it cannot start
/// outside CI.
fn open(settings: &[&str]) -> Option<(Result<RedisBackend, String>, TestRedisServer, tempfile::TempDir)> {
    let dir = tempfile::TempDir::new().expect("a temp dir");
    let server = required("a redis-server of the test's own", TestRedisServer::start_with(dir.path().to_path_buf(), settings))?;
    let store =
        SqliteBackend::open(SqliteOptions::new(dir.path().join("store.db").to_str().expect("a UTF-8 temp path"))).expect("open SQLite");
    let backend = RedisBackend::open(RedisOptions::new(server.url()), Arc::new(store)).map_err(|e| e.to_string());
    Some((backend, server, dir))
}

#[test]
fn a_redis_that_may_evict_keys_is_refused() {
    let Some((opened, _server, _dir)) = open(&["--maxmemory-policy", "allkeys-lru", "--appendonly", "yes"]) else { return };
    let err = opened.err().expect("allkeys-lru is refused");
    assert!(err.contains("maxmemory-policy is allkeys-lru") && err.contains("set maxmemory-policy noeviction"), "{err}");
}

#[test]
fn the_policy_is_read_from_info_when_config_is_disabled() {
    let settings = ["--maxmemory-policy", "volatile-ttl", "--appendonly", "yes", "--rename-command", "CONFIG", ""];
    let Some((opened, _server, _dir)) = open(&settings) else { return };
    let err = opened.err().expect("volatile-ttl is refused without CONFIG too");
    assert!(err.contains("maxmemory-policy is volatile-ttl"), "{err}");
}

#[test]
fn a_redis_that_persists_nothing_is_warned_about() {
    let Some((opened, _server, _dir)) = open(&["--save", "", "--appendonly", "no"]) else { return };
    let backend = opened.expect("a Redis without persistence still opens");
    let warnings = backend.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("persists nothing") && warnings[0].contains("appendonly yes"), "{warnings:?}");
}

#[test]
fn a_redis_with_an_aof_or_save_points_warns_of_nothing() {
    for settings in [&["--appendonly", "yes", "--save", ""][..], &["--appendonly", "no", "--save", "3600 1"][..]] {
        let Some((opened, _server, _dir)) = open(settings) else { return };
        let backend = opened.expect("open");
        assert!(backend.warnings().is_empty(), "{settings:?}: {:?}", backend.warnings());
    }
}
