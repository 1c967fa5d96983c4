//! AUTH PLAIN and AUTH LOGIN (RFC 4954) against the configured accounts: offered only
//! over TLS or to trusted networks, checked with argon2 off the async runtime.

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};

use super::ehlo::auth_allowed;
use super::reply::Reply;
use super::session::{Flow, Next, Session};
use crate::config::Account;

/// Failed attempts on one connection before it is closed.
const MAX_AUTH_FAILURES: u32 = 3;

/// Wait before answering a failed attempt: it makes guessing slow, and unknown user
/// and wrong password alike.
const FAILURE_DELAY: Duration = Duration::from_secs(1);

/// Why credentials could not even be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Malformed {
    Base64,
    Plain,
}

impl Malformed {
    fn reply(&self) -> Reply {
        match self {
            Malformed::Base64 => Reply::new(501, "5.5.2", "Cannot decode base64 response"),
            Malformed::Plain => Reply::new(501, "5.5.2", "Malformed PLAIN response"),
        }
    }
}

/// One base64 client response as text; "=" is the empty response (RFC 4954 §4).
pub(super) fn decode(response: &str) -> Result<String, Malformed> {
    let response = response.trim();
    if response == "=" {
        return Ok(String::new());
    }
    let bytes = BASE64.decode(response).map_err(|_| Malformed::Base64)?;
    String::from_utf8(bytes).map_err(|_| Malformed::Base64)
}

/// A PLAIN response: authzid NUL authcid NUL password (RFC 4616). Acting for someone
/// else (an authzid other than the authcid) is not supported.
pub(super) fn decode_plain(response: &str) -> Result<(String, String), Malformed> {
    let text = decode(response)?;
    let mut parts = text.split('\0');
    let (Some(authz), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed::Plain);
    };
    if user.is_empty() || (!authz.is_empty() && authz != user) {
        return Err(Malformed::Plain);
    }
    Ok((user.to_string(), password.to_string()))
}

/// Whether `password` is the password of account `user`. An unknown user costs a
/// hash check too, so that timing does not tell which accounts exist.
pub(super) async fn verify(accounts: &[Account], user: &str, password: &str) -> bool {
    let hash = accounts
        .iter()
        .find(|a| a.username == user)
        .map(|a| a.password_hash.clone());
    let password = password.to_string();
    tokio::task::spawn_blocking(move || match hash {
        Some(hash) => check(&hash, &password),
        None => {
            check(dummy_hash(), &password);
            false
        }
    })
    .await
    .unwrap_or(false)
}

fn check(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).ok();
        salt.and_then(|s| {
            Argon2::default()
                .hash_password(b"no such account", &s)
                .ok()
                .map(|h| h.to_string())
        })
        .unwrap_or_default()
    })
}

/// What reading a client response gave.
enum Response {
    Text(String),
    /// The client sent "*", or something unreadable: this reply ends the exchange.
    Refused(Reply),
    /// The connection is over (closed, idle, shutdown).
    Gone(Next),
}

impl Session {
    pub(super) async fn auth(&mut self, mechanism: u64, initial: &str) -> io::Result<Flow> {
        let refusal = if !auth_allowed(self.stream.is_tls(), self.trusted) {
            Some(Reply::new(
                538,
                "5.7.11",
                "Encryption required: issue STARTTLS first",
            ))
        } else if self.helo.is_none() {
            Some(Reply::new(503, "5.5.1", "Send EHLO first"))
        } else if self.account.is_some() {
            Some(Reply::new(503, "5.5.1", "Already authenticated"))
        } else if self.tx.is_some() {
            Some(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            ))
        } else if mechanism != AUTH_PLAIN && mechanism != AUTH_LOGIN {
            Some(Reply::new(
                504,
                "5.5.4",
                "Unrecognized authentication mechanism; use PLAIN or LOGIN",
            ))
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.send(reply);
            return Ok(Flow::Continue);
        }

