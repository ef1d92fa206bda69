//! The one access check of the HTTP API (SPEC "Access and outbound safety"): tokens with
//! roles, dashboard sessions, the `Host` allow-list against DNS rebinding, and the cross-site
//! and content-type checks that keep a web page the operator visits from driving the API.
//!
//! Every request passes [`guard`] before any handler runs. What a role may do is decided here,
//! from the method and the path, and nowhere else; what a role may *see* is filtered here too
//! ([`redact_response`]): only the admin reads secrets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use conveyor_core::backend::QueueBackend;

use crate::error::ApiError;
use crate::AppState;

mod filter;
mod session;

pub(crate) use filter::{redact_response, Filter};
pub(crate) use session::{close_session, open_session, MIGRATIONS};
use session::{session_cookie, session_role};

/// What a token lets its holder do (the SPEC's role table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything, secrets included.
    Admin,
    /// Every read, `/metrics`, the dashboard without its buttons; never a secret.
    Read,
    /// The application back end: events, jobs, batches, orders, users' inbox and preferences.
    Publish,
    /// Workers in other languages, over the Faktory port only.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Read => "read",
            Role::Publish => "publish",
            Role::Worker => "worker",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [Role::Admin, Role::Read, Role::Publish, Role::Worker].into_iter().find(|r| r.as_str() == s)
    }
}

/// A credential that never prints.
#[derive(Clone)]
pub struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The access settings of a server.
#[derive(Clone, Debug, Default)]
pub struct AccessConfig {
    /// `CONVEYOR_API_TOKEN`, `CONVEYOR_READ_TOKEN`, `CONVEYOR_PUBLISH_TOKEN`, `CONVEYOR_WORKER_TOKEN`.
    pub admin_token: Option<String>,
    pub read_token: Option<String>,
    pub publish_token: Option<String>,
    pub worker_token: Option<String>,
    /// `CONVEYOR_ALLOWED_HOSTS`: `Host` names answered besides loopback names and the bound address.
    pub allowed_hosts: Vec<String>,
    /// The address the server is bound to (its IP is an accepted `Host`; an unspecified
    /// address such as `0.0.0.0` accepts every IP literal, since a rebinding attack needs a name).
    pub bound: Option<SocketAddr>,
    /// How long a dashboard session lasts (default 12 h).
    pub session_ttl: Option<Duration>,
}

impl AccessConfig {
    /// Only an admin token (what tests and embedders most often need).
    pub fn admin(token: Option<String>) -> Self {
        AccessConfig { admin_token: token, ..AccessConfig::default() }
    }
}

/// The access settings as the guard uses them.
pub(crate) struct Access {
    tokens: Vec<(Role, Secret)>,
    allowed_hosts: Vec<String>,
    bound: Option<IpAddr>,
    session_ttl: Duration,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("roles", &self.tokens.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>()).finish()
    }
}

impl Access {
    pub(crate) fn new(c: AccessConfig) -> Self {
        let tokens =
            [(Role::Admin, c.admin_token), (Role::Read, c.read_token), (Role::Publish, c.publish_token), (Role::Worker, c.worker_token)]
                .into_iter()
                .filter_map(|(role, t)| t.filter(|t| !t.is_empty()).map(|t| (role, Secret(t))))
                .collect();
        let allowed_hosts = c.allowed_hosts.iter().filter_map(|h| host_name(h)).collect();
        Access {
            tokens,
            allowed_hosts,
            bound: c.bound.map(|a| a.ip()),
            session_ttl: c.session_ttl.unwrap_or(Duration::from_secs(12 * 3600)),
        }
    }

    /// Whether any token is configured: then every API call needs one.
    pub(crate) fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The role of a presented token. Every configured token is compared, each in constant
    /// time, so neither the answer's timing nor which token matched leaks how close a guess was.
    pub(crate) fn role_of(&self, given: &str) -> Option<Role> {
        let mut found = None;
        for (role, secret) in &self.tokens {
            if constant_time_eq(given.as_bytes(), secret.0.as_bytes()) && found.is_none() {
                found = Some(*role);
            }
        }
        found
    }

