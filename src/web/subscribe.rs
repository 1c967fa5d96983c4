//! Double opt-in: `POST /subscribe` keeps a pending sign-up and queues the confirmation
//! mail; `/confirm/{token}` shows it (GET) and records the consent with proof (POST).

use std::sync::Arc;

use askama::Template;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::i18n::{Lang, Texts};
use super::mail::{self, Named};
use super::metrics::bump;
use super::unsubscribe::mask;
use super::{App, Client, MessagePage, Problem, blocking, header_text, render};
use crate::address::Address;
use crate::config::Config;
use crate::spool;
use crate::store::{
    Confirmation, NewMessage, NewSignup, QueuedMessage, RecipientDecision, Signup, Store,
    StoreError,
};
use crate::token::{Claims, TokenKind};

/// Recorded with the confirmation: bump it when the confirmation page's sentences change.
const CONFIRM_WORDING: &str = "confirm-page/1";
/// The queue's purpose for confirmation mails: reserved, not a configured purpose, so
/// delivery sends them as they are (DKIM-signed, no unsubscribe link).
pub const CONFIRMATION_PURPOSE: &str = "confirmation";
/// The history's `source` when the form names none.
const DEFAULT_SOURCE: &str = "double-opt-in";
/// Free-text fields are evidence, not payload.
const MAX_TEXT_CHARS: usize = 200;
const DAY: i64 = 86_400;

/// A sign-up as the form or the JSON body asks for it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub email: Address,
    /// Public purpose ids, without repeats, in the order given.
    pub purposes: Vec<String>,
    pub source: String,
    pub wording_version: String,
}

/// What is wrong with a sign-up: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Invalid {
    pub field: &'static str,
    pub error: String,
}

fn invalid(field: &'static str, error: impl Into<String>) -> Invalid {
    Invalid {
        field,
        error: error.into(),
    }
}

/// The fields as sent, before checking.
#[derive(Default)]
struct Raw {
    email: Option<String>,
    purposes: Vec<String>,
    source: Option<String>,
    wording_version: Option<String>,
}

/// Reads form fields: `purposes` may repeat, and each may be comma-separated.
pub(super) fn from_form(config: &Config, fields: &[(String, String)]) -> Result<Request, Invalid> {
    let mut raw = Raw::default();
    for (name, value) in fields {
        match name.as_str() {
            "email" => raw.email = Some(value.clone()),
            "purposes" => raw.purposes.push(value.clone()),
            "source" => raw.source = Some(value.clone()),
            "wording_version" => raw.wording_version = Some(value.clone()),
            _ => {}
        }
    }
    check(config, raw)
}

/// Reads a JSON object: `purposes` is an array of ids or one comma-separated string.
pub(super) fn from_json(config: &Config, body: &[u8]) -> Result<Request, Invalid> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid("body", format!("not valid JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| invalid("body", "must be a JSON object"))?;
    let text = |field: &'static str| -> Result<Option<String>, Invalid> {
        match object.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(field, "must be a string")),
        }
    };
    let purposes = match object.get("purposes") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid("purposes", "must be an array of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("purposes", "must be an array of strings")),
    };
    check(
        config,
        Raw {
            email: text("email")?,
            purposes,
            source: text("source")?,
            wording_version: text("wording_version")?,
        },
    )
}

fn check(config: &Config, raw: Raw) -> Result<Request, Invalid> {
    let email = raw
        .email
        .filter(|e| !e.trim().is_empty())
        .ok_or_else(|| invalid("email", "missing"))?;
    let email = Address::parse(email.trim()).map_err(|e| invalid("email", e.to_string()))?;
    let mut purposes: Vec<String> = Vec::new();
    for id in raw
        .purposes
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
    {
        if id.is_empty() || purposes.iter().any(|p| p == id) {
            continue;
        }
        // Unknown and private purposes get the same answer: the form learns nothing
        // about purposes the operator keeps to itself.
        if !config.purpose(id).is_some_and(|p| p.public) {
            return Err(invalid(
                "purposes",
                format!("'{}' is not a purpose open to sign-ups", clip(id)),
            ));
        }
        purposes.push(id.to_string());
    }
    if purposes.is_empty() {
        return Err(invalid("purposes", "name at least one purpose"));
    }
    let short = |field: &'static str, value: Option<String>| -> Result<String, Invalid> {
        let value = value.unwrap_or_default().trim().to_string();
        if value.chars().count() > MAX_TEXT_CHARS || value.chars().any(char::is_control) {
            return Err(invalid(
                field,
                format!("at most {MAX_TEXT_CHARS} characters, no control characters"),
            ));
        }
        Ok(value)
    };
    let source = short("source", raw.source)?;
    Ok(Request {
        email,
        purposes,
        source: if source.is_empty() {
            DEFAULT_SOURCE.to_string()
        } else {
            source
        },
        wording_version: short("wording_version", raw.wording_version)?,
    })
}