        let credentials = if mechanism == AUTH_PLAIN {
            let response = match initial {
                "" => match self.challenge("").await? {
                    Response::Text(t) => t,
                    Response::Refused(r) => return self.refuse(r),
                    Response::Gone(why) => return Ok(self.hang_up(why)),
                },
                given => given.to_string(),
            };
            decode_plain(&response)
        } else {
            let user = match initial {
                "" => match self.challenge("VXNlcm5hbWU6").await? {
                    Response::Text(t) => t,
                    Response::Refused(r) => return self.refuse(r),
                    Response::Gone(why) => return Ok(self.hang_up(why)),
                },
                given => given.to_string(),
            };
            let password = match self.challenge("UGFzc3dvcmQ6").await? {
                Response::Text(t) => t,
                Response::Refused(r) => return self.refuse(r),
                Response::Gone(why) => return Ok(self.hang_up(why)),
            };
            decode(&user).and_then(|u| decode(&password).map(|p| (u, p)))
        };
        let (user, password) = match credentials {
            Ok(c) => c,
            Err(e) => return self.refuse(e.reply()),
        };

        if verify(&self.inbound.config.smtp.accounts, &user, &password).await {
            tracing::info!(peer = %self.peer.ip(), user = ?user, "authenticated");
            self.account = Some(user);
            self.send(Reply::new(235, "2.7.0", "Authentication successful"));
            return Ok(Flow::Continue);
        }
        // Debug formatting: the name is the peer's to choose, newlines included.
        tracing::warn!(peer = %self.peer.ip(), user = ?user, "authentication failed");
        tokio::time::sleep(FAILURE_DELAY).await;
        self.refuse(Reply::new(
            535,
            "5.7.8",
            "Authentication credentials invalid",
        ))
    }

    /// Sends "334 prompt" and reads the client's answer.
    async fn challenge(&mut self, prompt: &str) -> io::Result<Response> {
        self.send(Reply::bare(334, prompt));
        Ok(match self.next_line().await? {
            Next::Line(line) => {
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text == "*" {
                    Response::Refused(Reply::new(501, "5.7.0", "Authentication cancelled"))
                } else {
                    Response::Text(text)
                }
            }
            Next::TooLong => Response::Refused(Reply::new(500, "5.5.2", "Line too long")),
            gone => Response::Gone(gone),
        })
    }

    /// Ends a failed exchange; too many failures end the connection.
    fn refuse(&mut self, reply: Reply) -> io::Result<Flow> {
        self.send(reply);
        self.auth_failures += 1;
        if self.auth_failures >= MAX_AUTH_FAILURES {
            tracing::warn!(peer = %self.peer.ip(), "too many failed authentications; closing");
            self.send(Reply::new(
                421,
                "4.7.0",
                "Too many failed authentications, closing connection",
            ));
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_has_three_parts_and_no_proxying() {
        let enc = |s: &str| BASE64.encode(s);
        assert_eq!(
            decode_plain(&enc("\0crm\0secret")),
            Ok(("crm".into(), "secret".into()))
        );
        assert_eq!(
            decode_plain(&enc("crm\0crm\0secret")),
            Ok(("crm".into(), "secret".into()))
        );
        assert_eq!(
            decode_plain(&enc("admin\0crm\0secret")),
            Err(Malformed::Plain)
        );
        assert_eq!(decode_plain(&enc("crm\0secret")), Err(Malformed::Plain));
        assert_eq!(decode_plain(&enc("\0\0secret")), Err(Malformed::Plain));
        assert_eq!(decode_plain("not base64!"), Err(Malformed::Base64));
        assert_eq!(decode("="), Ok(String::new()));
    }

    #[tokio::test]
    async fn verifies_against_the_phc_hash() {
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let hasher = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let hash = hasher.hash_password(b"secret", &salt).unwrap().to_string();
        let accounts = vec![Account {
            username: "crm".into(),
            password_hash: hash,
            purposes: None,
            default_purpose: None,
        }];
        assert!(verify(&accounts, "crm", "secret").await);
        assert!(!verify(&accounts, "crm", "wrong").await);
        assert!(!verify(&accounts, "nobody", "secret").await);
    }
}
