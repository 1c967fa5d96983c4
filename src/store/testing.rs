//! The real store for tests, with a switch to make any of its operations fail.
//!
//! [`Flaky`] keeps a [`SqliteStore`] in a temporary directory and hands every call to
//! it; a test switches off the operations whose failure it wants to see, and counts
//! the calls it wants to count. Everything else is the real database, read back
//! through the real API.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;

use super::*;

/// One [`Store`] method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    ConsentFacts,
    AppendConsent,
    SetCustomer,
    Contact,
    Suppress,
    Unsuppress,
    ContactId,
    ContactAddress,
    Enqueue,
    PendingDeliveries,
    Message,
    RecordOutcomes,
    Queue,
    EventsFor,
    WebhookCursor,
    /// Every method no test needs to fail on its own.
    Other,
}

const OPS: usize = Op::Other as usize + 1;

pub struct Flaky {
    // Declared before the directory, so the database closes before it is removed.
    inner: SqliteStore,
    /// Per operation, how many of its next calls fail.
    failing: [AtomicUsize; OPS],
    /// Per operation, how many calls have ended, failed ones included.
    calls: [AtomicUsize; OPS],
    /// Messages that `message()` no longer finds.
    lost: Mutex<HashSet<String>>,
    dir: TempDir,
}

impl Default for Flaky {
    /// A new, empty database in its own temporary directory, without fsync.
    fn default() -> Flaky {
        let dir = tempfile::tempdir().unwrap();
        Flaky {
            inner: SqliteStore::open(&dir.path().join("optgate.db"), false).unwrap(),
            failing: Default::default(),
            calls: Default::default(),
            lost: Mutex::default(),
            dir,
        }
    }
}

impl Flaky {
    /// The next `times` calls of `op` fail with a database error (`usize::MAX`: until
    /// told otherwise, `0`: no longer).
    pub fn fail(&self, op: Op, times: usize) {
        self.failing[op as usize].store(times, Ordering::SeqCst);
    }

    /// From now on `message(id)` finds nothing, as if the message had been removed.
    pub fn lose(&self, id: &str) {
        self.lost.lock().unwrap().insert(id.to_string());
    }

    /// How many calls of `op` have returned so far, failed ones included.
    pub fn calls(&self, op: Op) -> usize {
        self.calls[op as usize].load(Ordering::SeqCst)
    }

