//! One Faktory connection: the greeting and `HELLO` (Faktory's password scheme, a token as the
//! password), then one RESP reply per command line. A bad command gets `-ERR` with a reason and
//! the connection carries on; only the client's `END`, its going away, or a line that cannot
//! be read in step (too long, not UTF-8) ends it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use conveyor_core::cache::Cache;
use conveyor_core::job::EnqueueOutcome;
use conveyor_core::{BackendError, NewJob};

use super::hub::{Hub, Signal};
use super::wire::{read_line, LineError, Reply, MAX_HELLO_LINE, MAX_LINE};
use super::{admin, batch, job, mutate, track, FaktoryConfig};
use crate::access::{constant_time_eq, Role};

/// Kind prefixes of the built-in applications and the engine: the admin's alone.
const RESERVED: [&str; 4] = ["orders.", "notify.", "sync.", "conveyor."];

/// What every connection of a server checks against.
pub(crate) struct Settings {
    tokens: Vec<(Role, String)>,
    iterations: u32,
}

impl Settings {
    pub(crate) fn new(config: &FaktoryConfig) -> Self {
        Settings { tokens: config.tokens(), iterations: config.hash_iterations.unwrap_or(1024).max(1) }
    }
}

/// Faktory's password hash: SHA-256 over the password and the salt, then over the digest,
/// `iterations` times in all, in lower-case hex.
pub(crate) fn password_hash(password: &str, salt: &str, iterations: u32) -> String {
    let mut digest = Sha256::new().chain_update(password.as_bytes()).chain_update(salt.as_bytes()).finalize();
    for _ in 1..iterations.max(1) {
        digest = Sha256::digest(digest);
    }
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) struct Connection {
    hub: Arc<Hub>,
    settings: Arc<Settings>,
    salt: String,
    /// Set by a successful `HELLO`.
    role: Option<Role>,
    wid: Option<String>,
}

/// What a command line asks for after its reply.
enum Then {
    Continue,
    Close,
}

impl Connection {
    pub(crate) fn new(hub: Arc<Hub>, settings: Arc<Settings>) -> Self {
        let salt: String = (0..8).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        Connection { hub, settings, salt, role: None, wid: None }
    }

    pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut self, stream: S, shutdown: CancellationToken) -> std::io::Result<()> {
        let (r, w) = tokio::io::split(stream);
        let (mut r, mut w) = (BufReader::with_capacity(64 * 1024, r), BufWriter::with_capacity(64 * 1024, w));
        self.hub.stats.connections.fetch_add(1, Ordering::Relaxed);
        let result = self.session(&mut r, &mut w, shutdown).await;
        self.hub.stats.connections.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn session<R, W>(&mut self, r: &mut BufReader<R>, w: &mut BufWriter<W>, shutdown: CancellationToken) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Compact JSON: one client splits the greeting at its first space.
        let hi = if self.settings.tokens.is_empty() {
            json!({ "v": 2 })
        } else {
            json!({ "v": 2, "i": self.settings.iterations, "s": self.salt })
        };
        Reply::Simple(format!("HI {hi}")).write(w).await?;
        w.flush().await?;
        let mut buf = Vec::new();
        loop {
            let line = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                l = read_line(r, &mut buf, if self.role.is_some() { MAX_LINE } else { MAX_HELLO_LINE }) => l,
            };
            let line = match line {
                Ok(l) => l,
                Err(LineError::Closed) => return Ok(()),
                Err(LineError::Io(e)) => return Err(e),
                Err(LineError::TooLong) => {
                    let max = if self.role.is_some() { MAX_LINE } else { MAX_HELLO_LINE };
                    Reply::err(format!("line longer than {max} bytes")).write(w).await?;
                    w.flush().await?;
                    continue;
                }
                Err(LineError::NotUtf8) => {
                    Reply::err("a command line must be UTF-8").write(w).await?;
                    w.flush().await?;
                    continue;
                }
            };
            if line.is_empty() {
                continue;
            }
            self.hub.stats.commands.fetch_add(1, Ordering::Relaxed);
            let (reply, then) = self.command(&line).await;
            reply.write(w).await?;
            w.flush().await?;
            if let Then::Close = then {
                return Ok(());
            }
        }
    }

    async fn command(&mut self, line: &str) -> (Reply, Then) {
        let (verb, rest) = match line.split_once(' ') {
            Some((v, r)) => (v, r.trim()),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        if verb == "END" {
            return (Reply::Ok, Then::Close);
        }
        if verb == "HELLO" {
            return (self.hello(rest), Then::Continue);
        }
        let Some(role) = self.role else {
            return (Reply::err("HELLO first: the connection is not identified"), Then::Continue);
        };
        if !allowed(role, &verb) {
            let reason = match verb.as_str() {
                "PUSH" | "PUSHB" | "BATCH" | "INFO" | "FETCH" | "ACK" | "FAIL" | "BEAT" | "TRACK" | "QUEUE" | "MUTATE" | "FLUSH" => {
                    format!("{verb} is not allowed for the {} token", role.as_str())
                }
                _ => return (Reply::err(format!("unknown command {}", truncate(&verb, 40))), Then::Continue),
            };
            return (Reply::err(reason), Then::Continue);
        }
        let reply = match verb.as_str() {
            "PUSH" => self.push(rest).await,
            "PUSHB" => self.push_bulk(rest).await,
            "FETCH" => self.fetch(rest).await,
            "ACK" => self.ack(rest).await,
            "FAIL" => self.fail(rest).await,
            "BEAT" => self.beat(rest).await,
            "INFO" => admin::info(&self.hub).await,
            "QUEUE" => admin::queue(&self.hub, rest).await,
            "FLUSH" => admin::flush(&self.hub).await,
            "TRACK" => track::command(&self.hub, rest).await,
            "BATCH" => batch::command(self, rest).await,
            "MUTATE" => mutate::command(&self.hub, rest).await,
            _ => Reply::err(format!("unknown command {}", truncate(&verb, 40))),
        };
        (reply, Then::Continue)
    }

    fn hello(&mut self, rest: &str) -> Reply {
        if self.role.is_some() {
            return Reply::err("HELLO was already said on this connection");
        }
        let o = match object(rest, "HELLO") {
            Ok(o) => o,
            Err(e) => return e,
        };
        match o.get("v") {
            // Some clients send no version (and hash the password once).
            None => {}
            Some(v) if v.as_u64() == Some(2) || v.as_str() == Some("2") => {}
            Some(v) => return Reply::err(format!("protocol version {v} is not supported (2 is)")),
        }
        let role = if self.settings.tokens.is_empty() {
            Role::Admin
        } else {
            let Some(given) = o.get("pwdhash").and_then(Value::as_str) else {
                return Reply::err("Invalid password: this server needs a token as the password (FAKTORY_URL=tcp://:TOKEN@host:port)");
            };
            let mut found = None;
            for (role, token) in &self.settings.tokens {
                let mut ok = constant_time_eq(given.as_bytes(), password_hash(token, &self.salt, self.settings.iterations).as_bytes());
                if o.get("v").is_none() && self.settings.iterations != 1 {
                    ok |= constant_time_eq(given.as_bytes(), password_hash(token, &self.salt, 1).as_bytes());
                }
                if ok && found.is_none() {
                    found = Some(*role);
                }
            }
            match found {
                Some(r) => r,
                None => return Reply::err("Invalid password"),
            }
        };
        if let Some(wid) = o.get("wid").and_then(Value::as_str).filter(|w| !w.is_empty()) {
            if wid.len() > 200 {
                return Reply::err("wid must be at most 200 characters");
            }
            let labels = o
                .get("labels")
                .and_then(Value::as_array)
                .map(|l| l.iter().filter_map(Value::as_str).take(20).map(|s| truncate(s, 100)).collect())
                .unwrap_or_default();
            let hostname = o.get("hostname").and_then(Value::as_str).map(|h| truncate(h, 200)).unwrap_or_default();
            let pid = o.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32;
            self.hub.hello(wid, &hostname, pid, labels);
            self.wid = Some(wid.to_string());
        }
        self.role = Some(role);
        Reply::Ok
    }

    pub(crate) fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Enqueues checked jobs: those of no batch in one commit, each batch's with its counters
    /// (a job pushed with `custom.bid` joins that batch). Per job: its outcome, or why it was
    /// refused (an unknown or finished batch).
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<Result<EnqueueOutcome, String>>, BackendError> {
        let mut out: Vec<Option<Result<EnqueueOutcome, String>>> = (0..jobs.len()).map(|_| None).collect();
        let (mut plain, mut batched) = (Vec::new(), std::collections::BTreeMap::<String, Vec<(usize, NewJob)>>::new());
        for (i, j) in jobs.into_iter().enumerate() {
            match j.batch_id.clone() {
                Some(bid) => batched.entry(bid).or_default().push((i, j)),
                None => plain.push((i, j)),
            }
        }
        if !plain.is_empty() {
            let (at, jobs): (Vec<usize>, Vec<NewJob>) = plain.into_iter().unzip();
            for (i, o) in at.into_iter().zip(self.hub.push(jobs).await?) {
                out[i] = Some(Ok(o));
            }
        }
        for (bid, group) in batched {
            let (at, jobs): (Vec<usize>, Vec<NewJob>) = group.into_iter().unzip();
            let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
            let result = conveyor_core::batch::add_jobs(&self.hub.conveyor, &bid, jobs).await;
            for (i, id) in at.into_iter().zip(ids) {
                out[i] = Some(match &result {
                    Ok(()) => Ok(EnqueueOutcome::Enqueued { id }),
                    Err(BackendError::NotFound(_)) => Err(format!("No such batch {bid}")),
                    Err(e) => return Err(e.clone()),
                });
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every job has an outcome")).collect())
    }

    fn local(&self) -> impl Fn(&str) -> bool + '_ {
        |kind| self.hub.conveyor.registry().contains(kind)
    }

    /// Checks a pushed job and whether this role may create it.
    pub(crate) fn pushed(&self, v: Value) -> Result<job::Pushed, String> {
        let p = job::parse(v, self.local())?;
        if p.job.batch_id.is_some() && p.job.unique.is_some() {
            return Err("custom.unique_for cannot be combined with custom.bid".into());
        }
        if RESERVED.iter().any(|r| p.job.kind.starts_with(r)) && self.role != Some(Role::Admin) {
            return Err(format!("jobs of the built-in kind {:?} can be pushed with the admin token only", p.job.kind));
        }
        Ok(p)
    }

    async fn push(&self, rest: &str) -> Reply {
        let v: Value = match serde_json::from_str(rest) {
            Ok(v) => v,
            Err(e) => return Reply::err(format!("PUSH: the job is not valid JSON: {e}")),
        };
        let tracked = track::tracked(&v);
        let p = match self.pushed(v) {
            Ok(p) => p,
            Err(e) => return Reply::err(e),
        };
        match self.enqueue(vec![p.job]).await {
            Ok(out) => match out.into_iter().next() {
                Some(Err(reason)) => Reply::err(reason),
                Some(Ok(EnqueueOutcome::Duplicate { .. })) => Reply::Error { code: "NOTUNIQUE", reason: "Job not unique".into() },
                _ => {
                    self.hub.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                    if tracked {
                        track::set_state(&self.hub, &p.jid, "enqueued").await;
                    }
                    Reply::Ok
                }
            },
            Err(e) => backend_error("PUSH", e),
        }
    }

    /// `PUSHB`: the valid jobs are enqueued (in one commit); the answer maps each refused
    /// job's jid to its reason (`{}` when none was).
    async fn push_bulk(&self, rest: &str) -> Reply {
        let list = match serde_json::from_str::<Value>(rest) {
            Ok(Value::Array(list)) => list,
            Ok(_) => return Reply::err("PUSHB takes a JSON array of jobs"),
            Err(e) => return Reply::err(format!("PUSHB: the jobs are not valid JSON: {e}")),
        };
        let mut refused = Map::new();
        let mut jobs = Vec::with_capacity(list.len());
        let mut jids = Vec::with_capacity(list.len());
        for (i, v) in list.into_iter().enumerate() {
            let name = v.get("jid").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("#{i}"));
            let tracked = track::tracked(&v);
            match self.pushed(v) {
                Ok(p) => {
                    jids.push((p.jid, tracked));
                    jobs.push(p.job);
                }
                Err(e) => {
                    refused.insert(name, Value::String(e));
                }
            }
        }
        if !jobs.is_empty() {
            match self.enqueue(jobs).await {
                Ok(out) => {
                    for ((jid, tracked), o) in jids.into_iter().zip(out) {
                        match o {
                            Err(reason) => {
                                refused.insert(jid, Value::String(reason));
                            }
                            Ok(EnqueueOutcome::Duplicate { .. }) => {
                                refused.insert(jid, Value::String("NOTUNIQUE Job not unique".into()));
                            }
                            Ok(EnqueueOutcome::Enqueued { .. }) => {
                                self.hub.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                                if tracked {
                                    track::set_state(&self.hub, &jid, "enqueued").await;
                                }
                            }
                        }
                    }
                }
                Err(e) => return backend_error("PUSHB", e),
            }
        }
        Reply::json(&Value::Object(refused))
    }

    async fn fetch(&self, rest: &str) -> Reply {
        let queues: Vec<String> =
            if rest.is_empty() { vec!["default".to_string()] } else { rest.split_whitespace().take(100).map(str::to_string).collect() };
        for q in &queues {
            if let Err(e) = conveyor_core::job::validate_queue_name(q) {
                return Reply::err(format!("FETCH: queue {}: {e}", truncate(q, 80)));
            }
        }
        match self.hub.fetch(&queues, self.wid.as_deref()).await {
            Ok(Some(job)) => {
                if track::tracked(&job) {
                    track::set_state(&self.hub, job["jid"].as_str().unwrap_or_default(), "working").await;
                }
                Reply::json(&job)
            }
            Ok(None) => Reply::Null,
            Err(e) => backend_error("FETCH", e),
        }
    }

    async fn ack(&self, rest: &str) -> Reply {
        let jid = match object(rest, "ACK").and_then(|o| jid_of(&o, "ACK")) {
            Ok(j) => j,
            Err(e) => return e,
        };
        match self.hub.ack(&jid).await {
            Ok(Some(job)) => {
                if track::payload_tracked(&job.payload) {
                    track::set_state(&self.hub, &jid, "success").await;
                }
                Reply::Ok
            }
            Ok(None) => {
                // Re-sent, expired or someone else's: an error would stop some clients' workers.
                debug!(jid = %jid, "ACK of a job not held here");
                Reply::Ok
            }
            Err(e) => backend_error("ACK", e),
        }
    }

    async fn fail(&self, rest: &str) -> Reply {
        let (o, jid) = match object(rest, "FAIL").and_then(|o| jid_of(&o, "FAIL").map(|j| (o, j))) {
            Ok(x) => x,
            Err(e) => return e,
        };
        match self.hub.fail(&jid, failure_text(&o)).await {
            Ok(Some((job, dead))) => {
                if track::payload_tracked(&job.payload) {
                    track::set_state(&self.hub, &jid, if dead { "dead" } else { "failed" }).await;
                }
                Reply::Ok
            }
            Ok(None) => {
                debug!(jid = %jid, "FAIL of a job not held here");
                Reply::Ok
            }
            Err(e) => backend_error("FAIL", e),
        }
    }

    async fn beat(&self, rest: &str) -> Reply {
        let o = match object(rest, "BEAT") {
            Ok(o) => o,
            Err(e) => return e,
        };
        let Some(wid) = o.get("wid").and_then(Value::as_str).filter(|w| !w.is_empty() && w.len() <= 200) else {
            return Reply::err("BEAT needs the worker's wid");
        };
        let reported = o.get("current_state").and_then(Value::as_str).map(|s| truncate(s, 20));
        let signal = signal_of(&self.hub, wid).await;
        if let Err(e) = self.hub.beat(wid, reported, signal).await {
            return backend_error("BEAT", e);
        }
        match signal {
            // Bulk, and on every beat once set: clients act only on that form.
            Some(s) => Reply::json(&json!({ "state": s.as_str() })),
            None => Reply::Ok,
        }
    }
}

