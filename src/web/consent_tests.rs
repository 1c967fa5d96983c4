//! Consent people manage and operators prove, against the real SQLite store: the
//! preference centre, double opt-in (sign-up, mail, confirmation) and the admin API.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};

use super::tests::{
    API_TOKEN, Fixture, Reply, URLENCODED, assert_private_headers, fixture, fixture_with,
};
use crate::address::Address;
use crate::store::{ALL_PURPOSES, ConsentAction, NewSignup, Store};
use crate::token::{Claims, TokenKind};

impl Fixture {
    /// A token with no purpose in it: preference centre (contact) or confirmation (sign-up).
    fn scoped_token(&self, kind: TokenKind, subject: i64) -> String {
        self.web.tokens.issue(Claims {
            kind,
            subject: u64::try_from(subject).unwrap(),
            scope: 0,
        })
    }

    fn preferences_uri(&self, address: &Address) -> String {
        let id = self.store.contact_id(address).unwrap();
        format!("/p/{}", self.scoped_token(TokenKind::Preferences, id))
    }

    async fn form(&self, uri: &str, body: &str, accept_language: Option<&str>) -> Reply {
        let mut request = Request::post(uri)
            .header(header::CONTENT_TYPE, URLENCODED)
            .header(header::USER_AGENT, "Browser/1.0");
        if let Some(lang) = accept_language {
            request = request.header(header::ACCEPT_LANGUAGE, lang);
        }
        self.send(request.body(Body::from(body.to_string())).unwrap())
            .await
    }

    async fn api_ok(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let reply = self.api(method, uri, body, Some(API_TOKEN)).await;
        let json = if reply.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&reply.body)
                .unwrap_or_else(|e| panic!("{method} {uri}: not JSON ({e}): {}", reply.body))
        };
        (reply.status, json)
    }
}

/// The checkbox of `purpose` as the page renders it: `(present, checked, disabled)`.
fn checkbox(html: &str, purpose: &str) -> (bool, bool, bool) {
    let marker = format!("name=\"purpose\" value=\"{purpose}\"");
    match html.find(&marker) {
        None => (false, false, false),
        Some(at) => {
            let tag = &html[at..at + html[at..].find('>').unwrap()];
            (true, tag.contains(" checked"), tag.contains(" disabled"))
        }
    }
}

// ---- the preference centre ----------------------------------------------------------

