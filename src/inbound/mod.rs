//! Inbound SMTP: listeners, sessions, AUTH, relay access and limits.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::policy::Policy;
use crate::spool::Spool;

/// What every session needs, shared.
pub struct Inbound {
    pub config: Arc<Config>,
    pub policy: Policy,
    pub spool: Spool,
}

/// Binds every `smtp.listen` address, prints `smtp listening on ADDR` for each, and
/// serves until `shutdown`; then stops accepting and returns once the transactions in
/// flight are finished.
pub async fn serve(_inbound: Arc<Inbound>, _shutdown: CancellationToken) -> anyhow::Result<()> {
    todo!("inbound helper")
}