/// The key under which the dashboard leaves a signal for a remote worker (shared by every
/// process through the store, or Redis when configured).
pub(crate) fn signal_key(wid: &str) -> String {
    format!("faktory:signal:{wid}")
}

async fn signal_of(hub: &Hub, wid: &str) -> Option<Signal> {
    let cache = Cache::new(hub.conveyor.backend().clone());
    match cache.get::<String>(&signal_key(wid)).await.ok().flatten()?.as_str() {
        "quiet" => Some(Signal::Quiet),
        "terminate" => Some(Signal::Terminate),
        _ => None,
    }
}

/// What each role may say after `HELLO` (SPEC's role table).
fn allowed(role: Role, verb: &str) -> bool {
    match verb {
        "PUSH" | "PUSHB" | "BATCH" | "INFO" => matches!(role, Role::Admin | Role::Publish | Role::Worker),
        "FETCH" | "ACK" | "FAIL" | "BEAT" | "TRACK" => matches!(role, Role::Admin | Role::Worker),
        "QUEUE" | "MUTATE" | "FLUSH" => role == Role::Admin,
        _ => true,
    }
}

fn object(rest: &str, verb: &str) -> Result<Map<String, Value>, Reply> {
    match serde_json::from_str::<Value>(rest) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Reply::err(format!("{verb} takes a JSON object"))),
        Err(e) => Err(Reply::err(format!("{verb}: not valid JSON: {e}"))),
    }
}

