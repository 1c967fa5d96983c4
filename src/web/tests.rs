//! The web side against the real SQLite store: requests through the router (with a
//! mocked peer address), and one through a real listener with a raw HTTP client.
//! The fixture is shared with `consent_tests` (preference centre, double opt-in, API).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::{Web, router, serve_on};
use crate::address::Address;
use crate::config::Config;
use crate::spool::{Intake, Ready, Spool};
use crate::store::{ConsentAction, ConsentEvent, LatestEvent, NewConsentEvent, SqliteStore, Store};
use crate::token::{Claims, TokenKey, TokenKeys, TokenKind, purpose_tag};

const PEER: [u8; 4] = [192, 0, 2, 7];
const MULTIPART_TYPE: &str = "multipart/form-data; boundary=----optgate-test";
const MULTIPART_BODY: &str = "------optgate-test\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n------optgate-test--\r\n";
pub(super) const URLENCODED: &str = "application/x-www-form-urlencoded";

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) store: Arc<SqliteStore>,
    pub(super) web: Arc<Web>,
    router: Router,
    /// What the spool committed (confirmation mails), as delivery would receive it.
    ready: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Ready>>,
}

pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: String,
}

/// The bearer token the fixture's `[api]` accepts.
pub(super) const API_TOKEN: &str = "test-token-0123456789abcdef";

pub(super) fn fixture(rate_limit_per_minute: u32) -> Fixture {
    fixture_with(rate_limit_per_minute, 5)
}

/// Five purposes: four public (one per opt-in/opt-out basis, one in French), one not.
pub(super) fn fixture_with(rate_limit_per_minute: u32, signups_per_ip_per_hour: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[unsubscribe]
rate_limit_per_minute = {rate_limit_per_minute}

[api]
tokens = ["{API_TOKEN}"]

[double_opt_in]
link_validity = "1h"
from = "News <news@example.com>"
sender = "bounces@example.com"
max_per_address_per_day = 2
max_per_ip_per_hour = {signups_per_ip_per_hour}

[[purpose]]
id = "newsletter"
name = "Newsletter"
description = "Our monthly news and articles."
basis = "consent"
public = true

[[purpose]]
id = "offres"
name = "Offres partenaires"
description = "Les offres de nos partenaires."
basis = "legitimate_interest"
locale = "fr"
public = true

[[purpose]]
id = "clients"
name = "Customer offers"
basis = "soft_opt_in"
public = true

[[purpose]]
id = "internal"
name = "Internal tests"
basis = "consent"

[[purpose]]
id = "orders"
name = "Orders"
basis = "transactional"
"#
    );
    let config = Config::parse(&text, &dir.path().join("optgate.toml")).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("optgate.db"), false).unwrap());
    let tokens = TokenKeys::new(vec![TokenKey::new(1, &[7u8; 32], None).unwrap()]).unwrap();
    let (spool, ready, _writer) = Spool::start(store.clone(), Intake::unlimited());
    let web = Arc::new(Web {
        config: Arc::new(config),
        store: store.clone(),
        tokens: Arc::new(tokens),
        spool,
    });
    let router = router(web.clone()).layer(MockConnectInfo(SocketAddr::from((PEER, 40000))));
    Fixture {
        _dir: dir,
        store,
        web,
        router,
        ready: tokio::sync::Mutex::new(ready),
    }
}

impl Fixture {
    /// A contact who consented to `purposes`, and their unsubscribe link token for the first.
    pub(super) fn subscriber(&self, email: &str, purposes: &[&str]) -> (Address, String) {
        let address = Address::parse(email).unwrap();
        for purpose in purposes {
            self.store
                .append_consent(&NewConsentEvent {
                    address: address.clone(),
                    purpose: purpose.to_string(),
                    action: ConsentAction::Grant,
                    at: 1_700_000_000,
                    source: "import".into(),
                    evidence: serde_json::json!({}),
                })
                .unwrap();
        }
        let id = self.store.contact_id(&address).unwrap();
        (address, self.token(TokenKind::Unsubscribe, id, purposes[0]))
    }

    pub(super) fn token(&self, kind: TokenKind, contact: i64, purpose: &str) -> String {
        self.web.tokens.issue(Claims {
            kind,
            subject: u64::try_from(contact).unwrap(),
            scope: purpose_tag(purpose),
        })
    }

    pub(super) fn latest(&self, address: &Address, purpose: &str) -> Option<LatestEvent> {
        self.store
            .consent_facts(std::slice::from_ref(address), purpose)
            .unwrap()[0]
            .purpose_event
            .clone()
    }

