//! The HTTP side: the pages recipients reach from their mail (unsubscribe, preference
//! centre, double opt-in), the admin API and metrics, and the server that runs them.
//!
//! Handlers stay thin: they read the request, ask the token keys and the store (on
//! the blocking pool), and hand the decisions to plain functions. Every failure is a
//! [`Problem`], which becomes a short page in the reader's language, never a panic.

mod api;
mod form;
mod forwarded;
mod i18n;
mod mail;
mod metrics;
mod preferences;
mod ratelimit;
mod subscribe;
mod unsubscribe;

#[cfg(test)]
mod consent_tests;
#[cfg(test)]
mod tests;

pub use subscribe::CONFIRMATION_PURPOSE;

use std::future::IntoFuture;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use askama::Template;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::address::Address;
use crate::config::Config;
use crate::spool::Spool;
use crate::store::{Store, StoreError};
use crate::token::{Claims, TokenKeys, TokenKind};

use i18n::Lang;
use metrics::{Metrics, bump};
use ratelimit::RateLimiter;

/// What the web side needs from the rest of optgate.
pub struct Web {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub tokens: Arc<TokenKeys>,
    /// Where double opt-in confirmation mails are queued, like any accepted message.
    pub spool: Spool,
}

/// Form bodies are a field or two; anything bigger is not one of ours.
const MAX_FORM_BYTES: usize = 8 * 1024;
/// An admin API body: one JSON object, or a bulk import of consent rows.
const MAX_API_BYTES: usize = 64 * 1024;
const MAX_IMPORT_BYTES: usize = 32 * 1024 * 1024;
/// A request (body included) that takes longer is a stuck or hostile client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shutdown lets requests in flight finish before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// User agents are evidence, not payload: enough to recognise a client.
const MAX_USER_AGENT_CHARS: usize = 512;

/// The state behind every handler: the outside world plus what the web side keeps
/// for itself.
struct App {
    web: Arc<Web>,
    metrics: Metrics,
    limiter: RateLimiter,
    /// Sign-ups per IP per hour (`double_opt_in.max_per_ip_per_hour`).
    signups: RateLimiter,
    /// Serialises "read the latest event, then append" so that two POSTs racing
    /// (mail providers do send duplicates) record one withdrawal, not two. It only
    /// covers this process: with several nodes, a duplicate is harmless anyway.
    consent_lock: Mutex<()>,
}

/// The routes, for [`serve`] and for tests. Handlers read the client's IP from
/// `ConnectInfo<SocketAddr>` (which [`real_client`] sets to the forwarded client behind
/// a trusted proxy): serve with `into_make_service_with_connect_info`, or add a
/// `MockConnectInfo` layer.
pub fn router(web: Arc<Web>) -> Router {
    let now = Instant::now();
    let app = Arc::new(App {
        limiter: RateLimiter::new(web.config.unsubscribe.rate_limit_per_minute, now),
        signups: RateLimiter::per_period(
            web.config.double_opt_in.max_per_ip_per_hour,
            Duration::from_secs(3600),
            now,
        ),
        web,
        metrics: Metrics::default(),
        consent_lock: Mutex::new(()),
    });
    let links = Router::new()
        .route(
            "/u/{token}",
            get(unsubscribe::show).post(unsubscribe::submit),
        )
        .route(
            "/p/{token}",
            get(preferences::show).post(preferences::submit),
        )
        .route("/subscribe", post(subscribe::subscribe))
        .route(
            "/confirm/{token}",
            get(subscribe::show).post(subscribe::confirm),
        )
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .route_layer(middleware::from_fn_with_state(app.clone(), rate_limit));
    let api = Router::new()
        .route("/contacts/{email}", get(api::contact).delete(api::forget))
        .route("/contacts/{email}/consents", post(api::record_consent))
        .route("/contacts/{email}/customer", put(api::set_customer))
        .route("/events", get(api::events))
        .layer(DefaultBodyLimit::max(MAX_API_BYTES))
        .merge(
            Router::new()
                .route("/consents/import", post(api::import))
                .layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)),
        )
        .fallback(api::not_found)
        .layer(middleware::from_fn_with_state(
            app.clone(),
            api::require_token,
        ));
    Router::new()
        .route("/", get(home))
        .route(
            "/metrics",
            get(metrics).route_layer(middleware::from_fn_with_state(
                app.clone(),
                api::guard_metrics,
            )),
        )
        .merge(links)
        .nest("/api/v1", api)
        .fallback(not_found)
        .layer(middleware::from_fn(time_limit))
        .layer(middleware::map_response(security_headers))
        .layer(middleware::from_fn_with_state(app.clone(), real_client))
        .with_state(app)
}