/// A hostile value quoted back in an error stays short.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// What became of a valid sign-up. Every case but a store failure gets the same
/// answer, so that the form cannot be used to learn who is known.
#[derive(Debug, PartialEq, Eq)]
enum Registered {
    Created(i64),
    /// Over `max_per_address_per_day`.
    AddressLimit,
    /// Erased or on the suppression list: no mail may go there.
    Unmailable,
}

/// Checks the per-address limit and whether the address may be mailed at all, then
/// keeps the sign-up; all under `lock`, so two racing requests count each other.
fn register(
    store: &dyn Store,
    lock: &std::sync::Mutex<()>,
    signup: &NewSignup,
    max_per_day: u32,
) -> Result<Registered, StoreError> {
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let recent = store.signups_since(&signup.address, signup.at - DAY)?;
    if recent >= usize::try_from(max_per_day).unwrap_or(usize::MAX) {
        return Ok(Registered::AddressLimit);
    }
    let purpose = signup.purposes.first().map(String::as_str).unwrap_or("");
    let facts = store.consent_facts(std::slice::from_ref(&signup.address), purpose)?;
    if facts
        .first()
        .is_some_and(|f| f.erased || f.suppression.is_some())
    {
        return Ok(Registered::Unmailable);
    }
    match store.create_signup(signup) {
        Err(StoreError::Erased) => Ok(Registered::Unmailable),
        created => created.map(Registered::Created),
    }
}

/// The language of a sign-up's mail and pages: the reader's if they have one we
/// speak, else the first purpose's locale.
fn lang_for(config: &Config, purposes: &[String], client: Option<&Client>) -> Lang {
    let locale = purposes
        .first()
        .and_then(|id| config.purpose(id))
        .map_or("en", |p| p.locale.as_str());
    match client {
        Some(client) => client.lang(locale),
        None => super::i18n::negotiate(None, locale),
    }
}

fn named<'a>(config: &'a Config, purposes: &'a [String]) -> Vec<Named<'a>> {
    purposes
        .iter()
        .map(|id| match config.purpose(id) {
            Some(p) => Named {
                name: &p.name,
                description: &p.description,
            },
            // A purpose removed from the config since the sign-up: its id is all we have.
            None => Named {
                name: id,
                description: "",
            },
        })
        .collect()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|media| {
            let media = media.trim().to_ascii_lowercase();
            media == "application/json" || media.ends_with("+json")
        })
        .unwrap_or(false)
}

/// `{"error": …, "field": …}` with `status`.
fn json_error(status: StatusCode, field: Option<&str>, error: &str) -> Response {
    let mut body = json!({ "error": error });
    if let Some(field) = field {
        body["field"] = json!(field);
    }
    (status, Json(body)).into_response()
}

#[derive(Template)]
#[template(path = "signup.html")]
struct SignupPage<'a> {
    t: &'static Texts,
    heading: &'a str,
    lead: &'a str,
    purposes: &'a [Named<'a>],
    address: &'a str,
    button: Option<&'a str>,
}

/// POST /subscribe: form fields or JSON. Answers 202 `{"status":"pending"}` (JSON) or
/// a "check your mailbox" page (forms), whether or not a limit held the mail back.
pub(super) async fn subscribe(
    State(app): State<Arc<App>>,
    client: Client,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let json = is_json(&headers);
    let config = &app.web.config;
    let fallback = client.lang(
        config
            .purposes
            .iter()
            .find(|p| p.public)
            .map_or("en", |p| p.locale.as_str()),
    );
    let problem = |p: Problem| -> Response {
        if json {
            let (status, error) = match p {
                Problem::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large"),
                Problem::BadRequest => (StatusCode::BAD_REQUEST, "the body is not a form"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            };
            json_error(status, None, error)
        } else {
            p.page(fallback)
        }
    };
    let request = if json {
        match body {
            Ok(body) => from_json(config, &body),
            Err(_) => return problem(Problem::TooLarge),
        }
    } else {
        match super::form_fields(&headers, body, &client) {
            Ok(fields) => from_form(config, &fields),
            Err(p) => return problem(p),
        }
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(peer = %client.ip, field = e.field, error = %e.error, "http: sign-up refused");
            return if json {
                json_error(StatusCode::BAD_REQUEST, Some(e.field), &e.error)
            } else {
                refused_page(fallback, &e)
            };
        }
    };
    if let Err(p) = sign_up(&app, &client, &headers, &request).await {
        return problem(p);
    }
    if json {
        (StatusCode::ACCEPTED, Json(json!({ "status": "pending" }))).into_response()
    } else {
        let t = lang_for(config, &request.purposes, Some(&client)).texts();
        render(
            StatusCode::OK,
            &MessagePage {
                t,
                heading: t.signup_pending_heading,
                body: t.signup_pending_body,
                detail: None,
            },
        )
    }
}

