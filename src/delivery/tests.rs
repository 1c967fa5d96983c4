//! The scheduler against an in-memory store and a scripted upstream: resume, group
//! commit, one read per message, deferral, expiry, bounce-before-record, shutdown.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::address::Address;
use crate::relay::fake_upstream;
use crate::store::{
    ConsentFacts, ContactRecord, Event, NewConsentEvent, PendingDelivery, QueueEntry, StoreError,
};

#[derive(Debug, Clone)]
enum Entry {
    Enqueued { purpose: String },
    Outcome(DeliveryOutcome),
}

#[derive(Default)]
struct State {
    messages: HashMap<String, QueuedMessage>,
    deliveries: BTreeMap<(String, String), PendingDelivery>,
    log: Vec<Entry>,
    message_reads: usize,
    pending_reads: usize,
    record_calls: usize,
    /// Fail this many record_outcomes calls first.
    fail_records: usize,
}

#[derive(Default)]
struct FakeStore(Mutex<State>);

fn unused<T>() -> Result<T, StoreError> {
    Err(StoreError::Internal("not used by delivery".into()))
}

impl Store for FakeStore {
    fn consent_facts(&self, _: &[Address], _: &str) -> Result<Vec<ConsentFacts>, StoreError> {
        unused()
    }
    fn append_consent(&self, _: &NewConsentEvent) -> Result<i64, StoreError> {
        unused()
    }
    fn set_customer(&self, _: &Address, _: bool) -> Result<(), StoreError> {
        unused()
    }
    fn contact(&self, _: &Address) -> Result<Option<ContactRecord>, StoreError> {
        unused()
    }
    fn suppress(&self, _: &Address, _: &str, _: &str, _: i64) -> Result<(), StoreError> {
        unused()
    }
    fn unsuppress(&self, _: &Address) -> Result<bool, StoreError> {
        unused()
    }
    fn enqueue(&self, batch: &[NewMessage]) -> Result<(), StoreError> {
        let mut s = self.0.lock().unwrap();
        for m in batch {
            let id = m.message.id.clone();
            for r in m.recipients.iter().filter(|r| r.allowed) {
                s.deliveries.insert(
                    (id.clone(), r.address.to_string()),
                    PendingDelivery {
                        message_id: id.clone(),
                        recipient: r.address.to_string(),
                        attempts: 0,
                        next_attempt_at: m.message.received_at,
                    },
                );
            }
            s.messages.insert(id, m.message.clone());
            let purpose = m.message.purpose.clone();
            s.log.push(Entry::Enqueued { purpose });
        }
        Ok(())
    }
    fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StoreError> {
        let mut s = self.0.lock().unwrap();
        s.pending_reads += 1;
        Ok(s.deliveries.values().cloned().collect())
    }
    fn message(&self, id: &str) -> Result<Option<QueuedMessage>, StoreError> {
        let mut s = self.0.lock().unwrap();
        s.message_reads += 1;
        Ok(s.messages.get(id).cloned())
    }
    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        let mut s = self.0.lock().unwrap();
        s.record_calls += 1;
        if s.fail_records > 0 {
            s.fail_records -= 1;
            return Err(StoreError::Database("disk I/O error".into()));
        }
        for o in outcomes {
            let key = (o.message_id.clone(), o.recipient.clone());
            match &o.kind {
                OutcomeKind::Deferred {
                    next_attempt_at, ..
                } => {
                    if let Some(d) = s.deliveries.get_mut(&key) {
                        d.attempts += 1;
                        d.next_attempt_at = *next_attempt_at;
                    }
                }
                _ => {
                    s.deliveries.remove(&key);
                    if !s.deliveries.keys().any(|(id, _)| id == &o.message_id) {
                        s.messages.remove(&o.message_id);
                    }
                }
            }
            s.log.push(Entry::Outcome(o.clone()));
        }
        Ok(())
    }
    fn queue(&self) -> Result<Vec<QueueEntry>, StoreError> {
        unused()
    }
    fn events_for(&self, _: &Address) -> Result<Vec<Event>, StoreError> {
        unused()
    }
}

impl FakeStore {
    fn outcomes(&self) -> Vec<DeliveryOutcome> {
        let s = self.0.lock().unwrap();
        s.log
            .iter()
            .filter_map(|e| match e {
                Entry::Outcome(o) => Some(o.clone()),
                Entry::Enqueued { .. } => None,
            })
            .collect()
    }
    fn outcome_for(&self, recipient: &str) -> Option<OutcomeKind> {
        self.outcomes()
            .into_iter()
            .rev()
            .find(|o| o.recipient == recipient)
            .map(|o| o.kind)
    }
}

