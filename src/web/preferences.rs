//! `/p/{token}`: the preference centre. GET lists the public purposes, ticked where the
//! person may be mailed for them now; POST records the differences, each with its proof.

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
use super::unsubscribe::mask;
use super::{App, Client, Problem, blocking, form_fields, render};
use crate::address::Address;
use crate::config::Config;
use crate::policy::{Decision, Purpose, SuppressReason, decide};
use crate::store::{ALL_PURPOSES, ConsentAction, NewConsentEvent, Store, StoreError};
use crate::token::TokenKind;

/// Recorded with every event of the page: bump it when its sentences in `i18n`
/// change, so the evidence says which text the person saw.
const WORDING: &str = "preference-centre/1";
/// The history's `source` for the page's events.
const SOURCE: &str = "preference-centre";

/// What a POST asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Wish {
    /// The form's save button: exactly these purposes ticked.
    Save(Vec<String>),
    /// The "unsubscribe from everything" button.
    UnsubscribeAll,
}

/// Reads the button from the form; the ticked boxes come as repeated `purpose` fields.
pub(super) fn read_wish(fields: &[(String, String)]) -> Option<Wish> {
    let action = fields
        .iter()
        .find(|(k, _)| k == "action")
        .map(|(_, v)| v.trim());
    match action {
        Some("save") => Some(Wish::Save(
            fields
                .iter()
                .filter(|(k, _)| k == "purpose")
                .map(|(_, v)| v.trim().to_string())
                .collect(),
        )),
        Some("unsubscribe_all") => Some(Wish::UnsubscribeAll),
        _ => None,
    }
}

/// Why a purpose's box cannot be changed from the page, if it cannot: ticking it
/// would record a grant that the policy does not count, and the box would come
/// back unticked.
fn locked(decision: &Decision) -> Option<SuppressReason> {
    match decision {
        Decision::Suppress(
            reason @ (SuppressReason::NotCustomer
            | SuppressReason::Suppressed
            | SuppressReason::Erased),
        ) => Some(*reason),
        _ => None,
    }
}