/// A form's 400: what is wrong, in words (the field's message is in English).
fn refused_page(lang: Lang, e: &Invalid) -> Response {
    let t = lang.texts();
    let detail = format!("{}: {}", e.field, e.error);
    render(
        StatusCode::BAD_REQUEST,
        &MessagePage {
            t,
            heading: t.signup_refused_heading,
            body: t.signup_refused_body,
            detail: Some(&detail),
        },
    )
}

/// Applies the limits, keeps the sign-up and queues its mail. A limit is not an
/// error: the caller answers as for success, and only the log tells.
async fn sign_up(
    app: &Arc<App>,
    client: &Client,
    headers: &HeaderMap,
    request: &Request,
) -> Result<(), Problem> {
    let config = &app.web.config;
    // The mail speaks the purpose's language: a website's server may post for its
    // visitor, so this request's Accept-Language says little about the reader.
    let lang = lang_for(config, &request.purposes, None);
    if app
        .signups
        .check(client.ip, std::time::Instant::now())
        .is_err()
    {
        bump(&app.metrics.signups_limited);
        tracing::warn!(peer = %client.ip, limit = config.double_opt_in.max_per_ip_per_hour, "http: sign-up over the per-IP hourly limit; no mail sent");
        return Ok(());
    }
    let now = crate::clock::now();
    let validity = i64::try_from(config.double_opt_in.link_validity.as_secs()).unwrap_or(i64::MAX);
    let mut evidence = json!({
        "ip": client.ip.to_string(),
        "user_agent": client.user_agent,
        "at": crate::clock::rfc3339(now),
        "mail_lang": lang.code(),
    });
    // The page that carried the form, when the browser says: part of "from where".
    if let Some(origin) = header_text(headers, header::ORIGIN)
        .or_else(|| header_text(headers, header::REFERER))
        .map(|o| o.chars().take(MAX_TEXT_CHARS).collect::<String>())
    {
        evidence["origin"] = json!(origin);
    }
    let signup = NewSignup {
        address: request.email.clone(),
        purposes: request.purposes.clone(),
        source: request.source.clone(),
        wording_version: request.wording_version.clone(),
        evidence,
        at: now,
        expires_at: now.saturating_add(validity),
    };
    let registered = {
        let (app, signup) = (app.clone(), signup.clone());
        let max = config.double_opt_in.max_per_address_per_day;
        blocking(move || register(app.web.store.as_ref(), &app.consent_lock, &signup, max)).await?
    };
    let id = match registered {
        Registered::Created(id) => id,
        Registered::AddressLimit => {
            bump(&app.metrics.signups_limited);
            tracing::warn!(peer = %client.ip, limit = config.double_opt_in.max_per_address_per_day, "http: sign-up over the per-address daily limit; no mail sent");
            return Ok(());
        }
        Registered::Unmailable => {
            tracing::warn!(peer = %client.ip, "http: sign-up for an erased or suppressed address; no mail sent");
            return Ok(());
        }
    };
    let token = app.web.tokens.issue(Claims {
        kind: TokenKind::Confirm,
        subject: u64::try_from(id).map_err(|_| Problem::Internal)?,
        scope: 0,
    });
    let queue_id = spool::new_queue_id();
    let link = format!("{}/confirm/{token}", config.http.public_url);
    let body = mail::build(&mail::Confirmation {
        from: &config.double_opt_in.from,
        to: &request.email,
        lang,
        purposes: &named(config, &request.purposes),
        link: &link,
        valid_until: signup.expires_at,
        message_id: format!("<{queue_id}.confirm@{}>", config.smtp.hostname),
    })
    .map_err(|e| {
        tracing::error!(signup = id, error = %e, "http: cannot write the confirmation mail");
        Problem::Internal
    })?;
    let message = NewMessage {
        message: QueuedMessage {
            id: queue_id.clone(),
            sender: config.double_opt_in.sender.clone(),
            purpose: CONFIRMATION_PURPOSE.into(),
            received_at: now,
            body: Arc::new(body),
        },
        recipients: vec![RecipientDecision {
            address: request.email.clone(),
            allowed: true,
            reason: "allowed: double opt-in confirmation".into(),
        }],
        origin: "subscribe".into(),
    };
    app.web.spool.accept(message).await.map_err(|e| {
        tracing::error!(signup = id, error = %e, "http: cannot queue the confirmation mail");
        Problem::Internal
    })?;
    bump(&app.metrics.signups_mailed);
    tracing::info!(signup = id, queue_id = %queue_id, purposes = ?request.purposes, "http: sign-up kept; confirmation mail queued");
    Ok(())
}