/// Binds `config.http.listen`, says `http listening on ADDR` on stdout (scripts wait
/// for that line), and serves until `shutdown`; then lets requests in flight finish.
pub async fn serve(web: Arc<Web>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = web.config.http.listen;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    println!("http listening on {local}");
    let _ = std::io::stdout().flush();
    tracing::info!(%local, "http listening");
    serve_on(listener, web, shutdown).await
}

/// Serves on a bound listener (tests bind port 0 themselves).
async fn serve_on(
    listener: TcpListener,
    web: Arc<Web>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let service = router(web).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, service)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        ended = &mut server => return ended.context("http server"),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(ended) => ended.context("http server"),
        Err(_) => {
            tracing::warn!("http: requests still open after the drain timeout; dropped");
            Ok(())
        }
    }
}

// ---- what can go wrong ------------------------------------------------------------

/// A request that cannot be served, as the client will see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    /// Forged, truncated, unknown or wrong-kind link, or no such page: one answer
    /// for all, so that a prober learns nothing.
    NotFound,
    BadRequest,
    TooLarge,
    RateLimited {
        retry_after: u64,
    },
    Timeout,
    /// The store failed (already logged).
    Internal,
}

impl Problem {
    fn page(self, lang: Lang) -> Response {
        let t = lang.texts();
        let (status, heading, body) = match self {
            Problem::NotFound => (StatusCode::NOT_FOUND, t.invalid_heading, t.invalid_body),
            Problem::BadRequest => (
                StatusCode::BAD_REQUEST,
                t.bad_request_heading,
                t.bad_request_body,
            ),
            Problem::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                t.too_large_heading,
                t.too_large_body,
            ),
            Problem::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                t.too_many_heading,
                t.too_many_body,
            ),
            Problem::Timeout => (
                StatusCode::REQUEST_TIMEOUT,
                t.timeout_heading,
                t.timeout_body,
            ),
            Problem::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                t.error_heading,
                t.error_body,
            ),
        };
        let mut response = render(
            status,
            &MessagePage {
                t,
                heading,
                body,
                detail: None,
            },
        );
        if let Problem::RateLimited { retry_after } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        response
    }
}

/// Runs a store call on the blocking pool; a failure is logged here and reaches the
/// client only as [`Problem::Internal`].
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Problem> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Internal(format!("store task: {e}")))
        .and_then(|r| r);
    result.map_err(|e| {
        tracing::error!(error = %e, "http: store call failed");
        Problem::Internal
    })
}

/// The fields of a form POST, or the problem to show: too large, or not a form.
fn form_fields(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    client: &Client,
) -> Result<Vec<(String, String)>, Problem> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::TooLarge
        } else {
            Problem::BadRequest
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    form::parse(content_type, &body).map_err(|e| {
        tracing::info!(peer = %client.ip, error = ?e, "http: a POST that is not a form");
        Problem::BadRequest
    })
}

// ---- the client ---------------------------------------------------------------------

/// Who is asking: what the evidence records and what picks the page language.
struct Client {
    /// The TCP peer (IPv4-mapped addresses shown as IPv4).
    ip: IpAddr,
    user_agent: Option<String>,
    accept_language: Option<String>,
}

impl Client {
    /// The page language: Accept-Language, else `fallback` (a purpose's locale).
    fn lang(&self, fallback: &str) -> Lang {
        i18n::negotiate(self.accept_language.as_deref(), fallback)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let accept_language = header_text(&parts.headers, header::ACCEPT_LANGUAGE);
        let peer = ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "http: no peer address (router served without connect info)");
                Problem::Internal.page(i18n::negotiate(accept_language.as_deref(), "en"))
            })?;
        Ok(Client {
            ip: ratelimit::canonical_ip(peer.0.ip()),
            user_agent: header_text(&parts.headers, header::USER_AGENT)
                .map(|ua| sanitize_user_agent(&ua))
                .filter(|ua| !ua.is_empty()),
            accept_language,
        })
    }
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Control characters out, length capped on a character boundary.
fn sanitize_user_agent(ua: &str) -> String {
    ua.trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_USER_AGENT_CHARS)
        .collect()
}

// ---- links --------------------------------------------------------------------------

impl App {
    /// The token in a link's path; an unreadable path is refused like a forged token.
    fn link_token(
        &self,
        path: Result<Path<String>, PathRejection>,
        client: &Client,
    ) -> Result<String, Problem> {
        path.map(|Path(token)| token)
            .map_err(|_| self.refuse("an unreadable path", client))
    }

