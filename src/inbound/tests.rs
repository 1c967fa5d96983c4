//! Whole sessions over real sockets against the real store: what a mailer sees, and
//! what the queue then holds. The pieces have their own unit tests beside them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use super::wire::Wrapping;
use super::{Inbound, server};
use crate::address::Address;
use crate::config::Config;
use crate::policy::Policy;
use crate::spool::{Intake, Ready, Spool};
use crate::store::testing::{Flaky, Op};
use crate::store::*;

/// Who has said what about "news": the rest never said anything.
const GRANTED: [&str; 4] = [
    "yes@example.org",
    "yes1@example.org",
    "yes2@example.org",
    "yes3@example.org",
];
const WITHDRAWN: &str = "gone@example.org";

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

fn consent(store: &Flaky, address: &str, action: ConsentAction) {
    store
        .append_consent(&NewConsentEvent {
            address: addr(address),
            purpose: "news".into(),
            action,
            at: crate::clock::now() - 10,
            source: "test".into(),
            evidence: serde_json::json!({ "page": "signup" }),
        })
        .unwrap();
}

struct Gateway {
    addr: SocketAddr,
    store: Arc<Flaky>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    dir: tempfile::TempDir,
    _ready: tokio::sync::mpsc::UnboundedReceiver<Ready>,
}

impl Gateway {
    async fn start(smtp: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            r#"
[smtp]
hostname = "gw.test"
{smtp}
[storage]
data_dir = "data"
fsync = false
[[purpose]]
id = "news"
name = "News"
basis = "consent"
[[purpose]]
id = "orders"
name = "Orders"
basis = "transactional"
"#
        );
        let config = Config::parse(&toml, &dir.path().join("optgate.toml")).unwrap();
        let store = Arc::new(Flaky::default());
        for granted in GRANTED {
            consent(&store, granted, ConsentAction::Grant);
        }
        consent(&store, WITHDRAWN, ConsentAction::Grant);
        consent(&store, WITHDRAWN, ConsentAction::Withdraw);
        let (spool, ready, _writer) = Spool::start(store.clone(), Intake::unlimited());
        let inbound = Arc::new(Inbound {
            config: Arc::new(config),
            policy: Policy::new(store.clone()),
            spool,
        });
        let listeners = server::bind(&["127.0.0.1:0".parse().unwrap()], Wrapping::Plain)
            .await
            .unwrap();
        let addr = listeners[0].0.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let tls = super::tls::acceptor(&inbound.config).unwrap();
        let task = tokio::spawn(server::run(inbound, listeners, tls, shutdown.clone()));
        Gateway {
            addr,
            store,
            shutdown,
            task,
            dir,
            _ready: ready,
        }
    }

    async fn connect(&self) -> Client<TcpStream> {
        let mut c = Client {
            io: BufReader::new(TcpStream::connect(self.addr).await.unwrap()),
        };
        assert_eq!(c.reply().await, "220 gw.test ESMTP optgate");
        c
    }

    /// The messages the queue holds, oldest first.
    fn queued(&self) -> Vec<QueuedMessage> {
        let mut ids: Vec<String> = self
            .store
            .queue()
            .unwrap()
            .into_iter()
            .map(|e| e.message_id)
            .collect();
        ids.dedup();
        ids.iter()
            .map(|id| self.store.message(id).unwrap().expect("a queued message"))
            .collect()
    }

    /// Whom the queue will deliver the message to.
    fn recipients(&self, id: &str) -> Vec<String> {
        self.store
            .queue()
            .unwrap()
            .into_iter()
            .filter(|e| e.message_id == id)
            .map(|e| e.recipient)
            .collect()
    }

    /// The decisions stored about `address`, as (message id, reason).
    fn decisions(&self, address: &str) -> Vec<(String, String)> {
        self.store
            .events_for(&addr(address))
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "decision")
            .map(|e| (e.message_id.unwrap_or_default(), e.detail))
            .collect()
    }
}

struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, bytes: &str) {
        self.io.get_mut().write_all(bytes.as_bytes()).await.unwrap();
    }

    /// One whole reply, its lines joined by '\n'; "" if the connection closed.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line))
                .await
                .expect("no reply within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return lines.join("\n");
            }
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    async fn say(&mut self, command: &str) -> String {
        self.send(&format!("{command}\r\n")).await;
        self.reply().await
    }
}

const MESSAGE: &str = "From: shop@example.com\nSubject: hello\nX-Optgate-Purpose: news\n\nbare LF line\rbare CR line\r\n.. stuffed\r\n";