/// A verified confirmation link's sign-up.
async fn open(
    app: &App,
    path: Result<Path<String>, PathRejection>,
    client: &Client,
) -> Result<Signup, Problem> {
    let token = app.link_token(path, client)?;
    let claims = app.claims(&token, TokenKind::Confirm, client)?;
    let id = i64::try_from(claims.subject).map_err(|_| app.refuse("no such sign-up", client))?;
    let store = app.web.store.clone();
    blocking(move || store.signup(id))
        .await?
        .ok_or_else(|| app.refuse("no such sign-up", client))
}

/// Why a sign-up can no longer be confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    AlreadyConfirmed,
    Expired,
}

fn settled(signup: &Signup, now: i64) -> Option<Settled> {
    if signup.confirmed_at.is_some() {
        Some(Settled::AlreadyConfirmed)
    } else if signup.expires_at <= now {
        Some(Settled::Expired)
    } else {
        None
    }
}

/// 200 "already confirmed" (a second click is no error), 410 for an expired link.
fn settled_page(settled: Settled, lang: Lang) -> Response {
    let t = lang.texts();
    let (status, heading, body) = match settled {
        Settled::AlreadyConfirmed => (
            StatusCode::OK,
            t.already_confirmed_heading,
            t.already_confirmed_body,
        ),
        Settled::Expired => (StatusCode::GONE, t.expired_heading, t.expired_body),
    };
    render(
        status,
        &MessagePage {
            t,
            heading,
            body,
            detail: None,
        },
    )
}

/// The confirmation page (with its button), or the page after confirming.
fn signup_page(config: &Config, signup: &Signup, lang: Lang, confirmed: bool) -> Response {
    let t = lang.texts();
    let address = Address::parse(&signup.address)
        .map(|a| mask(&a))
        .unwrap_or_default();
    let (heading, lead, button) = if confirmed {
        (t.confirmed_heading, t.confirmed_lead, None)
    } else {
        (t.confirm_heading, t.confirm_lead, Some(t.confirm_button))
    };
    render(
        StatusCode::OK,
        &SignupPage {
            t,
            heading,
            lead,
            purposes: &named(config, &signup.purposes),
            address: &address,
            button,
        },
    )
}

/// GET /confirm/{token}: names the purposes and offers the button. Link scanners
/// fetch it; it records nothing.
pub(super) async fn show(
    State(app): State<Arc<App>>,
    client: Client,
    token: Result<Path<String>, PathRejection>,
) -> Result<Response, Response> {
    let fallback = client.lang("en");
    let signup = open(&app, token, &client)
        .await
        .map_err(|p| p.page(fallback))?;
    let lang = lang_for(&app.web.config, &signup.purposes, Some(&client));
    Ok(match settled(&signup, crate::clock::now()) {
        Some(state) => settled_page(state, lang),
        None => signup_page(&app.web.config, &signup, lang, false),
    })
}

