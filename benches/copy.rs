//! The per-recipient work of a delivery, measured on the reference newsletter
//! (`../shared/fixtures/newsletter.eml`, or the file named by `OPTGATE_BENCH_MESSAGE`):
//!
//! - `rewrite`: `Prepared::new` (once per message) and `Prepared::render` (per copy);
//! - `dkim`: signing one rendered copy with RSA-2048 and with Ed25519;
//! - `copy`: render + sign, what each recipient costs in CPU;
//! - `relay`: sign + send, one copy on its way out to a sink on 127.0.0.1;
//! - `token`: the signed unsubscribe token in each copy's links;
//! - `store`: `consent_facts` (the policy's lookup, for 1 and for 10 recipients) and
//!   `contact_id` (each copy's link names the contact) on a database of 100 000
//!   contacts (`OPTGATE_BENCH_CONTACTS` to change), built once in a temporary folder;
//! - `queue`: what the store writes per message with one recipient: `enqueue` of
//!   [`queue::GROUP`] messages in one fsync'd transaction, then `record_outcomes`
//!   delivering them, on a database file in a temporary folder (on disk, as
//!   `storage.fsync` wants). Divide its time by `GROUP` for one message.
//!
//! Run: `cargo bench --bench copy` (a filter narrows it: `cargo bench --bench copy -- dkim`).

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use divan::{Bencher, black_box};
use optgate::address::Address;
use optgate::dkim::{self, Algorithm, Signers};
use optgate::rewrite::{CompiledFooter, Footer, Links, Prepared};
use optgate::store::{
    ConsentAction, DeliveryOutcome, NewConsentEvent, NewMessage, OutcomeKind, QueuedMessage,
    RecipientDecision, SqliteStore, Store,
};
use optgate::token::{Claims, TokenKey, TokenKeys, TokenKind, purpose_tag};

fn main() {
    // At least a second per benchmark, so that the RSA medians settle; the command
    // line still overrides it (`-- --min-time 5`).
    divan::Divan::default()
        .min_time(std::time::Duration::from_secs(1))
        .config_with_args()
        .main();
}

const HOSTNAME: &str = "optgate.example";
const PURPOSE: &str = "newsletter";

/// The message as the queue holds it: CRLF line endings.
static MESSAGE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let path = std::env::var_os("OPTGATE_BENCH_MESSAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/newsletter.eml")
        });
    let raw = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): set OPTGATE_BENCH_MESSAGE",
            path.display()
        )
    });
    let mut crlf = Vec::with_capacity(raw.len() + raw.len() / 40);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        crlf.extend_from_slice(line);
        crlf.extend_from_slice(b"\r\n");
    }
    crlf
});

/// The message as the queue holds it, shared with each template as delivery does.
static SHARED: LazyLock<Arc<Vec<u8>>> = LazyLock::new(|| Arc::new(MESSAGE.clone()));

/// Compiled once, as delivery does per purpose.
static FOOTER: LazyLock<Arc<CompiledFooter>> = LazyLock::new(|| {
    Arc::new(CompiledFooter::new(&Footer::default_for(
        "fr",
        "Newsletter",
    )))
});

static PREPARED: LazyLock<Prepared> =
    LazyLock::new(|| Prepared::new(SHARED.clone(), FOOTER.clone(), HOSTNAME));

static TOKENS: LazyLock<TokenKeys> =
    LazyLock::new(|| TokenKeys::new(vec![TokenKey::new(1, &[42; 32], None).unwrap()]).unwrap());

/// A link as delivery makes it: the public URL and a token for contact 12 345.
static UNSUBSCRIBE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "https://news.example.com/u/{}",
        TOKENS.issue(claims(12_345))
    )
});

fn claims(contact: u64) -> Claims {
    Claims {
        kind: TokenKind::Unsubscribe,
        subject: contact,
        scope: purpose_tag(PURPOSE),
    }
}

fn links() -> Links<'static> {
    Links {
        unsubscribe: &UNSUBSCRIBE,
        preferences: None,
        mailto: None,
    }
}

/// One rendered copy, as handed to DKIM.
static RENDERED: LazyLock<Vec<u8>> = LazyLock::new(|| PREPARED.render(&links()).bytes);

static KEY_DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

fn signers(algorithm: Algorithm) -> Signers {
    let key = dkim::generate("example.com", "bench", algorithm).unwrap();
    let path = KEY_DIR.path().join(match algorithm {
        Algorithm::RsaSha256 => "rsa.pem",
        Algorithm::Ed25519Sha256 => "ed25519.pem",
    });
    std::fs::write(&path, key.private_pem).unwrap();
    let mut signers = Signers::default();
    signers
        .add_key_file("example.com", "bench", algorithm, &path)
        .unwrap();
    signers
}

