//! `/api/v1`: the admin API for the CRM and the operator's scripts: a contact's state
//! and history, consents with evidence, the customer flag, erasure, the event feed, bulk import.
//!
//! JSON in and out, bearer tokens from `[api] tokens`, errors as `{"error", "field"}`.
//! Documented route by route in `openapi.yaml` at the repository root.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, OriginalUri, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest::{SHA256, digest};
use serde::Serialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::metrics::bump;
use super::{App, Client, Problem, blocking};
use crate::address::Address;
use crate::clock;
use crate::config::Config;
use crate::import::{self, ConsentRow};
use crate::policy::decide;
use crate::store::{self, NewConsentEvent, StoreError};

/// Events per page of the feed unless the client asks, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// The kinds the feed can be filtered by.
const KINDS: [&str; 8] = [
    store::EVENT_DECISION,
    store::EVENT_DELIVERED,
    store::EVENT_DEFERRED,
    store::EVENT_BOUNCED,
    store::EVENT_CONSENT_GRANTED,
    store::EVENT_CONSENT_WITHDRAWN,
    store::EVENT_SUPPRESSION_ADDED,
    store::EVENT_CONTACT_FORGOTTEN,
];

// ---- errors ---------------------------------------------------------------------------

/// An API failure as the client sees it: a status, a sentence, and the field at fault.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn bad(field: &'static str, error: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            field: Some(field),
        }
    }

    /// The person asked to be forgotten: nothing more may be recorded about them.
    fn erased() -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            error:
                "this address was erased at the person's request; nothing more is recorded about it"
                    .into(),
            field: Some("email"),
        }
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> ApiError {
        let (status, error) = match p {
            Problem::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large"),
            Problem::BadRequest => (StatusCode::BAD_REQUEST, "the request is not understood"),
            Problem::NotFound => (StatusCode::NOT_FOUND, "no such resource"),
            Problem::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "too many requests"),
            Problem::Timeout => (StatusCode::REQUEST_TIMEOUT, "the request took too long"),
            // The cause is logged where it happened.
            Problem::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        };
        ApiError {
            status,
            error: error.into(),
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

// ---- authentication -------------------------------------------------------------------

/// Whether the request carries one of `tokens` as `Authorization: Bearer …`. Both
/// sides are hashed first, so the comparison takes the same time whatever the
/// length or content of the guess, and every configured token is always compared.
fn authorized(tokens: &[String], headers: &HeaderMap) -> Result<(), &'static str> {
    if tokens.is_empty() {
        return Err("the admin API is off: no token is configured in [api] tokens");
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or("an Authorization: Bearer token is required")?;
    let given = digest(&SHA256, given.as_bytes());
    let mut ok = subtle::Choice::from(0);
    for token in tokens {
        ok |= digest(&SHA256, token.as_bytes())
            .as_ref()
            .ct_eq(given.as_ref());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err("the bearer token is not valid")
    }
}

fn unauthorized(app: &App, why: &'static str, request: &Request) -> Response {
    bump(&app.metrics.api_unauthorized);
    let extensions = request.extensions();
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    // Inside the nested router the URI has lost its `/api/v1`.
    let path = extensions
        .get::<OriginalUri>()
        .map_or(request.uri().path(), |u| u.0.path());
    tracing::warn!(why, peer = ?peer, path, "http: api request without a valid token");
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        error: why.into(),
        field: Some("authorization"),
    }
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"optgate\""),
    );
    response
}

/// Every `/api/v1` request, routes and 404s alike: a valid token or 401.
pub(super) async fn require_token(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    match authorized(&app.web.config.api.tokens, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(why) => unauthorized(&app, why, &request),
    }
}