    /// Who submitted the message (account and/or IP), as stored with each of its
    /// decision events, in order. The API does not read it back, so this asks the file.
    pub fn origins(&self, message_id: &str) -> Vec<String> {
        let conn = rusqlite::Connection::open(self.dir.path().join("optgate.db")).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT origin FROM events WHERE message_id = ?1 AND kind = 'decision' ORDER BY id",
            )
            .unwrap();
        stmt.query_map([message_id], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Runs `f` on the real store unless `op` is switched off, and counts the call
    /// once it has returned.
    fn run<T>(
        &self,
        op: Op,
        f: impl FnOnce(&SqliteStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let switched_off = self.failing[op as usize]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let out = if switched_off {
            Err(StoreError::Database(format!(
                "{op:?} switched off by the test"
            )))
        } else {
            f(&self.inner)
        };
        self.calls[op as usize].fetch_add(1, Ordering::SeqCst);
        out
    }
}

impl Store for Flaky {
    fn consent_facts(
        &self,
        addresses: &[Address],
        purpose: &str,
    ) -> Result<Vec<ConsentFacts>, StoreError> {
        self.run(Op::ConsentFacts, |s| s.consent_facts(addresses, purpose))
    }
    fn append_consent(&self, event: &NewConsentEvent) -> Result<i64, StoreError> {
        self.run(Op::AppendConsent, |s| s.append_consent(event))
    }
    fn set_customer(&self, address: &Address, customer: bool) -> Result<(), StoreError> {
        self.run(Op::SetCustomer, |s| s.set_customer(address, customer))
    }
    fn contact(&self, address: &Address) -> Result<Option<ContactRecord>, StoreError> {
        self.run(Op::Contact, |s| s.contact(address))
    }
    fn suppress(
        &self,
        address: &Address,
        reason: &str,
        detail: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        self.run(Op::Suppress, |s| s.suppress(address, reason, detail, at))
    }
    fn unsuppress(&self, address: &Address) -> Result<bool, StoreError> {
        self.run(Op::Unsuppress, |s| s.unsuppress(address))
    }
    fn contact_id(&self, address: &Address) -> Result<i64, StoreError> {
        self.run(Op::ContactId, |s| s.contact_id(address))
    }
    fn contact_address(&self, id: i64) -> Result<Option<Address>, StoreError> {
        self.run(Op::ContactAddress, |s| s.contact_address(id))
    }
    fn enqueue(&self, batch: &[NewMessage]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        self.run(Op::Enqueue, |s| s.enqueue(batch))
    }
    fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StoreError> {
        self.run(Op::PendingDeliveries, |s| s.pending_deliveries())
    }
    fn message(&self, id: &str) -> Result<Option<QueuedMessage>, StoreError> {
        let lost = self.lost.lock().unwrap().contains(id);
        self.run(Op::Message, |s| if lost { Ok(None) } else { s.message(id) })
    }
    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        self.run(Op::RecordOutcomes, |s| s.record_outcomes(outcomes))
    }
    fn queue(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.run(Op::Queue, |s| s.queue())
    }
    fn events_for(&self, address: &Address) -> Result<Vec<Event>, StoreError> {
        self.run(Op::EventsFor, |s| s.events_for(address))
    }
    fn events_since(
        &self,
        after: i64,
        kinds: &[&str],
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.run(Op::Other, |s| s.events_since(after, kinds, limit))
    }
    fn webhook_cursor_or_start(&self, url: &str, from_now: bool) -> Result<i64, StoreError> {
        self.run(Op::WebhookCursor, |s| {
            s.webhook_cursor_or_start(url, from_now)
        })
    }
    fn set_webhook_cursor(&self, url: &str, event_id: i64) -> Result<(), StoreError> {
        self.run(Op::Other, |s| s.set_webhook_cursor(url, event_id))
    }
    fn append_consents(&self, events: &[NewConsentEvent]) -> Result<Vec<usize>, StoreError> {
        self.run(Op::Other, |s| s.append_consents(events))
    }
    fn history_page(&self, after: i64, limit: usize) -> Result<Vec<ConsentEvent>, StoreError> {
        self.run(Op::Other, |s| s.history_page(after, limit))
    }
    fn contacts_page(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, ContactRecord)>, StoreError> {
        self.run(Op::Other, |s| s.contacts_page(after, limit))
    }
    fn grants_older_than(&self, purpose: &str, at: i64) -> Result<Vec<Grant>, StoreError> {
        self.run(Op::Other, |s| s.grants_older_than(purpose, at))
    }
    fn create_signup(&self, signup: &NewSignup) -> Result<i64, StoreError> {
        self.run(Op::Other, |s| s.create_signup(signup))
    }
    fn signup(&self, id: i64) -> Result<Option<Signup>, StoreError> {
        self.run(Op::Other, |s| s.signup(id))
    }
    fn confirm_signup(
        &self,
        id: i64,
        at: i64,
        evidence: serde_json::Value,
    ) -> Result<Confirmation, StoreError> {
        self.run(Op::Other, |s| s.confirm_signup(id, at, evidence))
    }
    fn signups_since(&self, address: &Address, since: i64) -> Result<usize, StoreError> {
        self.run(Op::Other, |s| s.signups_since(address, since))
    }
    fn signups_for(&self, address: &Address) -> Result<Vec<Signup>, StoreError> {
        self.run(Op::Other, |s| s.signups_for(address))
    }
    fn forget(&self, address: &Address, at: i64) -> Result<bool, StoreError> {
        self.run(Op::Other, |s| s.forget(address, at))
    }
}