#[tokio::test]
async fn trusted_mailer_submits_and_hears_the_decisions() {
    let gw = Gateway::start("").await;
    let mut c = gw.connect().await;
    let ehlo = c.say("EHLO client.test").await;
    assert!(
        ehlo.starts_with("250-gw.test Hello client.test [127.0.0.1]"),
        "{ehlo}"
    );
    for ext in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    assert_eq!(
        c.say("MAIL FROM:<Shop@Example.COM> BODY=8BITMIME SIZE=500")
            .await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.say("RCPT TO:<yes@example.org>").await,
        "250 2.1.5 Recipient OK"
    );
    assert_eq!(
        c.say("RCPT TO:<no@example.org>").await,
        "250 2.1.5 Recipient OK"
    );
    assert_eq!(
        c.say("RCPT TO:<gone@example.org>").await,
        "250 2.1.5 Recipient OK"
    );
    assert!(c.say("DATA").await.starts_with("354 "));
    let done = c.say(&format!("{MESSAGE}.")).await;
    let queued = gw.queued();
    assert_eq!(queued.len(), 1);
    let m = &queued[0];
    assert_eq!(
        done,
        format!(
            "250 2.0.0 Queued as {}: 1 accepted, 2 suppressed (1 no consent, 1 consent withdrawn)",
            m.id
        )
    );
    assert_eq!(m.sender, "Shop@example.com");
    assert_eq!(m.purpose, "news");
    assert_eq!(gw.store.origins(&m.id), ["127.0.0.1"; 3]);
    assert_eq!(gw.recipients(&m.id), ["yes@example.org"]);
    let grant = gw
        .store
        .contact(&addr("yes@example.org"))
        .unwrap()
        .unwrap()
        .history[0]
        .id;
    for (rcpt, reason) in [
        (
            "yes@example.org",
            format!("allowed: consent (consent event {grant})"),
        ),
        ("no@example.org", "suppressed: no consent".into()),
        ("gone@example.org", "suppressed: consent withdrawn".into()),
    ] {
        assert_eq!(gw.decisions(rcpt), [(m.id.clone(), reason)], "{rcpt}");
    }

    let body = String::from_utf8(m.body.to_vec()).unwrap();
    let received = format!(
        "Received: from client.test (127.0.0.1)\r\n\tby gw.test (optgate) with ESMTP id {};\r\n\t",
        m.id
    );
    assert!(body.starts_with(&received), "{body}");
    assert!(body.ends_with(
        "From: shop@example.com\r\nSubject: hello\r\nX-Optgate-Purpose: news\r\n\r\nbare LF line\r\nbare CR line\r\n. stuffed\r\n"
    ));
    assert!(!body.replace("\r\n", "").contains(['\r', '\n']));

    // The session goes on: all suppressed is still a 250, and nothing is queued.
    assert_eq!(c.say("MAIL FROM:<>").await, "250 2.1.0 Sender OK");
    c.say("RCPT TO:<no@example.org>").await;
    c.say("RCPT TO:<nobody@example.org>").await;
    c.say("DATA").await;
    let done = c.say("Subject: x\r\n\r\nhi\r\n.").await;
    assert!(
        done.starts_with("250 2.0.0 Not queued: 0 accepted, 2 suppressed (no consent)"),
        "{done}"
    );
    let nobody = gw.decisions("nobody@example.org");
    assert_eq!(nobody.len(), 1);
    assert_eq!(nobody[0].1, "suppressed: no consent");
    assert!(gw.store.message(&nobody[0].0).unwrap().is_none());
    assert_eq!(gw.queued().len(), 1);
    assert_eq!(c.say("QUIT").await, "221 2.0.0 Bye");
}

#[tokio::test]
async fn pipelined_commands_are_all_answered() {
    let gw = Gateway::start("").await;
    let mut c = gw.connect().await;
    c.send("EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<yes@example.org>\r\nRCPT TO:<bad address>\r\nNOOP\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250-gw.test"));
    assert_eq!(c.reply().await, "250 2.1.0 Sender OK");
    assert_eq!(c.reply().await, "250 2.1.5 Recipient OK");
    assert_eq!(c.reply().await, "501 5.1.3 Bad recipient address syntax");
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    assert!(c.reply().await.starts_with("354 "));
    c.send("X-Optgate-Purpose: orders\r\n\r\nhi\r\n.\r\nRSET\r\nQUIT\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0 Queued as "));
    assert_eq!(c.reply().await, "250 2.0.0 Reset");
    assert_eq!(c.reply().await, "221 2.0.0 Bye");
}