#[tokio::test]
async fn the_page_lists_public_purposes_ticked_only_where_mail_may_go() {
    let f = fixture(1000);
    let (alice, _) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = f.preferences_uri(&alice);
    for _ in 0..3 {
        let reply = f.get(&uri, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_private_headers(&reply);
        let html = &reply.body;
        assert_eq!(checkbox(html, "newsletter"), (true, true, false), "{html}");
        // Legitimate interest: mailed until an objection, so ticked.
        assert_eq!(checkbox(html, "offres"), (true, true, false));
        // Soft opt-in for a non-customer: never ticked, and not tickable.
        assert_eq!(checkbox(html, "clients"), (true, false, true));
        assert!(html.contains("Only for customers."));
        assert!(
            !html.contains("internal") && !html.contains("Orders"),
            "only public purposes"
        );
        assert!(html.contains("Our monthly news and articles."));
        assert!(html.contains("a•••e@example.net") && !html.contains("alice"));
        assert!(html.contains("name=\"action\" value=\"unsubscribe_all\""));
        for external in ["http://", "https://", "<script", "<link", "@import"] {
            assert!(!html.contains(external), "{external} in {html}");
        }
    }
    assert_eq!(f.history(&alice).len(), 1, "GET records nothing");

    // An opt-in purpose never consented to is not pre-ticked.
    let bob = Address::parse("bob@example.net").unwrap();
    let html = f.get(&f.preferences_uri(&bob), None).await.body;
    assert_eq!(checkbox(&html, "newsletter"), (true, false, false));
}

#[tokio::test]
async fn saving_records_each_difference_with_its_proof() {
    let f = fixture(1000);
    let (alice, _) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = f.preferences_uri(&alice);

    // Untick the newsletter, keep offres.
    let saved = f.form(&uri, "action=save&purpose=offres", None).await;
    assert_eq!(saved.status, StatusCode::OK, "{}", saved.body);
    assert!(saved.headers.get(header::LOCATION).is_none());
    assert!(saved.body.contains("Your choices are saved."));
    assert_eq!(checkbox(&saved.body, "newsletter"), (true, false, false));
    assert_eq!(checkbox(&saved.body, "offres"), (true, true, false));
    assert!(!f.subscribed(&alice, "newsletter"));
    assert!(f.subscribed(&alice, "offres"));
    let history = f.history(&alice);
    assert_eq!(history.len(), 2, "one event: the change");
    let event = &history[1];
    assert_eq!(
        (event.purpose.as_str(), event.action, event.source.as_str()),
        ("newsletter", ConsentAction::Withdraw, "preference-centre")
    );
    assert_eq!(event.evidence["ip"], "192.0.2.7");
    assert_eq!(event.evidence["user_agent"], "Browser/1.0");
    assert_eq!(event.evidence["lang"], "en");
    assert_eq!(event.evidence["wording_version"], "preference-centre/1");
    assert!(
        event.evidence["wording"]
            .as_str()
            .unwrap()
            .contains("Save my choices")
    );

    // The same choices again: nothing new.
    f.form(&uri, "action=save&purpose=offres", None).await;
    assert_eq!(f.history(&alice).len(), 2);

    // Tick the newsletter again and untick offres (an objection); the locked box
    // and an unknown value are ignored.
    let saved = f
        .form(
            &uri,
            "action=save&purpose=newsletter&purpose=clients&purpose=internal",
            None,
        )
        .await;
    assert_eq!(saved.status, StatusCode::OK);
    assert!(f.subscribed(&alice, "newsletter"));
    assert!(!f.subscribed(&alice, "offres"));
    let history = f.history(&alice);
    assert_eq!(history.len(), 4);
    let changes: Vec<_> = history[2..]
        .iter()
        .map(|e| (e.purpose.as_str(), e.action))
        .collect();
    assert!(changes.contains(&("newsletter", ConsentAction::Grant)));
    assert!(changes.contains(&("offres", ConsentAction::Withdraw)));
    assert_eq!(
        f.metric("optgate_web_preference_changes_total{action=\"grant\"}")
            .await,
        1
    );
    assert_eq!(
        f.metric("optgate_web_preference_changes_total{action=\"withdraw\"}")
            .await,
        2
    );
}

#[tokio::test]
async fn unsubscribe_from_everything_is_one_withdrawal_for_all() {
    let f = fixture(1000);
    let (alice, _) = f.subscriber("alice@example.net", &["newsletter", "internal"]);
    let uri = f.preferences_uri(&alice);
    let done = f.form(&uri, "action=unsubscribe_all", None).await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(done.body.contains("You are unsubscribed from everything"));
    for purpose in ["newsletter", "offres", "clients"] {
        assert!(!checkbox(&done.body, purpose).1, "{purpose} still ticked");
    }
    for purpose in ["newsletter", "offres", "internal"] {
        assert!(!f.subscribed(&alice, purpose), "{purpose}");
    }
    let history = f.history(&alice);
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].purpose, ALL_PURPOSES);
    assert_eq!(history[2].action, ConsentAction::Withdraw);
    assert!(
        history[2].evidence["wording"]
            .as_str()
            .unwrap()
            .contains("Unsubscribe from everything")
    );
    // Again: already so.
    f.form(&uri, "action=unsubscribe_all", None).await;
    assert_eq!(f.history(&alice).len(), 3);
    // Ticking one box afterwards wins over the older "everything".
    f.form(&uri, "action=save&purpose=newsletter", None).await;
    assert!(f.subscribed(&alice, "newsletter"));
    assert!(!f.subscribed(&alice, "offres"));
    // And "everything" once more is needed again.
    f.form(&uri, "action=unsubscribe_all", None).await;
    assert_eq!(f.history(&alice).len(), 5);
    assert!(!f.subscribed(&alice, "newsletter"));
}

