//! The scheduler against the real store and a scripted upstream: resume, group
//! commit, one read per message, deferral, expiry, bounce-before-record, shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::address::Address;
use crate::dkim::KeyRing;
use crate::relay::fake_upstream;
use crate::store::Event;
use crate::store::testing::{Flaky, Op};
use crate::token::{TokenKey, TokenKeys};

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

/// What the store logged about delivering to `rcpt`: every event but the decision.
fn results(store: &Flaky, rcpt: &str) -> Vec<Event> {
    let mut events = store.events_for(&addr(rcpt)).unwrap();
    events.retain(|e| e.kind != "decision");
    events
}

/// The latest result logged for `rcpt`, as (kind, detail).
fn result(store: &Flaky, rcpt: &str) -> Option<(String, String)> {
    results(store, rcpt).pop().map(|e| (e.kind, e.detail))
}

/// The bounce reports queued for `sender`: the decision events of "dsn" messages.
fn reports_to(store: &Flaky, sender: &str) -> Vec<Event> {
    let mut events = store.events_for(&addr(sender)).unwrap();
    events.retain(|e| e.kind == "decision" && e.purpose.as_deref() == Some(DSN_PURPOSE));
    events
}

fn suppression(store: &Flaky, rcpt: &str) -> Option<String> {
    let contact = store.contact(&addr(rcpt)).unwrap()?;
    contact.suppression.map(|s| s.reason)
}

fn config(upstream: &str) -> Arc<Config> {
    let text = format!(
        "[smtp]\nhostname = \"gw.example.com\"\n{upstream}\n[queue]\nretry_schedule = [\"1m\", \"5m\"]\nmax_age = \"1d\"\nconcurrency = 4\n[dkim]\ngenerate_missing = false\n[[purpose]]\nid = \"news\"\nname = \"News\"\nbasis = \"consent\"\n"
    );
    Arc::new(Config::parse(&text, Path::new("/tmp/optgate-test/optgate.toml")).unwrap())
}

fn file_config(dir: &Path) -> Arc<Config> {
    config(&format!(
        "[upstream]\nkind = \"file\"\npath = \"{}\"\n",
        dir.display()
    ))
}

fn smtp_config(port: u16) -> Arc<Config> {
    config(&format!(
        "[upstream]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\npool_size = 2\ntimeout = \"5s\"\n"
    ))
}

struct Running {
    store: Arc<Flaky>,
    spool: Spool,
    writer: JoinHandle<()>,
    delivery: JoinHandle<()>,
    shutdown: CancellationToken,
}

/// The keys the copies' tokens are signed with.
fn tokens() -> TokenKeys {
    TokenKeys::new(vec![TokenKey::new(1, &[7u8; 32], None).unwrap()]).unwrap()
}

/// The contact number the copy's List-Unsubscribe link names.
fn unsubscribes(copy: &str) -> u64 {
    let token = copy.split("/u/").nth(1).and_then(|t| t.split('>').next());
    tokens()
        .verify(token.unwrap(), clock::now())
        .unwrap()
        .subject
}

fn run(config: Arc<Config>, store: Arc<Flaky>) -> Running {
    let dyn_store: Arc<dyn Store> = store.clone();
    let relay = Relay::new(&config.upstream, &config.smtp.hostname).unwrap();
    let tokens = tokens();
    // No key configured and none generated: copies go out unsigned.
    let dkim = KeyRing::load(&config.dkim, &config.storage.data_dir).unwrap();
    let copies = CopyMaker::new(
        config.clone(),
        dyn_store.clone(),
        Arc::new(tokens),
        Arc::new(dkim),
    );
    let (spool, ready, writer) = Spool::start(dyn_store.clone(), spool::Intake::unlimited());
    let shutdown = CancellationToken::new();
    let delivery = start(
        config,
        dyn_store,
        relay,
        copies,
        spool.clone(),
        ready,
        shutdown.clone(),
    );
    Running {
        store,
        spool,
        writer,
        delivery,
        shutdown,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.delivery)
            .await
            .expect("delivery stops")
            .unwrap();
        drop(self.spool);
        tokio::time::timeout(Duration::from_secs(10), self.writer)
            .await
            .expect("the spool writer ends once delivery let go")
            .unwrap();
    }
}

