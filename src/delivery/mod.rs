//! Delivery: the queue's workers. One scheduler task owns a timer heap of recipients
//! to try, starts at most `queue.concurrency` attempts, and acts on their results.
//!
//! Each recipient is in one place at a time: the timer heap (ids only, waiting for its
//! next try), the due queue (its time has come, waiting for a free slot), or in flight.
//! A message body is held in memory only while some of its recipients are due or in
//! flight; it is shared by them and read back from the store when none had it.
//! Results go to the recorder task, which stores them in groups. Permanent failures
//! of one message are gathered into one bounce report ([`dsn`]), spooled before the
//! failures are recorded, so that a crash in between repeats a bounce, never loses it.

mod copy;
pub mod dsn;
mod recorder;
pub mod schedule;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OnceCell, Semaphore, mpsc};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::address::Address;
use crate::clock;
use crate::config::Config;
use crate::relay::{Relay, RelayError};
use crate::spool::{self, Ready, Spool, Ticket};
use crate::store::{
    DeliveryOutcome, NewMessage, OutcomeKind, QueuedMessage, RecipientDecision, Store,
};
pub use copy::CopyMaker;
use copy::Template;
use schedule::{Failure, Verdict};

/// The reserved purpose of optgate's own bounce reports.
pub const DSN_PURPOSE: &str = "dsn";
/// How long shutdown waits for attempts in flight, then for bounce reports to spool.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Bodies of newly committed messages kept in memory while waiting for a free slot;
/// past this, they are read back from the store when their turn comes.
const READY_BODY_BUDGET: usize = 64 * 1024 * 1024;
/// When the store cannot give a message body (or a bounce cannot be spooled), try
/// again this much later, without counting an attempt.
const STORE_RETRY: Duration = Duration::from_secs(30);
/// Copies of messages up to this size are made on the runtime's own worker thread.
/// Such a copy takes about half a millisecond (most of it the RSA signature), less
/// than its trip to the blocking pool and back costs the machine: two thread
/// wake-ups, and the pool's lock, contended under load. bench/run measured 12% less
/// CPU per message and 15% more messages per second with these copies and the
/// consent lookup (see [`crate::policy`]) made in place. A worker is held that long
/// at most once per permit of the CPU semaphore, which has one per core; a larger
/// message, whose parse and body hash take longer, still goes to the blocking pool.
const IN_PLACE_COPY_MAX: usize = 256 * 1024;
/// When the pending deliveries cannot be read at start, try again this much later.
const RESUME_RETRY: Duration = Duration::from_secs(5);
/// The spool announces a message right after committing it, so one committed just
/// before the resume query is announced within moments of it; after this long the
/// list of resumed messages is no longer needed to spot such doubles.
const RESUME_OVERLAP: Duration = Duration::from_secs(60);

/// Starts delivery: resumes what the store holds as pending, then takes each newly
/// committed message from `ready`. Ends when `shutdown` fires and attempts in flight
/// are recorded.
pub fn start(
    config: Arc<Config>,
    store: Arc<dyn Store>,
    relay: Relay,
    copies: CopyMaker,
    spool: Spool,
    ready: mpsc::UnboundedReceiver<Ready>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let (outcomes, recorder) = recorder::start(store.clone(), shutdown.clone());
    let scheduler = Scheduler {
        concurrency: config.queue.concurrency.max(1),
        config,
        store,
        relay: Arc::new(relay),
        copies: Arc::new(copies),
        spool,
        outcomes,
        cpu: Arc::new(Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )),
        timers: BinaryHeap::new(),
        next_seq: 0,
        due: VecDeque::new(),
        slots: HashMap::new(),
        in_flight: JoinSet::new(),
        in_flight_ids: HashMap::new(),
        reports: JoinSet::new(),
        ready_bytes: 0,
        resumed: HashSet::new(),
        resumed_until: Instant::now(),
    };
    tokio::spawn(async move {
        let relay = scheduler.relay.clone();
        scheduler.run(ready, shutdown).await;
        // The scheduler has dropped every outcome sender: the recorder flushes and ends.
        if let Err(e) = recorder.await {
            tracing::error!(error = %e, "the outcome recorder failed");
        }
        relay.shutdown().await;
        tracing::info!("delivery stopped");
    })
}