    /// Whether a request's `Host` may be answered: a loopback name or address, the bound
    /// address, or one the operator allowed. A request without `Host` (not a browser's) passes.
    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(raw) = headers.get(header::HOST) else { return true };
        let Some(host) = raw.to_str().ok().and_then(host_name) else { return false };
        if host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return ip.is_loopback()
                || self.bound.is_some_and(|b| b == ip || b.is_unspecified())
                || self.allowed_hosts.iter().any(|h| h == &host);
        }
        self.allowed_hosts.iter().any(|h| h == &host)
    }
}

/// A `Host` header's (or an allow-list entry's) name, lower case, without port or final dot.
fn host_name(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.contains(['/', '@', ' ']) {
        return None;
    }
    let name = if raw.starts_with('[') {
        // `[::1]:8000`
        let end = raw.find(']')?;
        &raw[..=end]
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    Some(name.trim_end_matches('.').to_ascii_lowercase())
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// Who is asking, as the guard established it; handlers read it from the request extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Principal {
    /// `None`: no valid credential (only open routes get that far).
    pub(crate) role: Option<Role>,
    /// Whether tokens are configured at all (without them the loopback caller is the admin).
    pub(crate) tokens: bool,
}

impl Principal {
    /// Whether the caller may see the details that need a token (health checks).
    pub(crate) fn authenticated(&self) -> bool {
        !self.tokens || self.role.is_some()
    }
}

/// Every request's gate: the `Host`, cross-site and content-type checks, then who is asking
/// and whether that role may call this route; non-admin answers are filtered of secrets.
pub(crate) async fn guard(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let access = s.access.clone();
    let headers = req.headers();
    if !access.host_allowed(headers) {
        return ApiError::Forbidden("this Host is not served here: add it to CONVEYOR_ALLOWED_HOSTS".into()).into_response();
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if state_changing(&method, &path) && cross_site(headers) {
        return ApiError::Forbidden("cross-site requests cannot change anything".into()).into_response();
    }
    if let Err(e) = content_type_ok(&method, &path, headers) {
        return e.into_response();
    }

    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
    // A wrong bearer token is no credential: open routes answer as to anyone, the rest 401.
    let role = if !access.enabled() {
        Some(Role::Admin)
    } else if let Some(given) = bearer {
        access.role_of(given)
    } else {
        match session_cookie(headers) {
            // The dashboard's own requests carry `X-Conveyor-Dashboard`, a header no other
            // site can make a browser send; its pages are plain navigations.
            Some(id) if method == Method::GET || method == Method::HEAD || headers.contains_key("x-conveyor-dashboard") => {
                session_role(s.conveyor.backend().as_ref(), &id).await
            }
            _ => None,
        }
    };
    let principal = Principal { role, tokens: access.enabled() };
    req.extensions_mut().insert(principal);

    match route_class(&path) {
        Class::Open => return next.run(req).await,
        Class::DashboardPage => {
            return match role {
                Some(Role::Admin | Role::Read) => next.run(req).await,
                _ => Redirect::to("/dashboard/login").into_response(),
            };
        }
        Class::Api => {}
    }
    let Some(role) = role else { return ApiError::Unauthorized.into_response() };
    if let Err(why) = permitted(role, &method, &path) {
        return ApiError::Forbidden(why.into()).into_response();
    }
    let res = next.run(req).await;
    // Reads are filtered: of the process's own credentials for everyone (an operator's Slack URL
    // in a delivery log, a partner key quoted by a partner's error), and of every secret-like
    // field for the roles that may see no secret. The admin's reveal of a secret is the exception.
    let read = method == Method::GET || method == Method::HEAD;
    let filter = match role {
        Role::Admin if read && !is_secret_path(&path) => Filter::Credentials,
        Role::Admin => return res,
        _ => Filter::Secrets,
    };
    redact_response(res, filter).await
}

fn is_secret_path(path: &str) -> bool {
    path.ends_with("/secret") || path.contains("/secret/")
}

enum Class {
    /// Answered to anyone (health reduces itself; the login page; the redirect to it).
    Open,
    /// Dashboard pages: a session of the admin or read role, else the login page.
    DashboardPage,
    /// Everything else: a role that may call it.
    Api,
}

fn route_class(path: &str) -> Class {
    match path {
        "/health" | "/api/health" | "/" | "/dashboard/login" | "/dashboard/logout" | "/dashboard/app.css" => Class::Open,
        // Refused by its handler whenever a token is set; on loopback without tokens it is the
        // seed's demo call.
        "/trigger-sync" => Class::Open,
        p if p == "/dashboard" || p.starts_with("/dashboard/") => Class::DashboardPage,
        _ => Class::Api,
    }
}

/// What a role may call (the SPEC's role table), by method and path.
fn permitted(role: Role, method: &Method, path: &str) -> Result<(), &'static str> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let secret = is_secret_path(path);
    match role {
        Role::Admin => Ok(()),
        Role::Read if read && !secret => Ok(()),
        Role::Read => Err("the read token cannot change anything or see secrets"),
        Role::Publish if publish_may(method, path) => Ok(()),
        Role::Publish => Err("the publish token may only publish events, jobs, batches and orders, and read what it published"),
        Role::Worker => Err("the worker token is for the Faktory port"),
    }
}

/// The application back end's routes: publishing work, and reading back what it published.
fn publish_may(method: &Method, path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (get, put, post) = (*method == Method::GET || *method == Method::HEAD, *method == Method::PUT, *method == Method::POST);
    match parts.as_slice() {
        ["api", "events" | "jobs" | "batches" | "orders"] => post,
        ["api", "jobs", "bulk"] | ["api", "orders", "import"] | ["api", "v1", "users", "register"] => post,
        ["api", "jobs", id] => get && *id != "failed",
        ["api", "batches", _] => get,
        ["api", "openapi.json"] => get,
        ["api", "v1", "users", _, "preferences"] => get || put,
        ["api", "v1", "users", _, "inbox"] => get,
        ["api", "v1", "users", _, "inbox", _, "read"] => post,
        _ => false,
    }
}

/// Whether a request changes state: anything but a read, and the GETs that act.
fn state_changing(method: &Method, path: &str) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) || path == "/trigger-sync" || path == "/dashboard/logout"
}

