//! Real servers on loopback for the notification tests: an HTTP receiver (Slack-like, webhook
//! with signature check, Twilio-shaped SMS gateway) and an SMTP sink.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What the HTTP receiver got, and how it answers.
#[derive(Default)]
pub(crate) struct Inbox {
    /// (path, headers as lowercase name → value, body).
    pub(crate) requests: Vec<(String, HashMap<String, String>, String)>,
    /// Per path: how many more requests get a 500.
    pub(crate) fail: HashMap<String, u32>,
}

pub(crate) type Shared = Arc<Mutex<Inbox>>;

async fn receive(State(s): State<Shared>, Path(path): Path<String>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let mut inbox = s.lock().unwrap();
    let h = headers.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string())).collect();
    inbox.requests.push((path.clone(), h, String::from_utf8_lossy(&body).into_owned()));
    if let Some(n) = inbox.fail.get_mut(&path) {
        if *n > 0 {
            *n -= 1;
            return (StatusCode::INTERNAL_SERVER_ERROR, "provider down".to_string());
        }
    }
    let n = inbox.requests.len();
    (StatusCode::OK, if path.ends_with("Messages") { format!("{{\"sid\":\"SM{n:05}\"}}") } else { "ok".into() })
}

/// An HTTP receiver on a free port; every path is recorded (`POST /{*path}`).
pub(crate) async fn http() -> (String, Shared) {
    let shared: Shared = Arc::default();
    let app = Router::new().route("/{*path}", post(receive)).with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), shared)
}

/// A minimal SMTP server that accepts every message and keeps its DATA.
pub(crate) async fn smtp() -> (u16, Arc<Mutex<Vec<String>>>) {
    let mails: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let store = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let store = store.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"220 sink ESMTP\r\n").await.ok();
                while let Ok(Some(line)) = lines.next_line().await {
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("DATA") {
                        w.write_all(b"354 go on\r\n").await.ok();
                        let mut data = String::new();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            data.push_str(&l);
                            data.push('\n');
                        }
                        store.lock().unwrap().push(data);
                        b"250 queued\r\n"
                    } else if cmd.starts_with("QUIT") {
                        w.write_all(b"221 bye\r\n").await.ok();
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    w.write_all(reply).await.ok();
                }
            });
        }
    });
    (port, mails)
}