/// One recipient of one message.
#[derive(Debug, Clone)]
struct Delivery {
    message_id: Arc<str>,
    recipient: String,
    /// The recipient's contact number, when known: their copy's links carry it.
    contact: Option<i64>,
    /// Attempts already made.
    attempts: u32,
}

/// A recipient waiting in the timer heap.
struct Timer {
    due: Instant,
    /// Keeps equal due times in insertion order.
    seq: u64,
    delivery: Delivery,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    /// Reversed, so that `BinaryHeap` (a max-heap) yields the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// A message body shared by its recipients: filled by the first attempt that needs
/// it (or by the spool, for a message just committed).
type Body = Arc<OnceCell<Arc<QueuedMessage>>>;
/// What the rewrite prepares once per message, shared like the body: the first
/// attempt prepares it on the blocking pool, just before making its own copy there;
/// attempts of the same message made meanwhile wait for it.
type SharedTemplate = Arc<OnceLock<Template>>;

/// A message with recipients due or in flight.
struct Slot {
    body: Body,
    template: SharedTemplate,
    /// Recipients of this message in the due queue or in flight.
    users: usize,
    /// Bytes counted against [`READY_BODY_BUDGET`].
    budget_bytes: usize,
    /// Permanent failures waiting to be reported together.
    failures: Vec<(Delivery, Failure)>,
    failed_message: Option<Arc<QueuedMessage>>,
}

impl Slot {
    fn new(body: Body, budget_bytes: usize) -> Slot {
        Slot {
            body,
            template: Arc::new(OnceLock::new()),
            users: 0,
            budget_bytes,
            failures: Vec::new(),
            failed_message: None,
        }
    }
}

/// What an attempt task hands back.
struct Attempted {
    delivery: Delivery,
    result: AttemptResult,
}

enum AttemptResult {
    Sent {
        message: Arc<QueuedMessage>,
        result: Result<String, RelayError>,
        /// What the rewrite did, for the delivery event.
        notes: String,
    },
    /// The store no longer has the message.
    Gone,
    /// The store could not be read, or the copy not made (its link or signature).
    Unavailable(String),
}

enum LoadError {
    Gone,
    Unavailable(String),
}

struct Scheduler {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    relay: Arc<Relay>,
    copies: Arc<CopyMaker>,
    spool: Spool,
    outcomes: mpsc::UnboundedSender<DeliveryOutcome>,
    concurrency: usize,
    /// One permit per core for making copies: the attempts in flight take turns in
    /// order instead of all sharing the cores at once, so the oldest finish first.
    cpu: Arc<Semaphore>,
    timers: BinaryHeap<Timer>,
    next_seq: u64,
    /// Each with its place in the backlog that intake waits on.
    due: VecDeque<(Delivery, Ticket)>,
    slots: HashMap<Arc<str>, Slot>,
    in_flight: JoinSet<Attempted>,
    /// Which delivery each task carries, to recover it should the task panic.
    in_flight_ids: HashMap<tokio::task::Id, Delivery>,
    /// Bounce reports being spooled; each yields the failures to retry if it could not be.
    reports: JoinSet<Vec<Delivery>>,
    ready_bytes: usize,
    /// Messages resumed from the store at start: the spool may also announce those
    /// committed just before, and they must not be sent twice.
    resumed: HashSet<Arc<str>>,
    /// When `resumed` is let go.
    resumed_until: Instant,
}

impl Scheduler {
    async fn run(mut self, mut ready: mpsc::UnboundedReceiver<Ready>, shutdown: CancellationToken) {
        if !self.resume(&shutdown).await {
            return self.stop().await;
        }
        let mut ready_open = true;
        let mut batch = Vec::new();
        loop {
            self.start_due();
            let next_timer = self.timers.peek().map(|t| t.due);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => {
                    self.finished(done);
                }
                Some(done) = self.reports.join_next(), if !self.reports.is_empty() => {
                    self.report_finished(done);
                }
                n = ready.recv_many(&mut batch, 256), if ready_open => {
                    ready_open = n > 0;
                    for r in batch.drain(..) {
                        self.ready(r);
                    }
                }
                _ = tokio::time::sleep_until(next_timer.unwrap_or_else(Instant::now)), if next_timer.is_some() => {
                    self.fire_timers();
                }
            }
        }
        // Later messages stay in the store; the next start resumes them.
        drop(ready);
        self.stop().await;
    }

