//! `conveyor serve` speaking the Faktory work protocol to real, unchanged Faktory clients:
//! pyfaktory 0.2.13 and node's faktory-worker 4.7.1 (the scripts in `tests/faktory/`, run as
//! processes of their own) and the Rust `faktory` crate 0.13.1 (in the test process).
//!
//! The Python and node clients are installed on first use under the target directory (a venv with
//! pip, `npm install --prefix`). Without python3/pip or node/npm a test is skipped outside CI and
//! fails under `CI=true`. Each client process runs in a process group of its own (pyfaktory runs
//! its handlers in child processes), killed with the group when the test ends; its output goes to
//! a file in the test's directory and is printed when the test fails, as is the server's log.

mod flow;
mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faktory::{Job, JobId, Worker};
use serde_json::{json, Value};

use support::*;

use crate::{wait_for, TestEnv};

// --- the tests ---------------------------------------------------------------------------------

/// What the Python and the node tests share: tokens, 200 jobs worked exactly once, a failure
/// without retries in the failed store, a failure with retries delayed by Faktory's backoff.
async fn push_and_work_exactly_once(env: &TestEnv, lang: Lang) {
    let server = Server::start(env, &tokens()).await;
    let api = server.api();
    let dir = env.dir.path();
    let out = dir.join("out.txt");
    let (ok, boom) = (format!("{}.ok", lang.prefix()), format!("{}.boom", lang.prefix()));

    // The read token and a token of no role are refused (at HELLO): the client fails.
    for (who, url) in [("read", server.url(READ)), ("unknown", server.url("fk-no-such-token"))] {
        let Err((status, log)) = lang.produce(&url, &[&ok, "1", "default", "--tag", "refused"], dir, &format!("producer-{who}")).await
        else {
            panic!("the {who} token pushed a job");
        };
        assert!(log.contains("ERR"), "the client reports the server's -ERR for the {who} token ({status}): {log}");
    }
    // The publish token does not work jobs: a worker with it stops (with no job to take).
    let mut publisher = lang.worker(&server.url(PUBLISH), 1, &[&ok], &out, dir, "worker-publish");
    let status = crate::wait_exit(&mut publisher.child, Duration::from_secs(30)).await;
    assert!(!status.success(), "a worker with the publish token is refused: {status}");
    drop(publisher);

    let mut worker = lang.worker(&server.url(WORKER), 4, &[&ok, &boom], &out, dir, "worker");

    // 200 jobs, 100 PUSHed one by one and 100 in a PUSHB with one invalid job more, which alone
    // is refused.
    let pushed = lang.produce(&server.url(PUBLISH), &[&ok, "200", "default", "--tag", "ok", "--bad-jid"], dir, "producer-ok").await;
    let pushed = pushed.unwrap_or_else(|(status, log)| panic!("the producer failed ({status}): {log}"));
    assert_eq!(pushed["pushed"], 200, "{pushed}");
    let rejected = pushed["bulk_rejected"].as_object().cloned().unwrap_or_default();
    assert_eq!(rejected.keys().collect::<Vec<_>>(), ["abc"], "PUSHB names the invalid jid, and only it: {pushed}");
    assert!(rejected["abc"].as_str().is_some_and(|m| !m.is_empty()), "with a reason: {pushed}");
    assert!(pushed["info"]["server"].is_object(), "INFO answers with the server's state: {}", pushed["info"]);
    let jids: BTreeSet<String> = pushed["jids"].as_array().unwrap().iter().map(|j| j.as_str().unwrap().to_string()).collect();
    assert_eq!(jids.len(), 200);

    wait_for("the worker to record 200 distinct jobs", Duration::from_secs(60), || async { distinct(&recorded(&out, "ok")).len() == 200 })
        .await;
    wait_for("200 completed jobs in the API", Duration::from_secs(30), || async { api.jobs(&ok, "completed").await.len() >= 200 }).await;
    let lines = recorded(&out, "ok");
    let expected: BTreeSet<String> = (0..200).map(|i| format!("ok:{i}")).collect();
    assert_eq!(distinct(&lines), expected, "every job ran, and only these (not the refused ones)");
    assert_eq!(lines.len(), 200, "no job ran twice");
    let done = api.jobs(&ok, "completed").await;
    assert_eq!(done.len(), 200, "each job completed once");
    let done_jids: BTreeSet<String> = done.iter().map(|j| j["payload"]["jid"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(done_jids, jids, "the jobs keep their jids");
    for j in &done {
        assert_eq!(
            (j["queue"].as_str(), j["payload"]["jobtype"].as_str(), j["attempts"].as_u64()),
            (Some("default"), Some(ok.as_str()), Some(1)),
            "{j}"
        );
        assert_eq!(tag_of(j), Some("ok"), "{j}");
    }
    for state in ["pending", "delayed", "reserved"] {
        assert!(api.jobs(&ok, state).await.is_empty(), "no {ok} job left {state}");
    }
    assert!(api.failed(&ok).await.is_empty(), "no {ok} job failed");

    // retry 0: one FAIL sends the job to the failed store, with the handler's error.
    let pushed = lang
        .produce(&server.url(PUBLISH), &[&boom, "1", "default", "--tag", "boom0", "--retry", "0"], dir, "producer-boom0")
        .await
        .unwrap();
    let jid = pushed["jids"][0].as_str().unwrap().to_string();
    wait_for("the retry-0 failure in the failed store", Duration::from_secs(30), || async {
        api.failed(&boom).await.iter().any(|f| f["payload"]["jid"] == jid.as_str())
    })
    .await;
    let failed = api.failed(&boom).await.into_iter().find(|f| f["payload"]["jid"] == jid.as_str()).unwrap();
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("boom boom0:0")), "the failed store keeps the client's error: {failed}");
    assert_eq!((failed["attempts"].as_u64(), failed["max_attempts"].as_u64()), (Some(1), Some(1)), "{failed}");
    assert_eq!(failed["queue"], "default");

    // The default retry (the clients send 25): the FAIL schedules the retry with Faktory's backoff.
    let pushed_at = now_ms();
    let pushed = lang.produce(&server.url(PUBLISH), &[&boom, "1", "default", "--tag", "boom25"], dir, "producer-boom25").await.unwrap();
    let (job, since, until) = delayed_after_fail(&api, &boom, "boom25", pushed_at).await;
    assert_eq!(job["payload"]["jid"], pushed["jids"][0]);
    assert!(job["error"].as_str().is_some_and(|e| e.contains("boom boom25:0")), "{job}");
    assert_first_backoff(&job, since, until);
    assert!(!api.failed(&boom).await.iter().any(|f| tag_of(f) == Some("boom25")), "a job with retries left is not in the failed store");

    assert!(worker.running(), "the worker survived everything the server answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_push_and_work_exactly_once_on_sqlite() {
    let Some(lang) = Lang::python() else { return };
    let env = TestEnv::new("");
    push_and_work_exactly_once(&env, lang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_clients_push_and_work_exactly_once_on_redis() {
    let Some(lang) = Lang::node() else { return };
    let Some(redis) = conveyor_backends::redis::testing::TestRedis::create() else { return };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    let env = TestEnv::redis("", &url, &prefix, Some(redis));
    push_and_work_exactly_once(&env, lang).await;
}

/// The Rust `faktory` crate: PUSH, PUSHB with a partial failure, a strictly parsed INFO, FETCH
/// with ACK and FAIL, a blocking empty FETCH, a local kind that Conveyor runs itself, and a
/// paused queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_pushes_works_fails_and_pauses() {
    let env = TestEnv::new("");
    let server = Server::start(&env, &tokens()).await;
    let api = server.api();

    assert!(faktory::Client::connect_to(&server.url(READ)).await.is_err(), "the read token is refused");
    let mut producer = faktory::Client::connect_to(&server.url(PUBLISH)).await.expect("HELLO with the publish token");
    let info = producer.current_info().await.expect("INFO parses strictly (semver, integers, tasks)");
    assert_eq!(info.server.version.major, 1, "{:?}", info.server);

    producer.enqueue(Job::new("rs.ok", vec![json!(1), json!("one")])).await.expect("PUSH");
    let bad = Job::builder("rs.ok").jid(JobId::new("abc")).args(vec![json!(-1), json!("bad")]).build();
    let (n, errors) = producer.enqueue_many([Job::new("rs.ok", vec![json!(2), json!("two")]), bad]).await.expect("PUSHB");
    assert_eq!(n, 1, "the valid job of the bulk is enqueued");
    let errors = errors.expect("PUSHB names the rejected job");
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["abc"], "{errors:?}");

    let seen: Arc<Mutex<Vec<Vec<Value>>>> = Arc::default();
    let record = Arc::clone(&seen);
    let mut worker = Worker::builder::<std::io::Error>()
        .register_fn("rs.ok", move |job| {
            let record = Arc::clone(&record);
            async move {
                record.lock().unwrap().push(job.args().to_vec());
                Ok(())
            }
        })
        .register_fn("rs.boom", |job| async move { Err(std::io::Error::other(format!("kaboom {}", job.args()[0]))) })
        .connect_to(&server.url(WORKER))
        .await
        .expect("HELLO with the worker token");

    assert!(worker.run_one(0, &["default"]).await.expect("FETCH and ACK"), "a job was fetched");
    assert!(worker.run_one(0, &["default"]).await.expect("FETCH and ACK"), "a job was fetched");
    let mut got = seen.lock().unwrap().clone();
    got.sort_by_key(|args| args[0].as_i64());
    assert_eq!(got, vec![vec![json!(1), json!("one")], vec![json!(2), json!("two")]]);
    wait_for("both rs.ok jobs completed in the API", Duration::from_secs(10), || async { api.jobs("rs.ok", "completed").await.len() == 2 })
        .await;
    assert!(api.jobs("rs.ok", "completed").await.iter().all(|j| j["attempts"] == 1));

    // A local kind pushed over Faktory is Conveyor's to run: FETCH never hands it out, and with
    // nothing else queued it blocks about 2 s and answers null.
    let mut admin = faktory::Client::connect_to(&server.url(ADMIN)).await.expect("HELLO with the admin token");
    admin.enqueue(Job::new("conveyor.noop", Vec::<Value>::new())).await.expect("PUSH of a local kind");
    let t = Instant::now();
    assert!(!worker.run_one(0, &["default"]).await.expect("an empty FETCH"), "FETCH hands out no local job");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(1_500) && waited < Duration::from_secs(5), "an empty FETCH blocks about 2 s, not {waited:?}");
    wait_for("Conveyor's own worker to run the conveyor.noop", Duration::from_secs(30), || async {
        !api.jobs("conveyor.noop", "completed").await.is_empty()
    })
    .await;

    // A handler error: FAIL, and the job waits for its retry (Rust's default retry is 25).
    producer.enqueue(Job::new("rs.boom", vec![json!(7)])).await.unwrap();
    let since = now_ms();
    assert!(worker.run_one(0, &["default"]).await.expect("FETCH and FAIL"));
    let until = now_ms();
    wait_for("the failed rs.boom job to be delayed", Duration::from_secs(10), || async {
        !api.jobs("rs.boom", "delayed").await.is_empty()
    })
    .await;
    let delayed = api.jobs("rs.boom", "delayed").await;
    assert_eq!(delayed.len(), 1, "{delayed:?}");
    assert!(delayed[0]["error"].as_str().is_some_and(|e| e.contains("kaboom 7")), "{}", delayed[0]);
    assert_first_backoff(&delayed[0], since, until);
    // retry 0: straight to the failed store.
    producer.enqueue(Job::builder("rs.boom").args(vec![json!(8)]).retry(0isize).build()).await.unwrap();
    assert!(worker.run_one(0, &["default"]).await.expect("FETCH and FAIL"));
    wait_for("the retry-0 rs.boom job in the failed store", Duration::from_secs(10), || async { !api.failed("rs.boom").await.is_empty() })
        .await;
    let failed = api.failed("rs.boom").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0]["error"].as_str().is_some_and(|e| e.contains("kaboom 8")), "{}", failed[0]);

    // A paused queue hands out nothing until resumed.
    producer.enqueue(Job::new("rs.ok", vec![json!(3), json!("paused")]).on_queue("rs-paused")).await.unwrap();
    admin.queue_pause(&["rs-paused"]).await.expect("QUEUE PAUSE");
    assert!(!worker.run_one(0, &["rs-paused"]).await.expect("FETCH on a paused queue"), "nothing is fetched from a paused queue");
    let q = api.queue("rs-paused").await;
    assert_eq!((q["paused"].as_bool(), q["pending"].as_u64()), (Some(true), Some(1)), "{q}");
    admin.queue_resume(&["rs-paused"]).await.expect("QUEUE RESUME");
    assert!(worker.run_one(0, &["rs-paused"]).await.expect("FETCH after RESUME"), "the job comes once the queue is resumed");
    assert!(seen.lock().unwrap().contains(&vec![json!(3), json!("paused")]));
    assert!(producer.queue_pause(&["default"]).await.is_err(), "the publish token may not pause queues");
}

