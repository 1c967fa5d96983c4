//! Which purpose a message serves, and for each recipient whether the law lets it be
//! sent: allow by a rule that can be named, or suppress with a reason that is stored.

mod consent;
mod purpose;

pub use consent::{Decision, SuppressReason, decide};
pub use purpose::{Basis, Purpose, PurposeError, PurposeRequest, resolve_purpose};

use std::sync::Arc;

use crate::address::Address;
use crate::store::{Store, StoreError};

/// Recipients whose consent is looked up in place, on the session's own worker: an
/// indexed read each (about 7 µs from the page cache, `cargo bench --bench copy`),
/// which costs less than a trip to the blocking pool and back (see the measurement
/// at `delivery::IN_PLACE_COPY_MAX`). Longer lists are read on the blocking pool,
/// so that no worker is held for long.
const IN_PLACE_LOOKUPS: usize = 8;

/// The policy stage as the inbound session uses it: decisions for many recipients,
/// with the store read in place for a few, on the blocking pool for more.
#[derive(Clone)]
pub struct Policy {
    store: Arc<dyn Store>,
}

impl Policy {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Policy { store }
    }

    /// One decision per recipient, in order, for `purpose`, as of `now`.
    pub async fn decide_all(
        &self,
        purpose: &Purpose,
        recipients: &[Address],
        now: i64,
    ) -> Result<Vec<Decision>, StoreError> {
        let facts = if recipients.len() <= IN_PLACE_LOOKUPS {
            self.store.consent_facts(recipients, &purpose.id)?
        } else {
            let store = self.store.clone();
            let recipients = recipients.to_vec();
            let purpose_id = purpose.id.clone();
            tokio::task::spawn_blocking(move || store.consent_facts(&recipients, &purpose_id))
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))??
        };
        Ok(facts.iter().map(|f| decide(purpose, f, now)).collect())
    }
}