    /// Schedules every pending delivery the store holds. False if shutdown came first.
    async fn resume(&mut self, shutdown: &CancellationToken) -> bool {
        let pending = loop {
            let store = self.store.clone();
            let error = match tokio::task::spawn_blocking(move || store.pending_deliveries()).await
            {
                Ok(Ok(pending)) => break pending,
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("the store panicked: {e}"),
            };
            tracing::error!(%error, retry_in = ?RESUME_RETRY, "cannot read the pending deliveries; delivery waits");
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(RESUME_RETRY) => {}
            }
        };
        let now = clock::now();
        let count = pending.len();
        for p in pending {
            let message_id: Arc<str> = match self.resumed.get(p.message_id.as_str()) {
                Some(id) => id.clone(),
                None => {
                    let id: Arc<str> = p.message_id.into();
                    self.resumed.insert(id.clone());
                    id
                }
            };
            let wait = u64::try_from(p.next_attempt_at.saturating_sub(now)).unwrap_or(0);
            self.schedule_in(
                Duration::from_secs(wait),
                Delivery {
                    message_id,
                    recipient: p.recipient,
                    contact: p.contact,
                    attempts: p.attempts,
                },
            );
        }
        self.resumed_until = Instant::now() + RESUME_OVERLAP;
        if count > 0 {
            tracing::info!(
                deliveries = count,
                messages = self.resumed.len(),
                "resumed the queue"
            );
        }
        true
    }

    fn schedule_in(&mut self, wait: Duration, delivery: Delivery) {
        let due = Instant::now()
            .checked_add(wait)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
        self.next_seq += 1;
        self.timers.push(Timer {
            due,
            seq: self.next_seq,
            delivery,
        });
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|t| t.due <= now) {
            if let Some(t) = self.timers.pop() {
                self.push_due(t.delivery);
            }
        }
    }

    fn push_due(&mut self, delivery: Delivery) {
        let slot = self
            .slots
            .entry(delivery.message_id.clone())
            .or_insert_with(|| Slot::new(Arc::new(OnceCell::new()), 0));
        slot.users += 1;
        let ticket = self.spool.intake().due();
        self.due.push_back((delivery, ticket));
    }

    /// A message just committed: its recipients are due now, its body is at hand.
    fn ready(&mut self, ready: Ready) {
        let Ready {
            message,
            recipients,
        } = ready;
        if !self.resumed.is_empty() && Instant::now() > self.resumed_until {
            self.resumed = HashSet::new();
        }
        if self.resumed.remove(message.id.as_str()) || recipients.is_empty() {
            return;
        }
        self.spool.intake().queued(recipients.len());
        let id: Arc<str> = message.id.as_str().into();
        if !self.slots.contains_key(&id) {
            let size = message.body.len();
            let slot = if self.ready_bytes.saturating_add(size) <= READY_BODY_BUDGET {
                self.ready_bytes += size;
                Slot::new(Arc::new(OnceCell::new_with(Some(Arc::new(message)))), size)
            } else {
                Slot::new(Arc::new(OnceCell::new()), 0)
            };
            self.slots.insert(id.clone(), slot);
        }
        for (recipient, contact) in recipients {
            self.push_due(Delivery {
                message_id: id.clone(),
                recipient,
                contact: Some(contact),
                attempts: 0,
            });
        }
    }

    fn start_due(&mut self) {
        while self.in_flight.len() < self.concurrency {
            let Some((delivery, ticket)) = self.due.pop_front() else {
                return;
            };
            let Some(slot) = self.slots.get(&delivery.message_id) else {
                // Cannot happen: push_due made it. Put it back on the timer, not lost.
                self.schedule_in(STORE_RETRY, delivery);
                continue;
            };
            let task = attempt(
                Stages {
                    store: self.store.clone(),
                    relay: self.relay.clone(),
                    copies: self.copies.clone(),
                    cpu: self.cpu.clone(),
                },
                slot.body.clone(),
                slot.template.clone(),
                delivery.clone(),
                ticket,
            );
            let handle = self.in_flight.spawn(task);
            self.in_flight_ids.insert(handle.id(), delivery);
        }
    }

    fn finished(&mut self, done: Result<(tokio::task::Id, Attempted), JoinError>) {
        let (delivery, result) = match done {
            Ok((id, attempted)) => {
                self.in_flight_ids.remove(&id);
                (attempted.delivery, attempted.result)
            }
            Err(e) => {
                let Some(delivery) = self.in_flight_ids.remove(&e.id()) else {
                    return;
                };
                tracing::error!(
                    queue_id = %delivery.message_id,
                    recipient = %delivery.recipient,
                    error = %e,
                    "a delivery attempt panicked; it will be tried again"
                );
                self.schedule_in(STORE_RETRY, delivery.clone());
                self.release(&delivery.message_id);
                return;
            }
        };
        let id = delivery.message_id.clone();
        match result {
            AttemptResult::Sent {
                message,
                result,
                notes,
            } => self.judge(delivery, message, result, notes),
            AttemptResult::Gone => {
                tracing::warn!(
                    queue_id = %delivery.message_id,
                    recipient = %delivery.recipient,
                    "the message is no longer in the queue; nothing to deliver"
                );
            }
            AttemptResult::Unavailable(error) => {
                tracing::error!(
                    queue_id = %delivery.message_id,
                    recipient = %delivery.recipient,
                    %error,
                    retry_in = ?STORE_RETRY,
                    "cannot read the message or make its copy; will try again"
                );
                self.schedule_in(STORE_RETRY, delivery);
            }
        }
        self.release(&id);
    }

    fn judge(
        &mut self,
        delivery: Delivery,
        message: Arc<QueuedMessage>,
        result: Result<String, RelayError>,
        notes: String,
    ) {
        let now = clock::now();
        let verdict = schedule::decide(
            result,
            message.received_at,
            delivery.attempts,
            now,
            &self.config.queue,
        );
        let kind = match verdict {
            Verdict::Delivered { reply } => {
                tracing::debug!(queue_id = %delivery.message_id, recipient = %delivery.recipient, %reply, "delivered");
                let reply = if notes.is_empty() {
                    reply
                } else {
                    format!("{reply} ({notes})")
                };
                OutcomeKind::Delivered { reply }
            }
            Verdict::Deferred {
                next_attempt_at,
                delay,
                error,
            } => {
                tracing::info!(
                    queue_id = %delivery.message_id,
                    recipient = %delivery.recipient,
                    attempts = delivery.attempts.saturating_add(1),
                    retry_in = %humantime::format_duration(delay),
                    %error,
                    "deferred"
                );
                self.schedule_in(
                    delay,
                    Delivery {
                        attempts: delivery.attempts.saturating_add(1),
                        ..delivery.clone()
                    },
                );
                OutcomeKind::Deferred {
                    next_attempt_at,
                    error,
                }
            }
            Verdict::Failed(failure) => {
                tracing::info!(
                    queue_id = %delivery.message_id,
                    recipient = %delivery.recipient,
                    attempts = delivery.attempts.saturating_add(1),
                    error = %failure.error,
                    suppress = failure.suppress,
                    "bounced"
                );
                if !message.sender.is_empty()
                    && let Some(slot) = self.slots.get_mut(&delivery.message_id)
                {
                    // Recorded once the bounce report is spooled.
                    slot.failures.push((delivery, failure));
                    slot.failed_message = Some(message);
                    return;
                }
                OutcomeKind::Failed {
                    error: failure.error,
                    suppress: failure.suppress,
                }
            }
        };
        self.record(&delivery, now, kind);
    }

    fn record(&self, delivery: &Delivery, at: i64, kind: OutcomeKind) {
        let outcome = DeliveryOutcome {
            message_id: delivery.message_id.to_string(),
            recipient: delivery.recipient.clone(),
            at,
            kind,
        };
        if self.outcomes.send(outcome).is_err() {
            tracing::error!(queue_id = %delivery.message_id, recipient = %delivery.recipient, "the outcome recorder is gone; this delivery stays queued");
        }
    }

    /// One recipient of the message is no longer due or in flight; when none is, the
    /// body is let go and the failures gathered are reported.
    fn release(&mut self, id: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.users = slot.users.saturating_sub(1);
        if slot.users > 0 {
            return;
        }
        if let Some(slot) = self.slots.remove(id) {
            self.ready_bytes = self.ready_bytes.saturating_sub(slot.budget_bytes);
            self.report(slot);
        }
    }

    /// Spools one bounce report for the failures gathered in `slot`, then records them.
    fn report(&mut self, slot: Slot) {
        let Some(message) = slot.failed_message else {
            return;
        };
        if slot.failures.is_empty() {
            return;
        }
        let now = clock::now();
        let sender = match Address::parse(&message.sender) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(queue_id = %message.id, sender = %message.sender, error = %e, "no bounce report: the sender is not a valid address");
                for (delivery, failure) in slot.failures {
                    self.record(&delivery, now, failed(failure));
                }
                return;
            }
        };
        let recipients: Vec<dsn::FailedRecipient> = slot
            .failures
            .iter()
            .map(|(d, f)| dsn::FailedRecipient {
                address: d.recipient.clone(),
                status: f.status.clone(),
                diagnostic: f.diagnostic.clone(),
                expired: f.expired,
            })
            .collect();
        let report_id = spool::new_queue_id();
        let unique = format!("{:016x}", rand::random::<u64>());
        let body = dsn::build(&dsn::Report {
            hostname: &self.config.smtp.hostname,
            sender: sender.as_str(),
            queue_id: &message.id,
            received_at: message.received_at,
            now,
            original: &message.body,
            recipients: &recipients,
            unique: &unique,
        });
        let bounce = NewMessage {
            message: QueuedMessage {
                id: report_id.clone(),
                sender: String::new(),
                purpose: DSN_PURPOSE.into(),
                received_at: now,
                body: Arc::new(body),
            },
            recipients: vec![RecipientDecision {
                address: sender.clone(),
                allowed: true,
                reason: "allowed: delivery status notification".into(),
            }],
            origin: "optgate".into(),
        };
        let spool = self.spool.clone();
        let outcomes = self.outcomes.clone();
        let failures = slot.failures;
        self.reports.spawn(async move {
            match spool.accept(bounce).await {
                Ok(()) => {
                    tracing::info!(queue_id = %message.id, report = %report_id, to = %sender, recipients = failures.len(), "bounce report queued");
                    for (delivery, failure) in failures {
                        let outcome = DeliveryOutcome {
                            message_id: delivery.message_id.to_string(),
                            recipient: delivery.recipient,
                            at: now,
                            kind: failed(failure),
                        };
                        // A closed recorder leaves the delivery queued: it bounces again.
                        let _ = outcomes.send(outcome);
                    }
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!(queue_id = %message.id, error = %e, retry_in = ?STORE_RETRY, "cannot queue the bounce report; the failed recipients will be tried again");
                    failures.into_iter().map(|(d, _)| d).collect()
                }
            }
        });
    }

    fn report_finished(&mut self, done: Result<Vec<Delivery>, JoinError>) {
        match done {
            Ok(retry) => {
                for delivery in retry {
                    self.schedule_in(STORE_RETRY, delivery);
                }
            }
            // The failures stay unrecorded, so pending in the store: a restart retries them.
            Err(e) => tracing::error!(error = %e, "a bounce report task failed"),
        }
    }

    /// Stops starting attempts, lets those in flight finish (for a while), reports
    /// and records what they gave. What is left stays pending in the store.
    async fn stop(mut self) {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        if !self.in_flight.is_empty() {
            tracing::info!(
                attempts = self.in_flight.len(),
                "waiting for delivery attempts in flight"
            );
        }
        while !self.in_flight.is_empty() {
            tokio::select! {
                Some(done) = self.in_flight.join_next_with_id() => self.finished(done),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        attempts = self.in_flight.len(),
                        "delivery attempts still in flight at shutdown are abandoned; they stay queued and will be retried"
                    );
                    self.in_flight.shutdown().await;
                    break;
                }
            }
        }
        // Recipients not yet tried keep their messages' failures waiting: report now.
        let waiting: Vec<Arc<str>> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.failures.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            if let Some(slot) = self.slots.remove(&id) {
                self.report(slot);
            }
        }
        let deadline = deadline.max(Instant::now() + Duration::from_secs(5));
        while !self.reports.is_empty() {
            tokio::select! {
                Some(_) = self.reports.join_next() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("bounce reports not spooled at shutdown; their failures stay queued and will bounce after restart");
                    self.reports.shutdown().await;
                    break;
                }
            }
        }
        // Dropping `self` drops the last outcome sender (so the recorder flushes and
        // ends) and this Spool handle (so the spool writer can end).
    }
}