/// POST /confirm/{token}: records one grant per purpose with both sets of evidence
/// (the sign-up's, kept with it, and this request's).
pub(super) async fn confirm(
    State(app): State<Arc<App>>,
    client: Client,
    token: Result<Path<String>, PathRejection>,
) -> Result<Response, Response> {
    let fallback = client.lang("en");
    let signup = open(&app, token, &client)
        .await
        .map_err(|p| p.page(fallback))?;
    let lang = lang_for(&app.web.config, &signup.purposes, Some(&client));
    let now = crate::clock::now();
    let t = lang.texts();
    let evidence = json!({
        "ip": client.ip.to_string(),
        "user_agent": client.user_agent,
        "at": crate::clock::rfc3339(now),
        "lang": lang.code(),
        "wording_version": CONFIRM_WORDING,
        "wording": format!("{} [{}]", t.confirm_lead, t.confirm_button),
    });
    let outcome = {
        let (store, id) = (app.web.store.clone(), signup.id);
        blocking(move || store.confirm_signup(id, now, evidence))
            .await
            .map_err(|p| p.page(lang))?
    };
    match outcome {
        Confirmation::Recorded(events) => {
            bump(&app.metrics.confirmations);
            tracing::info!(signup = signup.id, events = ?events, "http: sign-up confirmed; consent recorded");
            Ok(signup_page(&app.web.config, &signup, lang, true))
        }
        Confirmation::AlreadyConfirmed => Ok(settled_page(Settled::AlreadyConfirmed, lang)),
        Confirmation::Expired => Ok(settled_page(Settled::Expired, lang)),
        Confirmation::Unknown => Err(app.refuse("no such sign-up", &client).page(lang)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::form::fields;

    fn config() -> Config {
        Config::parse(
            r#"
[[purpose]]
id = "news"
name = "News"
basis = "consent"
public = true

[[purpose]]
id = "offres"
name = "Offres"
basis = "consent"
public = true
locale = "fr"

[[purpose]]
id = "internal"
name = "Internal"
basis = "consent"
"#,
            std::path::Path::new("/tmp/optgate.toml"),
        )
        .unwrap()
    }

    #[test]
    fn purposes_repeat_or_come_comma_separated() {
        let c = config();
        let want = Request {
            email: Address::parse("a@example.net").unwrap(),
            purposes: vec!["news".into(), "offres".into()],
            source: "double-opt-in".into(),
            wording_version: String::new(),
        };
        assert_eq!(
            from_form(
                &c,
                &fields(&[
                    ("email", " a@example.net "),
                    ("purposes", "news"),
                    ("purposes", "offres")
                ])
            ),
            Ok(want.clone())
        );
        assert_eq!(
            from_form(
                &c,
                &fields(&[
                    ("email", "a@example.net"),
                    ("purposes", "news, offres,news,")
                ])
            ),
            Ok(want.clone())
        );
        assert_eq!(
            from_json(
                &c,
                br#"{"email":"a@example.net","purposes":["news","offres"],"source":null}"#
            ),
            Ok(want.clone())
        );
        let with_source = from_json(
            &c,
            br#"{"email":"a@example.net","purposes":"news,offres","source":"footer form","wording_version":"v3"}"#,
        )
        .unwrap();
        assert_eq!(with_source.purposes, want.purposes);
        assert_eq!(with_source.source, "footer form");
        assert_eq!(with_source.wording_version, "v3");
    }

    #[test]
    fn errors_name_the_field() {
        let c = config();
        let field = |r: Result<Request, Invalid>| r.unwrap_err().field;
        assert_eq!(
            field(from_form(&c, &fields(&[("purposes", "news")]))),
            "email"
        );
        assert_eq!(
            field(from_form(
                &c,
                &fields(&[("email", "nope"), ("purposes", "news")])
            )),
            "email"
        );
        assert_eq!(
            field(from_form(&c, &fields(&[("email", "a@example.net")]))),
            "purposes"
        );
        let unknown = from_form(
            &c,
            &fields(&[("email", "a@example.net"), ("purposes", "news,spam")]),
        )
        .unwrap_err();
        assert_eq!(unknown.field, "purposes");
        assert!(unknown.error.contains("'spam'"), "{}", unknown.error);
        let private =
            from_json(&c, br#"{"email":"a@example.net","purposes":["internal"]}"#).unwrap_err();
        assert_eq!(
            private.error,
            "'internal' is not a purpose open to sign-ups"
        );
        assert_eq!(
            field(from_json(
                &c,
                br#"{"email":"a@example.net","purposes":[1]}"#
            )),
            "purposes"
        );
        assert_eq!(
            field(from_json(&c, br#"{"email":5,"purposes":["news"]}"#)),
            "email"
        );
        assert_eq!(field(from_json(&c, b"[1]")), "body");
        assert_eq!(field(from_json(&c, b"{")), "body");
        let long = "x".repeat(201);
        assert_eq!(
            field(from_form(
                &c,
                &fields(&[
                    ("email", "a@example.net"),
                    ("purposes", "news"),
                    ("source", &long)
                ])
            )),
            "source"
        );
    }

    #[test]
    fn the_mail_speaks_the_first_purposes_language() {
        let c = config();
        assert_eq!(
            lang_for(&c, &["offres".into(), "news".into()], None),
            Lang::Fr
        );
        assert_eq!(lang_for(&c, &["news".into()], None), Lang::En);
        assert_eq!(lang_for(&c, &["gone".into()], None), Lang::En);
    }
}