/// A pyfaktory worker SIGKILLed (with its handler processes) in the middle of 30 one-second jobs:
/// a second worker gets every job, those the first held coming back once its BEATs stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_python_worker_loses_nothing() {
    let Some(lang) = Lang::python() else { return };
    let env = TestEnv::new("");
    let server = Server::start(&env, &tokens()).await;
    let api = server.api();
    let dir = env.dir.path();
    let out = dir.join("out.txt");

    let mut first = lang.worker(&server.url(WORKER), 4, &["py.slow"], &out, dir, "worker-1");
    let pushed =
        lang.produce(&server.url(PUBLISH), &["py.slow", "30", "default", "--tag", "slow", "--sleep", "1"], dir, "producer").await.unwrap();
    assert_eq!(pushed["pushed"], 30, "{pushed}");

    wait_for("4 jobs recorded while others are reserved", Duration::from_secs(60), || async {
        recorded(&out, "slow").len() >= 4 && api.queue("default").await["reserved"].as_u64().unwrap_or(0) > 0
    })
    .await;
    first.kill_group();
    let killed_at = Instant::now();
    let stranded: Vec<Value> = api.jobs("py.slow", "reserved").await;
    let at_kill = distinct(&recorded(&out, "slow")).len();
    assert!(at_kill < 30, "the worker was killed mid-way ({at_kill} done)");
    assert!(!stranded.is_empty(), "the killed worker held reservations");

    let _second = lang.worker(&server.url(WORKER), 4, &["py.slow"], &out, dir, "worker-2");
    let expected: BTreeSet<String> = (0..30).map(|i| format!("slow:{i}")).collect();
    wait_for("every job recorded, the killed worker's too", Duration::from_secs(90), || async {
        distinct(&recorded(&out, "slow")) == expected
    })
    .await;
    eprintln!("all 30 jobs done {:?} after the SIGKILL; {} were reserved by the killed worker", killed_at.elapsed(), stranded.len());
    wait_for("30 completed jobs in the API", Duration::from_secs(30), || async { api.jobs("py.slow", "completed").await.len() >= 30 })
        .await;
    let done = api.jobs("py.slow", "completed").await;
    assert_eq!(done.len(), 30, "each job completed once");
    let ids: BTreeSet<&str> = done.iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids.len(), 30);
    for j in &stranded {
        assert!(done.iter().any(|d| d["id"] == j["id"]), "the stranded job completed: {j}");
    }
}

