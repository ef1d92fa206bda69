//! Access through `conveyor serve` on a real socket: tokens with roles on every route, the
//! dashboard's server-side sessions, what the read role may not see, and the loopback
//! default's defences against web pages (Host allow-list, cross-site and content-type checks),
//! the header-read timeout and the connection limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use conveyor_core::NewJob;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::http::serve;
use crate::{sigterm, wait_exit, TestEnv};

const ADMIN: &str = "admin-0123456789";
const READ: &str = "read-0123456789";
const PUBLISH: &str = "publish-0123456789";
const WORKER: &str = "worker-0123456789";

fn tokens() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CONVEYOR_API_TOKEN", ADMIN),
        ("CONVEYOR_READ_TOKEN", READ),
        ("CONVEYOR_PUBLISH_TOKEN", PUBLISH),
        ("CONVEYOR_WORKER_TOKEN", WORKER),
    ]
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_token_of_a_role_that_may_call_it() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &tokens());
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut r = http.get(format!("{url}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    // Reads are closed without a token; a wrong one is no better.
    for path in ["/api/queues", "/api/jobs", "/api/stats", "/api/v1/notifications", "/api/openapi.json", "/metrics"] {
        assert_eq!(get(path, None).await.unwrap().status(), StatusCode::UNAUTHORIZED, "{path} without a token");
        assert_eq!(get(path, Some("wrong-token")).await.unwrap().status(), StatusCode::UNAUTHORIZED, "{path} with a wrong token");
        assert_eq!(get(path, Some(READ)).await.unwrap().status(), StatusCode::OK, "{path} with the read token");
        assert_eq!(get(path, Some(ADMIN)).await.unwrap().status(), StatusCode::OK, "{path} with the admin token");
    }
    let r = get("/api/queues", None).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "unauthorized");
    assert_eq!(get("/api/queues", Some(PUBLISH)).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(get("/api/queues", Some(WORKER)).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(get("/metrics", Some(PUBLISH)).await.unwrap().status(), StatusCode::FORBIDDEN);

    // Health: the status to anyone, the checks with a token.
    let open: Value = get("/health", None).await.unwrap().json().await.unwrap();
    assert!(open["data"]["status"].is_string());
    assert!(open["data"].get("checks").is_none(), "{open}");
    let full: Value = get("/api/health", Some(READ)).await.unwrap().json().await.unwrap();
    assert_eq!(full["data"]["checks"]["database"]["status"], "ok");

    // Writes: the admin; never the read token; the publish token on the publishing routes only.
    let pause = |token: &'static str| http.post(format!("{url}/api/queues/default/pause")).bearer_auth(token).send();
    assert_eq!(pause(READ).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(pause(PUBLISH).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(pause(ADMIN).await.unwrap().status(), StatusCode::OK);
    let event = |token: &'static str| {
        http.post(format!("{url}/api/events")).bearer_auth(token).json(&json!({ "event": "order_shipped", "payload": {} })).send()
    };
    assert_eq!(event(PUBLISH).await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(event(READ).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(event(WORKER).await.unwrap().status(), StatusCode::FORBIDDEN);
    let r =
        http.post(format!("{url}/api/v1/users/register")).bearer_auth(PUBLISH).json(&json!({ "name": "Ann", "email": "ann@example.com" }));
    let user: Value = r.send().await.unwrap().json().await.unwrap();
    let uid = user["data"]["user_id"].as_i64().expect("the publish token registers users");
    assert_eq!(get(&format!("/api/v1/users/{uid}/inbox"), Some(PUBLISH)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/api/v1/notifications", Some(PUBLISH)).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(get("/api/jobs/failed", Some(PUBLISH)).await.unwrap().status(), StatusCode::FORBIDDEN);

    // A job the publisher created can be read back by it, by id.
    let id = env.backend.enqueue(vec![NewJob::new("conveyor.noop", &json!({})).queue("elsewhere")]).await.unwrap()[0].id();
    assert_eq!(get(&format!("/api/jobs/{id}"), Some(PUBLISH)).await.unwrap().status(), StatusCode::OK);

    // The seed's GET that acts is off whenever a token is set.
    assert_eq!(get("/trigger-sync", None).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(get("/trigger-sync", Some(ADMIN)).await.unwrap().status(), StatusCode::FORBIDDEN);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_sees_no_secret() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &tokens());
    let http = reqwest::Client::new();
    let payload = json!({
        "webhook_url": "https://hooks.example.com/services/T0/B0/hook-path-secret",
        "api_key": "partner-key-secret",
        "callback": "https://svc:svc-password@partner.example/cb?token=query-secret&page=2",
        "email": "ann@example.com",
    });
    let id = env.backend.enqueue(vec![NewJob::new("conveyor.noop", &payload).queue("elsewhere")]).await.unwrap()[0].id();
    let as_read = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(READ).send().await.unwrap().text().await.unwrap();
    for secret in ["hook-path-secret", "partner-key-secret", "svc-password", "query-secret"] {
        assert!(!as_read.contains(secret), "the read token saw {secret}: {as_read}");
    }
    let v: Value = serde_json::from_str(&as_read).unwrap();
    assert_eq!(v["data"]["payload"]["webhook_url"], "https://hooks.example.com/…");
    assert_eq!(v["data"]["payload"]["email"], "ann@example.com", "what is not a secret stays");
    let as_admin = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    assert!(as_admin.contains("hook-path-secret") && as_admin.contains("partner-key-secret"), "the admin sees all: {as_admin}");

    // A webhook rule's URL: the origin only, in the list and by id.
    let post = |path: &str, body: Value| http.post(format!("{url}{path}")).bearer_auth(ADMIN).json(&body).send();
    let t: Value =
        post("/api/templates", json!({ "name": "hook", "channel": "webhook", "body": "hi" })).await.unwrap().json().await.unwrap();
    let tid = t["data"]["id"].as_i64().unwrap();
    let rule = json!({ "event": "e", "template_id": tid, "channel": "webhook", "recipient": "https://hooks.example.com/rule-path-secret" });
    let r: Value = post("/api/rules", rule).await.unwrap().json().await.unwrap();
    let rid = r["data"]["id"].as_i64().unwrap();
    for path in ["/api/rules".to_string(), format!("/api/rules/{rid}")] {
        let body = http.get(format!("{url}{path}")).bearer_auth(READ).send().await.unwrap().text().await.unwrap();
        assert!(!body.contains("rule-path-secret"), "{path}: {body}");
        assert!(body.contains("https://hooks.example.com/…"), "{path}: {body}");
    }
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_keeps_a_server_side_session_not_the_token() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &tokens());
    let http = no_redirects();

    let r = http.get(format!("{url}/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "unauthenticated dashboard redirects");
    assert_eq!(r.headers()["location"], "/dashboard/login");
    let login = |token: &str| http.post(format!("{url}/dashboard/login")).form(&[("token", token)]).send();
    let r = login("nope").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap().contains("not right"));
    assert_eq!(login(WORKER).await.unwrap().status(), StatusCode::FORBIDDEN, "the worker token opens no dashboard");

    let r = login(ADMIN).await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Max-Age="), "{cookie}");
    assert!(!cookie.contains(ADMIN), "the cookie carries a session, not the token: {cookie}");
    let admin = cookie.split(';').next().unwrap().to_string();
    let page = http.get(format!("{url}/dashboard")).header("cookie", &admin).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("data-role=\"admin\""));

    // The dashboard's writes: the session plus its header. The cookie alone is refused.
    let pause = |cookie: &str, header: bool| {
        let mut r = http.post(format!("{url}/api/queues/default/pause")).header("cookie", cookie);
        if header {
            r = r.header("x-conveyor-dashboard", "1");
        }
        r.send()
    };
    assert_eq!(pause(&admin, false).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(pause(&admin, true).await.unwrap().status(), StatusCode::OK);
    let stats = http.get(format!("{url}/api/stats")).header("cookie", &admin).send().await.unwrap();
    assert_eq!(stats.status(), StatusCode::OK, "reads with the session");

    // The read token's dashboard: its page hides the buttons and the API refuses its writes.
    let read = login(READ).await.unwrap().headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let page = http.get(format!("{url}/dashboard")).header("cookie", &read).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("data-role=\"read\""), "{page}");
    assert_eq!(pause(&read, true).await.unwrap().status(), StatusCode::FORBIDDEN);

    // The session lives in the store: another `serve` on the same store accepts it.
    let (mut other, other_url) = serve(&env, &tokens());
    let r = http.get(format!("{other_url}/api/queues")).header("cookie", &admin).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Logging out ends the session everywhere.
    let r = http.post(format!("{url}/dashboard/logout")).header("cookie", &admin).send().await.unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(
        http.get(format!("{other_url}/api/queues")).header("cookie", &admin).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(http.get(format!("{url}/dashboard")).header("cookie", &admin).send().await.unwrap().status(), StatusCode::SEE_OTHER);
    sigterm(&other);
    sigterm(&child);
    assert!(wait_exit(&mut other, Duration::from_secs(30)).await.success());
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_default_refuses_other_hosts_other_sites_and_other_content_types() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[]);
    let http = no_redirects();
    let port = url.rsplit(':').next().unwrap().to_string();

    // DNS rebinding: a page of evil.example whose name now points at 127.0.0.1.
    let r = http.get(format!("{url}/api/queues")).header("host", format!("evil.example:{port}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "forbidden");
    let r = http.get(format!("{url}/api/queues")).header("host", format!("localhost:{port}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Cross-site writes, whatever their shape.
    let pause = || http.post(format!("{url}/api/queues/default/pause"));
    for (name, value) in
        [("origin", "http://evil.example"), ("origin", "null"), ("sec-fetch-site", "cross-site"), ("sec-fetch-site", "same-site")]
    {
        let r = pause().header(name, value).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}: {value}");
    }
    assert_eq!(pause().header("origin", url.as_str()).send().await.unwrap().status(), StatusCode::OK, "same origin");
    assert_eq!(pause().header("sec-fetch-site", "same-origin").send().await.unwrap().status(), StatusCode::OK);
    let r = http.get(format!("{url}/trigger-sync")).header("origin", "http://evil.example").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the GET that acts is a write too");
    let r = http.get(format!("{url}/trigger-sync")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "sync not configured is a configuration state");

    // A form or text/plain body (what a page can send without asking) is not JSON here.
    let body = r#"{"event":"x","payload":{}}"#;
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let r = http.post(format!("{url}/api/events")).header("content-type", ct).body(body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        assert_eq!(r.json::<Value>().await.unwrap()["success"], false);
    }
    let r = http.post(format!("{url}/api/events")).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "no content type");
    let r = http.post(format!("{url}/api/events")).header("content-type", "application/json").body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = http.post(format!("{url}/api/orders/import")).header("content-type", "text/plain").body("order_id\n").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "the import takes CSV");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[("CONVEYOR_HTTP_MAX_CONNECTIONS", "2")]);
    let addr = url.trim_start_matches("http://").to_string();

    // A client that trickles its headers is disconnected after the header-read timeout. It and
    // an idle connection take both slots (connected first, so accepted first): a third client
    // waits for one of them to close.
    let mut s = TcpStream::connect(&addr).unwrap();
    let idle = TcpStream::connect(&addr).unwrap();
    let slow = {
        tokio::task::spawn_blocking(move || {
            s.write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
            let started = Instant::now();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            (started.elapsed(), buf)
        })
    };
    let capped = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    assert!(capped.get(format!("{url}/api/health")).send().await.is_err(), "a third connection is not served while two are open");
    let (elapsed, answer) = slow.await.unwrap();
    assert!(elapsed < Duration::from_secs(30), "the slow client was cut off after {elapsed:?}");
    assert!(!String::from_utf8_lossy(&answer).contains("\"success\":true"), "it got no answer");
    drop(idle);
    let fresh = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    assert_eq!(fresh.get(format!("{url}/api/health")).send().await.unwrap().status(), StatusCode::OK, "served once slots are free");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}
