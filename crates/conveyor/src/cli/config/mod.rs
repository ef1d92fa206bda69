//! Typed configuration: defaults, then `conveyor.toml` (or `CONVEYOR_CONFIG`), then the
//! environment (`.env` honoured). Every variable `CONVEYOR_SECTION_KEY` is also `[section] key`
//! in the file (`CONVEYOR_QUEUE` is the top-level `queue`); the environment wins. Invalid values
//! stop start-up with a message naming the variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use conveyor_core::cron::CronSchedule;
use conveyor_core::scheduler::{Missed, Schedule};
use conveyor_core::worker::SupervisorConfig;
use conveyor_core::NewJob;

mod apps;
mod kinds;
mod source;

pub(crate) use kinds::KindDefaults;

pub(crate) use source::parse_duration;
use source::{scalar_text, Source};

/// A credential that never prints.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) database_url: String,
    pub(crate) queue: String,
    pub(crate) redis_url: Option<Secret>,
    pub(crate) redis_prefix: String,
    pub(crate) amqp_url: Option<Secret>,
    pub(crate) amqp_prefix: String,
    pub(crate) http_addr: SocketAddr,
    /// `/metrics` and `/health` of a `conveyor work` process (`CONVEYOR_METRICS_ADDR`).
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) api_token: Option<Secret>,
    /// `CONVEYOR_READ_TOKEN`, `CONVEYOR_PUBLISH_TOKEN`, `CONVEYOR_WORKER_TOKEN` (`[api] read_token`, …).
    pub(crate) read_token: Option<Secret>,
    pub(crate) publish_token: Option<Secret>,
    pub(crate) worker_token: Option<Secret>,
    /// `CONVEYOR_ALLOWED_HOSTS`: extra `Host` names the HTTP server answers to.
    pub(crate) allowed_hosts: Vec<String>,
    /// `CONVEYOR_FAKTORY_ADDR` (`[faktory] addr`); `None` when `off`.
    pub(crate) faktory_addr: Option<SocketAddr>,
    /// `CONVEYOR_FAKTORY_TLS_CERT` and `CONVEYOR_FAKTORY_TLS_KEY`: PEM files.
    pub(crate) faktory_tls: Option<(PathBuf, PathBuf)>,
    /// `CONVEYOR_HTTP_MAX_CONNECTIONS`: connections the HTTP server serves at once.
    pub(crate) http_max_connections: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) supervisors: Vec<SupervisorConfig>,
    pub(crate) schedules: Vec<Schedule>,
    pub(crate) retention_completed: usize,
    pub(crate) retention_metrics: Duration,
    pub(crate) log_format: String,
    pub(crate) apps: conveyor_apps::AppsConfig,
    /// `[[kinds]]` entries without `url`: another kind's defaults.
    pub(crate) kind_defaults: Vec<KindDefaults>,
    /// What the application embedding Conveyor adds ([`crate::App`]).
    pub(crate) app: crate::Parts,
}

