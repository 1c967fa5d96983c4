use std::sync::Mutex;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

use super::*;
use crate::address::Address;
use crate::store::testing::{Flaky, Op};
use crate::store::{ConsentAction, NewConsentEvent};

#[test]
fn backoff_doubles_from_one_second_to_five_minutes() {
    let nominal: Vec<u64> = (1..=12).map(|n| backoff(n, 1.0).as_secs()).collect();
    assert_eq!(nominal, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    assert_eq!(backoff(u32::MAX, 1.0), MAX_RETRY);
    assert_eq!(backoff(1, 0.5), Duration::from_millis(500));
    assert_eq!(backoff(20, 0.5), Duration::from_secs(150));
}

#[test]
fn the_feed_is_consent_changes_only() {
    assert!(!KINDS.contains(&crate::store::EVENT_DECISION));
    assert!(!KINDS.contains(&crate::store::EVENT_DELIVERED));
}

#[test]
fn logged_urls_hide_a_password() {
    let url = reqwest::Url::parse("https://crm:hunter2@crm.example/hooks?x=1").unwrap();
    assert_eq!(shown_url(&url), "https://crm:***@crm.example/hooks?x=1");
}

#[test]
fn metrics_render_both_results() {
    let text = render_metrics();
    assert!(text.contains("optgate_webhook_attempts_total{result=\"delivered\"} "));
    assert!(text.contains("optgate_webhook_attempts_total{result=\"failed\"} "));
}

// ---- a worker against the real store and a real HTTP receiver

const SECRET: &str = "whsec_unit_0123456789";

/// What the receiver got, and how many requests it refuses (503) before saying yes.
struct Receiver {
    requests: Mutex<Vec<(HeaderMap, Bytes)>>,
    refuse_first: usize,
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut requests = receiver.requests.lock().unwrap();
    requests.push((headers, body));
    if requests.len() <= receiver.refuse_first {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    }
}

async fn receiver(refuse_first: usize) -> (String, Arc<Receiver>) {
    let receiver = Arc::new(Receiver {
        requests: Mutex::default(),
        refuse_first,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, receiver)
}

fn requests(receiver: &Receiver) -> Vec<(HeaderMap, Bytes)> {
    receiver.requests.lock().unwrap().clone()
}

fn record(store: &dyn Store, action: ConsentAction) {
    store
        .append_consent(&NewConsentEvent {
            address: Address::parse("ann@example.net").unwrap(),
            purpose: "news".into(),
            action,
            at: 1_764_426_259,
            source: "cli".into(),
            evidence: serde_json::json!({}),
        })
        .unwrap();
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 10 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn webhook(url: &str) -> Vec<WebhookConfig> {
    vec![WebhookConfig {
        url: url.to_string(),
        secret: SECRET.into(),
        start: WebhookStart::Oldest,
    }]
}

#[tokio::test]
async fn events_go_in_order_each_retried_until_acknowledged() {
    let store = Arc::new(Flaky::default());
    record(store.as_ref(), ConsentAction::Grant);
    record(store.as_ref(), ConsentAction::Withdraw);
    let events = store.events_since(0, &KINDS, 10).unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    let (url, receiver) = receiver(1).await;
    // The first cursor read fails: the worker tries the store again.
    store.fail(Op::WebhookCursor, 1);
    let shutdown = CancellationToken::new();
    let handle = start(&webhook(&url), store.clone(), shutdown.clone()).unwrap();

    wait_until("three requests", || requests(&receiver).len() >= 3).await;
    wait_until("the cursor at the last event", || {
        store.webhook_cursor_or_start(&url, false).ok() == Some(events[1].id)
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), handle)
        .await
        .expect("the worker stops within moments of shutdown")
        .unwrap();

    let requests = requests(&receiver);
    let ids: Vec<&str> = requests
        .iter()
        .map(|(headers, _)| headers["optgate-event-id"].to_str().unwrap())
        .collect();
    let (first, second) = (event_id(&events[0]), event_id(&events[1]));
    assert_eq!(ids, [&first, &first, &second]);
    for (headers, body) in &requests {
        let header = headers["optgate-signature"].to_str().unwrap();
        let t: i64 = header[2..header.find(',').unwrap()].parse().unwrap();
        assert_eq!(header, signature(&payload::key(SECRET), t, body));
        assert_eq!(headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["id"], headers["optgate-event-id"].to_str().unwrap());
    }
}

#[tokio::test]
async fn shutdown_cuts_a_retry_wait_short() {
    let store = Arc::new(Flaky::default());
    record(store.as_ref(), ConsentAction::Grant);
    let (url, receiver) = receiver(usize::MAX).await;
    let shutdown = CancellationToken::new();
    let handle = start(&webhook(&url), store.clone(), shutdown.clone()).unwrap();
    // After three refusals the next try is 2 to 4 s away.
    wait_until("three refusals", || requests(&receiver).len() >= 3).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_millis(500), handle)
        .await
        .expect("the worker stops without waiting for its retry")
        .unwrap();
    assert_eq!(store.webhook_cursor_or_start(&url, false).unwrap(), 0);
}

#[tokio::test]
async fn a_new_url_started_now_gets_only_later_changes_even_after_a_restart() {
    let store = Arc::new(Flaky::default());
    record(store.as_ref(), ConsentAction::Grant);
    record(store.as_ref(), ConsentAction::Withdraw);
    let (url, receiver) = receiver(0).await;
    let mut config = webhook(&url);
    config[0].start = WebhookStart::Now;
    let id_of = |n: usize| {
        let events = store.events_since(0, &KINDS, 10).unwrap();
        event_id(&events[n])
    };
    let received = || -> Vec<String> {
        requests(&receiver)
            .iter()
            .map(|(headers, _)| headers["optgate-event-id"].to_str().unwrap().to_string())
            .collect()
    };

    let shutdown = CancellationToken::new();
    let handle = start(&config, store.clone(), shutdown.clone()).unwrap();
    wait_until("the worker's start recorded", || {
        store.calls(Op::WebhookCursor) == 1
    })
    .await;
    record(store.as_ref(), ConsentAction::Grant);
    wait_until("the third event", || !received().is_empty()).await;
    shutdown.cancel();
    handle.await.unwrap();

    // Started again (the cursor is kept, so "now" is not the newest event again), with
    // one more change made while it was down: that one comes, nothing older.
    record(store.as_ref(), ConsentAction::Withdraw);
    let shutdown = CancellationToken::new();
    let handle = start(&config, store.clone(), shutdown.clone()).unwrap();
    // Events go in order: anything older would have come before the fourth.
    wait_until("the fourth event", || received().len() >= 2).await;
    shutdown.cancel();
    handle.await.unwrap();
    assert_eq!(received(), [id_of(2), id_of(3)]);
}
