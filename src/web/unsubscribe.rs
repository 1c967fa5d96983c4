//! `/u/{token}`: the unsubscribe page (GET, which changes nothing), the RFC 8058
//! one-click POST, the page's own button and its undo, each a history event with proof.

use std::sync::{Arc, Mutex};

use askama::Template;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::json;

use super::i18n::{Lang, Texts};
use super::metrics::bump;
use super::{App, Client, MessagePage, Problem, blocking, form_fields, render};
use crate::address::Address;
use crate::policy::Purpose;
use crate::store::{ConsentAction, LatestEvent, NewConsentEvent, Store, StoreError};
use crate::token::TokenKind;

/// The wording versions recorded with page events: bump them when the sentences in
/// `i18n` change, so the evidence says which text the person saw.
const PAGE_WORDING: &str = "unsubscribe-page/1";
const UNDO_WORDING: &str = "unsubscribe-page-undo/1";

/// What a POST asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    /// RFC 8058, from a mail client: `List-Unsubscribe=One-Click`.
    OneClick,
    /// The page's button (`action=unsubscribe`).
    Unsubscribe,
    /// The confirmation page's undo button (`action=resubscribe`).
    Resubscribe,
}

impl Intent {
    /// The history's `source` for the event this intent records.
    fn source(self) -> &'static str {
        match self {
            Intent::OneClick => "one-click",
            Intent::Unsubscribe => "unsubscribe-page",
            Intent::Resubscribe => "unsubscribe-page-undo",
        }
    }

    /// The evidence's `method`, the word an operator answers "how?" with.
    fn method(self) -> &'static str {
        match self {
            Intent::OneClick => "one-click",
            Intent::Unsubscribe => "page",
            Intent::Resubscribe => "page-undo",
        }
    }
}

/// Reads the intent from the form fields. A body that mixes the one-click field with
/// a page action is ambiguous and refused rather than guessed at.
pub(super) fn read_intent(fields: &[(String, String)]) -> Option<Intent> {
    let one_click = fields.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("List-Unsubscribe") && v.trim().eq_ignore_ascii_case("One-Click")
    });
    let action = fields
        .iter()
        .find(|(k, _)| k == "action")
        .map(|(_, v)| v.trim());
    match (one_click, action) {
        (true, None) => Some(Intent::OneClick),
        (false, Some("unsubscribe")) => Some(Intent::Unsubscribe),
        (false, Some("resubscribe")) => Some(Intent::Resubscribe),
        _ => None,
    }
}

/// The event to append given the newest one for this purpose, or None when the
/// history already says it. Undo only ever undoes a withdrawal: it must not turn a
/// person who never consented into one who did.
pub(super) fn change_needed(intent: Intent, latest: Option<&LatestEvent>) -> Option<ConsentAction> {
    let withdrawn = latest.is_some_and(|e| e.action == ConsentAction::Withdraw);
    match intent {
        Intent::OneClick | Intent::Unsubscribe if withdrawn => None,
        Intent::OneClick | Intent::Unsubscribe => Some(ConsentAction::Withdraw),
        Intent::Resubscribe if withdrawn => Some(ConsentAction::Grant),
        Intent::Resubscribe => None,
    }
}

/// The proof stored with the event: how, from where, with what, and for page events
/// the words the person was shown.
pub(super) fn evidence(intent: Intent, client: &Client, lang: Lang) -> serde_json::Value {
    let t = lang.texts();
    let mut evidence = json!({
        "method": intent.method(),
        "ip": client.ip.to_string(),
        "user_agent": client.user_agent,
    });
    let extra = match intent {
        Intent::OneClick => json!({}),
        Intent::Unsubscribe => json!({
            "wording_version": PAGE_WORDING,
            "lang": lang.code(),
            "wording": format!("{} [{}]", t.unsubscribe_lead, t.unsubscribe_button),
        }),
        Intent::Resubscribe => json!({
            "wording_version": UNDO_WORDING,
            "lang": lang.code(),
            "wording": format!("{} [{}]", t.undo_lead, t.undo_button),
        }),
    };
    if let (Some(evidence), serde_json::Value::Object(extra)) = (evidence.as_object_mut(), extra) {
        evidence.extend(extra);
    }
    evidence
}