/// `/metrics` needs the same token once tokens are configured; without any it stays
/// open, as before there was an API (a scraper on the same host).
pub(super) async fn guard_metrics(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    let tokens = &app.web.config.api.tokens;
    if tokens.is_empty() {
        return next.run(request).await;
    }
    match authorized(tokens, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(why) => unauthorized(&app, why, &request),
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        error: "no such route; see openapi.yaml".into(),
        field: None,
    }
}

// ---- reading requests -----------------------------------------------------------------

fn email(path: Result<Path<String>, PathRejection>) -> Result<Address, ApiError> {
    let Path(email) = path.map_err(|e| ApiError::bad("email", e.body_text()))?;
    Address::parse(&email).map_err(|e| ApiError::bad("email", e.to_string()))
}

/// The body as JSON; a body that is too large or not JSON is refused here.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::from(Problem::TooLarge)
        } else {
            ApiError::bad("body", rejection.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad("body", format!("not valid JSON: {e}")))
}

fn object(value: &Value) -> Result<&serde_json::Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::bad("body", "must be a JSON object"))
}

/// An optional string field; present but not a string is an error naming it.
fn opt_str<'a>(
    object: &'a serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(field, "must be a string")),
    }
}

/// `import::validate`'s errors start with the row field at fault; the API names its
/// own fields (`action`, `at`) where they differ from the CSV columns.
fn split_error(error: &str, rename: &[(&'static str, &'static str)]) -> (&'static str, String) {
    const FIELDS: [&str; 5] = ["email", "purpose", "status", "timestamp", "evidence"];
    for field in FIELDS {
        if let Some(rest) = error.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let field = rename
                .iter()
                .find(|(from, _)| *from == field)
                .map_or(field, |(_, to)| *to);
            return (field, rest.trim().to_string());
        }
    }
    ("body", error.to_string())
}

/// The store refuses to record anything about an erased address: None for that
/// (the client's 409), so that only real failures reach the error log.
fn unless_erased<T>(result: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(StoreError::Erased) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Who called, kept with each event the API records: the operator's side of "from where".
fn caller(client: &Client) -> Value {
    json!({ "ip": client.ip.to_string(), "user_agent": client.user_agent })
}

// ---- GET /contacts/{email} ------------------------------------------------------------

#[derive(Serialize)]
struct PurposeState<'a> {
    id: &'a str,
    name: &'a str,
    basis: &'static str,
    public: bool,
    /// Whether mail for this purpose may be sent to the person now.
    allowed: bool,
    /// The decision as stored in decision events: the rule that allows, or why not.
    reason: String,
    /// The consent-history event that satisfies the rule, where the basis needs one.
    record: Option<i64>,
}

/// A contact's state per purpose (as the policy decides it now), customer flag,
/// suppression, consent history and events. An address never seen is no error: the
/// answer says `known: false` and what the policy would decide for it.
pub(super) async fn contact(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let address = email(path)?;
    let (store, config) = (app.web.store.clone(), app.web.config.clone());
    let body = blocking(move || contact_state(store.as_ref(), &config, &address)).await?;
    Ok(Json(body).into_response())
}

fn contact_state(
    store: &dyn store::Store,
    config: &Config,
    address: &Address,
) -> Result<Value, StoreError> {
    let now = clock::now();
    let record = store.contact(address)?;
    let mut erased = false;
    let mut purposes = Vec::with_capacity(config.purposes.len());
    for purpose in &config.purposes {
        let facts = store.consent_facts(std::slice::from_ref(address), &purpose.id)?;
        let facts = facts.first().cloned().unwrap_or_default();
        erased |= facts.erased;
        let decision = decide(purpose, &facts, now);
        purposes.push(PurposeState {
            id: &purpose.id,
            name: &purpose.name,
            basis: purpose.basis.as_str(),
            public: purpose.public,
            allowed: decision.is_allowed(),
            reason: decision.reason(),
            record: match decision {
                crate::policy::Decision::Allow { record, .. } => record,
                crate::policy::Decision::Suppress(_) => None,
            },
        });
    }
    let events = store.events_for(address)?;
    Ok(json!({
        "email": address.as_str(),
        "known": record.is_some(),
        "erased": erased,
        "customer": record.as_ref().is_some_and(|r| r.customer),
        "suppression": record.as_ref().and_then(|r| r.suppression.as_ref()),
        "purposes": purposes,
        "history": record.as_ref().map(|r| r.history.as_slice()).unwrap_or_default(),
        "events": events,
    }))
}

