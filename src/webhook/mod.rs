//! Webhooks: each consent change (grant, withdrawal, unsubscribe, hard bounce, erasure)
//! POSTed as signed JSON to every configured URL, so the CRM and the mailer learn of it.
//!
//! The store's events table is the durable outbox: each change writes its event in the
//! same transaction as the change. One worker per URL sends them in order and keeps a
//! cursor in the store, the id of the last event the URL acknowledged.
//!
//! # What a receiver gets
//!
//! One `POST` per event, in event order, one at a time per URL:
//!
//! ```text
//! Content-Type: application/json
//! User-Agent: optgate/<version>
//! Optgate-Event-Id: evt_1234
//! Optgate-Signature: t=1764426259,v1=<hex HMAC-SHA256(secret, "1764426259." + body)>
//!
//! {"id":"evt_1234","type":"consent.withdrawn","created_at":"2026-11-29T14:24:19Z",
//!  "data":{"email":"ann@example.net","purpose":"news","source":"one-click","detail":"17"}}
//! ```
//!
//! - `type` is one of `consent.granted`, `consent.withdrawn`, `suppression.added`
//!   (a hard bounce: the mailbox does not exist) and `contact.forgotten` (an erasure).
//! - `data.email` is absent from `contact.forgotten`, which never names the person.
//!   `data.purpose` is a purpose id, `"all"` for every purpose, or null;
//!   `data.source` says how a consent change reached optgate (`cli`, `one-click`,
//!   `api`, `import`, `double-opt-in`…), null for the others; `data.detail` is, for a
//!   consent change, the id of its consent-history entry, for a suppression the
//!   upstream's reply, for an erasure a sentence.
//! - `created_at` is when the change happened (RFC 3339, UTC): for an imported
//!   consent, the time the file gives, which may be long before it was sent.
//! - The signature is Stripe's scheme: `t` is the attempt's Unix time, `v1` the
//!   HMAC-SHA256, in lower-case hex, of `t`, a dot and the raw body, keyed with the
//!   URL's `secret`. Receivers should compare in constant time and refuse a `t` too
//!   far from their clock.
//!
//! Any 2xx acknowledges the event; anything else (a redirect included, which is not
//! followed), a connection error or no answer within 10 s makes optgate try the same
//! event again after 1 s, then 2, 4… up to 5 minutes (each randomly shortened by up to
//! half, so that many gateways do not retry in step), for ever: later events wait, so
//! order is kept. Delivery is at least once: an acknowledgement lost on the way, or a
//! crash right after it, sends the event again, with the same `id`; receivers
//! deduplicate by it. A URL never seen before starts with the oldest event held, or,
//! with `start = "now"`, after the newest one: it then gets only what changes later.

mod payload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::config::{WebhookConfig, WebhookStart};
// "error sending request: … Connection refused": the top error alone rarely says what
// went wrong.
use crate::relay::error_chain;
use crate::store::{
    EVENT_CONSENT_GRANTED, EVENT_CONSENT_WITHDRAWN, EVENT_CONTACT_FORGOTTEN,
    EVENT_SUPPRESSION_ADDED, Event, Store, StoreError,
};

pub use payload::{body, event_id, signature};

/// The consent feed: decisions and delivery results stay inside optgate.
pub const KINDS: [&str; 4] = [
    EVENT_CONSENT_GRANTED,
    EVENT_CONSENT_WITHDRAWN,
    EVENT_SUPPRESSION_ADDED,
    EVENT_CONTACT_FORGOTTEN,
];
/// Events read from the store at a time.
const BATCH: usize = 100;
/// How often a caught-up worker asks the store for new events. Changes also come from
/// other processes (the CLI, imports), so there is nothing to be woken by; the query
/// reads an index and costs next to nothing.
const POLL: Duration = Duration::from_secs(1);
/// The longest one request may take, connecting and reading the answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// The most of an answer's body read (and ignored): reading it lets the connection be
/// reused; a receiver that sends more gets its connection closed.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook[{index}].url '{url}' is not a valid URL: {reason}")]
    BadUrl {
        index: usize,
        url: String,
        reason: String,
    },
    #[error("cannot set up the webhook HTTP client: {0}")]
    Client(String),
}

/// Why one attempt was not acknowledged.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("no answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Transport(String),
}

// ---- metrics

static DELIVERED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Webhook attempts since start, over every URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptCounts {
    /// Acknowledged with a 2xx.
    pub delivered: u64,
    /// Refused, unanswered or failed on the way (each retry counts).
    pub failed: u64,
}