/// `alice@example.net` → `a•••e@example.net`: enough for the person to recognise
/// their address, not enough for someone looking over a shoulder to read it.
pub(super) fn mask(address: &Address) -> String {
    let (local, domain) = address
        .as_str()
        .rsplit_once('@')
        .unwrap_or((address.as_str(), ""));
    let mut chars = local.chars();
    let first = chars.next().map(String::from).unwrap_or_default();
    let last = match local.chars().count() {
        0..=2 => String::new(),
        _ => chars.next_back().map(String::from).unwrap_or_default(),
    };
    format!("{first}•••{last}@{domain}")
}

/// A verified unsubscribe link: whose, and for what.
struct Link<'a> {
    contact: i64,
    address: Address,
    purpose: &'a Purpose,
    /// `/p/{token}` for the same person, when there is a preference centre to offer.
    preferences: Option<String>,
}

/// The purpose is checked before the store is asked, so a link for a purpose the
/// operator has since removed costs nothing and looks like any other bad link.
async fn open<'a>(
    app: &'a App,
    path: Result<Path<String>, PathRejection>,
    client: &Client,
) -> Result<Link<'a>, Problem> {
    let token = app.link_token(path, client)?;
    let claims = app.claims(&token, TokenKind::Unsubscribe, client)?;
    let purpose = app
        .web
        .config
        .purpose_by_tag(claims.scope)
        .ok_or_else(|| app.refuse("a purpose no longer configured", client))?;
    let (contact, address) = app.contact(claims.subject, client).await?;
    Ok(Link {
        contact,
        address,
        purpose,
        preferences: app.preferences_path(contact),
    })
}

#[derive(Template)]
#[template(path = "unsubscribe.html")]
struct UnsubscribePage<'a> {
    t: &'static Texts,
    heading: &'a str,
    lead: &'a str,
    purpose_name: &'a str,
    purpose_description: &'a str,
    address: &'a str,
    preferences: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "unsubscribed.html")]
struct UnsubscribedPage<'a> {
    t: &'static Texts,
    purpose_name: &'a str,
    purpose_description: &'a str,
    address: &'a str,
    preferences: Option<&'a str>,
}

/// GET: shows what the link is for and offers the button. Link scanners fetch every
/// URL in a message, so this must never change anything.
pub(super) async fn show(
    State(app): State<Arc<App>>,
    client: Client,
    token: Result<Path<String>, PathRejection>,
) -> Result<Response, Response> {
    let fallback = client.lang("en");
    let link = open(&app, token, &client)
        .await
        .map_err(|p| p.page(fallback))?;
    let t = client.lang(&link.purpose.locale).texts();
    Ok(render(
        StatusCode::OK,
        &UnsubscribePage {
            t,
            heading: t.unsubscribe_heading,
            lead: t.unsubscribe_lead,
            purpose_name: &link.purpose.name,
            purpose_description: &link.purpose.description,
            address: &mask(&link.address),
            preferences: link.preferences.as_deref(),
        },
    ))
}

/// POST: one-click from a mail client, or a button of the pages. Always 200 on
/// success, never a redirect (RFC 8058), and a repeat records nothing new.
pub(super) async fn submit(
    State(app): State<Arc<App>>,
    client: Client,
    token: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let fallback = client.lang("en");
    let link = open(&app, token, &client)
        .await
        .map_err(|p| p.page(fallback))?;
    let lang = client.lang(&link.purpose.locale);
    let fields = form_fields(&headers, body, &client).map_err(|p| p.page(lang))?;
    let intent = read_intent(&fields).ok_or_else(|| {
        tracing::info!(peer = %client.ip, "http: unsubscribe POST with an unrecognised body");
        Problem::BadRequest.page(lang)
    })?;

    let event = NewConsentEvent {
        address: link.address.clone(),
        purpose: link.purpose.id.clone(),
        action: ConsentAction::Withdraw, // set by `record` from the history
        at: crate::clock::now(),
        source: intent.source().to_string(),
        evidence: evidence(intent, &client, lang),
    };
    let recorded = {
        let app = app.clone();
        blocking(move || record(app.web.store.as_ref(), &app.consent_lock, intent, event))
            .await
            .map_err(|p| p.page(lang))?
    };
    match recorded {
        Some(id) => {
            bump(match intent {
                Intent::OneClick => &app.metrics.unsubscribes_one_click,
                Intent::Unsubscribe => &app.metrics.unsubscribes_page,
                Intent::Resubscribe => &app.metrics.resubscribes,
            });
            tracing::info!(
                contact = link.contact,
                purpose = %link.purpose.id,
                method = intent.method(),
                event = id,
                "http: consent {}",
                if intent == Intent::Resubscribe { "granted again" } else { "withdrawn" },
            );
        }
        None => tracing::debug!(
            contact = link.contact,
            purpose = %link.purpose.id,
            method = intent.method(),
            "http: already so; nothing recorded"
        ),
    }

    let t = lang.texts();
    let address = mask(&link.address);
    let page = match intent {
        Intent::OneClick => render(
            StatusCode::OK,
            &MessagePage {
                t,
                heading: t.unsubscribed_heading,
                body: t.one_click_body,
                detail: Some(&link.purpose.name),
            },
        ),
        Intent::Unsubscribe => render(
            StatusCode::OK,
            &UnsubscribedPage {
                t,
                purpose_name: &link.purpose.name,
                purpose_description: &link.purpose.description,
                address: &address,
                preferences: link.preferences.as_deref(),
            },
        ),
        Intent::Resubscribe => render(
            StatusCode::OK,
            &UnsubscribePage {
                t,
                heading: t.resubscribed_heading,
                lead: t.resubscribed_lead,
                purpose_name: &link.purpose.name,
                purpose_description: &link.purpose.description,
                address: &address,
                preferences: link.preferences.as_deref(),
            },
        ),
    };
    Ok(page)
}