fn config(upstream: &str) -> Arc<Config> {
    let text = format!(
        "[smtp]\nhostname = \"gw.example.com\"\n{upstream}\n[queue]\nretry_schedule = [\"1m\", \"5m\"]\nmax_age = \"1d\"\nconcurrency = 4\n[[purpose]]\nid = \"news\"\nname = \"News\"\nbasis = \"consent\"\n"
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
    store: Arc<FakeStore>,
    spool: Spool,
    writer: JoinHandle<()>,
    delivery: JoinHandle<()>,
    shutdown: CancellationToken,
}

fn run(config: Arc<Config>, store: Arc<FakeStore>) -> Running {
    let dyn_store: Arc<dyn Store> = store.clone();
    let relay = Relay::new(&config.upstream, &config.smtp.hostname).unwrap();
    let (spool, ready, writer) = Spool::start(dyn_store.clone());
    let shutdown = CancellationToken::new();
    let delivery = start(
        config,
        dyn_store,
        relay,
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
    wait_for("resume", || store.0.lock().unwrap().pending_reads == 1).await;
    let rcpts = ["a@example.net", "b@example.net", "c@example.net"];
    r.spool
        .accept(new_message(
            message("M1", "news@shop.example", clock::now()),
            &rcpts,
        ))
        .await
        .unwrap();
    wait_for("3 delivered", || store.outcomes().len() == 3).await;
    for o in store.outcomes() {
        match o.kind {
            OutcomeKind::Delivered { reply } => {
                assert!(reply.starts_with("written to "), "{reply}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        store.0.lock().unwrap().message_reads,
        0,
        "the body came with Ready"
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
        assert!(text.ends_with("Hi there.\r\n"));
    }
    assert!(store.0.lock().unwrap().messages.is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_messages_are_read_once_and_not_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<FakeStore> = Arc::default();
    let rcpts: Vec<String> = (0..10).map(|i| format!("r{i}@example.net")).collect();
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    store
        .enqueue(&[new_message(
            message("OLD", "news@shop.example", clock::now() - 60),
            &rcpt_refs,
        )])
        .unwrap();
    let r = run(file_config(dir.path()), store.clone());
    wait_for("10 delivered", || store.outcomes().len() == 10).await;
    assert_eq!(
        store.0.lock().unwrap().message_reads,
        1,
        "one read for ten recipients"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.outcomes().len(), 10);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 10);
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
        store.outcomes().len() >= 5
    })
    .await;

    assert!(
        matches!(store.outcome_for("ok@example.net"), Some(OutcomeKind::Delivered { reply }) if reply == "250 2.0.0 Ok: queued as FAKE")
    );
    match store.outcome_for("bad@example.net") {
        Some(OutcomeKind::Failed { error, suppress }) => {
            assert!(suppress);
            assert!(error.starts_with("550 5.1.1 <bad@example.net>"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.outcome_for("full@example.net"),
        Some(OutcomeKind::Failed {
            suppress: false,
            ..
        })
    ));
    match store.outcome_for("later@example.net") {
        Some(OutcomeKind::Deferred {
            next_attempt_at,
            error,
        }) => {
            assert_eq!(error, "451 4.3.0 Try again later");
            assert!((before + 60..=clock::now() + 60).contains(&next_attempt_at));
        }
        other => panic!("{other:?}"),
    }

    let log = store.0.lock().unwrap().log.clone();
    let dsn_at = log
        .iter()
        .position(|e| matches!(e, Entry::Enqueued { purpose, .. } if purpose == DSN_PURPOSE))
        .expect("one bounce report");
    let dsn_count = log
        .iter()
        .filter(|e| matches!(e, Entry::Enqueued { purpose, .. } if purpose == DSN_PURPOSE))
        .count();
    assert_eq!(dsn_count, 1, "one report for both failures: {log:?}");
    for (i, e) in log.iter().enumerate() {
        if let Entry::Outcome(o) = e
            && matches!(o.kind, OutcomeKind::Failed { .. })
        {
            assert!(i > dsn_at, "failure recorded before its bounce was spooled");
        }
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
    let store: Arc<FakeStore> = Arc::default();
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
    wait_for("both failed and a report queued", || {
        store.outcomes().len() >= 2
            && store
                .0
                .lock()
                .unwrap()
                .log
                .iter()
                .any(|e| matches!(e, Entry::Enqueued { purpose, .. } if purpose == DSN_PURPOSE))
    })
    .await;
    for rcpt in ["later1@example.net", "later2@example.net"] {
        match store.outcome_for(rcpt) {
            Some(OutcomeKind::Failed { error, suppress }) => {
                assert!(!suppress);
                assert_eq!(
                    error,
                    "4.4.7 message expired after 1 attempt: last error 451 4.3.0 Try again later"
                );
            }
            other => panic!("{rcpt}: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reports = store
        .0
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|e| matches!(e, Entry::Enqueued { purpose, .. } if purpose == DSN_PURPOSE))
        .count();
    assert_eq!(reports, 1, "none for the message with the null sender");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_retried_until_the_store_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<FakeStore> = Arc::default();
    store.0.lock().unwrap().fail_records = 2;
    let r = run(file_config(dir.path()), store.clone());
    r.spool
        .accept(new_message(
            message("M3", "", clock::now()),
            &["x@example.net"],
        ))
        .await
        .unwrap();
    wait_for("recorded after two failures", || {
        store.outcomes().len() == 1
    })
    .await;
    assert_eq!(store.0.lock().unwrap().record_calls, 3);
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
    wait_for("deferred", || store.outcomes().len() == 1).await;
    r.stop().await;
    let pending = store.pending_deliveries().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 1);
}