/// `work --faktory` serves the protocol without the HTTP API, here over TLS (a self-signed
/// certificate made with `openssl`), and pyfaktory's `tcp+tls://` pushes through it; a
/// configuration that cannot work stops start-up naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_serves_faktory_over_tls() {
    let Some(lang) = Lang::python() else { return };
    let env = TestEnv::new("");
    let (cert, key) = (env.dir.path().join("cert.pem"), env.dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match made {
        Ok(s) if s.success() => {}
        other if ci() => panic!("CI needs openssl for the TLS test: {other:?}"),
        other => return eprintln!("skipping: no openssl ({other:?})"),
    }
    // A key without its certificate is refused before anything listens.
    let refused = env.conveyor(&["work", "--faktory"]).env("CONVEYOR_FAKTORY_TLS_KEY", &key).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("CONVEYOR_FAKTORY_TLS_KEY needs CONVEYOR_FAKTORY_TLS_CERT"));

    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let mut cmd = env.conveyor(&["work", "--faktory"]);
    cmd.env("CONVEYOR_FAKTORY_ADDR", format!("127.0.0.1:{port}")).env("CONVEYOR_API_TOKEN", ADMIN);
    cmd.env("CONVEYOR_FAKTORY_TLS_CERT", &cert).env("CONVEYOR_FAKTORY_TLS_KEY", &key);
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawning conveyor work --faktory");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let said = loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("speaks Faktory on") => break line,
            Some(Ok(_)) => continue,
            _ => panic!("work --faktory exited before it listened: {:?}", child.wait()),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let _work = crate::Proc(child);
    assert!(said.contains(&format!("tcp+tls://127.0.0.1:{port}")), "{said}");

    let url = format!("tcp+tls://:{ADMIN}@127.0.0.1:{port}");
    let mut pushed = None;
    for _ in 0..50 {
        match lang.produce(&url, &["py.ok", "4", "default", "--tag", "tls"], env.dir.path(), "tls-producer").await {
            Ok(v) => {
                pushed = Some(v);
                break;
            }
            // The listener may not be accepting yet right after its line.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let pushed = pushed.expect("pyfaktory pushed over TLS");
    assert_eq!(pushed["pushed"], 4, "{pushed}");
    assert_eq!(pushed["info"]["faktory"]["queues"]["default"], 4, "{pushed}");
    // Remote jobs wait in the queue's remote lane (`conveyor_core::lane`).
    assert_eq!(env.queue("default@remote").await.pending, 4);
}

/// A remote job that no worker in another language is connected to fetch says so on its page
/// and in the API; local jobs never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_job_without_a_remote_worker_says_why_it_waits() {
    let env = TestEnv::new("");
    let server = Server::start(&env, &tokens()).await;
    let api = server.api();
    let mut producer = faktory::Client::connect_to(&server.url(PUBLISH)).await.expect("HELLO with the publish token");
    producer.enqueue(Job::builder("rs.lonely").queue("lonely").args(vec![json!(1)]).build()).await.expect("PUSH");
    let jobs = api.jobs("rs.lonely", "pending").await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["queue"], "lonely", "the lane is folded into its queue");
    let job = api.data(&format!("/api/jobs/{}", jobs[0]["id"].as_str().unwrap())).await;
    assert_eq!((job["remote"].as_bool(), job["waiting"]["reason"].as_str()), (Some(true), Some("no_worker")), "{job}");
    assert!(job["waiting"]["detail"].as_str().unwrap().contains("no Faktory worker is connected"), "{job}");
}