/// Reads the newest event for the purpose and appends what the intent needs, under
/// `lock` so that racing duplicates see each other. Returns the new event's id, or
/// None when the history already said so.
fn record(
    store: &dyn Store,
    lock: &Mutex<()>,
    intent: Intent,
    mut event: NewConsentEvent,
) -> Result<Option<i64>, StoreError> {
    // The lock guards no data, so a poisoned one is still a good lock.
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let facts = store.consent_facts(std::slice::from_ref(&event.address), &event.purpose)?;
    let latest = facts.first().and_then(|f| f.purpose_event.as_ref());
    let Some(action) = change_needed(intent, latest) else {
        return Ok(None);
    };
    event.action = action;
    store.append_consent(&event).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::form::fields;

    #[test]
    fn the_body_says_which_button() {
        assert_eq!(
            read_intent(&fields(&[("List-Unsubscribe", "One-Click")])),
            Some(Intent::OneClick)
        );
        assert_eq!(
            read_intent(&fields(&[("list-unsubscribe", " one-click ")])),
            Some(Intent::OneClick)
        );
        assert_eq!(
            read_intent(&fields(&[("action", "unsubscribe")])),
            Some(Intent::Unsubscribe)
        );
        assert_eq!(
            read_intent(&fields(&[("action", "resubscribe")])),
            Some(Intent::Resubscribe)
        );
        assert_eq!(read_intent(&[]), None);
        assert_eq!(read_intent(&fields(&[("List-Unsubscribe", "Yes")])), None);
        assert_eq!(read_intent(&fields(&[("action", "delete")])), None);
        assert_eq!(
            read_intent(&fields(&[
                ("List-Unsubscribe", "One-Click"),
                ("action", "resubscribe")
            ])),
            None
        );
    }

    #[test]
    fn repeats_record_nothing_and_undo_only_undoes_a_withdrawal() {
        let ev = |action| LatestEvent {
            id: 1,
            action,
            at: 0,
        };
        let (grant, withdraw) = (ev(ConsentAction::Grant), ev(ConsentAction::Withdraw));
        use ConsentAction::{Grant, Withdraw};
        assert_eq!(change_needed(Intent::OneClick, None), Some(Withdraw));
        assert_eq!(
            change_needed(Intent::OneClick, Some(&grant)),
            Some(Withdraw)
        );
        assert_eq!(change_needed(Intent::OneClick, Some(&withdraw)), None);
        assert_eq!(change_needed(Intent::Unsubscribe, Some(&withdraw)), None);
        assert_eq!(
            change_needed(Intent::Resubscribe, Some(&withdraw)),
            Some(Grant)
        );
        assert_eq!(change_needed(Intent::Resubscribe, Some(&grant)), None);
        assert_eq!(change_needed(Intent::Resubscribe, None), None);
    }

    #[test]
    fn addresses_are_masked() {
        let m = |s: &str| mask(&Address::parse(s).unwrap());
        assert_eq!(m("alice@example.net"), "a•••e@example.net");
        assert_eq!(m("ab@example.net"), "a•••@example.net");
        assert_eq!(m("x@example.net"), "x•••@example.net");
        assert_eq!(m("élodie@exemple.fr"), "é•••e@exemple.fr");
    }
}