// ---- POST /contacts/{email}/consents --------------------------------------------------

/// Records one grant or withdrawal with the caller's evidence: 201 with the event id.
/// Checked by `import::validate`, so the API accepts exactly what an import would.
pub(super) async fn record_consent(
    State(app): State<Arc<App>>,
    client: Client,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let address = email(path)?;
    let body = json_body(body)?;
    let event = consent_event(&app.web.config, &address, &body, &client, clock::now())?;
    let store = app.web.store.clone();
    let recorded = blocking(move || {
        unless_erased(store.append_consent(&event)).map(|id| id.map(|id| (id, event)))
    })
    .await?;
    let Some((id, event)) = recorded else {
        return Err(ApiError::erased());
    };
    tracing::info!(event = id, purpose = %event.purpose, action = event.action.as_str(), source = %event.source, "api: consent recorded");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "email": event.address.as_str(),
            "purpose": event.purpose,
            "action": event.action,
            "at": event.at,
            "source": event.source,
            "evidence": event.evidence,
        })),
    )
        .into_response())
}

/// The body `{purpose, action, source?, evidence?, at?}` as a history event.
fn consent_event(
    config: &Config,
    address: &Address,
    body: &Value,
    client: &Client,
    now: i64,
) -> Result<NewConsentEvent, ApiError> {
    let object = object(body)?;
    let purpose = opt_str(object, "purpose")?.ok_or_else(|| ApiError::bad("purpose", "missing"))?;
    let status = match opt_str(object, "action")? {
        Some("grant") => "granted",
        Some("withdraw") => "withdrawn",
        Some(other) => {
            return Err(ApiError::bad(
                "action",
                format!("'{other}' is not \"grant\" or \"withdraw\""),
            ));
        }
        None => return Err(ApiError::bad("action", "missing")),
    };
    let timestamp = match object.get("at") {
        None | Some(Value::Null) => clock::rfc3339(now),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(clock::rfc3339)
            .ok_or_else(|| ApiError::bad("at", "not a whole number of seconds"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "at",
                "must be an RFC 3339 string or Unix seconds",
            ));
        }
    };
    let evidence = match object.get("evidence") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(ApiError::bad("evidence", "must be a JSON object")),
    };
    let row = ConsentRow {
        email: address.to_string(),
        purpose: purpose.to_string(),
        status: status.to_string(),
        timestamp,
        source: opt_str(object, "source")?.unwrap_or("api").to_string(),
        evidence: Some(evidence),
    };
    let mut event = import::validate(config, &row, now).map_err(|e| {
        let (field, error) = split_error(&e, &[("status", "action"), ("timestamp", "at")]);
        ApiError::bad(field, error)
    })?;
    if let Some(evidence) = event.evidence.as_object_mut() {
        evidence
            .entry("recorded_via")
            .or_insert_with(|| json!({ "api": caller(client) }));
    }
    Ok(event)
}

// ---- PUT /contacts/{email}/customer ---------------------------------------------------

/// Sets or clears the customer flag (soft opt-in purposes need it).
pub(super) async fn set_customer(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let address = email(path)?;
    let body = json_body(body)?;
    let customer = match object(&body)?.get("customer") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("customer", "must be true or false")),
        None => return Err(ApiError::bad("customer", "missing")),
    };
    let store = app.web.store.clone();
    let set = {
        let address = address.clone();
        blocking(move || unless_erased(store.set_customer(&address, customer))).await?
    };
    if set.is_none() {
        return Err(ApiError::erased());
    }
    tracing::info!(customer, "api: customer flag set");
    Ok(Json(json!({ "email": address.as_str(), "customer": customer })).into_response())
}