    /// The claims of a link of `kind`, or the one answer every bad link gets.
    fn claims(&self, token: &str, kind: TokenKind, client: &Client) -> Result<Claims, Problem> {
        match self.web.tokens.verify(token, crate::clock::now()) {
            Ok(claims) if claims.kind == kind => Ok(claims),
            Ok(_) => Err(self.refuse("a token of another kind", client)),
            Err(_) => Err(self.refuse("forged, truncated or expired", client)),
        }
    }

    /// The address behind a contact number that a verified token carries.
    async fn contact(&self, subject: u64, client: &Client) -> Result<(i64, Address), Problem> {
        let id = i64::try_from(subject).map_err(|_| self.refuse("no such contact", client))?;
        let store = self.web.store.clone();
        match blocking(move || store.contact_address(id)).await? {
            Some(address) => Ok((id, address)),
            None => Err(self.refuse("no such contact", client)),
        }
    }

    /// The preference centre's path for a contact, or None when no purpose is public
    /// (there would be nothing to choose).
    fn preferences_path(&self, contact: i64) -> Option<String> {
        if !self.web.config.purposes.iter().any(|p| p.public) {
            return None;
        }
        let token = self.web.tokens.issue(Claims {
            kind: TokenKind::Preferences,
            subject: u64::try_from(contact).ok()?,
            scope: 0,
        });
        Some(format!("/p/{token}"))
    }

    /// Counts and logs a refused link. The token itself is not logged: a valid-looking
    /// one is a credential, and a forged one is noise.
    fn refuse(&self, why: &'static str, client: &Client) -> Problem {
        bump(&self.metrics.invalid_tokens);
        tracing::warn!(peer = %client.ip, why, "http: invalid link refused");
        Problem::NotFound
    }
}

// ---- pages and plumbing -------------------------------------------------------------

/// A heading and a sentence or two.
#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    t: &'static i18n::Texts,
    heading: &'a str,
    body: &'a str,
    detail: Option<&'a str>,
}

fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "http: a page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

/// So that a curl to the base URL answers something.
async fn home() -> &'static str {
    "optgate\n"
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(app.web.spool.intake().backlog()),
    )
        .into_response()
}

async fn not_found(headers: HeaderMap) -> Response {
    let lang = header_text(&headers, header::ACCEPT_LANGUAGE);
    Problem::NotFound.page(i18n::negotiate(lang.as_deref(), "en"))
}

/// Puts the client in place of the TCP peer when the peer is one of
/// `http.trusted_proxies` ([`forwarded`]): every layer and handler after this one, the
/// rate limits and the consent evidence alike, then reads the client from
/// `ConnectInfo`, as they would without a proxy.
async fn real_client(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    let trusted = &app.web.config.http.trusted_proxies;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Some(peer) = peer.filter(|_| !trusted.is_empty()) {
        let forwarded_for = request.headers().get_all("x-forwarded-for");
        let client = forwarded::client(peer.ip(), forwarded_for.iter(), trusted);
        if client != peer.ip() {
            tracing::trace!(proxy = %peer.ip(), %client, "http: request forwarded by a trusted proxy");
            request
                .extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(client, 0)));
        }
    }
    next.run(request).await
}

async fn rate_limit(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    match app.limiter.check(peer.ip(), Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(retry_after) => {
            bump(&app.metrics.rate_limited);
            tracing::debug!(peer = %peer.ip(), "http: rate limited");
            let lang = header_text(request.headers(), header::ACCEPT_LANGUAGE);
            Problem::RateLimited { retry_after }.page(i18n::negotiate(lang.as_deref(), "en"))
        }
    }
}

async fn time_limit(request: Request, next: Next) -> Response {
    let lang = header_text(request.headers(), header::ACCEPT_LANGUAGE);
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::Timeout.page(i18n::negotiate(lang.as_deref(), "en")),
    }
}

/// Every answer: never cached (a page names a person), never indexed, no referrer
/// leaking the token to anyone, and nothing loaded from anywhere.
async fn security_headers(mut response: Response) -> Response {
    const HEADERS: [(&str, &str); 6] = [
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-robots-tag", "noindex, nofollow"),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
    ];
    let headers = response.headers_mut();
    for (name, value) in HEADERS {
        headers
            .entry(HeaderName::from_static(name))
            .or_insert(HeaderValue::from_static(value));
    }
    response
}