impl Config {
    /// The configuration from `file` when given (an [`crate::App::config_file`]), else from
    /// `CONVEYOR_CONFIG` or `./conveyor.toml`; the environment wins over either.
    pub(crate) fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let _ = dotenvy::dotenv();
        if let Some(f) = file {
            let table = read_file(f).with_context(|| format!("the application's configuration file {}", f.display()))?;
            return Self::from_source(&Source { file: table });
        }
        let path = std::env::var("CONVEYOR_CONFIG").ok();
        let file = match &path {
            Some(p) => read_file(Path::new(p)).with_context(|| format!("CONVEYOR_CONFIG: cannot read {p}"))?,
            None if Path::new("conveyor.toml").exists() => read_file(Path::new("conveyor.toml"))?,
            None => toml::Table::new(),
        };
        Self::from_source(&Source { file })
    }

    fn from_source(src: &Source) -> anyhow::Result<Config> {
        let queue = src.string("", "queue", "database");
        if !matches!(queue.as_str(), "database" | "redis" | "amqp") {
            bail!("CONVEYOR_QUEUE: expected database, redis or amqp, got {queue:?}");
        }
        let redis_url = src.optional("redis", "url").map(Secret);
        let amqp_url = src.optional("amqp", "url").map(Secret);
        if queue == "redis" && redis_url.is_none() {
            bail!("CONVEYOR_QUEUE=redis needs CONVEYOR_REDIS_URL");
        }
        if queue == "amqp" && amqp_url.is_none() {
            bail!("CONVEYOR_QUEUE=amqp needs CONVEYOR_AMQP_URL");
        }
        let http_addr = src.parsed("http", "addr", SocketAddr::from(([127, 0, 0, 1], 8000)), "an address like 127.0.0.1:8000")?;
        let metrics_addr = match src.optional("metrics", "addr") {
            None => None,
            Some(_) => Some(src.parsed("metrics", "addr", SocketAddr::from(([127, 0, 0, 1], 9464)), "an address like 127.0.0.1:9464")?),
        };
        let shutdown_grace = src.duration("shutdown", "grace", Duration::from_secs(30))?;
        let api_token = src.optional("api", "token").map(Secret);
        let role_token = |key: &str| -> anyhow::Result<Option<Secret>> {
            let t = src.named(&format!("CONVEYOR_{}", key.to_uppercase()), "api", key).map(Secret);
            if t.is_some() && api_token.is_none() {
                bail!("{} needs CONVEYOR_API_TOKEN: the admin token must be set for the other roles' tokens", Source::env_name("", key));
            }
            Ok(t)
        };
        let (read_token, publish_token, worker_token) =
            (role_token("read_token")?, role_token("publish_token")?, role_token("worker_token")?);
        let faktory_addr = match src.string("faktory", "addr", "127.0.0.1:7419").trim() {
            "off" | "" => None,
            _ => Some(src.parsed("faktory", "addr", SocketAddr::from(([127, 0, 0, 1], 7419)), "an address like 127.0.0.1:7419, or off")?),
        };
        let faktory_tls = match (src.optional("faktory", "tls_cert"), src.optional("faktory", "tls_key")) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) => bail!("CONVEYOR_FAKTORY_TLS_CERT needs CONVEYOR_FAKTORY_TLS_KEY (the certificate's private key)"),
            (None, Some(_)) => bail!("CONVEYOR_FAKTORY_TLS_KEY needs CONVEYOR_FAKTORY_TLS_CERT"),
        };
        let (http_kinds, kind_defaults) = kinds::kinds(&src.file)?;
        let log_format = src.string("log", "format", "text");
        if !matches!(log_format.as_str(), "text" | "json") {
            bail!("CONVEYOR_LOG_FORMAT: expected text or json, got {log_format:?}");
        }
        Ok(Config {
            database_url: src.string("database", "url", "sqlite://conveyor.db"),
            queue,
            redis_url,
            redis_prefix: src.string("redis", "prefix", "conveyor"),
            amqp_url,
            amqp_prefix: src.string("amqp", "prefix", "conveyor"),
            http_addr,
            metrics_addr,
            api_token,
            read_token,
            publish_token,
            worker_token,
            faktory_addr,
            faktory_tls,
            http_max_connections: src.parsed("http", "max_connections", conveyor_server::MAX_CONNECTIONS, "a number of connections")?,
            allowed_hosts: src
                .optional("allowed", "hosts")
                .map(|v| v.split(',').map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect())
                .unwrap_or_default(),
            shutdown_grace,
            supervisors: supervisors(&src.file)?,
            schedules: Vec::new(),
            retention_completed: src.parsed("retention", "completed", 1_000usize, "a number of jobs")?,
            retention_metrics: src.duration("retention", "metrics", Duration::from_secs(24 * 3600))?,
            log_format,
            apps: conveyor_apps::AppsConfig { kinds: http_kinds, ..apps::apps(src)? },
            kind_defaults,
            app: crate::Parts::default(),
        }
        .with_schedules(schedules(&src.file)?))
    }

    /// Makes every configured credential known to the redaction helper, so that logs, stored
    /// errors and messages mask it wherever a library quotes it.
    pub(crate) fn register_secrets(&self) {
        use conveyor_core::redact::register;
        for t in [&self.api_token, &self.read_token, &self.publish_token, &self.worker_token, &self.redis_url, &self.amqp_url]
            .into_iter()
            .flatten()
        {
            register(t.0.clone());
        }
        register(self.database_url.clone());
        apps::register_secrets(&self.apps);
    }

    /// The HTTP server's access settings, for a server bound to `bound`.
    pub(crate) fn access(&self, bound: SocketAddr) -> conveyor_server::AccessConfig {
        let t = |s: &Option<Secret>| s.as_ref().map(|s| s.0.clone());
        conveyor_server::AccessConfig {
            admin_token: t(&self.api_token),
            read_token: t(&self.read_token),
            publish_token: t(&self.publish_token),
            worker_token: t(&self.worker_token),
            allowed_hosts: self.allowed_hosts.clone(),
            bound: Some(bound),
            session_ttl: None,
        }
    }

    /// The Faktory port's settings (its TLS files read and checked).
    pub(crate) fn faktory(&self) -> anyhow::Result<conveyor_server::faktory::FaktoryConfig> {
        let t = |s: &Option<Secret>| s.as_ref().map(|s| s.0.clone());
        let tls = match &self.faktory_tls {
            None => None,
            Some((cert, key)) => {
                let c = std::fs::read(cert).with_context(|| format!("CONVEYOR_FAKTORY_TLS_CERT: cannot read {}", cert.display()))?;
                let k = std::fs::read(key).with_context(|| format!("CONVEYOR_FAKTORY_TLS_KEY: cannot read {}", key.display()))?;
                Some(conveyor_server::faktory::tls_config(&c, &k).map_err(|e| anyhow::anyhow!("CONVEYOR_FAKTORY_TLS_CERT / _KEY: {e}"))?)
            }
        };
        Ok(conveyor_server::faktory::FaktoryConfig {
            admin_token: t(&self.api_token),
            publish_token: t(&self.publish_token),
            worker_token: t(&self.worker_token),
            hash_iterations: None,
            tls,
        })
    }

    /// The application's kinds and schedules (a configured schedule of the same name wins).
    pub(crate) fn with_app(mut self, app: crate::Parts) -> Config {
        for s in &app.schedules {
            if !self.schedules.iter().any(|c| c.name == s.name) {
                self.schedules.push(s.clone());
            }
        }
        self.app = app;
        self
    }

    fn with_schedules(mut self, configured: Vec<Schedule>) -> Config {
        self.schedules = with_builtin(configured, &self.apps);
        self
    }
}