// ---- DELETE /contacts/{email} ---------------------------------------------------------

/// Erasure (GDPR art. 17): everything goes but a keyed hash that keeps the person from
/// ever being mailed or imported again. 204 whether or not anything was held, so
/// that a repeated request is not an error. The log does not name the person.
pub(super) async fn forget(
    State(app): State<Arc<App>>,
    client: Client,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let address = email(path)?;
    let store = app.web.store.clone();
    let held = blocking(move || store.forget(&address, clock::now())).await?;
    tracing::info!(held, peer = %client.ip, "api: a contact was forgotten");
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- GET /events ----------------------------------------------------------------------

/// The feed's query: `after`, `limit`, and `kind` (repeatable or comma-separated).
#[derive(Debug, PartialEq, Eq)]
struct Feed {
    after: i64,
    limit: usize,
    kinds: Vec<&'static str>,
}

fn feed_query(query: Option<&str>) -> Result<Feed, ApiError> {
    let mut feed = Feed {
        after: 0,
        limit: DEFAULT_LIMIT,
        kinds: Vec::new(),
    };
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "after" => {
                feed.after = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n: &i64| *n >= 0)
                    .ok_or_else(|| ApiError::bad("after", "must be an event id (0 or more)"))?;
            }
            "limit" => {
                feed.limit = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad("limit", format!("must be between 1 and {MAX_LIMIT}"))
                    })?;
            }
            "kind" => {
                for kind in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                    let known = KINDS.iter().find(|k| **k == kind).ok_or_else(|| {
                        ApiError::bad(
                            "kind",
                            format!(
                                "unknown kind '{}'; one of {}",
                                kind.chars().take(64).collect::<String>(),
                                KINDS.join(", ")
                            ),
                        )
                    })?;
                    if !feed.kinds.contains(known) {
                        feed.kinds.push(known);
                    }
                }
            }
            other => {
                return Err(ApiError::bad(
                    "query",
                    format!(
                        "unknown parameter '{}'; use after, limit, kind",
                        other.chars().take(64).collect::<String>()
                    ),
                ));
            }
        }
    }
    Ok(feed)
}

/// Events after a cursor, oldest first: decisions, deliveries, consent changes,
/// suppressions, erasures. `next` is the cursor for the following page (the last id
/// returned, or `after` again when there is nothing new).
pub(super) async fn events(State(app): State<Arc<App>>, RawQuery(query): RawQuery) -> ApiResult {
    let feed = feed_query(query.as_deref())?;
    let store = app.web.store.clone();
    let (after, limit, kinds) = (feed.after, feed.limit, feed.kinds);
    let events = blocking(move || store.events_since(after, &kinds, limit)).await?;
    let next = events.last().map_or(after, |e| e.id);
    Ok(Json(json!({ "events": events, "next": next })).into_response())
}

// ---- POST /consents/import ------------------------------------------------------------

#[derive(Serialize, Debug, PartialEq, Eq)]
struct Rejected {
    index: usize,
    field: &'static str,
    error: String,
}

/// A JSON array of rows `{email, purpose, status, timestamp, source, evidence}`, each
/// checked by `import::validate`; the good ones are written in one transaction, the
/// bad ones listed by index with the reason.
pub(super) async fn import(
    State(app): State<Arc<App>>,
    client: Client,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = json_body(body)?;
    let Value::Array(rows) = body else {
        return Err(ApiError::bad("body", "must be a JSON array of rows"));
    };
    let (events, indexes, mut rejected) = check_rows(&app.web.config, rows, clock::now());
    let store = app.web.store.clone();
    let total = events.len();
    let refused = if events.is_empty() {
        Vec::new()
    } else {
        blocking(move || store.append_consents(&events)).await?
    };
    for i in &refused {
        if let Some(&index) = indexes.get(*i) {
            rejected.push(Rejected {
                index,
                field: "email",
                error: "this address was erased at the person's request".into(),
            });
        }
    }
    rejected.sort_by_key(|r| r.index);
    let imported = total - refused.len();
    tracing::info!(imported, rejected = rejected.len(), peer = %client.ip, "api: consent import");
    Ok(Json(json!({ "imported": imported, "rejected": rejected })).into_response())
}