/// The events a save needs: a grant for each box newly ticked, a withdrawal for each
/// box newly unticked, nothing for locked boxes or values that name no public purpose.
/// `current` pairs each public purpose with what the policy says of it now.
pub(super) fn changes<'a>(
    current: &[(&'a Purpose, Decision)],
    ticked: &[String],
) -> Vec<(&'a Purpose, ConsentAction)> {
    current
        .iter()
        .filter(|(_, decision)| locked(decision).is_none())
        .filter_map(|(purpose, decision)| {
            let wanted = ticked.contains(&purpose.id);
            match (wanted, decision.is_allowed()) {
                (true, false) => Some((*purpose, ConsentAction::Grant)),
                (false, true) => Some((*purpose, ConsentAction::Withdraw)),
                _ => None,
            }
        })
        .collect()
}

/// The purposes the page lists, in the config's order.
fn public(config: &Config) -> impl Iterator<Item = &Purpose> {
    config.purposes.iter().filter(|p| p.public)
}

/// The page's language: the reader's, else the first public purpose's locale.
fn page_lang(config: &Config, client: &Client) -> Lang {
    client.lang(public(config).next().map_or("en", |p| p.locale.as_str()))
}

/// What the policy says now of each public purpose, in [`public`] order.
fn decisions(
    store: &dyn Store,
    config: &Config,
    address: &Address,
) -> Result<Vec<Decision>, StoreError> {
    let now = crate::clock::now();
    public(config)
        .map(|purpose| {
            let facts = store.consent_facts(std::slice::from_ref(address), &purpose.id)?;
            let facts = facts.first().cloned().unwrap_or_default();
            Ok(decide(purpose, &facts, now))
        })
        .collect()
}

/// Whether "unsubscribe from everything" would change anything: not if the newest
/// statement for every purpose is already a withdrawal from everything.
fn withdraw_all_needed(
    store: &dyn Store,
    config: &Config,
    address: &Address,
) -> Result<bool, StoreError> {
    for purpose in &config.purposes {
        let facts = store.consent_facts(std::slice::from_ref(address), &purpose.id)?;
        let Some(facts) = facts.first() else {
            return Ok(true);
        };
        let Some(all) = facts
            .all_event
            .as_ref()
            .filter(|e| e.action == ConsentAction::Withdraw)
        else {
            return Ok(true);
        };
        if facts.purpose_event.as_ref().is_some_and(|e| e.id > all.id) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Applies the wish under `lock` (so that a double submit records one change) in one
/// transaction; returns what was recorded.
fn apply(
    store: &dyn Store,
    config: &Config,
    lock: &Mutex<()>,
    address: &Address,
    wish: &Wish,
    evidence: serde_json::Value,
) -> Result<Vec<(String, ConsentAction)>, StoreError> {
    // The lock guards no data, so a poisoned one is still a good lock.
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let wanted: Vec<(String, ConsentAction)> = match wish {
        Wish::Save(ticked) => {
            let now = decisions(store, config, address)?;
            let current: Vec<(&Purpose, Decision)> = public(config).zip(now).collect();
            changes(&current, ticked)
                .into_iter()
                .map(|(p, action)| (p.id.clone(), action))
                .collect()
        }
        Wish::UnsubscribeAll if withdraw_all_needed(store, config, address)? => {
            vec![(ALL_PURPOSES.to_string(), ConsentAction::Withdraw)]
        }
        Wish::UnsubscribeAll => Vec::new(),
    };
    if wanted.is_empty() {
        return Ok(wanted);
    }
    let at = crate::clock::now();
    let events: Vec<NewConsentEvent> = wanted
        .iter()
        .map(|(purpose, action)| NewConsentEvent {
            address: address.clone(),
            purpose: purpose.clone(),
            action: *action,
            at,
            source: SOURCE.to_string(),
            evidence: evidence.clone(),
        })
        .collect();
    let refused = store.append_consents(&events)?;
    Ok(wanted
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !refused.contains(i))
        .map(|(_, change)| change)
        .collect())
}

/// The proof stored with each event: from where, with what, and the words shown.
fn evidence(wish: &Wish, client: &Client, lang: Lang) -> serde_json::Value {
    let t = lang.texts();
    let wording = match wish {
        Wish::Save(_) => format!("{} [{}]", t.prefs_lead, t.prefs_save),
        Wish::UnsubscribeAll => format!("{} [{}]", t.prefs_all_lead, t.prefs_all_button),
    };
    json!({
        "method": SOURCE,
        "ip": client.ip.to_string(),
        "user_agent": client.user_agent,
        "lang": lang.code(),
        "wording_version": WORDING,
        "wording": wording,
    })
}

/// One purpose as the page shows it.
struct Row<'a> {
    id: &'a str,
    name: &'a str,
    description: &'a str,
    checked: bool,
    /// Why the box cannot be changed; None for an ordinary box.
    note: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "preferences.html")]
struct PreferencesPage<'a> {
    t: &'static Texts,
    address: &'a str,
    rows: Vec<Row<'a>>,
    notice: Option<&'a str>,
}

/// Verifies the link and finds whose it is.
async fn open(
    app: &App,
    path: Result<Path<String>, PathRejection>,
    client: &Client,
) -> Result<Address, Problem> {
    let token = app.link_token(path, client)?;
    let claims = app.claims(&token, TokenKind::Preferences, client)?;
    Ok(app.contact(claims.subject, client).await?.1)
}

/// Reads the current state and renders the page.
async fn page(
    app: &Arc<App>,
    address: Address,
    lang: Lang,
    notice: Option<&str>,
) -> Result<Response, Problem> {
    let now = {
        let (store, config, address) = (
            app.web.store.clone(),
            app.web.config.clone(),
            address.clone(),
        );
        blocking(move || decisions(store.as_ref(), &config, &address)).await?
    };
    let t = lang.texts();
    let rows = public(&app.web.config)
        .zip(now)
        .map(|(purpose, decision)| Row {
            id: &purpose.id,
            name: &purpose.name,
            description: &purpose.description,
            checked: decision.is_allowed(),
            note: locked(&decision).map(|reason| match reason {
                SuppressReason::NotCustomer => t.prefs_customers_only,
                _ => t.prefs_undeliverable,
            }),
        })
        .collect();
    Ok(render(
        StatusCode::OK,
        &PreferencesPage {
            t,
            address: &mask(&address),
            rows,
            notice,
        },
    ))
}

/// GET: the form with the current state. Link scanners fetch it; it changes nothing.
pub(super) async fn show(
    State(app): State<Arc<App>>,
    client: Client,
    token: Result<Path<String>, PathRejection>,
) -> Result<Response, Response> {
    let lang = page_lang(&app.web.config, &client);
    let address = open(&app, token, &client).await.map_err(|p| p.page(lang))?;
    page(&app, address, lang, None)
        .await
        .map_err(|p| p.page(lang))
}