fn message(id: &str, sender: &str, received_at: i64) -> QueuedMessage {
    QueuedMessage {
        id: id.into(),
        sender: sender.into(),
        purpose: "news".into(),
        received_at,
        body: Arc::new(
            b"From: news@shop.example\r\nTo: list@shop.example\r\nX-Optgate-Purpose: news\r\nSubject: Hello\r\n\r\nHi there.\r\n"
                .to_vec(),
        ),
    }
}

fn new_message(m: QueuedMessage, recipients: &[&str]) -> NewMessage {
    NewMessage {
        message: m,
        recipients: recipients
            .iter()
            .map(|r| RecipientDecision {
                address: Address::parse(r).unwrap(),
                allowed: true,
                reason: "allowed: test".into(),
            })
            .collect(),
        origin: "test".into(),
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_are_delivered_without_reading_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(file_config(dir.path()), Arc::default());
    let store = r.store.clone();
    // Committed before the resume query, it would come from the store instead.
    wait_for("resume", || store.calls(Op::PendingDeliveries) == 1).await;
    let rcpts = ["a@example.net", "b@example.net", "c@example.net"];
    r.spool
        .accept(new_message(
            message("M1", "news@shop.example", clock::now()),
            &rcpts,
        ))
        .await
        .unwrap();
    wait_for("3 delivered", || {
        rcpts.iter().all(|rcpt| result(&store, rcpt).is_some())
    })
    .await;
    for rcpt in rcpts {
        match result(&store, rcpt) {
            Some((kind, reply)) if kind == "delivered" => {
                // "written to PATH (body link: …)"
                let path = reply
                    .strip_prefix("written to ")
                    .and_then(|r| r.split(' ').next());
                let copy = std::fs::read_to_string(path.expect(&reply)).unwrap();
                // Each copy names its own recipient, by the number the queue gave.
                let contact = store.contact_id(&addr(rcpt)).unwrap();
                assert_eq!(unsubscribes(&copy), contact as u64, "{rcpt}");
            }
            other => panic!("{rcpt}: {other:?}"),
        }
    }
    assert_eq!(store.calls(Op::Message), 0, "the body came with Ready");
    assert_eq!(
        store.calls(Op::ContactId),
        rcpts.len(),
        "only this test's own lookups: the queue gave each copy its contact"
    );
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 3);
    for f in files {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            !text.contains("X-Optgate"),
            "control headers stripped: {text}"
        );
        assert!(text.contains("\r\n\r\nHi there.\r\n"), "{text}");
    }
    assert!(store.message("M1").unwrap().is_none());
    assert!(store.pending_deliveries().unwrap().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_messages_are_read_once_and_not_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<Flaky> = Arc::default();
    let rcpts: Vec<String> = (0..10).map(|i| format!("r{i}@example.net")).collect();
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    store
        .enqueue(&[new_message(
            message("OLD", "news@shop.example", clock::now() - 60),
            &rcpt_refs,
        )])
        .unwrap();
    let r = run(file_config(dir.path()), store.clone());
    wait_for("10 delivered", || {
        rcpts.iter().all(|rcpt| result(&store, rcpt).is_some())
    })
    .await;
    assert_eq!(store.calls(Op::Message), 1, "one read for ten recipients");
    assert_eq!(
        store.calls(Op::ContactId),
        0,
        "the pending deliveries came with their contacts"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for rcpt in &rcpts {
        let kinds: Vec<String> = results(&store, rcpt).into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["delivered"], "{rcpt}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 10);
    assert!(store.message("OLD").unwrap().is_none());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_gone_from_the_store_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<Flaky> = Arc::default();
    store
        .enqueue(&[new_message(
            message("GONE", "news@shop.example", clock::now() - 60),
            &["a@example.net"],
        )])
        .unwrap();
    store.lose("GONE");
    let r = run(file_config(dir.path()), store.clone());
    wait_for("the body looked up", || store.calls(Op::Message) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.calls(Op::Message), 1, "looked up once, not retried");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(result(&store, "a@example.net").is_none());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_bounce_once_per_message_before_they_are_recorded() {
    let up = fake_upstream::start().await;
    let r = run(smtp_config(up.port), Arc::default());
    let rcpts = [
        "ok@example.net",
        "bad@example.net",
        "full@example.net",
        "later@example.net",
    ];
    let before = clock::now();
    r.spool
        .accept(new_message(
            message("M2", "news@shop.example", before),
            &rcpts,
        ))
        .await
        .unwrap();
    let store = r.store.clone();
    // Four outcomes for M2, then the bounce report delivered to the sender.
    wait_for("outcomes and the bounce delivered", || {
        rcpts.iter().all(|rcpt| result(&store, rcpt).is_some())
            && result(&store, "news@shop.example").is_some()
    })
    .await;

    match result(&store, "ok@example.net") {
        Some((kind, reply)) if kind == "delivered" => {
            assert!(reply.starts_with("250 2.0.0 Ok: queued as FAKE"), "{reply}");
        }
        other => panic!("{other:?}"),
    }
    match result(&store, "bad@example.net") {
        Some((kind, error)) if kind == "bounced" => {
            assert!(error.starts_with("550 5.1.1 <bad@example.net>"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        suppression(&store, "bad@example.net").as_deref(),
        Some("hard bounce")
    );
    assert!(matches!(result(&store, "full@example.net"), Some((kind, _)) if kind == "bounced"));
    assert_eq!(suppression(&store, "full@example.net"), None);
    assert_eq!(
        result(&store, "later@example.net"),
        Some(("deferred".into(), "451 4.3.0 Try again later".into()))
    );
    let pending = store.pending_deliveries().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].recipient.as_str(), pending[0].attempts),
        ("later@example.net", 1)
    );
    assert!((before + 60..=clock::now() + 60).contains(&pending[0].next_attempt_at));

    let reports = reports_to(&store, "news@shop.example");
    assert_eq!(
        reports.len(),
        1,
        "one report for both failures: {reports:?}"
    );
    for rcpt in ["bad@example.net", "full@example.net"] {
        let failure = results(&store, rcpt).pop().unwrap();
        assert!(
            failure.id > reports[0].id,
            "{rcpt}: failure recorded before its bounce was spooled"
        );
    }

    // The report went out with the null sender to the original sender.
    let received = up.received.lock().unwrap().clone();
    let report = received
        .iter()
        .find(|m| m.recipients == ["news@shop.example"])
        .expect("report relayed");
    assert_eq!(report.sender, "");
    let text = String::from_utf8_lossy(&report.data);
    assert!(text.contains("Final-Recipient: rfc822; bad@example.net"));
    assert!(text.contains("Final-Recipient: rfc822; full@example.net"));
    assert!(!text.contains("later@example.net"));
    assert!(text.contains("Subject: Hello"), "original headers returned");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_message_expires_and_a_null_sender_gets_no_bounce() {
    let up = fake_upstream::start().await;
    let store: Arc<Flaky> = Arc::default();
    let old = clock::now() - 2 * 86400;
    store
        .enqueue(&[
            new_message(
                message("OLD1", "news@shop.example", old),
                &["later1@example.net"],
            ),
            new_message(message("OLD2", "", old), &["later2@example.net"]),
        ])
        .unwrap();
    let r = run(smtp_config(up.port), store.clone());
    let rcpts = ["later1@example.net", "later2@example.net"];
    wait_for("both failed and a report queued", || {
        rcpts.iter().all(|rcpt| result(&store, rcpt).is_some())
            && !reports_to(&store, "news@shop.example").is_empty()
    })
    .await;
    for rcpt in rcpts {
        assert_eq!(
            result(&store, rcpt),
            Some((
                "bounced".into(),
                "4.4.7 message expired after 1 attempt: last error 451 4.3.0 Try again later"
                    .into()
            )),
            "{rcpt}"
        );
        assert_eq!(suppression(&store, rcpt), None, "{rcpt}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reports_to(&store, "news@shop.example").len(),
        1,
        "none for the message with the null sender"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_retried_until_the_store_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<Flaky> = Arc::default();
    store.fail(Op::RecordOutcomes, 2);
    let r = run(file_config(dir.path()), store.clone());
    r.spool
        .accept(new_message(
            message("M3", "", clock::now()),
            &["x@example.net"],
        ))
        .await
        .unwrap();
    wait_for("recorded after two failures", || {
        result(&store, "x@example.net").is_some()
    })
    .await;
    assert_eq!(store.calls(Op::RecordOutcomes), 3);
    assert_eq!(results(&store, "x@example.net").len(), 1);
    assert!(store.pending_deliveries().unwrap().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_deferred_recipients_pending() {
    let up = fake_upstream::start().await;
    let r = run(smtp_config(up.port), Arc::default());
    r.spool
        .accept(new_message(
            message("M4", "", clock::now()),
            &["later@example.net"],
        ))
        .await
        .unwrap();
    let store = r.store.clone();
    wait_for("deferred", || result(&store, "later@example.net").is_some()).await;
    r.stop().await;
    let pending = store.pending_deliveries().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 1);
}
