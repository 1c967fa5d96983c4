//! The inbound stage against the real SQLite store, in process: a mailer submits over
//! SMTP, and the queue and the decision events hold what the 250 reply announced.

use std::sync::Arc;
use std::time::Duration;

use optgate::address::Address;
use optgate::config::Config;
use optgate::inbound::{self, Inbound};
use optgate::policy::Policy;
use optgate::spool::{Intake, Spool};
use optgate::store::{ConsentAction, NewConsentEvent, SqliteStore, Store};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn reply(io: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), io.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        all.push_str(&line);
        if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
            return all.trim_end().to_string();
        }
    }
}

#[tokio::test]
async fn a_submission_is_queued_with_its_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let toml = format!(
        r#"
[smtp]
listen = ["127.0.0.1:{port}"]
hostname = "gw.test"
[storage]
data_dir = "data"
fsync = false
[[purpose]]
id = "news"
name = "News"
basis = "consent"
"#
    );
    let config = Arc::new(Config::parse(&toml, &dir.path().join("optgate.toml")).unwrap());
    std::fs::create_dir_all(&config.storage.data_dir).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&config.storage.database(), false).unwrap());
    let yes = Address::parse("yes@example.org").unwrap();
    store
        .append_consent(&NewConsentEvent {
            address: yes.clone(),
            purpose: "news".into(),
            action: ConsentAction::Grant,
            at: optgate::clock::now() - 60,
            source: "test".into(),
            evidence: serde_json::json!({}),
        })
        .unwrap();

    let (spool, _ready, writer) = Spool::start(store.clone(), Intake::unlimited());
    let inbound = Arc::new(Inbound {
        config: config.clone(),
        policy: Policy::new(store.clone()),
        spool,
    });
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(inbound::serve(inbound, shutdown.clone()));

    let mut tcp = None;
    for _ in 0..100 {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut io = BufReader::new(tcp.expect("the gateway never listened"));
    assert_eq!(reply(&mut io).await, "220 gw.test ESMTP optgate");
    io.get_mut()
        .write_all(b"EHLO mailer.test\r\nMAIL FROM:<shop@example.com>\r\nRCPT TO:<yes@example.org>\r\nRCPT TO:<no@example.org>\r\nDATA\r\n")
        .await
        .unwrap();
    for _ in 0..4 {
        assert!(reply(&mut io).await.starts_with("250"));
    }
    assert!(reply(&mut io).await.starts_with("354"));
    io.get_mut()
        .write_all(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    let done = reply(&mut io).await;
    assert!(
        done.starts_with("250 2.0.0 Queued as ")
            && done.ends_with(": 1 accepted, 1 suppressed (no consent)"),
        "{done}"
    );
    assert_eq!(reply(&mut io).await, "221 2.0.0 Bye");
    let id = done["250 2.0.0 Queued as ".len()..]
        .split(':')
        .next()
        .unwrap()
        .to_string();

    let queue = store.queue().unwrap();
    assert_eq!(queue.len(), 1);
    assert_eq!(
        (queue[0].message_id.as_str(), queue[0].recipient.as_str()),
        (id.as_str(), "yes@example.org")
    );
    let message = store.message(&id).unwrap().expect("the message is stored");
    assert!(
        message
            .body
            .starts_with(b"Received: from mailer.test (127.0.0.1)\r\n")
    );
    let no = store
        .events_for(&Address::parse("no@example.org").unwrap())
        .unwrap();
    assert!(
        no.iter()
            .any(|e| e.kind == "decision" && e.message_id.as_deref() == Some(id.as_str())),
        "{no:?}"
    );

    shutdown.cancel();
    server.await.unwrap().unwrap();
    writer.await.unwrap();
}