#[tokio::test]
async fn smuggled_commands_stay_inside_the_message() {
    let gw = Gateway::start("").await;
    let mut c = gw.connect().await;
    c.say("EHLO client.test").await;
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    c.say("DATA").await;
    c.send("Subject: hi\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<yes-victim@example.org>\r\nDATA\r\nforged\r\n\r\n.\r\r\nQUIT\r\n.\r\n")
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0 Queued as "), "{reply}");
    assert_eq!(c.say("NOOP").await, "250 2.0.0 OK");
    let queued = gw.queued();
    assert_eq!(queued.len(), 1);
    assert_eq!(gw.recipients(&queued[0].id), ["yes@example.org"]);
    assert!(gw.decisions("yes-victim@example.org").is_empty());
    let body = String::from_utf8(queued[0].body.to_vec()).unwrap();
    // A dot after a bare LF does not start a line: it stays, and the LF becomes CRLF.
    assert!(
        body.contains("hello\r\n.\r\nMAIL FROM:<evil@example.com>\r\n"),
        "{body}"
    );
    assert!(body.ends_with("forged\r\n\r\n\r\n\r\nQUIT\r\n"), "{body:?}");
}

#[tokio::test]
async fn a_message_over_many_reads_is_decoded_as_one() {
    let gw = Gateway::start("").await;
    let mut c = gw.connect().await;
    c.say("EHLO client.test").await;
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    assert!(c.say("DATA").await.starts_with("354 "));
    // Far more than one read, with a stuffed dot on every tenth line.
    let mut data = String::from("X-Optgate-Purpose: news\r\n\r\n");
    let mut expected = data.clone();
    for i in 0..20_000 {
        let line = format!("line {i:05}, long enough that the message needs many reads\r\n");
        if i % 10 == 0 {
            data.push_str("..");
            expected.push('.');
        }
        data.push_str(&line);
        expected.push_str(&line);
    }
    data.push_str(".\r\nNOOP\r\n");
    // Sent in pieces that end inside a CRLF, after a CRLF ".", and inside the end.
    let cuts = [
        data[100_000..].find('\r').unwrap() + 100_001,
        data[400_000..].find("\r\n..").unwrap() + 400_003,
        data.len() - 8,
    ];
    let mut from = 0;
    for cut in cuts.into_iter().chain([data.len()]) {
        c.send(&data[from..cut]).await;
        from = cut;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0 Queued as "), "{reply}");
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    let body = gw.queued()[0].body.clone();
    assert!(body.starts_with(b"Received: "));
    assert!(body.ends_with(expected.as_bytes()));
}

#[tokio::test]
async fn limits_get_their_replies_and_the_session_goes_on() {
    let gw =
        Gateway::start("max_message_size = 300\nmax_recipients = 2\nmax_line_length = 100").await;
    let mut c = gw.connect().await;
    assert_eq!(c.say("DATA").await, "503 5.5.1 Need MAIL command");
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "503 5.5.1 Send EHLO or HELO first"
    );
    assert_eq!(
        c.say("HELO client.test").await,
        "250 gw.test Hello client.test [127.0.0.1]"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@example.com> SIZE=301").await,
        "552 5.3.4 Message too big (max 300 bytes)"
    );
    assert_eq!(
        c.say("MAIL FROM:<not an address>").await,
        "501 5.1.7 Bad sender address syntax"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@exa_mple.com>").await,
        "501 5.1.7 Bad sender address syntax"
    );
    assert_eq!(
        c.say("RCPT TO:<yes@example.org>").await,
        "503 5.5.1 Need MAIL before RCPT"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "503 5.5.1 Nested MAIL command"
    );
    assert_eq!(c.say("DATA").await, "503 5.5.1 Need RCPT command");
    c.say("RCPT TO:<yes1@example.org>").await;
    c.say("RCPT TO:<yes2@example.org>").await;
    assert_eq!(
        c.say("RCPT TO:<yes3@example.org>").await,
        "452 4.5.3 Too many recipients"
    );
    c.say("DATA").await;
    let big = format!("Subject: big\r\n\r\n{}\r\n.", "0123456789\r\n".repeat(40));
    assert_eq!(
        c.say(&big).await,
        "552 5.3.4 Message too big (max 300 bytes)"
    );
    // The transaction is over; a new one works.
    assert_eq!(
        c.say("RCPT TO:<yes@example.org>").await,
        "503 5.5.1 Need MAIL before RCPT"
    );
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    c.say("DATA").await;
    let long = format!("Subject: long\r\n\r\n{}\r\n.", "x".repeat(101));
    assert_eq!(
        c.say(&long).await,
        "554 5.6.0 Message has a line longer than 100 octets"
    );
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    c.say("DATA").await;
    let fine = format!("Subject: fine\r\n\r\n{}\r\n.", "x".repeat(100));
    assert!(c.say(&fine).await.starts_with("250 2.0.0 Queued as "));
    assert_eq!(gw.queued().len(), 1);

    assert_eq!(
        c.say(&format!("NOOP {}", "x".repeat(5000))).await,
        "500 5.5.2 Line too long"
    );
    assert_eq!(c.say("XYZZY").await, "500 5.5.1 Command not recognized");
    assert_eq!(
        c.say("VRFY bob").await,
        "252 2.5.0 Cannot VRFY user, but will accept message"
    );
    assert_eq!(c.say("EXPN list").await, "502 5.5.1 EXPN not implemented");
    assert!(c.say("HELP").await.starts_with("214 2.0.0 "));
    for _ in 0..9 {
        assert_eq!(c.say("XYZZY").await, "500 5.5.1 Command not recognized");
    }
    assert_eq!(c.say("XYZZY").await, "500 5.5.1 Command not recognized");
    assert_eq!(
        c.reply().await,
        "421 4.7.0 Too many errors, closing connection"
    );
    assert_eq!(c.reply().await, "");
}

