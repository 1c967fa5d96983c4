//! Talking to the upstream: a pooled SMTP client (lettre) or a folder of .eml files,
//! with every reply mapped to delivered, transient or permanent.

use crate::config::UpstreamConfig;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// Try again later: 4xx replies, connection and TLS failures, timeouts.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Will never succeed: 5xx replies. `enhanced` is the RFC 3463 status, if given.
    #[error("permanent failure: {message}")]
    Permanent { enhanced: Option<[u16; 3]>, message: String },
}

pub struct Relay {}

impl Relay {
    pub fn new(_config: &UpstreamConfig, _hostname: &str) -> Result<Relay, RelayError> {
        todo!("relay helper")
    }

    /// Sends one copy; `sender` empty means the null reverse-path. Returns the
    /// upstream's reply text on success.
    pub async fn send(&self, _sender: &str, _recipient: &str, _message: &[u8]) -> Result<String, RelayError> {
        todo!("relay helper")
    }
}
