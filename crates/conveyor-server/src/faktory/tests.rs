//! The protocol over a real socket, command by command: bad input gets a clear `-ERR`, stores
//! nothing, and the connection carries on. (The real client libraries are exercised end to end
//! by the CLI tests, `tests/cli/faktory.rs`.)

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_core::backend::{JobFilter, Page};
use conveyor_core::{Conveyor, QueueBackend, Registry};

use super::conn::password_hash;
use super::FaktoryConfig;

struct Server {
    addr: std::net::SocketAddr,
    backend: Arc<dyn QueueBackend>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server(config: FaktoryConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let raw: Arc<dyn QueueBackend> =
        Arc::new(SqliteBackend::open(SqliteOptions::new(dir.path().join("f.db").to_string_lossy().to_string())).unwrap());
    let backend = conveyor_core::lane::Lanes::wrap(raw);
    let mut registry = Registry::new();
    registry.register("local.echo", |_: Value, _ctx| async { Ok(()) });
    let conveyor = Conveyor::new(backend.clone(), registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(super::serve(listener, conveyor, config, stop.clone()));
    Server { addr, backend, stop, _dir: dir }
}

struct Client {
    r: BufReader<tokio::io::ReadHalf<TcpStream>>,
    w: tokio::io::WriteHalf<TcpStream>,
    greeting: Value,
}

impl Client {
    async fn connect(s: &Server) -> Client {
        let (r, w) = tokio::io::split(TcpStream::connect(s.addr).await.unwrap());
        let mut c = Client { r: BufReader::new(r), w, greeting: Value::Null };
        let hi = c.reply().await;
        c.greeting = serde_json::from_str(hi.strip_prefix("+HI ").expect("a greeting")).unwrap();
        c
    }

    /// One reply: a simple string or error as its line, a bulk string as its content, `nil`.
    async fn reply(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line)).await.expect("a reply in time").unwrap();
        let line = line.trim_end().to_string();
        if let Some(n) = line.strip_prefix('$') {
            let n: i64 = n.parse().unwrap();
            if n < 0 {
                return "nil".into();
            }
            let mut body = vec![0; n as usize + 2];
            self.r.read_exact(&mut body).await.unwrap();
            body.truncate(n as usize);
            return String::from_utf8(body).unwrap();
        }
        line
    }

    async fn send(&mut self, line: &str) -> String {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.w.write_all(b"\r\n").await.unwrap();
        self.reply().await
    }

    async fn hello(s: &Server, password: Option<&str>) -> Client {
        let mut c = Client::connect(s).await;
        let mut hello = json!({ "v": 2, "hostname": "test", "wid": "test-worker-1", "pid": 1, "labels": ["test"] });
        if let (Some(p), Some(salt)) = (password, c.greeting["s"].as_str()) {
            hello["pwdhash"] = json!(password_hash(p, salt, c.greeting["i"].as_u64().unwrap() as u32));
        }
        assert_eq!(c.send(&format!("HELLO {hello}")).await, "+OK");
        c
    }
}

/// Waits (up to 10 s) until `check` holds: ACK and FAIL are answered before their batch commits.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `BATCH STATUS` on a connection of its own.
async fn c2_status(s: &Server, bid: &str) -> String {
    let mut c = Client::hello(s, None).await;
    c.send(&format!("BATCH STATUS {bid}")).await
}

