//! The embedded SQLite backend.

use std::path::Path;

use super::*;

pub struct SqliteStore {}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode; `fsync` false
    /// relaxes durability for throwaway instances.
    pub fn open(_path: &Path, _fsync: bool) -> Result<SqliteStore, StoreError> {
        todo!("store helper")
    }
}

impl Store for SqliteStore {
    fn consent_facts(&self, _: &[Address], _: &str) -> Result<Vec<ConsentFacts>, StoreError> { todo!() }
    fn append_consent(&self, _: &NewConsentEvent) -> Result<i64, StoreError> { todo!() }
    fn set_customer(&self, _: &Address, _: bool) -> Result<(), StoreError> { todo!() }
    fn contact(&self, _: &Address) -> Result<Option<ContactRecord>, StoreError> { todo!() }
    fn suppress(&self, _: &Address, _: &str, _: &str, _: i64) -> Result<(), StoreError> { todo!() }
    fn unsuppress(&self, _: &Address) -> Result<bool, StoreError> { todo!() }
    fn enqueue(&self, _: &[NewMessage]) -> Result<(), StoreError> { todo!() }
    fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StoreError> { todo!() }
    fn message(&self, _: &str) -> Result<Option<QueuedMessage>, StoreError> { todo!() }
    fn record_outcomes(&self, _: &[DeliveryOutcome]) -> Result<(), StoreError> { todo!() }
    fn queue(&self) -> Result<Vec<QueueEntry>, StoreError> { todo!() }
    fn events_for(&self, _: &Address) -> Result<Vec<Event>, StoreError> { todo!() }
}