fn read_file(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.parse::<toml::Table>().map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().lines().next().unwrap_or_default()))
}

/// `[[supervisors]]` tables: `name`, `queues`, `concurrency` (or `max_workers`), `prefetch`,
/// `lease`, `balance` (`off`, `simple`, `auto`), `min_workers`.
fn supervisors(file: &toml::Table) -> anyhow::Result<Vec<SupervisorConfig>> {
    let Some(list) = file.get("supervisors") else {
        // The order workflow and the notifications get supervisors of their own, so a backlog
        // elsewhere never starves them; deliveries wait on providers, not on the CPU.
        return Ok(vec![
            SupervisorConfig::new("default", vec!["default".into()], 8),
            #[cfg(feature = "orders")]
            SupervisorConfig::new("orders", vec![conveyor_apps::orders::QUEUE.into()], 64),
            #[cfg(feature = "notify")]
            SupervisorConfig::new("notify", conveyor_apps::notify::queues(), 64),
            #[cfg(feature = "sync")]
            crate::cli::sync::sync_supervisor(),
        ]);
    };
    let list = list.as_array().context("supervisors: expected [[supervisors]] tables")?;
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let t = item.as_table().with_context(|| format!("supervisors[{i}]: expected a table"))?;
        let name = t.get("name").and_then(|v| v.as_str()).map(str::to_string).unwrap_or_else(|| format!("supervisor-{}", i + 1));
        let queues: Vec<String> = match t.get("queues") {
            None => vec!["default".into()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|q| q.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                .with_context(|| format!("supervisors[{i}].queues: expected a list of queue names"))?,
        };
        for q in &queues {
            conveyor_core::job::validate_queue_name(q).map_err(|e| anyhow::anyhow!("supervisors[{i}].queues: {e}"))?;
        }
        let int = |key: &str, default: i64| -> anyhow::Result<i64> {
            match t.get(key) {
                None => Ok(default),
                Some(v) => {
                    v.as_integer().filter(|n| *n >= 1).with_context(|| format!("supervisors[{i}].{key}: expected a positive integer"))
                }
            }
        };
        let max = int("max_workers", 8)?;
        let mut s = SupervisorConfig::new(name, queues, int("concurrency", max)? as usize);
        s.prefetch = int("prefetch", s.concurrency as i64)? as usize;
        s.min_workers = int("min_workers", 1)? as usize;
        if let Some(b) = t.get("balance") {
            s.balance = scalar_text(b).parse().map_err(|e| anyhow::anyhow!("supervisors[{i}].balance: {e}"))?;
        }
        if s.balance != conveyor_core::balance::Balance::Off && s.concurrency < s.queues.len() * s.min_workers.max(1) {
            bail!(
                "supervisors[{i}]: balancing {} queues with min_workers {} needs concurrency (max_workers) of at least {}",
                s.queues.len(),
                s.min_workers.max(1),
                s.queues.len() * s.min_workers.max(1)
            );
        }
        if let Some(v) = t.get("lease") {
            let text = scalar_text(v);
            s.lease = parse_duration(&text).with_context(|| format!("supervisors[{i}].lease: expected a duration like 30s"))?;
        }
        out.push(s);
    }
    Ok(out)
}