#[tokio::test]
async fn bad_preference_links_and_bodies_change_nothing() {
    let f = fixture(1000);
    let (alice, unsubscribe_token) = f.subscriber("alice@example.net", &["newsletter"]);
    let id = f.store.contact_id(&alice).unwrap();
    for token in [
        unsubscribe_token.as_str(),
        &f.scoped_token(TokenKind::Confirm, id),
        &f.scoped_token(TokenKind::Preferences, id + 1000),
        "forged",
    ] {
        let uri = format!("/p/{token}");
        assert_eq!(f.get(&uri, None).await.status, StatusCode::NOT_FOUND);
        let reply = f.form(&uri, "action=unsubscribe_all", None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert!(reply.body.contains("Link not valid"));
    }
    let uri = f.preferences_uri(&alice);
    for body in ["", "purpose=newsletter", "action=delete"] {
        let reply = f.form(&uri, body, None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(f.history(&alice).len(), 1);
    assert!(f.subscribed(&alice, "newsletter"));
}

#[tokio::test]
async fn the_preference_centre_speaks_french_and_the_unsubscribe_page_links_to_it() {
    let f = fixture(1000);
    let (alice, unsubscribe_token) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = f.preferences_uri(&alice);
    let fr = f.get(&uri, Some("fr-FR, fr;q=0.9")).await.body;
    assert!(fr.contains("<html lang=\"fr\">"));
    assert!(fr.contains("Enregistrer mes choix") && fr.contains("Me désinscrire de tout"));
    let saved = f.form(&uri, "action=save", Some("fr")).await;
    assert!(saved.body.contains("Vos choix sont enregistrés."));
    assert_eq!(f.history(&alice).pop().unwrap().evidence["lang"], "fr");

    let page = f.get(&format!("/u/{unsubscribe_token}"), None).await.body;
    let link = page
        .split("href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no link in {page}"));
    assert!(link.starts_with("/p/"), "{link}");
    assert!(page.contains("Manage all your email preferences"));
    assert_eq!(f.get(link, None).await.status, StatusCode::OK);
}

// ---- double opt-in ------------------------------------------------------------------

async fn subscribe_json(f: &Fixture, body: Value) -> Reply {
    let request = Request::post("/subscribe")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "SignupPage/1.0")
        .header(header::ORIGIN, "https://shop.example.com")
        .body(Body::from(body.to_string()))
        .unwrap();
    f.send(request).await
}

/// The confirmation link's path in a queued mail.
fn confirm_path(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let at = text
        .find("/confirm/")
        .unwrap_or_else(|| panic!("no link in {text}"));
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "/_-".contains(*c))
        .collect()
}