fn failed(failure: Failure) -> OutcomeKind {
    OutcomeKind::Failed {
        error: failure.error,
        suppress: failure.suppress,
    }
}

/// What an attempt goes through.
struct Stages {
    store: Arc<dyn Store>,
    relay: Arc<Relay>,
    copies: Arc<CopyMaker>,
    cpu: Arc<Semaphore>,
}

/// One attempt: the message (shared by its recipients, read once), its rewrite
/// template (prepared once), this recipient's signed copy, and the upstream's answer.
/// The ticket (its place in the backlog) is given back once the copy is made.
async fn attempt(
    stages: Stages,
    body: Body,
    template: SharedTemplate,
    delivery: Delivery,
    ticket: Ticket,
) -> Attempted {
    let Stages {
        store,
        relay,
        copies,
        cpu,
    } = stages;
    let unavailable = |delivery, e: String| Attempted {
        delivery,
        result: AttemptResult::Unavailable(e),
    };
    let loaded = body
        .get_or_try_init(|| load(store, delivery.message_id.clone()))
        .await;
    let message = match loaded {
        Ok(m) => m.clone(),
        Err(LoadError::Gone) => {
            return Attempted {
                delivery,
                result: AttemptResult::Gone,
            };
        }
        Err(LoadError::Unavailable(e)) => return unavailable(delivery, e),
    };
    // Never closed: the scheduler owns it.
    let Ok(core) = cpu.acquire().await else {
        return unavailable(delivery, "the copy makers are closed".into());
    };
    let (m, recipient, contact) = (
        message.clone(),
        delivery.recipient.clone(),
        delivery.contact,
    );
    let make = move || {
        let template = template.get_or_init(|| copies.template(&m));
        copies.make(template, &m, &recipient, contact)
    };
    let made = if message.body.len() <= IN_PLACE_COPY_MAX {
        Ok(make())
    } else {
        tokio::task::spawn_blocking(make).await
    };
    let copy = match made {
        Ok(Ok(copy)) => copy,
        Ok(Err(e)) => return unavailable(delivery, e.to_string()),
        Err(e) => return unavailable(delivery, format!("making the copy panicked: {e}")),
    };
    drop((core, ticket));
    let result = relay
        .send(&message.sender, &delivery.recipient, &copy.parts())
        .await;
    Attempted {
        delivery,
        result: AttemptResult::Sent {
            message,
            result,
            notes: copy.notes,
        },
    }
}

async fn load(store: Arc<dyn Store>, id: Arc<str>) -> Result<Arc<QueuedMessage>, LoadError> {
    match tokio::task::spawn_blocking(move || store.message(&id)).await {
        Ok(Ok(Some(m))) => Ok(Arc::new(m)),
        Ok(Ok(None)) => Err(LoadError::Gone),
        Ok(Err(e)) => Err(LoadError::Unavailable(e.to_string())),
        Err(e) => Err(LoadError::Unavailable(format!("the store panicked: {e}"))),
    }
}

#[cfg(test)]
mod tests;
