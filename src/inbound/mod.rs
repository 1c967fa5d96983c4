//! Inbound SMTP: listeners, sessions, AUTH, relay access and limits.
//!
//! `server` binds the listeners, enforces the connection limits and drains on
//! shutdown; `session` runs one connection's command loop and hands each step to
//! `ehlo`, `auth`, `envelope` (MAIL, RCPT) and `data` (DATA, BDAT, end of data).
//! The byte work on messages (`message`) and replies (`reply`) are plain functions;
//! `wire` is the socket, the input cut into lines and the batched replies; `tls` makes
//! the TLS acceptor (for STARTTLS, and for implicit-TLS listeners before the greeting).

mod auth;
mod data;
mod ehlo;
mod envelope;
mod message;
mod reply;
mod server;
mod session;
mod tls;
mod wire;

#[cfg(test)]
mod tests;

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

/// Binds every `smtp.listen` address (STARTTLS offered) and every
/// `smtp.listen_implicit_tls` one (TLS from the first byte), prints `smtp listening on
/// ADDR` or `smtps listening on ADDR` for each, and serves until `shutdown`; then
/// stops accepting and returns once the transactions in flight are finished.
pub async fn serve(inbound: Arc<Inbound>, shutdown: CancellationToken) -> anyhow::Result<()> {
    server::serve(inbound, shutdown).await
}