#[tokio::test]
async fn a_sign_up_queues_the_confirmation_mail_and_allows_nothing_yet() {
    let f = fixture(1000);
    let reply = subscribe_json(
        &f,
        json!({"email": "carol@example.net", "purposes": ["newsletter", "offres"], "source": "footer", "wording_version": "form-v2"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(
        serde_json::from_str::<Value>(&reply.body).unwrap(),
        json!({"status": "pending"})
    );
    let queued = f.queued().await;
    assert_eq!(queued.len(), 1);
    let mail = &queued[0];
    let carol = f
        .store
        .contact_id(&Address::parse("carol@example.net").unwrap())
        .unwrap();
    assert_eq!(
        mail.recipients,
        vec![("carol@example.net".to_string(), carol)]
    );
    assert_eq!(mail.message.purpose, "confirmation");
    assert_eq!(mail.message.sender, "bounces@example.com");
    let text = String::from_utf8_lossy(&mail.message.body);
    assert!(text.contains("From: News <news@example.com>"), "{text}");
    assert!(text.contains("To: carol@example.net"));
    assert!(text.contains("Subject: Please confirm your subscription"));
    assert!(text.contains("multipart/alternative"));
    assert!(confirm_path(&mail.message.body).len() > "/confirm/".len() + 20);

    let carol = Address::parse("carol@example.net").unwrap();
    assert!(
        !f.subscribed(&carol, "newsletter"),
        "nothing before confirmation"
    );
    let signups = f.store.signups_for(&carol).unwrap();
    assert_eq!(signups.len(), 1);
    let signup = &signups[0];
    assert_eq!(signup.purposes, vec!["newsletter", "offres"]);
    assert_eq!(
        (signup.source.as_str(), signup.wording_version.as_str()),
        ("footer", "form-v2")
    );
    assert_eq!(signup.evidence["ip"], "192.0.2.7");
    assert_eq!(signup.evidence["user_agent"], "SignupPage/1.0");
    assert_eq!(signup.evidence["origin"], "https://shop.example.com");
    assert!((signup.expires_at - signup.at - 3600).abs() <= 1);

    // A form gets a page; comma-separated purposes; the page in French on request.
    let reply = f
        .form(
            "/subscribe",
            "email=dan%40example.net&purposes=newsletter,clients",
            Some("fr"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.body.contains("Consultez votre messagerie"),
        "{}",
        reply.body
    );
    let queued = f.queued().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(
        f.metric("optgate_web_signups_total{outcome=\"mailed\"}")
            .await,
        2
    );
}

#[tokio::test]
async fn confirming_records_the_grants_with_both_proofs() {
    let f = fixture(1000);
    subscribe_json(&f, json!({"email": "erin@example.net", "purposes": "newsletter", "wording_version": "form-v2"})).await;
    let path = confirm_path(&f.queued().await[0].message.body);
    let erin = Address::parse("erin@example.net").unwrap();

    for _ in 0..3 {
        let page = f.get(&path, None).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            page.body.contains("Confirm your subscription") && page.body.contains("Newsletter")
        );
        assert!(
            page.body
                .contains("<button type=\"submit\" class=\"primary\">Confirm</button>")
        );
        assert_private_headers(&page);
    }
    assert!(!f.subscribed(&erin, "newsletter"), "GET confirms nothing");

    let done = f.form(&path, "action=confirm", None).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(done.body.contains("Subscription confirmed"));
    assert!(f.subscribed(&erin, "newsletter"));
    let grant = f.history(&erin).pop().unwrap();
    assert_eq!(grant.action, ConsentAction::Grant);
    assert_eq!(grant.source, "double-opt-in");
    assert_eq!(grant.evidence["signup"]["ip"], "192.0.2.7");
    assert_eq!(grant.evidence["signup"]["user_agent"], "SignupPage/1.0");
    assert_eq!(grant.evidence["confirmation"]["ip"], "192.0.2.7");
    assert_eq!(grant.evidence["confirmation"]["user_agent"], "Browser/1.0");
    assert_eq!(
        grant.evidence["confirmation"]["wording_version"],
        "confirm-page/1"
    );
    assert_eq!(grant.evidence["wording_version"], "form-v2");
    assert!(
        grant.evidence["signup"]["at"].is_string()
            && grant.evidence["confirmation"]["at"].is_string()
    );

    // A second click: a clear page, nothing new.
    let again = f.form(&path, "action=confirm", None).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.body.contains("Already confirmed"));
    assert!(f.get(&path, None).await.body.contains("Already confirmed"));
    assert_eq!(f.history(&erin).len(), 1);
    assert_eq!(f.metric("optgate_web_confirmations_total").await, 1);
}

#[tokio::test]
async fn expired_and_unknown_confirmation_links_get_clear_pages() {
    let f = fixture(1000);
    let frank = Address::parse("frank@example.net").unwrap();
    let now = crate::clock::now();
    let id = f
        .store
        .create_signup(&NewSignup {
            address: frank.clone(),
            purposes: vec!["newsletter".into()],
            source: "test".into(),
            wording_version: String::new(),
            evidence: json!({}),
            at: now - 7200,
            expires_at: now - 3600,
        })
        .unwrap();
    let path = format!("/confirm/{}", f.scoped_token(TokenKind::Confirm, id));
    let page = f.get(&path, None).await;
    assert_eq!(page.status, StatusCode::GONE);
    assert!(page.body.contains("Link expired"));
    let page = f.form(&path, "action=confirm", Some("fr")).await;
    assert_eq!(page.status, StatusCode::GONE);
    assert!(page.body.contains("Lien expiré"));
    assert!(!f.subscribed(&frank, "newsletter"));

    for path in [
        format!("/confirm/{}", f.scoped_token(TokenKind::Confirm, id + 99)),
        format!("/confirm/{}", f.scoped_token(TokenKind::Preferences, id)),
        "/confirm/forged".to_string(),
    ] {
        assert_eq!(
            f.get(&path, None).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
        assert_eq!(
            f.form(&path, "", None).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
}

#[tokio::test]
async fn bad_sign_ups_get_400_naming_the_field() {
    let f = fixture(1000);
    for (body, field) in [
        (json!({"purposes": ["newsletter"]}), "email"),
        (
            json!({"email": "nope", "purposes": ["newsletter"]}),
            "email",
        ),
        (json!({"email": "a@example.net"}), "purposes"),
        (
            json!({"email": "a@example.net", "purposes": ["spam"]}),
            "purposes",
        ),
        (
            json!({"email": "a@example.net", "purposes": ["internal"]}),
            "purposes",
        ),
        (
            json!({"email": "a@example.net", "purposes": "newsletter", "source": 3}),
            "source",
        ),
        (json!(["a@example.net"]), "body"),
    ] {
        let reply = subscribe_json(&f, body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        let error: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(error["field"], field, "{body}: {error}");
        assert!(error["error"].is_string());
    }
    let reply = f
        .form(
            "/subscribe",
            "email=a%40example.net&purposes=newsletter&purposes=spam",
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("Sign-up not accepted"));
    assert!(
        reply
            .body
            .contains("purposes: &#39;spam&#39; is not a purpose open to sign-ups"),
        "{}",
        reply.body
    );
    assert!(f.queued().await.is_empty());
}

#[tokio::test]
async fn over_a_limit_the_answer_is_the_same_but_no_mail_goes() {
    let f = fixture_with(1000, 4);
    let body = json!({"email": "gail@example.net", "purposes": ["newsletter"]});
    // Per address: two a day.
    for _ in 0..3 {
        let reply = subscribe_json(&f, body.clone()).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        assert_eq!(reply.body, "{\"status\":\"pending\"}");
    }
    assert_eq!(f.queued().await.len(), 2);
    // Per IP: four an hour, three used above (a sign-up over the address limit counts).
    for i in 0..3 {
        let reply = subscribe_json(
            &f,
            json!({"email": format!("h{i}@example.net"), "purposes": ["newsletter"]}),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    assert_eq!(f.queued().await.len(), 1, "then the IP's hour is used up");
    assert_eq!(
        f.metric("optgate_web_signups_total{outcome=\"limited\"}")
            .await,
        3
    );

    // An erased address gets the same answer, and nothing is kept or sent.
    let f = fixture(1000);
    let ivy = Address::parse("ivy@example.net").unwrap();
    f.store.forget(&ivy, crate::clock::now()).unwrap();
    let reply = subscribe_json(
        &f,
        json!({"email": "ivy@example.net", "purposes": ["newsletter"]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert!(f.queued().await.is_empty());
    assert!(f.store.signups_for(&ivy).unwrap().is_empty());
}

// ---- the admin API ------------------------------------------------------------------

#[tokio::test]
async fn the_api_wants_a_valid_bearer_token() {
    let f = fixture(1000);
    for (token, uri) in [
        (None, "/api/v1/contacts/a@example.net"),
        (
            Some("wrong-token-0123456789abcdef"),
            "/api/v1/contacts/a@example.net",
        ),
        (Some(&API_TOKEN[1..]), "/api/v1/events"),
        (None, "/api/v1/no-such-route"),
        (None, "/metrics"),
    ] {
        let reply = f.api("GET", uri, None, token).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{uri} {token:?}");
        assert_eq!(
            reply.headers[header::WWW_AUTHENTICATE],
            "Bearer realm=\"optgate\""
        );
        if uri != "/metrics" {
            let error: Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(error["field"], "authorization");
        }
    }
    let reply = f
        .api("DELETE", "/api/v1/contacts/a@example.net", None, None)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.metric("optgate_web_api_unauthorized_total").await, 6);
    let (status, body) = f.api_ok("GET", "/api/v1/no-such-route", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn contacts_read_and_change_through_the_api() {
    let f = fixture(1000);
    // Never seen: known false, and what the policy would decide.
    let (status, body) = f
        .api_ok("GET", "/api/v1/contacts/jo@example.net", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["known"], false);
    let state = |body: &Value, id: &str| -> Value {
        body["purposes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(state(&body, "newsletter")["allowed"], false);
    assert_eq!(
        state(&body, "newsletter")["reason"],
        "suppressed: no consent"
    );
    assert_eq!(state(&body, "offres")["allowed"], true);

    // A grant with evidence: 201 and the event id.
    let (status, created) = f
        .api_ok(
            "POST",
            "/api/v1/contacts/jo@example.net/consents",
            Some(json!({"purpose": "newsletter", "action": "grant", "source": "crm", "evidence": {"ip": "198.51.100.4", "form": "shop checkout"}, "at": "2026-01-02T03:04:05Z"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().unwrap();
    let (_, body) = f
        .api_ok("GET", "/api/v1/contacts/jo@example.net", None)
        .await;
    assert_eq!(body["known"], true);
    assert_eq!(state(&body, "newsletter")["allowed"], true);
    assert_eq!(state(&body, "newsletter")["record"], id);
    let event = &body["history"][0];
    assert_eq!(event["source"], "crm");
    assert_eq!(event["at"], 1_767_323_045);
    assert_eq!(event["evidence"]["form"], "shop checkout");
    assert_eq!(event["evidence"]["recorded_via"]["api"]["ip"], "192.0.2.7");
    assert_eq!(
        event["evidence"]["recorded_via"]["api"]["user_agent"],
        "crm/2.0"
    );

    // A withdrawal from everything, at now by default.
    let (status, _) = f
        .api_ok(
            "POST",
            "/api/v1/contacts/jo@example.net/consents",
            Some(json!({"purpose": "*", "action": "withdraw"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, body) = f
        .api_ok("GET", "/api/v1/contacts/jo@example.net", None)
        .await;
    assert_eq!(state(&body, "newsletter")["allowed"], false);
    assert_eq!(state(&body, "offres")["reason"], "suppressed: objected");
    assert_eq!(body["history"][1]["source"], "api");

    // The customer flag.
    let (status, body) = f
        .api_ok(
            "PUT",
            "/api/v1/contacts/kim@example.net/customer",
            Some(json!({"customer": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"email": "kim@example.net", "customer": true}));
    let (_, body) = f
        .api_ok("GET", "/api/v1/contacts/kim@example.net", None)
        .await;
    assert_eq!(body["customer"], true);
    assert_eq!(state(&body, "clients")["allowed"], true);
}

#[tokio::test]
async fn bad_api_requests_get_400_naming_the_field() {
    let f = fixture(1000);
    let uri = "/api/v1/contacts/jo@example.net/consents";
    for (body, field) in [
        (json!({"action": "grant"}), "purpose"),
        (json!({"purpose": "spam", "action": "grant"}), "purpose"),
        (json!({"purpose": "*", "action": "grant"}), "purpose"),
        (json!({"purpose": "newsletter"}), "action"),
        (
            json!({"purpose": "newsletter", "action": "maybe"}),
            "action",
        ),
        (
            json!({"purpose": "newsletter", "action": "grant", "at": "yesterday"}),
            "at",
        ),
        (
            json!({"purpose": "newsletter", "action": "grant", "at": "2999-01-01T00:00:00Z"}),
            "at",
        ),
        (
            json!({"purpose": "newsletter", "action": "grant", "evidence": [1]}),
            "evidence",
        ),
        (
            json!({"purpose": "newsletter", "action": "grant", "source": 1}),
            "source",
        ),
        (json!([1]), "body"),
    ] {
        let (status, error) = f.api_ok("POST", uri, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error["field"], field, "{body}: {error}");
    }
    let (status, error) = f
        .api_ok(
            "POST",
            "/api/v1/contacts/not-an-address/consents",
            Some(json!({"purpose": "newsletter", "action": "grant"})),
        )
        .await;
    assert_eq!(
        (status, error["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("email"))
    );
    let (status, error) = f.api_ok("GET", "/api/v1/contacts/nope", None).await;
    assert_eq!(
        (status, error["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("email"))
    );
    for body in [json!({}), json!({"customer": "yes"})] {
        let (status, error) = f
            .api_ok(
                "PUT",
                "/api/v1/contacts/jo@example.net/customer",
                Some(body),
            )
            .await;
        assert_eq!(
            (status, error["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("customer"))
        );
    }
    let reply = f
        .send(
            Request::post(uri)
                .header(header::AUTHORIZATION, format!("Bearer {API_TOKEN}"))
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("\"field\":\"body\""), "{}", reply.body);
    let jo = Address::parse("jo@example.net").unwrap();
    assert!(f.store.contact(&jo).unwrap().is_none(), "nothing recorded");
}

#[tokio::test]
async fn forgetting_leaves_nothing_and_refuses_new_records() {
    let f = fixture(1000);
    let (lee, _) = f.subscriber("lee@example.net", &["newsletter"]);
    let reply = f
        .api(
            "DELETE",
            "/api/v1/contacts/lee@example.net",
            None,
            Some(API_TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
    assert!(f.store.contact(&lee).unwrap().is_none());
    let (_, body) = f
        .api_ok("GET", "/api/v1/contacts/lee@example.net", None)
        .await;
    assert_eq!(
        (body["known"].as_bool(), body["erased"].as_bool()),
        (Some(false), Some(true))
    );
    assert!(body["history"].as_array().unwrap().is_empty());
    assert!(
        body["purposes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["allowed"] == false)
    );
    let (status, error) = f
        .api_ok(
            "POST",
            "/api/v1/contacts/lee@example.net/consents",
            Some(json!({"purpose": "newsletter", "action": "grant"})),
        )
        .await;
    assert_eq!(
        (status, error["field"].as_str()),
        (StatusCode::CONFLICT, Some("email"))
    );
    let (status, _) = f
        .api_ok(
            "PUT",
            "/api/v1/contacts/lee@example.net/customer",
            Some(json!({"customer": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Again: still 204.
    let reply = f
        .api(
            "DELETE",
            "/api/v1/contacts/lee@example.net",
            None,
            Some(API_TOKEN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn the_event_feed_pages_by_cursor_and_filters_by_kind() {
    let f = fixture(1000);
    f.subscriber("m1@example.net", &["newsletter"]);
    f.subscriber("m2@example.net", &["newsletter"]);
    let uri = f.preferences_uri(&Address::parse("m1@example.net").unwrap());
    f.form(&uri, "action=save&purpose=offres", None).await;

    let (status, all) = f.api_ok("GET", "/api/v1/events", None).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let events = all["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"consent.granted") && kinds.contains(&"consent.withdrawn"),
        "{kinds:?}"
    );
    assert_eq!(all["next"], events.last().unwrap()["id"]);

    let (_, page) = f.api_ok("GET", "/api/v1/events?limit=1", None).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    let next = page["next"].as_i64().unwrap();
    let (_, rest) = f
        .api_ok(
            "GET",
            &format!("/api/v1/events?after={next}&limit=1000"),
            None,
        )
        .await;
    assert_eq!(rest["events"].as_array().unwrap().len(), events.len() - 1);
    let (_, end) = f
        .api_ok(
            "GET",
            &format!("/api/v1/events?after={}", all["next"]),
            None,
        )
        .await;
    assert_eq!(end, json!({"events": [], "next": all["next"]}));

    let (_, withdrawn) = f
        .api_ok("GET", "/api/v1/events?kind=consent.withdrawn", None)
        .await;
    let withdrawn = withdrawn["events"].as_array().unwrap();
    assert_eq!(withdrawn.len(), 1);
    assert_eq!(withdrawn[0]["address"], "m1@example.net");
    assert_eq!(withdrawn[0]["origin"], "preference-centre");

    for (query, field) in [
        ("after=-1", "after"),
        ("limit=0", "limit"),
        ("kind=spam", "kind"),
        ("cursor=3", "query"),
    ] {
        let (status, error) = f
            .api_ok("GET", &format!("/api/v1/events?{query}"), None)
            .await;
        assert_eq!(
            (status, error["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "{query}"
        );
    }
}

#[tokio::test]
async fn bulk_import_writes_the_good_rows_and_names_the_bad() {
    let f = fixture(1000);
    let erased = Address::parse("gone@example.net").unwrap();
    f.store.forget(&erased, crate::clock::now()).unwrap();
    let rows = json!([
        {"email": "n1@example.net", "purpose": "newsletter", "status": "granted", "timestamp": "2025-05-01T12:00:00Z", "source": "old-crm", "evidence": {"ip": "203.0.113.9"}},
        {"email": "n2@example.net", "purpose": "newsletter", "status": "granted", "timestamp": "2025-05-01T12:00:00Z", "evidence": "{\"form\": \"v1\"}"},
        {"email": "bad", "purpose": "newsletter", "status": "granted", "timestamp": "2025-05-01T12:00:00Z"},
        {"email": "n3@example.net", "purpose": "*", "status": "withdrawn", "timestamp": "2025-05-01T12:00:00Z"},
        {"email": "n4@example.net", "purpose": "newsletter", "status": "maybe", "timestamp": "2025-05-01T12:00:00Z"},
        {"email": "gone@example.net", "purpose": "newsletter", "status": "granted", "timestamp": "2025-05-01T12:00:00Z"},
        {"email": 5},
    ]);
    let (status, body) = f
        .api_ok("POST", "/api/v1/consents/import", Some(rows))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["imported"], 3);
    let rejected: Vec<(i64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_i64().unwrap(), r["error"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2, 4, 5, 6],
        "{body}"
    );
    assert!(rejected[0].1.starts_with("email:"));
    assert!(rejected[1].1.starts_with("status:"));
    assert!(rejected[2].1.contains("erased"));
    let n1 = Address::parse("n1@example.net").unwrap();
    assert!(f.subscribed(&n1, "newsletter"));
    let event = f.history(&n1).pop().unwrap();
    assert_eq!(
        (event.source.as_str(), event.evidence["ip"].as_str()),
        ("old-crm", Some("203.0.113.9"))
    );
    assert_eq!(
        f.history(&Address::parse("n2@example.net").unwrap())[0].evidence["form"],
        "v1"
    );
    assert!(!f.subscribed(&Address::parse("n3@example.net").unwrap(), "offres"));

    let (status, error) = f
        .api_ok("POST", "/api/v1/consents/import", Some(json!({"rows": []})))
        .await;
    assert_eq!(
        (status, error["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("body"))
    );
    let (status, body) = f
        .api_ok("POST", "/api/v1/consents/import", Some(json!([])))
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"imported": 0, "rejected": []}))
    );
}