    pub(super) fn subscribed(&self, address: &Address, purpose: &str) -> bool {
        let facts = &self
            .store
            .consent_facts(std::slice::from_ref(address), purpose)
            .unwrap()[0];
        let purpose = self.web.config.purpose(purpose).unwrap();
        crate::policy::decide(purpose, facts, crate::clock::now()).is_allowed()
    }

    pub(super) fn history(&self, address: &Address) -> Vec<ConsentEvent> {
        self.store.contact(address).unwrap().unwrap().history
    }

    pub(super) async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    pub(super) async fn get(&self, uri: &str, accept_language: Option<&str>) -> Reply {
        let mut request = Request::get(uri);
        if let Some(lang) = accept_language {
            request = request.header(header::ACCEPT_LANGUAGE, lang);
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    pub(super) async fn post(&self, uri: &str, content_type: Option<&str>, body: &str) -> Reply {
        let mut request = Request::post(uri).header(header::USER_AGENT, "TestMail/1.0 (one-click)");
        if let Some(ct) = content_type {
            request = request.header(header::CONTENT_TYPE, ct);
        }
        self.send(request.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// A request with an optional JSON body and bearer token.
    pub(super) async fn api(
        &self,
        method: &str,
        uri: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::USER_AGENT, "crm/2.0");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    /// The confirmation mails the spool committed since the last call.
    pub(super) async fn queued(&self) -> Vec<Ready> {
        let mut ready = self.ready.lock().await;
        let mut out = Vec::new();
        while let Ok(r) = ready.try_recv() {
            out.push(r);
        }
        out
    }

    pub(super) async fn metric(&self, line_start: &str) -> u64 {
        let metrics = self
            .api("GET", "/metrics", None, Some(API_TOKEN))
            .await
            .body;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
    }
}

pub(super) fn assert_private_headers(reply: &Reply) {
    let h = |name: &str| {
        reply
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    assert_eq!(h("cache-control"), "no-store");
    assert_eq!(h("referrer-policy"), "no-referrer");
    assert!(h("x-robots-tag").contains("noindex"));
    let csp = h("content-security-policy");
    for directive in [
        "default-src 'none'",
        "style-src 'unsafe-inline'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
}

#[tokio::test]
async fn get_shows_the_purpose_and_a_scanner_unsubscribes_nobody() {
    let f = fixture(1000);
    let (alice, token) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = format!("/u/{token}");
    for _ in 0..20 {
        let reply = f.get(&uri, None).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_private_headers(&reply);
        let html = &reply.body;
        assert!(html.contains("Newsletter") && html.contains("Our monthly news and articles."));
        assert!(html.contains("a•••e@example.net"), "{html}");
        assert!(!html.contains("alice"), "the address is masked");
        assert!(
            html.contains("<button type=\"submit\">Unsubscribe</button>"),
            "{html}"
        );
        assert!(html.contains("name=\"action\" value=\"unsubscribe\""));
        assert!(html.contains("name=\"viewport\""));
        for external in ["http://", "https://", "<script", "<img", "<link", "@import"] {
            assert!(!html.contains(external), "{external} in {html}");
        }
    }
    let head = f
        .send(Request::head(&uri).body(Body::empty()).unwrap())
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(f.subscribed(&alice, "newsletter"));
    assert_eq!(f.history(&alice).len(), 1, "only the original grant");
}

#[tokio::test]
async fn one_click_urlencoded_withdraws_with_evidence_and_repeats_are_harmless() {
    let f = fixture(1000);
    let (alice, token) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = format!("/u/{token}");
    let reply = f
        .post(&uri, Some(URLENCODED), "List-Unsubscribe=One-Click")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(reply.headers.get(header::LOCATION).is_none());
    assert!(reply.body.contains("You are unsubscribed") && reply.body.contains("Newsletter"));
    assert_private_headers(&reply);
    assert!(!f.subscribed(&alice, "newsletter"));

    let history = f.history(&alice);
    assert_eq!(history.len(), 2);
    let event = &history[1];
    assert_eq!(event.action, ConsentAction::Withdraw);
    assert_eq!(event.purpose, "newsletter");
    assert_eq!(event.source, "one-click");
    assert_eq!(event.evidence["method"], "one-click");
    assert_eq!(event.evidence["ip"], "192.0.2.7");
    assert_eq!(event.evidence["user_agent"], "TestMail/1.0 (one-click)");
    assert!((event.at - crate::clock::now()).abs() < 60);

    let again = f
        .post(&uri, Some(URLENCODED), "List-Unsubscribe=One-Click")
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.headers.get(header::LOCATION).is_none());
    let again = f.post(&uri, Some(MULTIPART_TYPE), MULTIPART_BODY).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(f.history(&alice).len(), 2, "nothing new recorded");
    assert_eq!(
        f.metric("optgate_web_unsubscribes_total{method=\"one-click\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn one_click_multipart_withdraws() {
    let f = fixture(1000);
    let (bob, token) = f.subscriber("bob@example.net", &["newsletter"]);
    let reply = f
        .post(&format!("/u/{token}"), Some(MULTIPART_TYPE), MULTIPART_BODY)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(reply.headers.get(header::LOCATION).is_none());
    let latest = f.latest(&bob, "newsletter").unwrap();
    assert_eq!(latest.action, ConsentAction::Withdraw);
    let event = f.history(&bob).pop().unwrap();
    assert_eq!(event.source, "one-click");
    assert_eq!(event.evidence["ip"], "192.0.2.7");
    assert!(!f.subscribed(&bob, "newsletter"));
}

#[tokio::test]
async fn the_page_button_confirms_and_offers_an_undo_that_grants_again() {
    let f = fixture(1000);
    let (carol, token) = f.subscriber("carol@example.net", &["newsletter"]);
    let uri = format!("/u/{token}");

    let done = f.post(&uri, Some(URLENCODED), "action=unsubscribe").await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(
        done.body.contains("<h1>You are unsubscribed</h1>"),
        "{}",
        done.body
    );
    assert!(done.body.contains("name=\"action\" value=\"resubscribe\""));
    assert!(
        done.body
            .contains("<button type=\"submit\" class=\"secondary\">Subscribe again</button>")
    );
    assert!(!f.subscribed(&carol, "newsletter"));
    let withdrawal = f.history(&carol).pop().unwrap();
    assert_eq!(withdrawal.action, ConsentAction::Withdraw);
    assert_eq!(withdrawal.source, "unsubscribe-page");
    assert_eq!(withdrawal.evidence["method"], "page");
    assert_eq!(withdrawal.evidence["wording_version"], "unsubscribe-page/1");
    assert_eq!(
        withdrawal.evidence["user_agent"],
        "TestMail/1.0 (one-click)"
    );

    let undone = f.post(&uri, Some(URLENCODED), "action=resubscribe").await;
    assert_eq!(undone.status, StatusCode::OK, "{}", undone.body);
    assert!(
        undone.body.contains("You are subscribed again"),
        "{}",
        undone.body
    );
    assert!(
        undone.body.contains("value=\"unsubscribe\""),
        "the way out again"
    );
    assert!(f.subscribed(&carol, "newsletter"));
    let grant = f.history(&carol).pop().unwrap();
    assert_eq!(grant.action, ConsentAction::Grant);
    assert_eq!(grant.source, "unsubscribe-page-undo");
    assert_eq!(grant.evidence["method"], "page-undo");
    assert_eq!(grant.evidence["wording_version"], "unsubscribe-page-undo/1");
    assert_eq!(grant.evidence["ip"], "192.0.2.7");
    assert!(
        grant.evidence["wording"]
            .as_str()
            .unwrap()
            .contains("Subscribe again")
    );

    // A second undo has nothing to undo.
    let again = f.post(&uri, Some(URLENCODED), "action=resubscribe").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(f.history(&carol).len(), 3);
    assert_eq!(
        f.metric("optgate_web_unsubscribes_total{method=\"page\"}")
            .await,
        1
    );
    assert_eq!(f.metric("optgate_web_resubscribes_total").await, 1);
}

#[tokio::test]
async fn undo_without_a_withdrawal_grants_nothing() {
    let f = fixture(1000);
    let address = Address::parse("dan@example.net").unwrap();
    let id = f.store.contact_id(&address).unwrap();
    let token = f.token(TokenKind::Unsubscribe, id, "newsletter");
    let reply = f
        .post(
            &format!("/u/{token}"),
            Some(URLENCODED),
            "action=resubscribe",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(f.latest(&address, "newsletter").is_none());
    assert!(!f.subscribed(&address, "newsletter"));
}

#[tokio::test]
async fn bad_links_all_get_the_same_404_and_are_counted() {
    let f = fixture(1000);
    let (alice, token) = f.subscriber("alice@example.net", &["newsletter"]);
    let id = f.store.contact_id(&alice).unwrap();
    // A character in the middle: the MAC no longer matches.
    let mut forged = token.clone().into_bytes();
    forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let bad = [
        forged,
        token[..token.len() - 3].to_string(),
        "not-a-token".to_string(),
        "%FF%FE".to_string(),
        f.token(TokenKind::Preferences, id, "newsletter"),
        f.token(TokenKind::Unsubscribe, id + 1000, "newsletter"),
        f.token(TokenKind::Unsubscribe, id, "a-purpose-since-removed"),
    ];
    let reference = f.get(&format!("/u/{}", bad[0]), None).await;
    assert_eq!(reference.status, StatusCode::NOT_FOUND);
    assert!(reference.body.contains("Link not valid"));
    for t in &bad[1..] {
        let reply = f.get(&format!("/u/{t}"), None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{t}");
        assert_eq!(
            reply.body, reference.body,
            "{t}: the same page for every case"
        );
        assert_private_headers(&reply);
    }
    for t in &bad {
        let reply = f
            .post(
                &format!("/u/{t}"),
                Some(URLENCODED),
                "List-Unsubscribe=One-Click",
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{t}");
        assert_eq!(reply.body, reference.body);
    }
    assert_eq!(
        f.metric("optgate_web_invalid_tokens_total").await,
        2 * bad.len() as u64
    );
    assert!(f.subscribed(&alice, "newsletter"));
    assert_eq!(f.history(&alice).len(), 1);
}

#[tokio::test]
async fn a_link_for_one_purpose_cannot_touch_another() {
    let f = fixture(1000);
    let (erin, newsletter_token) = f.subscriber("erin@example.net", &["newsletter", "offres"]);
    let reply = f
        .post(
            &format!("/u/{newsletter_token}"),
            Some(URLENCODED),
            "List-Unsubscribe=One-Click",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!f.subscribed(&erin, "newsletter"));
    assert!(f.subscribed(&erin, "offres"));
    assert_eq!(
        f.latest(&erin, "offres").unwrap().action,
        ConsentAction::Grant
    );
    // The signature covers the purpose: changing it in the token breaks the link.
    let id = f.store.contact_id(&erin).unwrap();
    let offres = f.token(TokenKind::Unsubscribe, id, "offres");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut spliced = b64.decode(&newsletter_token).unwrap();
    let offres = b64.decode(&offres).unwrap();
    // kind, key id, a one-byte contact number, then the 4-byte purpose tag.
    assert_ne!(spliced[3..7], offres[3..7]);
    spliced[3..7].copy_from_slice(&offres[3..7]);
    let spliced = b64.encode(spliced);
    let reply = f
        .post(
            &format!("/u/{spliced}"),
            Some(URLENCODED),
            "List-Unsubscribe=One-Click",
        )
        .await;
    assert_ne!(reply.status, StatusCode::OK);
    assert!(f.subscribed(&erin, "offres"));
}

#[tokio::test]
async fn french_by_accept_language_or_by_the_purpose_locale() {
    let f = fixture(1000);
    let (alice, newsletter) = f.subscriber("alice@example.net", &["newsletter", "offres"]);
    let id = f.store.contact_id(&alice).unwrap();
    let offres = f.token(TokenKind::Unsubscribe, id, "offres");

    let fr = f
        .get(
            &format!("/u/{newsletter}"),
            Some("fr-CH, fr;q=0.9, en;q=0.8"),
        )
        .await;
    assert!(fr.body.contains("<html lang=\"fr\">"));
    assert!(
        fr.body
            .contains("<button type=\"submit\">Se désinscrire</button>"),
        "{}",
        fr.body
    );
    let en = f
        .get(&format!("/u/{newsletter}"), Some("fr;q=0.4, en;q=0.8"))
        .await;
    assert!(en.body.contains(">Unsubscribe</button>"));
    // No header: the purpose's locale; a language we lack: the same.
    let by_locale = f.get(&format!("/u/{offres}"), None).await;
    assert!(by_locale.body.contains("Se désinscrire"));
    let by_locale = f
        .get(&format!("/u/{offres}"), Some("de-DE, de;q=0.9"))
        .await;
    assert!(by_locale.body.contains("Se désinscrire"));
    let english = f.get(&format!("/u/{newsletter}"), Some("de")).await;
    assert!(english.body.contains(">Unsubscribe</button>"));

    let request = Request::post(format!("/u/{offres}"))
        .header(header::CONTENT_TYPE, URLENCODED)
        .header(header::ACCEPT_LANGUAGE, "fr")
        .body(Body::from("action=unsubscribe"))
        .unwrap();
    let done = f.send(request).await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(
        done.body.contains("<h1>Vous êtes désinscrit(e)</h1>"),
        "{}",
        done.body
    );
    assert!(done.body.contains("Me réabonner"));
    let event = f.history(&alice).pop().unwrap();
    assert_eq!(event.evidence["lang"], "fr");
    assert_eq!(event.evidence["user_agent"], serde_json::Value::Null);

    let not_found = f.get("/u/nope", Some("fr")).await;
    assert!(not_found.body.contains("Lien non valide"));
}

#[tokio::test]
async fn posts_that_are_not_an_unsubscription_get_400_and_change_nothing() {
    let f = fixture(1000);
    let (alice, token) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = format!("/u/{token}");
    for (content_type, body) in [
        (Some(URLENCODED), ""),
        (None, ""),
        (Some(URLENCODED), "List-Unsubscribe=Yes"),
        (Some("text/plain"), "List-Unsubscribe=One-Click"),
        (
            Some("application/json"),
            "{\"List-Unsubscribe\":\"One-Click\"}",
        ),
        (Some("multipart/form-data; boundary=x"), "garbage"),
        (
            Some(URLENCODED),
            "List-Unsubscribe=One-Click&action=resubscribe",
        ),
    ] {
        let reply = f.post(&uri, content_type, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{content_type:?} {body:?}"
        );
        assert!(reply.body.contains("Request not understood"));
    }
    let huge = format!("List-Unsubscribe=One-Click&pad={}", "x".repeat(64 * 1024));
    let reply = f.post(&uri, Some(URLENCODED), &huge).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(f.subscribed(&alice, "newsletter"));
    assert_eq!(f.history(&alice).len(), 1);
}

#[tokio::test]
async fn too_many_requests_from_one_ip_get_429() {
    let f = fixture(3);
    let (_, token) = f.subscriber("alice@example.net", &["newsletter"]);
    let uri = format!("/u/{token}");
    for _ in 0..3 {
        assert_eq!(f.get(&uri, None).await.status, StatusCode::OK);
    }
    let refused = f.get(&uri, None).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers.get(header::RETRY_AFTER).unwrap(), "20");
    assert!(refused.body.contains("Too many requests"));
    let refused = f
        .post(&uri, Some(URLENCODED), "List-Unsubscribe=One-Click")
        .await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    // Bad tokens are limited too (no brute force), the rest of the site is not.
    assert_eq!(
        f.get("/u/forged", None).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(f.get("/", None).await.status, StatusCode::OK);
    assert_eq!(f.metric("optgate_web_rate_limited_total").await, 3);
}

#[tokio::test]
async fn the_base_url_answers_and_everything_else_is_404() {
    let f = fixture(1000);
    let home = f.get("/", None).await;
    assert_eq!(home.status, StatusCode::OK);
    assert_eq!(home.body, "optgate\n");
    for uri in ["/nope", "/u/", "/u/a/b", "/p/", "/confirm/"] {
        assert_eq!(
            f.get(uri, None).await.status,
            StatusCode::NOT_FOUND,
            "{uri}"
        );
    }
    assert_eq!(
        f.get("/metrics", None).await.status,
        StatusCode::UNAUTHORIZED,
        "with API tokens configured, metrics need one"
    );
    let metrics = f.api("GET", "/metrics", None, Some(API_TOKEN)).await;
    assert!(
        metrics.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    assert!(
        metrics
            .body
            .contains("# TYPE optgate_web_invalid_tokens_total counter")
    );
    assert_eq!(
        f.metric("optgate_web_invalid_tokens_total").await,
        0,
        "a 404 page is not a token"
    );
}

/// Through a real socket: the peer address comes from the connection itself, and
/// shutdown ends the server.
#[tokio::test]
async fn a_real_server_records_the_peer_and_stops_on_shutdown() {
    let f = fixture(1000);
    let (alice, token) = f.subscriber("alice@example.net", &["newsletter"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve_on(listener, f.web.clone(), shutdown.clone()));

    let body = "List-Unsubscribe=One-Click";
    let request = format!(
        "POST /u/{token} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: raw-socket\r\nContent-Type: {URLENCODED}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(!response.to_ascii_lowercase().contains("\r\nlocation:"));
    let event = f.history(&alice).pop().unwrap();
    assert_eq!(event.action, ConsentAction::Withdraw);
    assert_eq!(event.evidence["ip"], "127.0.0.1");
    assert_eq!(event.evidence["user_agent"], "raw-socket");

    // An idle keep-alive connection must not hold shutdown up.
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}
