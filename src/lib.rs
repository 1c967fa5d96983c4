//! optgate: a consent-enforcing SMTP gateway for marketing mail.
//!
//! A mailer submits over SMTP (`inbound`). At the end of DATA, `policy` names the
//! message's purpose and decides, per recipient, allow or suppress, asking the consent
//! `store`. The message and its allowed recipients go to the durable `spool`, which
//! answers only once they are on disk. `delivery` takes each recipient's copy, has
//! `rewrite` make it personal, and hands it to `relay` for the upstream, retrying
//! transient failures and bouncing permanent ones with a DSN. Data flows one way; each
//! stage knows nothing of the ones after it.

pub mod address;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod import;
pub mod inbound;
pub mod keyfile;
pub mod policy;
pub mod relay;
pub mod rewrite;
pub mod serve;
pub mod spool;
pub mod store;
pub mod token;
pub mod web;
pub mod webhook;