pub fn attempt_counts() -> AttemptCounts {
    AttemptCounts {
        delivered: DELIVERED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// The counters in the Prometheus text format, for `/metrics` to append.
pub fn render_metrics() -> String {
    let counts = attempt_counts();
    format!(
        "# HELP optgate_webhook_attempts_total Webhook requests made, by result (failed: non-2xx, error or timeout).\n\
         # TYPE optgate_webhook_attempts_total counter\n\
         optgate_webhook_attempts_total{{result=\"delivered\"}} {}\n\
         optgate_webhook_attempts_total{{result=\"failed\"}} {}\n",
        counts.delivered, counts.failed
    )
}

// ---- the workers

/// Starts one worker per configured URL. The handle ends once every worker has
/// stopped: at `shutdown`, after the request in flight (at most 10 s) and its cursor.
pub fn start(
    webhooks: &[WebhookConfig],
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, WebhookError> {
    let mut workers = Vec::with_capacity(webhooks.len());
    if !webhooks.is_empty() {
        let client = reqwest::Client::builder()
            .user_agent(concat!("optgate/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookError::Client(error_chain(&e)))?;
        for (index, webhook) in webhooks.iter().enumerate() {
            let url = reqwest::Url::parse(&webhook.url).map_err(|e| WebhookError::BadUrl {
                index,
                url: webhook.url.clone(),
                reason: e.to_string(),
            })?;
            workers.push(Worker {
                shown: shown_url(&url),
                url,
                cursor_key: webhook.url.clone(),
                from_now: webhook.start == WebhookStart::Now,
                key: payload::key(&webhook.secret),
                client: client.clone(),
                store: store.clone(),
                shutdown: shutdown.clone(),
                failures: 0,
            });
        }
    }
    Ok(tokio::spawn(async move {
        let mut running = JoinSet::new();
        for worker in workers {
            running.spawn(worker.run());
        }
        while let Some(done) = running.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a webhook worker failed");
            }
        }
    }))
}

/// The URL for logs: without a password, should one be written in it.
fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

struct Worker {
    url: reqwest::Url,
    /// The URL as configured: what the store keys the cursor by.
    cursor_key: String,
    /// A URL never seen before starts after the newest event (`start = "now"`).
    from_now: bool,
    shown: String,
    key: ring::hmac::Key,
    client: reqwest::Client,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    /// Failed attempts in a row, for the backoff.
    failures: u32,
}

impl Worker {
    async fn run(mut self) {
        let (key, from_now) = (self.cursor_key.clone(), self.from_now);
        let Some(mut cursor) = self
            .store_call(move |s| s.webhook_cursor_or_start(&key, from_now))
            .await
        else {
            return;
        };
        tracing::info!(url = %self.shown, after = cursor, "webhook worker started");
        'feed: while !self.shutdown.is_cancelled() {
            let Some(events) = self
                .store_call(move |s| s.events_since(cursor, &KINDS, BATCH))
                .await
            else {
                break;
            };
            if events.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => continue,
                    _ = self.shutdown.cancelled() => break,
                }
            }
            for event in events {
                if let Err(e) = self.attempt(&event).await {
                    self.failures = self.failures.saturating_add(1);
                    FAILED.fetch_add(1, Ordering::Relaxed);
                    let delay = backoff(self.failures, rand::thread_rng().gen_range(0.5..=1.0));
                    tracing::warn!(
                        url = %self.shown,
                        event = %event_id(&event),
                        error = %e,
                        failures = self.failures,
                        retry_in = ?delay,
                        "webhook not acknowledged; will retry"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => break 'feed,
                    }
                    // Read the feed again from the cursor: the same event comes first,
                    // unless an erasure deleted it meanwhile, and then it must not go.
                    continue 'feed;
                }
                DELIVERED.fetch_add(1, Ordering::Relaxed);
                if self.failures > 0 {
                    tracing::info!(url = %self.shown, after_failures = self.failures, "webhook acknowledged again");
                    self.failures = 0;
                }
                let (key, id) = (self.cursor_key.clone(), event.id);
                if self
                    .store_call(move |s| s.set_webhook_cursor(&key, id))
                    .await
                    .is_none()
                {
                    break 'feed;
                }
                cursor = id;
                if self.shutdown.is_cancelled() {
                    break 'feed;
                }
            }
        }
        tracing::info!(url = %self.shown, after = cursor, "webhook worker stopped");
    }

    /// One POST of one event, with a signature made for this attempt.
    async fn attempt(&self, event: &Event) -> Result<(), AttemptError> {
        let body = payload::body(event);
        let signed = payload::signature(&self.key, clock::now(), &body);
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Optgate-Event-Id", event_id(event))
            .header("Optgate-Signature", signed)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    AttemptError::Timeout
                } else {
                    AttemptError::Transport(error_chain(&e.without_url()))
                }
            })?;
        let status = response.status();
        drain(response).await;
        if status.is_success() {
            tracing::debug!(url = %self.shown, event = %event_id(event), %status, "webhook acknowledged");
            Ok(())
        } else {
            Err(AttemptError::Status(status))
        }
    }

    /// Runs a store call on the blocking pool, retrying while it fails. None when
    /// shutdown came while it was failing (the call is always tried once, so that the
    /// cursor of a request finished during shutdown is still recorded).
    async fn store_call<T, F>(&self, call: F) -> Option<T>
    where
        T: Send + 'static,
        F: Fn(&dyn Store) -> Result<T, StoreError> + Send + Sync + 'static,
    {
        let call = Arc::new(call);
        let mut delay = Duration::from_millis(200);
        loop {
            let (store, call) = (self.store.clone(), call.clone());
            let error = match tokio::task::spawn_blocking(move || call(store.as_ref())).await {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("the store panicked: {e}"),
            };
            if self.shutdown.is_cancelled() {
                tracing::error!(url = %self.shown, %error, "webhook worker stopping with the store failing; unacknowledged events will be sent after restart");
                return None;
            }
            tracing::error!(url = %self.shown, %error, retry_in = ?delay, "webhook worker cannot use the store; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
}

/// Reads and drops a little of the answer, so that its connection can serve the next
/// request; its content means nothing to us.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        read += chunk.len();
        if read > MAX_ANSWER {
            break;
        }
    }
}

/// The wait before the next try after `failures` failed attempts in a row: 1 s
/// doubling up to 5 minutes, times `jitter` (drawn in 0.5..=1), so that receivers
/// coming back are not hit by every sender at once.
fn backoff(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let nominal = FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
    nominal.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests;
