//! Delivery: scheduling, retries with backoff, expiry, DSN bounces.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::relay::Relay;
use crate::spool::{Ready, Spool};
use crate::store::Store;

/// Starts delivery: resumes what the store holds as pending, then takes each newly
/// committed message from `ready`. Ends when `shutdown` fires and attempts in flight
/// are recorded.
pub fn start(
    _config: Arc<Config>,
    _store: Arc<dyn Store>,
    _relay: Relay,
    _spool: Spool,
    _ready: mpsc::UnboundedReceiver<Ready>,
    _shutdown: CancellationToken,
) -> JoinHandle<()> {
    todo!("delivery helper")
}