/// A browser's request from another site: an `Origin` that is `null` or not the request's own
/// `Host`, or `Sec-Fetch-Site: cross-site | same-site`. `curl` and servers send neither.
fn cross_site(headers: &HeaderMap) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).unwrap_or("");
    if fetch_site.eq_ignore_ascii_case("cross-site") || fetch_site.eq_ignore_ascii_case("same-site") {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return false };
    let Ok(origin) = origin.to_str() else { return true };
    let Some(authority) = origin.split_once("://").map(|(_, a)| a.trim_end_matches('/')) else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    !authority.eq_ignore_ascii_case(host)
}

/// JSON endpoints take JSON only: a form or `text/plain` body (what a page on another site can
/// send without asking) is refused before any handler parses it. Body-less requests pass; the
/// CSV import and the login form keep their own types.
fn content_type_ok(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let declared_len = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let has_body = declared_len.is_some_and(|n| n > 0) || headers.contains_key(header::TRANSFER_ENCODING);
    if !has_body {
        return Ok(());
    }
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim().to_string();
    let accepted = match path {
        "/api/orders/import" => matches!(essence.as_str(), "text/csv" | "application/csv" | "multipart/form-data"),
        "/dashboard/login" => essence == "application/x-www-form-urlencoded",
        _ => essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")),
    };
    if accepted {
        return Ok(());
    }
    let expected = match path {
        "/api/orders/import" => "text/csv or multipart/form-data",
        "/dashboard/login" => "application/x-www-form-urlencoded",
        _ => "application/json",
    };
    let got = if essence.is_empty() { "none".to_string() } else { essence };
    Err(ApiError::UnsupportedMediaType(format!("Content-Type must be {expected} (got {got})")))
}

