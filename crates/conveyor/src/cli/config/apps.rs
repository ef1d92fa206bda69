//! The built-in applications' settings: each read only when the build has the application
//! (cargo features `orders`, `notify`, `sync`).

#[cfg(any(feature = "orders", feature = "notify", feature = "sync"))]
use std::time::Duration;

#[cfg(any(feature = "orders", feature = "notify", feature = "sync"))]
use anyhow::bail;

use super::source::Source;

/// The applications' settings (those this build has), and `[outbound] allow`.
pub(super) fn apps(src: &Source) -> anyhow::Result<conveyor_apps::AppsConfig> {
    let outbound = match src.get("outbound", "allow") {
        None => conveyor_apps::outbound::Policy::default(),
        Some((v, name)) => conveyor_apps::outbound::Policy::parse(&v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?,
    };
    Ok(conveyor_apps::AppsConfig {
        #[cfg(feature = "orders")]
        payment: payment(src)?,
        #[cfg(feature = "notify")]
        notify: notify(src, &outbound)?,
        #[cfg(feature = "sync")]
        sync: sync(src)?,
        outbound,
        kinds: Vec::new(),
    })
}

/// Makes the applications' credentials known to the redaction helper.
pub(super) fn register_secrets(apps: &conveyor_apps::AppsConfig) {
    use conveyor_core::redact::register;
    #[cfg(feature = "notify")]
    {
        let n = &apps.notify;
        if let conveyor_apps::notify::channels::Mailer::Smtp(urls) = &n.mailer {
            urls.iter().for_each(|u| register(u.clone()));
        }
        for s in n.sms_urls.iter().chain(&n.sms_token).chain(&n.webhook_secret) {
            register(s.clone());
        }
        if let Some(slack) = &n.slack_webhook {
            conveyor_core::redact::register_whole(slack.clone());
        }
    }
    for s in apps.kinds.iter().flat_map(|k| &k.secrets) {
        register(s.clone());
    }
    #[cfg(feature = "sync")]
    {
        let sync = &apps.sync;
        for s in sync.source.iter().flat_map(|s| s.token.iter().chain([&s.url])) {
            register(s.clone());
        }
        for s in sync.target.iter().flat_map(|t| t.key.iter().chain([&t.url])) {
            register(s.clone());
        }
    }
}

/// `[payment] success_rate, seed, latency_ms`: the payment simulator of the order workflow.
#[cfg(feature = "orders")]
fn payment(src: &Source) -> anyhow::Result<conveyor_apps::orders::payment::SimulatorConfig> {
    let rate: f64 = src.parsed("payment", "success_rate", 0.9, "a number from 0 to 1")?;
    if !(0.0..=1.0).contains(&rate) {
        bail!("CONVEYOR_PAYMENT_SUCCESS_RATE: expected a number from 0 to 1, got {rate}");
    }
    let seed: u64 = match src.get("payment", "seed") {
        None => rand_seed(),
        Some((v, name)) => v.trim().parse().map_err(|_| anyhow::anyhow!("{name}: expected a whole number, got {v:?}"))?,
    };
    let latency: u64 = src.parsed("payment", "latency_ms", 0, "a number of milliseconds")?;
    Ok(conveyor_apps::orders::payment::SimulatorConfig { success_rate: rate, seed, latency: Duration::from_millis(latency) })
}

/// `[sync]`: the partners (`source_url`, `source_token`, `target_url`, `target_key`), the
/// limit and interval, and what a real partner needs changed: `source_path`, `page_size`,
/// `source_fields` (`name=path,…`), `target_key_header`, `target_variant_path`,
/// `target_price_path`, `target_stock_path`, `timeout`, `max_attempts`, `breaker_window`,
/// `breaker_open_for`.
#[cfg(feature = "sync")]
fn sync(src: &Source) -> anyhow::Result<conveyor_apps::sync::SyncConfig> {
    use conveyor_apps::sync::connector::{SourceConfig, TargetConfig};
    let mut c = conveyor_apps::sync::SyncConfig::default();
    let url = |key: &str| -> anyhow::Result<Option<String>> {
        match src.get("sync", key) {
            None => Ok(None),
            Some((v, name)) => {
                let u = reqwest_like_url(&v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                Ok(Some(u))
            }
        }
    };
    let timeout = src.duration("sync", "timeout", Duration::from_secs(10))?;
    if let Some(u) = url("source_url")? {
        let mut s = SourceConfig::new(u, src.optional("sync", "source_token"));
        s.products_path = src.string("sync", "source_path", &s.products_path);
        s.page_size = src.parsed("sync", "page_size", s.page_size, "a whole number from 1 to 1000")?;
        if !(1..=1000).contains(&s.page_size) {
            bail!("CONVEYOR_SYNC_PAGE_SIZE: expected a whole number from 1 to 1000, got {}", s.page_size);
        }
        if let Some((v, name)) = src.get("sync", "source_fields") {
            s.fields.parse_overrides(&v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        }
        s.timeout = timeout;
        c.source = Some(s);
    }
    if let Some(u) = url("target_url")? {
        let mut t = TargetConfig::new(u, src.optional("sync", "target_key"));
        t.key_header = src.string("sync", "target_key_header", &t.key_header);
        t.variant_path = src.string("sync", "target_variant_path", &t.variant_path);
        t.price_path = src.string("sync", "target_price_path", &t.price_path);
        t.stock_path = src.string("sync", "target_stock_path", &t.stock_path);
        t.timeout = timeout;
        c.target = Some(t);
    }
    c.target_rps = src.parsed("sync", "target_rps", c.target_rps, "a whole number of requests per second from 1")?;
    if c.target_rps == 0 {
        bail!("CONVEYOR_SYNC_TARGET_RPS: expected a whole number of requests per second from 1, got 0");
    }
    c.interval = src.duration("sync", "interval", c.interval)?;
    c.max_attempts = src.parsed("sync", "max_attempts", c.max_attempts, "a whole number of tries from 1")?.max(1);
    c.breaker.window = src.duration("sync", "breaker_window", c.breaker.window)?;
    c.breaker.open_for = src.duration("sync", "breaker_open_for", c.breaker.open_for)?;
    Ok(c)
}

/// An `http(s)://` URL, or why not.
#[cfg(feature = "sync")]
fn reqwest_like_url(text: &str) -> Result<String, String> {
    let t = text.trim().trim_end_matches('/');
    let rest = t.strip_prefix("http://").or_else(|| t.strip_prefix("https://")).ok_or("expected an http:// or https:// URL")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("the URL has no host".into());
    }
    Ok(t.to_string())
}

/// `CONVEYOR_MAILER`, `CONVEYOR_SMTP_URL`, `CONVEYOR_MAIL_FROM`, `CONVEYOR_SMS_*`,
/// `CONVEYOR_SLACK_WEBHOOK`, `CONVEYOR_WEBHOOK_SECRET`, `CONVEYOR_NOTIFY_*`, and
/// `CONVEYOR_OUTBOUND_ALLOW` (`[outbound] allow`: where callers' URLs may lead although private).
#[cfg(feature = "notify")]
fn notify(src: &Source, outbound: &conveyor_apps::outbound::Policy) -> anyhow::Result<conveyor_apps::notify::NotifyConfig> {
    use conveyor_apps::notify::channels::Mailer;
    let mut c = conveyor_apps::notify::NotifyConfig::default();
    c.mailer = match src.string("", "mailer", "log").as_str() {
        "log" => Mailer::Log,
        "smtp" => Mailer::Smtp(
            src.optional("smtp", "url")
                .ok_or_else(|| anyhow::anyhow!("CONVEYOR_MAILER=smtp needs CONVEYOR_SMTP_URL"))?
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
        ),
        other => bail!("CONVEYOR_MAILER: expected log or smtp, got {other:?}"),
    };
    c.mail_from = src.string("mail", "from", &c.mail_from);
    conveyor_apps::notify::channels::Email::providers(&c.mailer, &c.mail_from).map_err(|e| anyhow::anyhow!(e))?;
    // Several gateways, comma-separated, are tried in order (each behind its own breaker).
    c.sms_urls = src
        .optional("sms", "url")
        .map(|u| u.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect())
        .unwrap_or_default();
    c.sms_token = src.optional("sms", "token");
    c.sms_from = src.string("sms", "from", &c.sms_from);
    c.slack_webhook = src.optional("slack", "webhook");
    c.webhook_secret = src.optional("webhook", "secret");
    c.outbound = outbound.clone();
    c.max_attempts = src.parsed("notify", "max_attempts", 3u32, "a whole number of tries from 1")?;
    if c.max_attempts == 0 {
        bail!("CONVEYOR_NOTIFY_MAX_ATTEMPTS: expected a whole number of tries from 1, got 0");
    }
    if let Some((v, name)) = src.get("notify", "backoff") {
        c.backoff = v
            .split(',')
            .map(|s| s.trim().parse::<u64>().map(Duration::from_secs))
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("{name}: expected seconds separated by commas like 60,300,900, got {v:?}"))?;
    }
    if let Some((v, name)) = src.get("notify", "rate_limit") {
        c.rate_limit = conveyor_core::ratelimit::RateLimit::parse(&v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    Ok(c)
}

#[cfg(feature = "orders")]
fn rand_seed() -> u64 {
    conveyor_apps::orders::payment::SimulatorConfig::default().seed
}