/// The Rust client end to end on the two scale-out stores not covered above: PostgreSQL, and
/// RabbitMQ (its ledger in SQLite). Every job is acknowledged once, a failure lands in the
/// failed store, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_works_on_postgres_and_on_rabbitmq() {
    let mut envs = Vec::new();
    match TestEnv::postgres("", None) {
        Some(env) => envs.push(("postgres", env)),
        None if ci() => panic!("CI needs the local PostgreSQL"),
        None => eprintln!("skipping PostgreSQL: no server"),
    }
    match conveyor_backends::amqp::testing::TestAmqp::create() {
        Some(mut amqp) => {
            amqp.cleanup.extend(["default".to_string(), "default@remote".to_string()]);
            envs.push(("amqp", TestEnv::amqp("", amqp)));
        }
        None if ci() => panic!("CI needs the local RabbitMQ"),
        None => eprintln!("skipping RabbitMQ: no broker"),
    }
    for (name, env) in envs {
        let server = Server::start(&env, &tokens()).await;
        let api = server.api();
        let mut producer = faktory::Client::connect_to(&server.url(PUBLISH)).await.expect("HELLO");
        let jobs: Vec<Job> = (0..20).map(|i| Job::new("rs.scale", vec![json!(i)])).collect();
        assert_eq!(producer.enqueue_many(jobs).await.expect("PUSHB").0, 20, "{name}");
        producer.enqueue(Job::builder("rs.fails").args(vec![json!(0)]).retry(0).build()).await.expect("PUSH");
        let ran: Arc<Mutex<Vec<i64>>> = Arc::default();
        let record = Arc::clone(&ran);
        let mut worker = Worker::builder::<std::io::Error>()
            .register_fn("rs.scale", move |job| {
                let record = Arc::clone(&record);
                async move {
                    record.lock().unwrap().push(job.args()[0].as_i64().unwrap());
                    Ok(())
                }
            })
            .register_fn("rs.fails", |_| async move { Err(std::io::Error::other("no luck")) })
            .connect_to(&server.url(WORKER))
            .await
            .expect("HELLO with the worker token");
        for _ in 0..21 {
            assert!(worker.run_one(0, &["default"]).await.expect("FETCH, then ACK or FAIL"), "{name}: a job was fetched");
        }
        let mut got = ran.lock().unwrap().clone();
        got.sort();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "{name}: every job ran once");
        wait_for("the outcomes to be recorded", Duration::from_secs(20), || async {
            api.jobs("rs.scale", "completed").await.len() == 20 && api.failed("rs.fails").await.len() == 1
        })
        .await;
        let failed = api.failed("rs.fails").await;
        assert!(failed[0]["error"].as_str().unwrap().contains("no luck"), "{name}: {failed:?}");
        assert_eq!(api.queue("default").await["pending"], 0, "{name}");
    }
}