/// The valid rows as events (with their row indexes) and the rejected ones.
fn check_rows(
    config: &Config,
    rows: Vec<Value>,
    now: i64,
) -> (Vec<NewConsentEvent>, Vec<usize>, Vec<Rejected>) {
    let mut events = Vec::with_capacity(rows.len());
    let mut indexes = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for (index, row) in rows.into_iter().enumerate() {
        let checked = serde_json::from_value::<ConsentRow>(row)
            .map_err(|e| ("body", format!("not a row of strings: {e}")))
            .and_then(|row| import::validate(config, &row, now).map_err(|e| split_error(&e, &[])));
        match checked {
            Ok(event) => {
                events.push(event);
                indexes.push(index);
            }
            Err((field, error)) => rejected.push(Rejected {
                index,
                field,
                error: format!("{field}: {error}"),
            }),
        }
    }
    (events, indexes, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_against_every_configured_one() {
        let tokens = vec!["a".repeat(24), "b".repeat(30)];
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(
            authorized(&tokens, &headers(&format!("Bearer {}", "a".repeat(24)))),
            Ok(())
        );
        assert_eq!(
            authorized(&tokens, &headers(&format!("bearer  {} ", "b".repeat(30)))),
            Ok(())
        );
        assert!(authorized(&tokens, &headers(&format!("Bearer {}", "a".repeat(23)))).is_err());
        assert!(authorized(&tokens, &headers(&format!("Basic {}", "a".repeat(24)))).is_err());
        assert!(authorized(&tokens, &headers("Bearer")).is_err());
        assert!(authorized(&tokens, &HeaderMap::new()).is_err());
        assert!(authorized(&[], &headers(&format!("Bearer {}", "a".repeat(24)))).is_err());
    }

    #[test]
    fn the_feed_query_is_checked_field_by_field() {
        assert_eq!(
            feed_query(None).unwrap(),
            Feed {
                after: 0,
                limit: DEFAULT_LIMIT,
                kinds: vec![]
            }
        );
        assert_eq!(
            feed_query(Some(
                "after=7&limit=2&kind=decision,consent.withdrawn&kind=decision"
            ))
            .unwrap(),
            Feed {
                after: 7,
                limit: 2,
                kinds: vec!["decision", "consent.withdrawn"]
            }
        );
        let field = |q: &str| feed_query(Some(q)).unwrap_err().field;
        assert_eq!(field("after=-1"), Some("after"));
        assert_eq!(field("after=x"), Some("after"));
        assert_eq!(field("limit=0"), Some("limit"));
        assert_eq!(field("limit=1001"), Some("limit"));
        assert_eq!(field("kind=spam"), Some("kind"));
        assert_eq!(field("aftr=3"), Some("query"));
    }

    #[test]
    fn validation_errors_are_split_into_field_and_reason() {
        assert_eq!(
            split_error("status: 'x' is not", &[("status", "action")]),
            ("action", "'x' is not".to_string())
        );
        assert_eq!(
            split_error(
                "timestamp: bad",
                &[("status", "action"), ("timestamp", "at")]
            ),
            ("at", "bad".to_string())
        );
        assert_eq!(
            split_error("purpose: unknown purpose 'x'", &[]),
            ("purpose", "unknown purpose 'x'".to_string())
        );
        assert_eq!(split_error("odd", &[]), ("body", "odd".to_string()));
    }
}