async fn stored(s: &Server) -> u64 {
    s.backend.jobs(JobFilter::default(), Page::new(1, 100)).await.unwrap().total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_reason_stores_nothing_and_the_connection_carries_on() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::connect(&s).await;
    assert_eq!(c.greeting, json!({ "v": 2 }), "no password without tokens");
    assert!(c.send("PUSH {}").await.starts_with("-ERR HELLO first"));
    // Before HELLO a line may be 64 KiB at most.
    assert_eq!(
        c.send(&"x".repeat(super::wire::MAX_HELLO_LINE + 1)).await,
        format!("-ERR line longer than {} bytes", super::wire::MAX_HELLO_LINE)
    );
    assert_eq!(c.send(r#"HELLO {"v":2}"#).await, "+OK");
    let cases = [
        ("PUSH {not json", "-ERR PUSH: the job is not valid JSON"),
        (r#"PUSH {"jobtype":"x","args":[]}"#, "-ERR jobs must have a reasonable jid parameter"),
        (r#"PUSH {"jid":"abcdefgh1","jobtype":"","args":[]}"#, "-ERR jobs must have a jobtype parameter"),
        (r#"PUSH {"jid":"abcdefgh1","jobtype":"x","args":{}}"#, "-ERR jobs must have an args parameter"),
        (r#"PUSH {"jid":"abcdefgh1","jobtype":"x","reserve_for":100000}"#, "-ERR jobs cannot be reserved for more than one day"),
        (r#"PUSH {"jid":"abcdefgh1","jobtype":"x","queue":"no spaces"}"#, "-ERR queue:"),
        (r#"PUSH {"jid":"abcdefgh1","jobtype":"x","at":"yesterday"}"#, "-ERR at must be an RFC 3339 time"),
        (r#"PUSH [1]"#, "-ERR a job must be a JSON object"),
        ("PUSHB {}", "-ERR PUSHB takes a JSON array"),
        ("ACK {}", "-ERR ACK needs the job's jid"),
        ("FAIL nope", "-ERR FAIL: not valid JSON"),
        ("BEAT {}", "-ERR BEAT needs the worker's wid"),
        ("FETCH bad/queue", "-ERR FETCH: queue bad/queue"),
        ("QUEUE PAUSE", "-ERR QUEUE PAUSE needs queue names"),
        ("QUEUE SHAKE default", "-ERR unknown QUEUE subcommand"),
        ("FROBNICATE now", "-ERR unknown command FROBNICATE"),
        (r#"HELLO {"v":2}"#, "-ERR HELLO was already said"),
    ];
    for (line, want) in cases {
        let got = c.send(line).await;
        assert!(got.starts_with(want), "{line}: got {got:?}, want {want:?}");
    }
    // An oversized line is read to its end and refused; the next command still works.
    let huge = format!("PUSH {{\"jid\":\"abcdefgh1\",\"jobtype\":\"x\",\"args\":[\"{}\"]}}", "x".repeat(super::wire::MAX_LINE));
    assert!(c.send(&huge).await.starts_with("-ERR line longer than"));
    assert_eq!(stored(&s).await, 0, "nothing was stored");
    // Partial success: the good job is enqueued, the bad one named.
    let bulk = json!([{ "jid": "good-job-01", "jobtype": "x", "args": [] }, { "jid": "abc", "jobtype": "x", "args": [] }]);
    let refused: Value = serde_json::from_str(&c.send(&format!("PUSHB {bulk}")).await).unwrap();
    assert_eq!(refused, json!({ "abc": "jobs must have a reasonable jid parameter" }));
    assert_eq!(stored(&s).await, 1);
    assert_eq!(c.send("END").await, "+OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_hands_out_remote_jobs_in_queue_order_and_never_local_ones() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    for (jid, kind, queue) in [("local-job-1", "local.echo", "a"), ("remote-job-1", "py.work", "b"), ("remote-job-2", "py.work", "a")] {
        let job = json!({ "jid": jid, "jobtype": kind, "args": [1], "queue": queue });
        assert_eq!(c.send(&format!("PUSH {job}")).await, "+OK");
    }
    // Queue `a` first: its remote job, then `b`'s; the local job is never fetched.
    let first: Value = serde_json::from_str(&c.send("FETCH a b").await).unwrap();
    assert_eq!((first["jid"].as_str(), first["queue"].as_str()), (Some("remote-job-2"), Some("a")));
    assert!(first["enqueued_at"].is_string() && first["reserve_for"] == 1800, "{first}");
    let second: Value = serde_json::from_str(&c.send("FETCH a b").await).unwrap();
    assert_eq!(second["jid"], "remote-job-1");
    let started = std::time::Instant::now();
    assert_eq!(c.send("FETCH a b").await, "nil");
    assert!(started.elapsed() >= Duration::from_millis(1500), "an empty FETCH waits about 2 s");
    assert_eq!(c.send(r#"ACK {"jid":"remote-job-2"}"#).await, "+OK");
    // An ACK repeated, or for a job nobody holds, is not an error (clients re-send them).
    assert_eq!(c.send(r#"ACK {"jid":"remote-job-2"}"#).await, "+OK");
    assert_eq!(c.send(r#"FAIL {"jid":"remote-job-1","errtype":"KeyError","message":"no such key","backtrace":["a.py:1"]}"#).await, "+OK");
    let failed_job = || async {
        let failed = s.backend.jobs(JobFilter { kind: Some("py.work".into()), ..JobFilter::default() }, Page::new(1, 10)).await.unwrap();
        failed.items.into_iter().find(|j| j.payload["jid"] == "remote-job-1").expect("the failed job")
    };
    eventually("the failure to be recorded", || async { failed_job().await.error.is_some() }).await;
    let retried = failed_job().await;
    assert_eq!(retried.error.as_deref(), Some("KeyError: no such key\n  a.py:1"));
    assert!(retried.available_at.unwrap() >= conveyor_core::clock::now_ms() + 13_000, "Faktory's backoff: 15 s and more");
}

/// A job pushed in a trace (`custom.traceparent`) is fetched in it: the worker continues the
/// trace (no exporter in this test, so the context comes back as it went in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_trace_context_reaches_the_worker_that_fetches_the_job() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let job = json!({ "jid": "traced-job-1", "jobtype": "py.work", "args": [], "queue": "traced", "custom": { "traceparent": tp } });
    assert_eq!(c.send(&format!("PUSH {job}")).await, "+OK");
    let plain = json!({ "jid": "plain-job-1", "jobtype": "py.work", "args": [], "queue": "traced" });
    assert_eq!(c.send(&format!("PUSH {plain}")).await, "+OK");
    let fetched: Value = serde_json::from_str(&c.send("FETCH traced").await).unwrap();
    assert_eq!((fetched["jid"].as_str(), fetched["custom"]["traceparent"].as_str()), (Some("traced-job-1"), Some(tp)), "{fetched}");
    let fetched: Value = serde_json::from_str(&c.send("FETCH traced").await).unwrap();
    assert_eq!(fetched["jid"], "plain-job-1");
    assert!(fetched.get("custom").is_none_or(|c| c.get("traceparent").is_none()), "a job in no trace gets none: {fetched}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_say_what() {
    let config = FaktoryConfig {
        admin_token: Some("admin-secret".into()),
        publish_token: Some("publish-secret".into()),
        worker_token: Some("worker-secret".into()),
        ..FaktoryConfig::default()
    };
    let s = server(config).await;
    let mut c = Client::connect(&s).await;
    assert!(c.greeting["s"].is_string() && c.greeting["i"].as_u64() >= Some(1), "{}", c.greeting);
    assert_eq!(c.send(r#"HELLO {"v":2}"#).await.split(':').next(), Some("-ERR Invalid password"));
    let wrong = password_hash("guess", c.greeting["s"].as_str().unwrap(), c.greeting["i"].as_u64().unwrap() as u32);
    assert_eq!(c.send(&format!(r#"HELLO {{"v":2,"pwdhash":"{wrong}"}}"#)).await, "-ERR Invalid password");
    // A client that sends no version and hashes once (the `faktory` package on PyPI).
    let mut once = Client::connect(&s).await;
    let h = password_hash("publish-secret", once.greeting["s"].as_str().unwrap(), 1);
    assert_eq!(once.send(&format!(r#"HELLO {{"pwdhash":"{h}"}}"#)).await, "+OK");

    let mut publisher = Client::hello(&s, Some("publish-secret")).await;
    assert_eq!(publisher.send(r#"PUSH {"jid":"abcdefgh1","jobtype":"x","args":[]}"#).await, "+OK");
    assert!(publisher.send("FETCH").await.starts_with("-ERR FETCH is not allowed for the publish token"));
    assert!(publisher.send(r#"PUSH {"jid":"abcdefgh2","jobtype":"conveyor.noop","args":[]}"#).await.contains("admin token only"));
    let mut worker = Client::hello(&s, Some("worker-secret")).await;
    assert!(worker.send("FETCH").await.starts_with('{'));
    assert!(worker.send("FLUSH").await.starts_with("-ERR FLUSH is not allowed for the worker token"));
    let mut admin = Client::hello(&s, Some("admin-secret")).await;
    assert_eq!(admin.send("QUEUE PAUSE default").await, "+OK");
    assert_eq!(admin.send("FLUSH").await, "+OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_jobs_report_their_state_and_progress() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let state = |v: &str| serde_json::from_str::<Value>(v).unwrap();
    assert_eq!(c.send(r#"PUSH {"jid":"tracked-01","jobtype":"py.work","args":[],"custom":{"track":1}}"#).await, "+OK");
    assert_eq!(state(&c.send("TRACK GET tracked-01").await)["state"], "enqueued");
    assert_eq!(state(&c.send("FETCH").await)["jid"], "tracked-01");
    assert_eq!(state(&c.send("TRACK GET tracked-01").await)["state"], "working");
    let until = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(3);
    let set = json!({ "jid": "tracked-01", "percent": 40, "desc": "halfway", "reserve_until": until.to_string() });
    assert_eq!(c.send(&format!("TRACK SET {set}")).await, "+OK");
    let t = state(&c.send("TRACK GET tracked-01").await);
    assert_eq!((t["state"].as_str(), t["percent"].as_u64(), t["desc"].as_str()), (Some("working"), Some(40), Some("halfway")));
    assert!(c.send(r#"TRACK SET {"jid":"tracked-01","percent":140}"#).await.starts_with("-ERR TRACK SET: percent"));
    assert_eq!(c.send(r#"ACK {"jid":"tracked-01"}"#).await, "+OK");
    let t = state(&c.send("TRACK GET tracked-01").await);
    assert_eq!((t["state"].as_str(), t["percent"].as_u64()), (Some("success"), Some(40)), "{t}");
    assert_eq!(state(&c.send("TRACK GET never-pushed").await), json!({ "jid": "never-pushed", "state": "unknown", "updated_at": "" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_worker_is_registered_by_its_beats_and_told_to_quiet_or_stop() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    assert_eq!(c.send(r#"BEAT {"wid":"test-worker-1"}"#).await, "+OK");
    let workers = s.backend.workers(Duration::from_secs(30)).await.unwrap();
    let w = workers.iter().find(|w| w.id == "test-worker-1").expect("the remote worker is listed");
    assert_eq!((w.hostname.as_str(), w.status.as_str(), w.supervisors[0].name.as_str()), ("test", "running", "faktory (test)"));
    assert!(super::signal_worker(&s.backend, "test-worker-1", "nap").await.is_err());
    assert_eq!(super::signal_worker(&s.backend, "test-worker-1", "quiet").await.unwrap(), "quiet");
    // The state is repeated on every beat, as a bulk string (the form every client reads).
    for _ in 0..2 {
        assert_eq!(c.send(r#"BEAT {"wid":"test-worker-1","current_state":"quiet"}"#).await, r#"{"state":"quiet"}"#);
    }
    super::signal_worker(&s.backend, "test-worker-1", "stop").await.unwrap();
    assert_eq!(c.send(r#"BEAT {"wid":"test-worker-1"}"#).await, r#"{"state":"terminate"}"#);
    let workers = s.backend.workers(Duration::from_secs(30)).await.unwrap();
    assert_eq!(workers.iter().find(|w| w.id == "test-worker-1").unwrap().status, "terminate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stays_open_until_committed_then_runs_its_callbacks_and_counts_in_its_parent() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let json_of = |v: &str| serde_json::from_str::<Value>(v).unwrap_or_else(|_| panic!("not JSON: {v}"));
    let parent = c.send(r#"BATCH NEW {"description":"parent","complete":{"jobtype":"cb.parent_done","args":[],"queue":"cb"}}"#).await;
    let new = json!({ "description": "child", "parent_bid": parent,
        "success": { "jobtype": "cb.success", "args": [1], "queue": "cb" }, "complete": { "jobtype": "cb.complete", "queue": "cb" } });
    let bid = c.send(&format!("BATCH NEW {new}")).await;
    assert!(!bid.starts_with('-'), "{bid}");
    assert!(c.send(r#"BATCH NEW {"parent_bid":"no-such-batch"}"#).await.starts_with("-ERR No such batch"));
    assert_eq!(c.send(&format!("BATCH OPEN {bid}")).await, bid);
    for jid in ["member-001", "member-002"] {
        let job = json!({ "jid": jid, "jobtype": "py.work", "args": [], "custom": { "bid": bid } });
        assert_eq!(c.send(&format!("PUSH {job}")).await, "+OK");
    }
    assert!(c
        .send(r#"PUSH {"jid":"member-003","jobtype":"py.work","custom":{"bid":"nope"}}"#)
        .await
        .starts_with("-ERR No such batch nope"));
    // The first member finishes before the commit: the batch must not finish with it.
    assert_eq!(json_of(&c.send("FETCH").await)["jid"], "member-001");
    assert_eq!(c.send(r#"ACK {"jid":"member-001"}"#).await, "+OK");
    let st = json_of(&c.send(&format!("BATCH STATUS {bid}")).await);
    assert_eq!((st["total"].as_u64(), st["pending"].as_u64(), st["complete_st"].as_str()), (Some(2), Some(1), Some("")), "{st}");
    assert_eq!(c.send(&format!("BATCH COMMIT {bid}")).await, "+OK");
    assert_eq!(c.send(&format!("BATCH COMMIT {bid}")).await, "+OK", "committing twice changes nothing");
    assert_eq!(c.send(&format!("BATCH COMMIT {parent}")).await, "+OK");
    assert!(c.send("FETCH cb").await == "nil", "no callback before the last member finishes");
    assert_eq!(json_of(&c.send("FETCH").await)["jid"], "member-002");
    assert_eq!(c.send(r#"ACK {"jid":"member-002"}"#).await, "+OK");
    let st = json_of(&c.send(&format!("BATCH STATUS {bid}")).await);
    assert_eq!((st["pending"].as_u64(), st["success_st"].as_str(), st["parent_bid"].as_str()), (Some(0), Some("1"), Some(parent.as_str())));
    // Both callbacks of the child, then the parent's (the child was its only member).
    let st = json_of(&c.send(&format!("BATCH STATUS {bid}")).await);
    assert_eq!((st["success_st"].as_str(), st["complete_st"].as_str()), (Some("1"), Some("1")), "callbacks enqueued: {st}");
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let cb = json_of(&c.send("FETCH cb").await);
        kinds.push(cb["jobtype"].as_str().unwrap().to_string());
        assert_eq!(c.send(&format!(r#"ACK {{"jid":"{}"}}"#, cb["jid"].as_str().unwrap())).await, "+OK");
    }
    kinds.sort();
    assert_eq!(kinds, ["cb.complete", "cb.parent_done", "cb.success"]);
    eventually("the callbacks to be recorded as succeeded", || async {
        let st = json_of(&c2_status(&s, &bid).await);
        st["success_st"] == "2" && st["complete_st"] == "2"
    })
    .await;
    eventually("the parent's callback to be recorded as succeeded", || async {
        json_of(&c2_status(&s, &parent).await)["complete_st"] == "2"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutate_requeues_and_discards_dead_jobs_by_filter() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let json_of = |v: &str| serde_json::from_str::<Value>(v).unwrap_or_else(|_| panic!("not JSON: {v}"));
    for (jid, kind, arg) in [("dead-job-1", "py.a", "uid:1"), ("dead-job-2", "py.a", "uid:2"), ("dead-job-3", "py.b", "uid:3")] {
        let job = json!({ "jid": jid, "jobtype": kind, "args": [arg], "retry": -1 });
        assert_eq!(c.send(&format!("PUSH {job}")).await, "+OK");
        assert_eq!(json_of(&c.send("FETCH").await)["jid"], jid);
        assert_eq!(c.send(&format!(r#"FAIL {{"jid":"{jid}","message":"no"}}"#)).await, "+OK");
    }
    let dead = || async { s.backend.failed(None, Page::new(1, 50)).await.unwrap().total };
    eventually("retry -1: straight to the failed store", || async { dead().await == 3 }).await;
    assert!(c.send(r#"MUTATE {"cmd":"explode","target":"dead"}"#).await.starts_with("-ERR MUTATE: unknown cmd"));
    assert!(c.send(r#"MUTATE {"cmd":"requeue","target":"queues"}"#).await.starts_with("-ERR MUTATE: unknown target"));
    assert_eq!(c.send(r#"MUTATE {"cmd":"requeue","target":"dead","filter":{"regexp":"*uid:2*"}}"#).await, "+OK");
    assert_eq!(dead().await, 2);
    assert_eq!(json_of(&c.send("FETCH").await)["jid"], "dead-job-2", "a requeued dead job goes back to the remote workers");
    assert_eq!(c.send(r#"MUTATE {"cmd":"discard","target":"dead","filter":{"jobtype":"py.b"}}"#).await, "+OK");
    assert_eq!(dead().await, 1);
    assert_eq!(c.send(r#"MUTATE {"cmd":"discard","target":"dead","filter":{"jids":["other"]}}"#).await, "+OK");
    assert_eq!(dead().await, 1);
    assert_eq!(c.send(r#"MUTATE {"cmd":"clear","target":"dead"}"#).await, "+OK");
    assert_eq!(dead().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_job_is_not_handed_out_and_says_why_in_the_failed_store() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let past = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1)).to_string();
    let expired = json!({ "jid": "expired-01", "jobtype": "py.work", "args": [], "custom": { "expires_at": past } });
    assert_eq!(c.send(&format!("PUSH {expired}")).await, "+OK");
    assert_eq!(c.send(r#"PUSH {"jid":"fresh-0001","jobtype":"py.work","args":[],"custom":{"expires_in":600}}"#).await, "+OK");
    let got: Value = serde_json::from_str(&c.send("FETCH").await).unwrap();
    assert_eq!(got["jid"], "fresh-0001");
    eventually("the expired job in the failed store", || async {
        let failed = s.backend.failed(None, Page::new(1, 10)).await.unwrap();
        failed.items.iter().any(|f| f.payload["jid"] == "expired-01" && f.error.contains("expired at"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_job_frees_its_key_at_start_or_at_success_as_it_says() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let job = |jid: &str, until: &str| json!({ "jid": jid, "jobtype": "py.unique", "args": [until], "queue": until, "custom": { "unique_for": 600, "unique_until": until } });
    for until in ["start", "success"] {
        assert_eq!(c.send(&format!("PUSH {}", job(&format!("{until}-first-01"), until))).await, "+OK");
        let dup = c.send(&format!("PUSH {}", job(&format!("{until}-again-01"), until))).await;
        assert!(dup.starts_with("-NOTUNIQUE"), "while it waits the key is held ({until}): {dup}");
        let got: Value = serde_json::from_str(&c.send(&format!("FETCH {until}")).await).unwrap();
        assert_eq!(got["jid"], format!("{until}-first-01"));
        let running = c.send(&format!("PUSH {}", job(&format!("{until}-while-01"), until))).await;
        if until == "start" {
            assert_eq!(running, "+OK", "unique_until start: the key is free once a worker has the job");
        } else {
            assert!(running.starts_with("-NOTUNIQUE"), "unique_until success: held while it runs: {running}");
        }
    }
    let bad = c.send(&format!("PUSH {}", job("bad-until-01", "later"))).await;
    assert!(bad.starts_with("-ERR") && bad.contains("unique_until"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutate_runs_scheduled_jobs_now_and_kills_retries() {
    let s = server(FaktoryConfig::default()).await;
    let mut c = Client::hello(&s, None).await;
    let json_of = |v: &str| serde_json::from_str::<Value>(v).unwrap_or_else(|_| panic!("not JSON: {v}"));
    let at = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    let later = json!({ "jid": "scheduled-1", "jobtype": "py.later", "args": [], "at": at });
    assert_eq!(c.send(&format!("PUSH {later}")).await, "+OK");
    assert_eq!(c.send(r#"PUSH {"jid":"retried-01","jobtype":"py.flaky","args":[]}"#).await, "+OK");
    assert_eq!(json_of(&c.send("FETCH").await)["jid"], "retried-01");
    assert_eq!(c.send(r#"FAIL {"jid":"retried-01","message":"try later"}"#).await, "+OK");
    eventually("the failure to be recorded", || async { s.backend.queues().await.unwrap().iter().any(|q| q.delayed == 2) }).await;
    // Each set holds only its own jobs: a requeue of the retries does not touch the scheduled job.
    assert_eq!(c.send(r#"MUTATE {"cmd":"kill","target":"retries","filter":{"jobtype":"py.later"}}"#).await, "+OK");
    assert_eq!(c.send(r#"MUTATE {"cmd":"requeue","target":"scheduled","filter":{"jids":["scheduled-1"]}}"#).await, "+OK");
    assert_eq!(json_of(&c.send("FETCH").await)["jid"], "scheduled-1", "a requeued scheduled job is ready now");
    assert_eq!(c.send(r#"MUTATE {"cmd":"kill","target":"retries"}"#).await, "+OK");
    let failed = s.backend.failed(None, Page::new(1, 10)).await.unwrap();
    assert_eq!(failed.items.len(), 1);
    assert_eq!(
        (failed.items[0].payload["jid"].as_str(), failed.items[0].error.as_str()),
        (Some("retried-01"), "killed by MUTATE before it ran")
    );
}