static RSA: LazyLock<Signers> = LazyLock::new(|| signers(Algorithm::RsaSha256));
static ED25519: LazyLock<Signers> = LazyLock::new(|| signers(Algorithm::Ed25519Sha256));

fn signer(algorithm: &str) -> &'static Signers {
    match algorithm {
        "rsa" => &RSA,
        _ => &ED25519,
    }
}

mod rewrite {
    use super::*;

    /// Once per message: parse, plan, pre-encode.
    #[divan::bench]
    fn prepare(bencher: Bencher) {
        LazyLock::force(&MESSAGE);
        LazyLock::force(&FOOTER);
        bencher.bench(|| Prepared::new(black_box(SHARED.clone()), FOOTER.clone(), HOSTNAME));
    }

    /// Once per recipient.
    #[divan::bench]
    fn render(bencher: Bencher) {
        LazyLock::force(&PREPARED);
        let links = links();
        bencher.bench(|| PREPARED.render(black_box(&links)));
    }
}

/// Signing one rendered copy.
#[divan::bench(args = ["rsa", "ed25519"])]
fn dkim(bencher: Bencher, algorithm: &str) {
    let signers = signer(algorithm);
    LazyLock::force(&RENDERED);
    bencher.bench(|| signers.signature_fields(black_box(&RENDERED)).unwrap());
}

/// What each recipient costs in CPU: its copy rendered, then signed.
#[divan::bench(args = ["rsa", "ed25519"])]
fn copy(bencher: Bencher, algorithm: &str) {
    let signers = signer(algorithm);
    LazyLock::force(&PREPARED);
    let links = links();
    bencher.bench(|| {
        let rendered = PREPARED.render(black_box(&links));
        let signature = signers.signature_fields(&rendered.bytes).unwrap();
        (signature, rendered.bytes)
    });
}

/// One copy on its way out: signed (with Ed25519, whose cost does not drown the
/// rest) and sent with `Relay` over a pooled connection to a sink on 127.0.0.1,
/// which reads the message and answers 250. The sink's work counts too.
#[divan::bench]
fn relay(bencher: Bencher) {
    use optgate::config::{SmtpUpstream, UpstreamConfig, UpstreamTls};
    use optgate::relay::Relay;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let port = runtime.block_on(sink());
    let upstream = UpstreamConfig::Smtp(SmtpUpstream {
        host: "127.0.0.1".into(),
        port,
        tls: UpstreamTls::None,
        username: None,
        password: None,
        accept_invalid_certs: false,
        pool_size: 1,
        timeout: std::time::Duration::from_secs(10),
    });
    let relay = Relay::new(&upstream, HOSTNAME).unwrap();
    let signers = signer("ed25519");
    LazyLock::force(&RENDERED);
    bencher.bench_local(|| {
        runtime.block_on(async {
            let signature = signers.signature_fields(&RENDERED).unwrap();
            relay
                .send(
                    "shop@example.com",
                    "reader@example.net",
                    &[&signature, &RENDERED],
                )
                .await
                .unwrap()
        })
    });
}

/// A minimal SMTP server that accepts everything, for [`relay`]; its port.
async fn sink() -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::with_capacity(64 * 1024, read);
                write.write_all(b"220 sink\r\n").await?;
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if read.read_until(b'\n', &mut line).await? == 0 {
                        return Ok::<(), std::io::Error>(());
                    }
                    let reply: &[u8] = match line.get(..4) {
                        Some(b"EHLO") => b"250-sink\r\n250 8BITMIME\r\n",
                        Some(b"DATA") => {
                            write.write_all(b"354 go on\r\n").await?;
                            loop {
                                line.clear();
                                if read.read_until(b'\n', &mut line).await? == 0 {
                                    return Ok(());
                                }
                                if line == b".\r\n" {
                                    break;
                                }
                            }
                            b"250 2.0.0 Ok\r\n"
                        }
                        Some(b"QUIT") => return write.write_all(b"221 bye\r\n").await,
                        _ => b"250 Ok\r\n",
                    };
                    write.write_all(reply).await?;
                }
            });
        }
    });
    port
}

/// The unsubscribe token of one copy.
#[divan::bench]
fn token(bencher: Bencher) {
    LazyLock::force(&TOKENS);
    bencher.bench(|| TOKENS.issue(black_box(claims(12_345))));
}

mod store {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Db {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        addresses: Vec<Address>,
    }

