//! Everything optgate keeps, behind one trait: contacts, the append-only consent
//! history and the state derived from it, suppressions, events, and the mail queue.
//!
//! Every SQL statement lives in a backend file (`sqlite.rs` today). The trait is
//! synchronous: async callers run it on the blocking pool (`spawn_blocking`), so that
//! no write (an fsync) or long read stalls the runtime. One short read is made in
//! place, where the trip to the pool would cost more than the read: the consent of a
//! few recipients (`policy`). A copy's contact number comes with its delivery (from
//! `enqueue` or `pending_deliveries`), so making a copy reads nothing.

mod sqlite;
#[cfg(test)]
pub mod testing;

pub use sqlite::SqliteStore;

use std::sync::Arc;

use serde::Serialize;

use crate::address::Address;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
    /// The address is on the erasure list: nothing about it may be recorded again.
    #[error("the address was erased at the person's request: nothing about it is recorded")]
    Erased,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// The purpose name that stands for "every purpose" in the consent history.
pub const ALL_PURPOSES: &str = "all";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentAction {
    Grant,
    Withdraw,
}

impl ConsentAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentAction::Grant => "grant",
            ConsentAction::Withdraw => "withdraw",
        }
    }
}

/// A consent or withdrawal to append to the history.
#[derive(Debug, Clone)]
pub struct NewConsentEvent {
    pub address: Address,
    /// A purpose id, or [`ALL_PURPOSES`].
    pub purpose: String,
    pub action: ConsentAction,
    /// Unix seconds when it happened (not when it was recorded, for imports).
    pub at: i64,
    /// How it reached us: "cli", "one-click", "page", "api", "import"…
    pub source: String,
    /// The proof: IP, user agent, wording version shown, anything else relevant.
    pub evidence: serde_json::Value,
}

/// One entry of the append-only consent history.
#[derive(Debug, Clone, Serialize)]
pub struct ConsentEvent {
    pub id: i64,
    pub address: String,
    pub purpose: String,
    pub action: ConsentAction,
    pub at: i64,
    pub recorded_at: i64,
    pub source: String,
    pub evidence: serde_json::Value,
}

/// The newest history event for one (contact, purpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestEvent {
    /// History ids grow with every append, so they order events even within a second.
    pub id: i64,
    pub action: ConsentAction,
    pub at: i64,
}

/// What the policy needs to know about one recipient for one purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentFacts {
    pub customer: bool,
    /// The person asked to be forgotten: never mail them again, for any purpose.
    pub erased: bool,
    /// The suppression-list reason, if the address is on it.
    pub suppression: Option<String>,
    pub purpose_event: Option<LatestEvent>,
    /// The newest event for [`ALL_PURPOSES`].
    pub all_event: Option<LatestEvent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Suppression {
    pub reason: String,
    pub detail: String,
    pub at: i64,
}

/// Everything held about one contact.
#[derive(Debug, Clone, Serialize)]
pub struct ContactRecord {
    pub address: String,
    pub customer: bool,
    pub suppression: Option<Suppression>,
    /// Oldest first.
    pub history: Vec<ConsentEvent>,
}

/// An accepted message as the queue holds it. The body is the message as received
/// (CRLF line endings, no dot-stuffing), before any per-recipient change.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// The queue id, as told to the mailer in the 250 reply.
    pub id: String,
    /// The envelope sender; empty for the null reverse-path `<>`.
    pub sender: String,
    pub purpose: String,
    pub received_at: i64,
    pub body: Arc<Vec<u8>>,
}

/// The policy's verdict on one recipient, as stored in the decision event.
#[derive(Debug, Clone)]
pub struct RecipientDecision {
    pub address: Address,
    pub allowed: bool,
    pub reason: String,
}

/// A message to enqueue together with every recipient's decision.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub message: QueuedMessage,
    pub recipients: Vec<RecipientDecision>,
    /// Who submitted it (account and/or IP), for the decision events.
    pub origin: String,
}

/// A recipient still to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelivery {
    pub message_id: String,
    pub recipient: String,
    /// The recipient's contact number; None only if the contact is gone.
    pub contact: Option<i64>,
    pub attempts: u32,
    pub next_attempt_at: i64,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone)]