/// The applications' schedules, unless the file names one the same (then the file's wins).
fn with_builtin(mut configured: Vec<Schedule>, apps: &conveyor_apps::AppsConfig) -> Vec<Schedule> {
    for s in conveyor_apps::schedules(apps) {
        if !configured.iter().any(|c| c.name == s.name) {
            configured.push(s);
        }
    }
    configured
}

/// `[[schedule]]` tables: `name`, `cron`, `timezone` (default UTC), `job` (a job kind),
/// `payload` (a table), `queue`, `missed` (`skip` or `run_once`).
fn schedules(file: &toml::Table) -> anyhow::Result<Vec<Schedule>> {
    let Some(list) = file.get("schedule") else { return Ok(Vec::new()) };
    let list = list.as_array().context("schedule: expected [[schedule]] tables")?;
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let t = item.as_table().with_context(|| format!("schedule[{i}]: expected a table"))?;
        let text = |key: &str| t.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let name = text("name").with_context(|| format!("schedule[{i}].name: required"))?;
        let cron = text("cron").with_context(|| format!("schedule[{i}].cron: required (e.g. \"0 */5 * * * *\")"))?;
        let tz = text("timezone").unwrap_or_else(|| "UTC".into());
        let cron = CronSchedule::parse(&cron, &tz).map_err(|e| anyhow::anyhow!("schedule[{i}].cron: {e}"))?;
        let kind = text("job").with_context(|| format!("schedule[{i}].job: required (a job kind)"))?;
        let payload = match t.get("payload") {
            None => serde_json::json!({}),
            Some(v) => serde_json::to_value(v).with_context(|| format!("schedule[{i}].payload: not representable as JSON"))?,
        };
        let mut job = NewJob::new(kind, &payload);
        if let Some(q) = text("queue") {
            conveyor_core::job::validate_queue_name(&q).map_err(|e| anyhow::anyhow!("schedule[{i}].queue: {e}"))?;
            job = job.queue(q);
        }
        let missed = match text("missed").as_deref() {
            None | Some("skip") => Missed::Skip,
            Some("run_once") => Missed::RunOnce,
            Some(other) => bail!("schedule[{i}].missed: expected skip or run_once, got {other:?}"),
        };
        out.push(Schedule::new(name, cron, job).missed(missed));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(text: &str) -> Source {
        Source { file: text.parse().unwrap() }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn file_values_and_errors_name_their_key() {
        let c = Config::from_source(&src("[database]\nurl = \"sqlite:///tmp/x.db\"\n[[supervisors]]\nname = \"orders\"\nqueues = [\"orders\"]\nconcurrency = 4\nlease = \"5s\"\n")).unwrap();
        assert_eq!(c.database_url, "sqlite:///tmp/x.db");
        assert_eq!(c.supervisors[0].concurrency, 4);
        assert_eq!(c.supervisors[0].lease, Duration::from_secs(5));
        let e = Config::from_source(&src("queue = \"redis\"\n")).unwrap_err().to_string();
        assert!(e.contains("CONVEYOR_REDIS_URL"), "{e}");
        let e = Config::from_source(&src("[http]\naddr = \"nope\"\n")).unwrap_err().to_string();
        assert!(e.contains("[http] addr"), "{e}");
        let e = Config::from_source(&src("[[supervisors]]\nconcurrency = 0\n")).unwrap_err().to_string();
        assert!(e.contains("supervisors[0].concurrency"), "{e}");
    }

    #[test]
    fn role_tokens_need_the_admin_token() {
        let c = Config::from_source(&src(
            "[api]\ntoken = \"admin-secret\"\nread_token = \"read-secret\"\n[allowed]\nhosts = \"a.example, b.example\"\n",
        ))
        .unwrap();
        assert_eq!(c.read_token.as_ref().map(|s| s.0.as_str()), Some("read-secret"));
        assert_eq!(c.allowed_hosts, vec!["a.example", "b.example"]);
        let e = Config::from_source(&src("[api]\npublish_token = \"p-secret\"\n")).unwrap_err().to_string();
        assert!(e.contains("CONVEYOR_PUBLISH_TOKEN needs CONVEYOR_API_TOKEN"), "{e}");
    }

    #[test]
    fn schedules_parse_and_errors_name_the_entry() {
        let c = Config::from_source(&src(
            "[[schedule]]\nname = \"tick\"\ncron = \"*/5 * * * * *\"\njob = \"conveyor.noop\"\npayload = { a = 1 }\nmissed = \"run_once\"\n",
        ))
        .unwrap();
        assert_eq!(c.schedules[0].name, "tick");
        assert_eq!(c.schedules[0].missed, Missed::RunOnce);
        assert_eq!(c.schedules[0].job.payload, "{\"a\":1}");
        let e = Config::from_source(&src("[[schedule]]\nname = \"x\"\ncron = \"61 * * * *\"\njob = \"k\"\n")).unwrap_err().to_string();
        assert!(e.contains("schedule[0].cron") && e.contains("minute"), "{e}");
        let e = Config::from_source(&src("[[schedule]]\nname = \"x\"\ncron = \"* * * * *\"\n")).unwrap_err().to_string();
        assert!(e.contains("schedule[0].job"), "{e}");
    }

    #[test]
    fn the_outbound_allow_list_is_read_from_the_file_and_checked() {
        let c = Config::from_source(&src("[outbound]\nallow = \"127.0.0.1/32, receiver.internal\"\n")).unwrap();
        assert_eq!(c.apps.outbound, conveyor_apps::outbound::Policy::parse("receiver.internal,127.0.0.1/32").unwrap());
        #[cfg(feature = "notify")]
        assert_eq!(c.apps.notify.outbound, c.apps.outbound);
        let e = Config::from_source(&src("[outbound]\nallow = \"10.0.0.0/99\"\n")).unwrap_err().to_string();
        assert!(e.contains("[outbound] allow"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(***)");
    }
}