fn jid_of(o: &Map<String, Value>, verb: &str) -> Result<String, Reply> {
    match o.get("jid").and_then(Value::as_str) {
        Some(j) if !j.is_empty() && j.len() <= 200 => Ok(j.to_string()),
        _ => Err(Reply::err(format!("{verb} needs the job's jid"))),
    }
}

/// A failure as the job's error: `errtype: message`, then the backtrace (bounded).
fn failure_text(o: &Map<String, Value>) -> String {
    let errtype = o.get("errtype").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or("error");
    let message = o.get("message").and_then(Value::as_str).unwrap_or("");
    let mut text = format!("{}: {}", truncate(errtype, 200), truncate(message, 8 * 1024));
    if let Some(lines) = o.get("backtrace").and_then(Value::as_array) {
        for l in lines.iter().filter_map(Value::as_str).take(50) {
            text.push_str("\n  ");
            text.push_str(&truncate(l, 500));
        }
    }
    text
}

pub(crate) fn backend_error(verb: &str, e: BackendError) -> Reply {
    match e {
        BackendError::Invalid(reason) => Reply::err(reason),
        // Storage and availability details stay in the log.
        other => {
            tracing::warn!(error = %other, "Faktory {verb} failed");
            Reply::err(format!("{verb} failed: the store is unavailable, try again"))
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_hash_matches_the_reference_vectors() {
        // Computed with the Python and the Node clients' own code.
        assert_eq!(password_hash("s3cret", "123456789abc", 1735), "0a72f5240dbdacb3822d81b4e057e105f489454bac5919364b47480037ad2526");
        assert_eq!(password_hash("s3cret", "123456789abc", 1), "9ab543a3508054ae0a59eee04da63768d109a60fc25e37a58ab7f18b9a03ac57");
    }

    #[test]
    fn roles_may_say_what_the_spec_lets_them() {
        assert!(allowed(Role::Publish, "PUSH") && !allowed(Role::Publish, "FETCH") && !allowed(Role::Publish, "FLUSH"));
        assert!(allowed(Role::Worker, "FETCH") && allowed(Role::Worker, "PUSHB") && !allowed(Role::Worker, "QUEUE"));
        assert!(allowed(Role::Admin, "MUTATE") && !allowed(Role::Read, "INFO"));
    }

    #[test]
    fn a_failure_keeps_type_message_and_a_bounded_backtrace() {
        let o = json!({ "jid": "x", "errtype": "ValueError", "message": "bad", "backtrace": (0..80).map(|i| format!("line {i}")).collect::<Vec<_>>() });
        let text = failure_text(o.as_object().unwrap());
        assert!(text.starts_with("ValueError: bad\n  line 0\n"), "{text}");
        assert_eq!(text.lines().count(), 51);
    }
}