    /// COUNT contacts, each with a consent for the purpose, one in ten withdrawn since.
    static DB: LazyLock<Db> = LazyLock::new(|| {
        let count: usize = std::env::var("OPTGATE_BENCH_CONTACTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let dir = tempfile::tempdir().unwrap();
        // fsync off only to build it quickly; lookups do not write.
        let store = SqliteStore::open(&dir.path().join("optgate.db"), false).unwrap();
        let now = optgate::clock::now();
        let mut addresses = Vec::with_capacity(count);
        let mut batch = Vec::with_capacity(11_000);
        for i in 0..count {
            let address = Address::parse(&format!("contact{i:06}@example.org")).unwrap();
            let at = now - 86_400 - (i as i64 * 617) % (700 * 86_400);
            let event = NewConsentEvent {
                address: address.clone(),
                purpose: PURPOSE.into(),
                action: ConsentAction::Grant,
                at,
                source: "benchmark".into(),
                evidence: serde_json::json!({}),
            };
            batch.push(event.clone());
            if i % 10 == 9 {
                batch.push(NewConsentEvent {
                    action: ConsentAction::Withdraw,
                    at: at + 3_600,
                    ..event
                });
            }
            addresses.push(address);
            if batch.len() >= 10_000 || i + 1 == count {
                store.append_consents(&batch).unwrap();
                batch.clear();
            }
        }
        Db {
            _dir: dir,
            store,
            addresses,
        }
    });

    /// A different contact each time, spread over the whole database.
    fn next(i: &AtomicUsize, n: usize) -> usize {
        i.fetch_add(7_919, Ordering::Relaxed) % n
    }

    /// The policy's lookup for a message with one recipient.
    #[divan::bench]
    fn consent_facts(bencher: Bencher) {
        let db = &*DB;
        let i = AtomicUsize::new(0);
        bencher
            .with_inputs(|| {
                let k = next(&i, db.addresses.len());
                db.addresses[k].clone()
            })
            .bench_refs(|a| {
                db.store
                    .consent_facts(std::slice::from_ref(a), PURPOSE)
                    .unwrap()
            });
    }

    /// The same for a message with ten recipients (one call, as the policy makes it).
    #[divan::bench]
    fn consent_facts_10(bencher: Bencher) {
        let db = &*DB;
        let i = AtomicUsize::new(0);
        bencher
            .with_inputs(|| {
                (0..10)
                    .map(|_| db.addresses[next(&i, db.addresses.len())].clone())
                    .collect::<Vec<_>>()
            })
            .bench_refs(|a| db.store.consent_facts(a, PURPOSE).unwrap());
    }

    /// The contact number each copy's unsubscribe link carries.
    #[divan::bench]
    fn contact_id(bencher: Bencher) {
        let db = &*DB;
        let i = AtomicUsize::new(0);
        bencher
            .with_inputs(|| db.addresses[next(&i, db.addresses.len())].clone())
            .bench_refs(|a| db.store.contact_id(a).unwrap());
    }
}

mod queue {
    use super::*;

    /// Messages enqueued in one transaction, and delivered in one: what the spool's
    /// group commit gathers under load.
    pub const GROUP: usize = 8;
    /// Distinct recipients cycled through: after the first round each is a known
    /// contact, as a newsletter's subscribers are.
    const RECIPIENTS: usize = 10_000;

    /// `GROUP` messages with one allowed recipient each, enqueued (fsync'd), then
    /// delivered: the store's whole share of their journey through the gateway.
    #[divan::bench]
    fn enqueue_and_deliver(bencher: Bencher) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("optgate.db"), true).unwrap();
        LazyLock::force(&SHARED);
        let mut n = 0usize;
        bencher.bench_local(|| {
            let now = optgate::clock::now();
            let batch: Vec<NewMessage> = (0..GROUP)
                .map(|_| {
                    n += 1;
                    let address =
                        Address::parse(&format!("reader{:05}@example.net", n % RECIPIENTS))
                            .unwrap();
                    NewMessage {
                        message: QueuedMessage {
                            id: format!("Q{n:010}"),
                            sender: "shop@example.com".into(),
                            purpose: PURPOSE.into(),
                            received_at: now,
                            body: SHARED.clone(),
                        },
                        recipients: vec![RecipientDecision {
                            address,
                            allowed: true,
                            reason: "allowed: consent (consent event 12345)".into(),
                        }],
                        origin: "listmonk@192.0.2.7".into(),
                    }
                })
                .collect();
            store.enqueue(&batch).unwrap();
            let outcomes: Vec<DeliveryOutcome> = batch
                .iter()
                .map(|m| DeliveryOutcome {
                    message_id: m.message.id.clone(),
                    recipient: m.recipients[0].address.as_str().to_string(),
                    at: now,
                    kind: OutcomeKind::Delivered {
                        reply: "250 2.0.0 Ok: queued as 4Xk9Lq0ZbVz1".into(),
                    },
                })
                .collect();
            store.record_outcomes(&outcomes).unwrap();
        });
    }
}