#[tokio::test]
async fn bdat_chunks_make_one_message_and_refused_chunks_are_skipped() {
    let gw = Gateway::start("max_message_size = 100").await;
    let mut c = gw.connect().await;
    c.say("EHLO client.test").await;
    // Refused, but its 10 bytes must not be read as commands.
    c.send("BDAT 10\r\nQUIT\r\nQUIT").await;
    assert_eq!(c.reply().await, "503 5.5.1 Need MAIL command");
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    c.send("BDAT 17\r\nSubject: chunks\r\n").await;
    assert_eq!(c.reply().await, "250 2.0.0 17 octets received");
    c.send("BDAT 8 LAST\r\n\r\nhi\nyo\n").await;
    let done = c.reply().await;
    assert!(done.starts_with("250 2.0.0 Queued as "), "{done}");
    let body = gw.queued()[0].body.to_vec();
    assert!(body.ends_with(b"Subject: chunks\r\n\r\nhi\r\nyo\r\n"));

    // Too big: every chunk to LAST is refused, then the session is ready again.
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    c.send(&format!(
        "BDAT 80\r\n{}BDAT 80\r\n{}BDAT 0 LAST\r\n",
        "a".repeat(80),
        "b".repeat(80)
    ))
    .await;
    assert_eq!(c.reply().await, "250 2.0.0 80 octets received");
    assert_eq!(c.reply().await, "552 5.3.4 Message too big (max 100 bytes)");
    assert_eq!(c.reply().await, "552 5.3.4 Message too big (max 100 bytes)");
    assert_eq!(c.say("DATA").await, "503 5.5.1 Need MAIL command");
    assert_eq!(gw.queued().len(), 1);
}

#[tokio::test]
async fn purpose_and_store_trouble() {
    let gw = Gateway::start("").await;
    let mut c = gw.connect().await;
    c.say("EHLO client.test").await;
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<yes@example.org>").await;
    c.say("DATA").await;
    assert_eq!(
        c.say("X-Optgate-Purpose: nope\r\n\r\nhi\r\n.").await,
        "550 5.7.1 unknown purpose 'nope'"
    );

    // The store fails: when asked about consent, then when the message is queued.
    for (op, reply) in [
        (
            Op::ConsentFacts,
            "451 4.3.0 Temporary failure checking consent, try again later",
        ),
        (
            Op::Enqueue,
            "451 4.3.0 Could not queue the message, try again later",
        ),
    ] {
        gw.store.fail(op, 1);
        c.say("MAIL FROM:<a@example.com>").await;
        c.say("RCPT TO:<yes@example.org>").await;
        c.say("DATA").await;
        assert_eq!(c.say("Subject: x\r\n\r\nhi\r\n.").await, reply);
    }
    assert!(gw.queued().is_empty());
    assert!(gw.decisions("yes@example.org").is_empty());
}