pub async fn migrate(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<Vec<u32>> {
    conveyor_core::migrate::apply(backend, "server", MIGRATIONS).await
}

/// The shared handle the state keeps.
pub(crate) type SharedAccess = Arc<Access>;

#[cfg(test)]
mod tests {
    use super::*;

    fn access(bound: &str, allowed: &[&str]) -> Access {
        Access::new(AccessConfig {
            admin_token: Some("admin-token-1".into()),
            read_token: Some("read-token-1".into()),
            publish_token: Some("publish-token-1".into()),
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            bound: Some(bound.parse().unwrap()),
            ..AccessConfig::default()
        })
    }

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, h.parse().unwrap());
        m
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn tokens_map_to_roles() {
        let a = access("127.0.0.1:8000", &[]);
        assert_eq!(a.role_of("admin-token-1"), Some(Role::Admin));
        assert_eq!(a.role_of("read-token-1"), Some(Role::Read));
        assert_eq!(a.role_of("publish-token-1"), Some(Role::Publish));
        assert_eq!(a.role_of("worker-token-1"), None);
        assert_eq!(a.role_of(""), None);
    }

    #[test]
    fn hosts_are_loopback_the_bound_address_or_allowed() {
        let a = access("127.0.0.1:8000", &["conveyor.example.com", "Queue.Internal:443"]);
        for ok in ["localhost:8000", "LOCALHOST.", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000", "conveyor.example.com", "queue.internal"] {
            assert!(a.host_allowed(&host(ok)), "{ok} should be served");
        }
        for bad in ["evil.example", "127.0.0.1.nip.io", "10.0.0.5:8000", "conveyor.example.com.evil", "localhost@evil"] {
            assert!(!a.host_allowed(&host(bad)), "{bad} should be refused");
        }
        let any = access("0.0.0.0:8000", &[]);
        assert!(any.host_allowed(&host("10.0.0.5:8000")), "an IP literal of a server bound to every address");
        assert!(!any.host_allowed(&host("rebind.example:8000")));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let mut h = host("127.0.0.1:8000");
        assert!(!cross_site(&h), "no Origin: curl");
        h.insert(header::ORIGIN, "http://127.0.0.1:8000".parse().unwrap());
        assert!(!cross_site(&h), "same origin");
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(cross_site(&h));
        let mut h = host("127.0.0.1:8000");
        h.insert("sec-fetch-site", "same-site".parse().unwrap());
        assert!(cross_site(&h));
    }

    #[test]
    fn roles_may_call_what_the_spec_says() {
        let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
        assert!(permitted(Role::Read, &get, "/api/jobs").is_ok());
        assert!(permitted(Role::Read, &post, "/api/queues/a/pause").is_err());
        assert!(permitted(Role::Read, &get, "/api/rules/3/secret").is_err());
        assert!(permitted(Role::Admin, &get, "/api/rules/3/secret").is_ok());
        assert!(permitted(Role::Publish, &post, "/api/events").is_ok());
        assert!(permitted(Role::Publish, &post, "/api/jobs/bulk").is_ok());
        assert!(permitted(Role::Publish, &get, "/api/jobs/0190f").is_ok());
        assert!(permitted(Role::Publish, &get, "/api/jobs/failed").is_err());
        assert!(permitted(Role::Publish, &get, "/api/jobs").is_err());
        assert!(permitted(Role::Publish, &put, "/api/v1/users/7/preferences").is_ok());
        assert!(permitted(Role::Publish, &post, "/api/v1/users/7/inbox/x/read").is_ok());
        assert!(permitted(Role::Publish, &delete, "/api/templates/1").is_err());
        assert!(permitted(Role::Publish, &get, "/api/v1/notifications").is_err());
        assert!(permitted(Role::Worker, &post, "/api/events").is_err());
    }

    #[test]
    fn json_only_for_json_endpoints() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(content_type_ok(&Method::POST, "/api/events", &h).is_err());
        h.insert(header::CONTENT_TYPE, "application/json; charset=utf-8".parse().unwrap());
        assert!(content_type_ok(&Method::POST, "/api/events", &h).is_ok());
        assert!(content_type_ok(&Method::POST, "/api/orders/import", &h).is_err());
        h.insert(header::CONTENT_TYPE, "text/csv".parse().unwrap());
        assert!(content_type_ok(&Method::POST, "/api/orders/import", &h).is_ok());
        let mut empty = HeaderMap::new();
        empty.insert(header::CONTENT_LENGTH, "0".parse().unwrap());
        assert!(content_type_ok(&Method::POST, "/api/queues/a/pause", &empty).is_ok(), "a body-less POST");
    }
}