pub enum OutcomeKind {
    Delivered {
        reply: String,
    },
    /// Transient failure; try again at `next_attempt_at`.
    Deferred {
        next_attempt_at: i64,
        error: String,
    },
    /// Permanent failure or expiry; `suppress` puts the address on the suppression
    /// list with reason "hard bounce" (the mailbox does not exist).
    Failed {
        error: String,
        suppress: bool,
    },
}

#[derive(Debug, Clone)]
pub struct DeliveryOutcome {
    pub message_id: String,
    pub recipient: String,
    pub at: i64,
    pub kind: OutcomeKind,
}

/// One line of `optgate queue list`.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    pub message_id: String,
    pub sender: String,
    pub recipient: String,
    pub purpose: String,
    pub received_at: i64,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
}

/// One entry of the event log: a decision, a delivery result.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Grows with every event: the cursor of the admin API and of webhooks.
    pub id: i64,
    pub at: i64,
    /// One of the `EVENT_*` kinds.
    pub kind: String,
    pub message_id: Option<String>,
    /// Empty for `contact.forgotten`, which never names the person.
    pub address: String,
    pub purpose: Option<String>,
    pub detail: String,
    /// Who caused it: the submitting account/IP for decisions, the consent event's
    /// source for consent changes.
    pub origin: Option<String>,
}

// The kinds of event. Decisions and delivery results are written by enqueue and
// record_outcomes; consent changes by every method that appends to the history
// (detail = the history event id); a hard bounce also writes `suppression.added`.
pub const EVENT_DECISION: &str = "decision";
pub const EVENT_DELIVERED: &str = "delivered";
pub const EVENT_DEFERRED: &str = "deferred";
pub const EVENT_BOUNCED: &str = "bounced";
pub const EVENT_CONSENT_GRANTED: &str = "consent.granted";
pub const EVENT_CONSENT_WITHDRAWN: &str = "consent.withdrawn";
pub const EVENT_SUPPRESSION_ADDED: &str = "suppression.added";
pub const EVENT_CONTACT_FORGOTTEN: &str = "contact.forgotten";

/// A double opt-in sign-up waiting for its confirmation.
#[derive(Debug, Clone)]
pub struct NewSignup {
    pub address: Address,
    pub purposes: Vec<String>,
    pub source: String,
    pub wording_version: String,
    /// The sign-up's proof: time, IP, user agent.
    pub evidence: serde_json::Value,
    pub at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Signup {
    pub id: i64,
    pub address: String,
    pub purposes: Vec<String>,
    pub source: String,
    pub wording_version: String,
    pub evidence: serde_json::Value,
    pub at: i64,
    pub expires_at: i64,
    pub confirmed_at: Option<i64>,
}

/// How a confirmation went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The consents were recorded: one history event id per purpose.
    Recorded(Vec<i64>),
    AlreadyConfirmed,
    Expired,
    Unknown,
}

/// A current grant that will lapse: for `optgate consent expiring`.
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub address: String,
    pub purpose: String,
    pub event_id: i64,
    pub at: i64,
}