fn fast_hash(password: &str) -> String {
    let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

async fn start_tls(
    c: Client<TcpStream>,
    dir: &Path,
) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let pem = std::fs::read(dir.join("data/tls/cert.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("gw.test").unwrap();
    let tls = connector.connect(name, c.io.into_inner()).await.unwrap();
    Client {
        io: BufReader::new(tls),
    }
}

#[tokio::test]
async fn untrusted_peer_needs_starttls_and_auth() {
    let smtp = format!(
        "trusted_networks = [\"10.0.0.0/8\"]\n[[smtp.account]]\nusername = \"crm\"\npassword_hash = \"{}\"\npurposes = [\"orders\"]\ndefault_purpose = \"orders\"",
        fast_hash("s3cret")
    );
    let gw = Gateway::start(&smtp).await;
    let mut c = gw.connect().await;
    let ehlo = c.say("EHLO client.test").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert_eq!(
        c.say("AUTH PLAIN AGNybQBzM2NyZXQ=").await,
        "538 5.7.11 Encryption required: issue STARTTLS first"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "530 5.7.0 Authentication required: issue STARTTLS first, then AUTH"
    );
    // A command pipelined behind STARTTLS is dropped, never run inside TLS.
    c.send("STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
        .await;
    assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS");
    let mut c = start_tls(c, gw.dir.path()).await;
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "503 5.5.1 Send EHLO or HELO first"
    );
    let ehlo = c.say("EHLO client.test").await;
    assert!(
        !ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN LOGIN"),
        "{ehlo}"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "530 5.7.0 Authentication required"
    );
    let wrong = BASE64.encode("\0crm\0guess");
    assert_eq!(
        c.say(&format!("AUTH PLAIN {wrong}")).await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert_eq!(c.say("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.say("*").await, "501 5.7.0 Authentication cancelled");
    assert_eq!(c.say("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.say(&BASE64.encode("crm")).await, "334 UGFzc3dvcmQ6");
    assert_eq!(
        c.say(&BASE64.encode("s3cret")).await,
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(
        c.say("AUTH PLAIN AGNybQBzM2NyZXQ=").await,
        "503 5.5.1 Already authenticated"
    );
    assert_eq!(
        c.say("MAIL FROM:<a@example.com>").await,
        "250 2.1.0 Sender OK"
    );
    c.say("RCPT TO:<anyone@example.org>").await;
    c.say("DATA").await;
    assert_eq!(
        c.say("X-Optgate-Purpose: news\r\n\r\nhi\r\n.").await,
        "550 5.7.1 account 'crm' may not send for purpose 'news'"
    );
    c.say("MAIL FROM:<a@example.com>").await;
    c.say("RCPT TO:<anyone@example.org>").await;
    c.say("DATA").await;
    assert!(
        c.say("Subject: order\r\n\r\nhi\r\n.")
            .await
            .starts_with("250 2.0.0 Queued as ")
    );
    let queued = gw.queued();
    assert_eq!(queued.len(), 1);
    let m = &queued[0];
    assert_eq!(m.purpose, "orders");
    assert_eq!(gw.store.origins(&m.id), ["crm@127.0.0.1"]);
    let body = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(
        body.contains("with ESMTPSA id") && body.contains("for <anyone@example.org>;"),
        "{body}"
    );
    assert!(queued.iter().all(|m| m.sender != "injected@example.com"));
}

#[tokio::test]
async fn shutdown_lets_data_finish_and_closes_idle_sessions() {
    let gw = Gateway::start("").await;
    let mut idle = gw.connect().await;
    idle.say("EHLO idle.test").await;
    let mut busy = gw.connect().await;
    busy.say("EHLO busy.test").await;
    busy.say("MAIL FROM:<a@example.com>").await;
    busy.say("RCPT TO:<yes@example.org>").await;
    busy.say("DATA").await;
    busy.send("Subject: half\r\n\r\nfirst half\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    gw.shutdown.cancel();
    assert_eq!(idle.reply().await, "421 4.3.2 Service shutting down");
    // No more connections are taken.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(gw.addr).await.is_err());
    busy.send("second half\r\n.\r\n").await;
    assert!(busy.reply().await.starts_with("250 2.0.0 Queued as "));
    assert_eq!(busy.reply().await, "421 4.3.2 Service shutting down");
    let ended = tokio::time::timeout(Duration::from_secs(5), gw.task).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "serve did not end cleanly: {ended:?}"
    );
    assert_eq!(gw.store.queue().unwrap().len(), 1);
}

#[tokio::test]
async fn idle_clients_and_too_many_connections_are_told_why() {
    let gw = Gateway::start("idle_timeout = \"300ms\"\nmax_connections_per_ip = 1").await;
    let mut first = gw.connect().await;
    let mut second = Client {
        io: BufReader::new(TcpStream::connect(gw.addr).await.unwrap()),
    };
    assert_eq!(second.reply().await, "421 4.7.0 Too many connections");
    assert_eq!(first.reply().await, "421 4.4.2 Idle timeout, closing");
    assert_eq!(first.reply().await, "");
    // The slot is free again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = gw.connect().await;
    assert_eq!(third.say("NOOP").await, "250 2.0.0 OK");
}
