//! The dashboard: a single-page app compiled into the binary (no front-end build, no separate
//! server), polling the JSON API. With `CONVEYOR_API_TOKEN` set it asks for the token once and
//! keeps it in an HTTP-only, same-site cookie.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use crate::AppState;

pub(crate) const COOKIE: &str = "conveyor_token";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(|| async { asset("application/javascript; charset=utf-8", include_str!("app.js")) }))
        .route("/dashboard/app.css", get(|| async { asset("text/css; charset=utf-8", include_str!("app.css")) }))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", get(logout))
        .route("/", get(|| async { Redirect::to("/dashboard") }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn index() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(include_str!("index.html"))).into_response()
}

fn login_html(error: Option<&str>) -> Html<String> {
    let msg = error.map(|e| format!("<p class=\"error\" role=\"alert\">{e}</p>")).unwrap_or_default();
    Html(include_str!("login.html").replace("<!--ERROR-->", &msg))
}

async fn login_page(State(s): State<AppState>) -> Response {
    if s.token.is_none() {
        return Redirect::to("/dashboard").into_response();
    }
    login_html(None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    let Some(token) = &s.token else { return Redirect::to("/dashboard").into_response() };
    if !crate::constant_time_eq(form.token.as_bytes(), token.0.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, login_html(Some("That token is not right."))).into_response();
    }
    let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", cookie_value(&token.0));
    ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard")).into_response()
}

async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard/login")).into_response()
}

/// The cookie carries the token itself, percent-encoded where a cookie could not hold it.
fn cookie_value(token: &str) -> String {
    token
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Whether the request carries the dashboard cookie for `token`.
pub(crate) fn has_cookie(headers: &HeaderMap, token: &str) -> bool {
    let expected = cookie_value(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && crate::constant_time_eq(v.as_bytes(), expected.as_bytes()))
}