pub trait Store: Send + Sync + 'static {
    // ---- contacts and consent
    /// Facts for each address, in order, about `purpose`.
    fn consent_facts(
        &self,
        addresses: &[Address],
        purpose: &str,
    ) -> Result<Vec<ConsentFacts>, StoreError>;
    /// Appends to the history (creating the contact if new); returns the event id.
    fn append_consent(&self, event: &NewConsentEvent) -> Result<i64, StoreError>;
    fn set_customer(&self, address: &Address, customer: bool) -> Result<(), StoreError>;
    fn contact(&self, address: &Address) -> Result<Option<ContactRecord>, StoreError>;
    fn suppress(
        &self,
        address: &Address,
        reason: &str,
        detail: &str,
        at: i64,
    ) -> Result<(), StoreError>;
    /// Lifts a suppression; false if the address was not on the list.
    fn unsuppress(&self, address: &Address) -> Result<bool, StoreError>;

    /// The contact's stable number (what tokens carry), creating the contact if new.
    fn contact_id(&self, address: &Address) -> Result<i64, StoreError>;
    /// The address behind a contact number, if that contact exists.
    fn contact_address(&self, id: i64) -> Result<Option<Address>, StoreError>;

    // ---- the queue
    /// Stores messages, their deliveries (allowed recipients, who become contacts)
    /// and every decision event in one durable transaction. A message with no allowed recipient leaves
    /// only its decision events. An allowed recipient forgotten since the decision is
    /// not queued: their decision is logged as a refusal, without the address.
    /// Returns, per message, each queued recipient in envelope order with their
    /// contact number, so that their copies need not look it up.
    fn enqueue(&self, batch: &[NewMessage]) -> Result<Vec<Vec<(String, i64)>>, StoreError>;
    /// Every delivery not yet delivered or failed, for resuming after a restart.
    fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StoreError>;
    /// The message's envelope and body, or None once it has been fully delivered.
    fn message(&self, id: &str) -> Result<Option<QueuedMessage>, StoreError>;
    /// Applies attempt results in one transaction: removes finished deliveries (and
    /// messages with none left), reschedules deferred ones, logs events, adds
    /// hard-bounce suppressions.
    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError>;
    fn queue(&self) -> Result<Vec<QueueEntry>, StoreError>;

    // ---- the event log
    /// Events about `address`, oldest first.
    fn events_for(&self, address: &Address) -> Result<Vec<Event>, StoreError>;
    /// Up to `limit` events with id > `after`, oldest first; only the given kinds
    /// when `kinds` is not empty.
    fn events_since(
        &self,
        after: i64,
        kinds: &[&str],
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;
    /// The id of the last event a webhook endpoint acknowledged. For a URL never seen
    /// before, first records where it starts: at 0, so that the oldest event held
    /// comes first, or, `from_now`, at the newest event's id, so that only later
    /// ones are sent.
    fn webhook_cursor_or_start(&self, url: &str, from_now: bool) -> Result<i64, StoreError>;
    fn set_webhook_cursor(&self, url: &str, event_id: i64) -> Result<(), StoreError>;

    // ---- bulk consent: import and export
    /// Appends many events in ONE transaction (all or nothing). Returns the indexes
    /// of the events refused because their address was erased (those are not written).
    fn append_consents(&self, events: &[NewConsentEvent]) -> Result<Vec<usize>, StoreError>;
    /// Up to `limit` history events with id > `after`, oldest first (for exports).
    fn history_page(&self, after: i64, limit: usize) -> Result<Vec<ConsentEvent>, StoreError>;
    /// Up to `limit` contacts with id > `after` in id order, each with its history.
    fn contacts_page(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, ContactRecord)>, StoreError>;
    /// Current grants for `purpose` (the newest event for it is a grant) given at or
    /// before `granted_at_or_before`: who lapses soon, for purposes that expire.
    fn grants_older_than(
        &self,
        purpose: &str,
        granted_at_or_before: i64,
    ) -> Result<Vec<Grant>, StoreError>;

    // ---- double opt-in
    fn create_signup(&self, signup: &NewSignup) -> Result<i64, StoreError>;
    fn signup(&self, id: i64) -> Result<Option<Signup>, StoreError>;
    /// Records one grant per purpose of the sign-up (evidence: the sign-up's and the
    /// confirmation's, and the wording version) and marks it confirmed, in one
    /// transaction.
    fn confirm_signup(
        &self,
        id: i64,
        at: i64,
        evidence: serde_json::Value,
    ) -> Result<Confirmation, StoreError>;
    /// Sign-ups for `address` created at or after `since` (rate limiting).
    fn signups_since(&self, address: &Address, since: i64) -> Result<usize, StoreError>;
    /// Every sign-up of `address`, oldest first (for the person's own file).
    fn signups_for(&self, address: &Address) -> Result<Vec<Signup>, StoreError>;

    // ---- erasure (GDPR art. 17)
    /// Deletes everything held about `address` (contact, history, suppressions,
    /// events, sign-ups, pending deliveries) but keeps a keyed hash of it on the
    /// erasure list, so it is never mailed or imported again; logs a
    /// `contact.forgotten` event that does not name it. False if nothing was held.
    fn forget(&self, address: &Address, at: i64) -> Result<bool, StoreError>;
}
