//! No configured secret reaches the log, a stored error or an API answer: a `conveyor serve`
//! with every credential set runs deliveries and a product sync against a hostile partner that
//! answers 500 with everything it was sent (headers, URL, body) echoed back, at debug level;
//! then its whole log and the admin's view of the errors are searched for each secret.

use std::process::Stdio;
use std::time::Duration;

use axum::http::{HeaderMap, Uri};
use serde_json::{json, Value};

use crate::{sigterm, wait_exit, Proc, TestEnv};

/// A partner that fails every request and echoes what it got, as a hostile or careless
/// service would (error pages that quote the request are common).
async fn echoing_partner() -> String {
    let app = axum::Router::new().fallback(|uri: Uri, headers: HeaderMap, body: String| async move {
        let mut echo = format!("failed: {uri}\n");
        for (k, v) in &headers {
            echo.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("")));
        }
        echo.push_str(&body);
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, echo)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_appears_in_the_log_or_the_stored_errors() {
    let env = TestEnv::new("");
    let partner = echoing_partner().await;
    let smtp_port = closed_port();
    let secrets: Vec<(&str, String)> = vec![
        ("CONVEYOR_API_TOKEN", "admin-token-s3cr3t-0001".into()),
        ("CONVEYOR_READ_TOKEN", "read-token-s3cr3t-0002".into()),
        ("CONVEYOR_PUBLISH_TOKEN", "publish-token-s3cr3t-0003".into()),
        ("CONVEYOR_WORKER_TOKEN", "worker-token-s3cr3t-0004".into()),
        ("CONVEYOR_SMTP_URL", format!("smtp://mailer:smtp-password-s3cr3t-0005@127.0.0.1:{smtp_port}")),
        ("CONVEYOR_SMS_TOKEN", "sms-token-s3cr3t-0006".into()),
        ("CONVEYOR_SLACK_WEBHOOK", format!("{partner}/services/T000/B000/slack-path-s3cr3t-0007")),
        ("CONVEYOR_WEBHOOK_SECRET", "webhook-secret-s3cr3t-0008".into()),
        ("CONVEYOR_SYNC_SOURCE_TOKEN", "source-token-s3cr3t-0009".into()),
        ("CONVEYOR_SYNC_TARGET_KEY", "target-key-s3cr3t-0010".into()),
    ];
    // What must never be seen: the secret values themselves (for URLs, the secret part).
    let needles = [
        "admin-token-s3cr3t-0001",
        "read-token-s3cr3t-0002",
        "publish-token-s3cr3t-0003",
        "worker-token-s3cr3t-0004",
        "smtp-password-s3cr3t-0005",
        "sms-token-s3cr3t-0006",
        "slack-path-s3cr3t-0007",
        "webhook-secret-s3cr3t-0008",
        "source-token-s3cr3t-0009",
        "target-key-s3cr3t-0010",
    ];
    let admin = "admin-token-s3cr3t-0001";

    let log_path = env.dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = env.conveyor(&["serve"]);
    cmd.env("CONVEYOR_HTTP_ADDR", "127.0.0.1:0")
        .env("CONVEYOR_LOG", "debug")
        .env("CONVEYOR_MAILER", "smtp")
        .env("CONVEYOR_SMS_URL", format!("{partner}/sms"))
        .env("CONVEYOR_NOTIFY_MAX_ATTEMPTS", "2")
        .env("CONVEYOR_NOTIFY_BACKOFF", "0")
        .env("CONVEYOR_SYNC_SOURCE_URL", format!("{partner}/source"))
        .env("CONVEYOR_SYNC_TARGET_URL", format!("{partner}/target"))
        .env("CONVEYOR_SYNC_MAX_ATTEMPTS", "2")
        .env("CONVEYOR_OUTBOUND_ALLOW", "127.0.0.1/32");
    for (k, v) in &secrets {
        cmd.env(k, v);
    }
    let mut child = Proc(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap());
    let mut url = None;
    crate::wait_for("serve to listen", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        url = text.split("listening on ").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_string);
        std::future::ready(url.is_some())
    })
    .await;
    let url = url.unwrap();
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| http.post(format!("{url}{path}")).bearer_auth(admin).json(&body).send();

    // Email (SMTP refused), SMS and Slack (the echoing partner) for one user; a signed webhook too.
    let r: Value = post(
        "/api/v1/users/register",
        json!({ "name": "Ann", "email": "ann@example.com", "phone": "+15550100", "webhook_url": format!("{partner}/hook") }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let uid = r["data"]["user_id"].as_i64().unwrap_or_else(|| panic!("registered: {r}"));
    for channel in ["sms", "slack", "webhook"] {
        let t: Value =
            post("/api/templates", json!({ "name": channel, "channel": channel, "body": "hello" })).await.unwrap().json().await.unwrap();
        let tid = t["data"]["id"].as_i64().unwrap_or_else(|| panic!("template: {t}"));
        let r = post("/api/rules", json!({ "event": "alert", "template_id": tid, "channel": channel })).await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    assert_eq!(post("/api/events", json!({ "event": "alert", "payload": { "user_id": uid } })).await.unwrap().status(), 202);
    assert_eq!(post("/api/sync/products", json!({})).await.unwrap().status(), 202);

    // Every delivery has failed for good (two tries each), and the sync run has ended.
    crate::wait_for("the deliveries to fail", Duration::from_secs(60), || async {
        let logs: Value = http
            .get(format!("{url}/api/v1/notifications?user_id={uid}&status=failed"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        logs["meta"]["total"].as_u64().unwrap_or(0) >= 4
    })
    .await;
    crate::wait_for("the sync run to end", Duration::from_secs(60), || async {
        let runs: Value = http.get(format!("{url}/api/sync/runs")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
        runs["data"][0]["status"].as_str().is_some_and(|s| s != "running")
    })
    .await;

    // What an admin reads back: the delivery log, failed jobs, job errors, sync health and runs.
    let mut answers = String::new();
    for path in [
        format!("/api/v1/notifications?user_id={uid}"),
        "/api/jobs/failed".to_string(),
        "/api/jobs?per_page=1000".to_string(),
        "/api/sync/runs".to_string(),
        "/api/sync/health".to_string(),
        "/api/breakers".to_string(),
    ] {
        answers.push_str(&http.get(format!("{url}{path}")).bearer_auth(admin).send().await.unwrap().text().await.unwrap());
    }
    assert!(answers.contains("\"failed\""), "the failures are there to look at: {answers}");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("DEBUG"), "the log ran at debug level");
    for secret in needles {
        assert!(
            !log.contains(secret),
            "the log shows {secret}:\n{}",
            log.lines().filter(|l| l.contains(secret)).take(5).collect::<Vec<_>>().join("\n")
        );
        assert!(!answers.contains(secret), "an API answer shows {secret}");
    }
}
