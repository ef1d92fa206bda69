//! The dashboard: a single-page app compiled into the binary (no front-end build, no separate
//! server), polling the JSON API. With tokens configured it asks for one once and opens a
//! server-side session (the cookie holds a random session id, never the token); the read
//! token's dashboard hides its buttons, and the API refuses its writes anyway.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Form, Router};
use serde::Deserialize;

use crate::access::{self, Principal, Role};
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(|| async { asset("application/javascript; charset=utf-8", include_str!("app.js")) }))
        .route("/dashboard/app.css", get(|| async { asset("text/css; charset=utf-8", include_str!("app.css")) }))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", get(logout).post(logout))
        .route("/", get(|| async { Redirect::to("/dashboard") }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn index(Extension(p): Extension<Principal>) -> Response {
    // The role decides which buttons the page shows; the API enforces it either way.
    let role = p.role.map_or("read", Role::as_str);
    let signed_in = if p.tokens { "1" } else { "" };
    #[allow(unused_mut)]
    let mut html = include_str!("index.html").replace("data-role=\"\"", &format!("data-role=\"{role}\" data-session=\"{signed_in}\""));
    // Pages of applications this build does not have are left out of the navigation.
    #[cfg(not(feature = "orders"))]
    {
        html = html.replace("<a href=\"#/orders\">Orders</a>", "");
    }
    #[cfg(not(feature = "notify"))]
    {
        html = html.replace("<a href=\"#/notifications\">Notifications</a>", "");
    }
    ([(header::CACHE_CONTROL, "no-cache")], Html(html)).into_response()
}

fn login_html(error: Option<&str>) -> Html<String> {
    let msg = error.map(|e| format!("<p class=\"error\" role=\"alert\">{e}</p>")).unwrap_or_default();
    Html(include_str!("login.html").replace("<!--ERROR-->", &msg))
}

async fn login_page(State(s): State<AppState>) -> Response {
    if !s.access.enabled() {
        return Redirect::to("/dashboard").into_response();
    }
    login_html(None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    if !s.access.enabled() {
        return Redirect::to("/dashboard").into_response();
    }
    let role = match s.access.role_of(form.token.trim()) {
        Some(r @ (Role::Admin | Role::Read)) => r,
        Some(_) => {
            return (StatusCode::FORBIDDEN, login_html(Some("That token is for the API, not the dashboard: use the admin or read token.")))
                .into_response()
        }
        None => return (StatusCode::UNAUTHORIZED, login_html(Some("That token is not right."))).into_response(),
    };
    match access::open_session(&s, role).await {
        Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard")).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let cookie = access::close_session(&s, &headers).await;
    ([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard/login")).into_response()
}