/// POST: records what changed and shows the page again with a notice. The token in
/// the path is the credential, so a forged cross-site POST cannot name anyone.
pub(super) async fn submit(
    State(app): State<Arc<App>>,
    client: Client,
    token: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let lang = page_lang(&app.web.config, &client);
    let address = open(&app, token, &client).await.map_err(|p| p.page(lang))?;
    let fields = form_fields(&headers, body, &client).map_err(|p| p.page(lang))?;
    let wish = read_wish(&fields).ok_or_else(|| {
        tracing::info!(peer = %client.ip, "http: preference POST with an unrecognised body");
        Problem::BadRequest.page(lang)
    })?;

    let recorded = {
        let (app, address, wish) = (app.clone(), address.clone(), wish.clone());
        let evidence = evidence(&wish, &client, lang);
        blocking(move || {
            let web = &app.web;
            apply(
                web.store.as_ref(),
                &web.config,
                &app.consent_lock,
                &address,
                &wish,
                evidence,
            )
        })
        .await
        .map_err(|p| p.page(lang))?
    };
    for (purpose, action) in &recorded {
        bump(match action {
            ConsentAction::Grant => &app.metrics.preference_grants,
            ConsentAction::Withdraw => &app.metrics.preference_withdrawals,
        });
        tracing::info!(%purpose, action = action.as_str(), "http: preference centre: consent changed");
    }
    let t = lang.texts();
    let notice = match wish {
        Wish::Save(_) => t.prefs_saved,
        Wish::UnsubscribeAll => t.prefs_all_done,
    };
    page(&app, address, lang, Some(notice))
        .await
        .map_err(|p| p.page(lang))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Basis;
    use crate::web::form::fields;

    fn purpose(id: &str, basis: Basis) -> Purpose {
        Purpose {
            id: id.into(),
            name: id.into(),
            basis,
            expires_after_days: None,
            description: String::new(),
            locale: "en".into(),
            footer_text: None,
            footer_html: None,
            public: true,
        }
    }

    #[test]
    fn the_buttons_are_read_with_their_boxes() {
        assert_eq!(
            read_wish(&fields(&[
                ("action", "save"),
                ("purpose", "news"),
                ("purpose", " b2b ")
            ])),
            Some(Wish::Save(vec!["news".into(), "b2b".into()]))
        );
        assert_eq!(
            read_wish(&fields(&[("action", "save")])),
            Some(Wish::Save(vec![]))
        );
        assert_eq!(
            read_wish(&fields(&[
                ("action", "unsubscribe_all"),
                ("purpose", "news")
            ])),
            Some(Wish::UnsubscribeAll)
        );
        assert_eq!(read_wish(&fields(&[("purpose", "news")])), None);
        assert_eq!(read_wish(&fields(&[("action", "delete")])), None);
    }

    #[test]
    fn only_differences_are_recorded_and_locked_boxes_never() {
        let news = purpose("news", Basis::Consent);
        let b2b = purpose("b2b", Basis::LegitimateInterest);
        let offers = purpose("offers", Basis::SoftOptIn);
        let allowed = Decision::Allow {
            basis: Basis::Consent,
            record: Some(1),
        };
        let current = [
            (&news, Decision::Suppress(SuppressReason::NoConsent)),
            (&b2b, allowed.clone()),
            (&offers, Decision::Suppress(SuppressReason::NotCustomer)),
        ];
        let ids = |v: Vec<(&Purpose, ConsentAction)>| {
            v.into_iter()
                .map(|(p, a)| (p.id.clone(), a))
                .collect::<Vec<_>>()
        };
        // Nothing ticked differs from b2b: withdraw it; offers is locked.
        assert_eq!(
            ids(changes(&current, &[])),
            vec![("b2b".to_string(), ConsentAction::Withdraw)]
        );
        // Tick news (and a value that names nothing, and the locked one).
        assert_eq!(
            ids(changes(
                &current,
                &["news".into(), "b2b".into(), "offers".into(), "x".into()]
            )),
            vec![("news".to_string(), ConsentAction::Grant)]
        );
        // The same state as shown: nothing to record.
        assert!(changes(&current, &["b2b".into()]).is_empty());
        // An expired consent is renewed by ticking its box again.
        let lapsed = [(&news, Decision::Suppress(SuppressReason::ConsentExpired))];
        assert_eq!(
            ids(changes(&lapsed, &["news".into()])),
            vec![("news".to_string(), ConsentAction::Grant)]
        );
    }
}
