//! Opaque, signed tokens for the links optgate puts in messages (unsubscribe,
//! preferences, confirmation). They name a contact by its number, never by address.
//!
//! Layout before base64url: kind (1 byte) · key id (1) · subject (LEB128 u64) ·
//! scope (4 bytes) · HMAC-SHA256 of all that, cut to 16 bytes. At most 32 bytes,
//! so at most 43 URL-safe characters. The key id lets keys rotate: links signed with
//! a retired key keep working until that key's `accept_until`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use subtle::ConstantTimeEq;

const MAC_LEN: usize = 16;
const MAX_TOKEN_BYTES: usize = 2 + 10 + 4 + MAC_LEN;

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// One purpose's unsubscribe link (`/u/{token}`).
    Unsubscribe = 1,
    /// The preference centre (`/p/{token}`).
    Preferences = 2,
    /// A double opt-in confirmation (`/confirm/{token}`).
    Confirm = 3,
}

impl TokenKind {
    fn from_byte(b: u8) -> Option<TokenKind> {
        match b {
            1 => Some(TokenKind::Unsubscribe),
            2 => Some(TokenKind::Preferences),
            3 => Some(TokenKind::Confirm),
            _ => None,
        }
    }
}

/// What a token says, once its signature is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub kind: TokenKind,
    /// A contact number, or a sign-up number for confirmations.
    pub subject: u64,
    /// A purpose tag ([`purpose_tag`]), or 0 where no purpose applies.
    pub scope: u32,
}

/// A short stable tag for a purpose id, so tokens stay valid when the config's
/// purposes are reordered.
pub fn purpose_tag(purpose_id: &str) -> u32 {
    let digest = ring::digest::digest(&ring::digest::SHA256, purpose_id.as_bytes());
    let b = digest.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Deliberately vague: a forged, truncated or expired link all look the same.
    #[error("invalid token")]
    Invalid,
    #[error("token keys: {0}")]
    Keys(String),
}

/// One signing secret.
#[derive(Clone)]
pub struct TokenKey {
    pub id: u8,
    key: hmac::Key,
    /// Unix seconds after which links signed with this key are refused; None for
    /// keys still in service.
    pub accept_until: Option<i64>,
}

impl TokenKey {
    pub fn new(id: u8, secret: &[u8], accept_until: Option<i64>) -> Result<TokenKey, TokenError> {
        if secret.len() < 32 {
            return Err(TokenError::Keys(format!(
                "key {id}: a secret needs at least 32 bytes"
            )));
        }
        Ok(TokenKey {
            id,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            accept_until,
        })
    }
}

/// The keys in use: the newest key still in service signs, every key verifies.
#[derive(Clone)]
pub struct TokenKeys {
    keys: Vec<TokenKey>,
    signing: usize,
}

impl TokenKeys {
    pub fn new(keys: Vec<TokenKey>) -> Result<TokenKeys, TokenError> {
        let signing = keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.accept_until.is_none())
            .max_by_key(|(_, k)| k.id)
            .map(|(i, _)| i)
            .ok_or_else(|| {
                TokenError::Keys("no key in service (every key has accept_until)".into())
            })?;
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.id == k.id) {
                return Err(TokenError::Keys(format!("key id {} is used twice", k.id)));
            }
        }
        Ok(TokenKeys { keys, signing })
    }

    pub fn issue(&self, claims: Claims) -> String {
        let key = &self.keys[self.signing];
        let mut bytes = Vec::with_capacity(MAX_TOKEN_BYTES);
        bytes.push(claims.kind as u8);
        bytes.push(key.id);
        let mut subject = claims.subject;
        loop {
            let low = (subject & 0x7f) as u8;
            subject >>= 7;
            if subject == 0 {
                bytes.push(low);
                break;
            }
            bytes.push(low | 0x80);
        }
        bytes.extend_from_slice(&claims.scope.to_be_bytes());
        let tag = hmac::sign(&key.key, &bytes);
        bytes.extend_from_slice(&tag.as_ref()[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Checks the signature (in constant time) and the key's validity at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > (MAX_TOKEN_BYTES * 4).div_ceil(3) {
            return Err(TokenError::Invalid);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Invalid)?;
        if bytes.len() < 2 + 1 + 4 + MAC_LEN {
            return Err(TokenError::Invalid);
        }
        let (signed, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let key = self
            .keys
            .iter()
            .find(|k| k.id == signed[1])
            .filter(|k| k.accept_until.is_none_or(|until| now <= until))
            .ok_or(TokenError::Invalid)?;
        let expected = hmac::sign(&key.key, signed);
        if !bool::from(expected.as_ref()[..MAC_LEN].ct_eq(mac)) {
            return Err(TokenError::Invalid);
        }
        let kind = TokenKind::from_byte(signed[0]).ok_or(TokenError::Invalid)?;
        let (mut subject, mut shift, mut pos) = (0u64, 0u32, 2usize);
        loop {
            let b = *signed.get(pos).ok_or(TokenError::Invalid)?;
            if shift > 63 {
                return Err(TokenError::Invalid);
            }
            subject |= u64::from(b & 0x7f) << shift;
            pos += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let scope: [u8; 4] = signed[pos..].try_into().map_err(|_| TokenError::Invalid)?;
        Ok(Claims {
            kind,
            subject,
            scope: u32::from_be_bytes(scope),
        })
    }
}

// ---- the key file -----------------------------------------------------------------
//
// `tokens.keys_file` (by default `{data_dir}/token-keys`; several nodes share one),
// mode 0600, one key a line: `ID ACCEPT_UNTIL SECRET`, where
// ACCEPT_UNTIL is `-` for the key in service or the Unix second its links expire,
// and SECRET is 32 random bytes in base64url.

impl TokenKeys {
    /// Reads the key file, creating it with one fresh key if absent.
    pub fn load_or_create(path: &std::path::Path) -> Result<TokenKeys, TokenError> {
        match std::fs::read_to_string(path) {
            Ok(text) => parse_key_file(&text)
                .map_err(|e| TokenError::Keys(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = vec![(1, None, random_secret())];
                write_key_file(path, &keys)?;
                tracing::info!(path = %path.display(), "generated the token signing key");
                keys_from(keys)
            }
            Err(e) => Err(TokenError::Keys(format!("{}: {e}", path.display()))),
        }
    }

    /// Puts a new key in service; links signed with the others keep working until
    /// `now + validity`. Returns the new key's id.
    pub fn rotate(
        path: &std::path::Path,
        now: i64,
        validity: std::time::Duration,
    ) -> Result<u8, TokenError> {
        Self::load_or_create(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| TokenError::Keys(e.to_string()))?;
        let mut keys = parse_lines(&text)?;
        let until = now.saturating_add(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX));
        // Keys whose links have expired are of no more use: drop them.
        keys.retain(|(_, accept_until, _)| accept_until.is_none_or(|t| t > now));
        for key in keys.iter_mut().filter(|k| k.1.is_none()) {
            key.1 = Some(until);
        }
        let id = keys
            .iter()
            .map(|k| k.0)
            .max()
            .map(|m| m.wrapping_add(1).max(1))
            .unwrap_or(1);
        if keys.iter().any(|k| k.0 == id) {
            return Err(TokenError::Keys(
                "every key id is in use; wait for old keys to expire".into(),
            ));
        }
        keys.push((id, None, random_secret()));
        write_key_file(path, &keys)?;
        Ok(id)
    }
}

type KeyLine = (u8, Option<i64>, Vec<u8>);

fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    secret
}

fn parse_lines(text: &str) -> Result<Vec<KeyLine>, TokenError> {
    let bad =
        |n: usize| TokenError::Keys(format!("line {}: expected `ID ACCEPT_UNTIL SECRET`", n + 1));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(n, line)| {
            let mut fields = line.split_whitespace();
            let (Some(id), Some(until), Some(secret), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(n));
            };
            let id = id.parse::<u8>().map_err(|_| bad(n))?;
            let until = match until {
                "-" => None,
                t => Some(t.parse::<i64>().map_err(|_| bad(n))?),
            };
            let secret = URL_SAFE_NO_PAD.decode(secret).map_err(|_| bad(n))?;
            Ok((id, until, secret))
        })
        .collect()
}

fn parse_key_file(text: &str) -> Result<TokenKeys, TokenError> {
    keys_from(parse_lines(text)?)
}

fn keys_from(lines: Vec<KeyLine>) -> Result<TokenKeys, TokenError> {
    TokenKeys::new(
        lines
            .into_iter()
            .map(|(id, until, secret)| TokenKey::new(id, &secret, until))
            .collect::<Result<_, _>>()?,
    )
}

fn write_key_file(path: &std::path::Path, keys: &[KeyLine]) -> Result<(), TokenError> {
    let io = |e: std::io::Error| TokenError::Keys(format!("{}: {e}", path.display()));
    let mut text =
        String::from("# optgate token signing keys: ID ACCEPT_UNTIL SECRET. Keep secret.\n");
    for (id, until, secret) in keys {
        let until = until.map_or("-".to_string(), |t| t.to_string());
        text.push_str(&format!(
            "{id} {until} {}\n",
            URL_SAFE_NO_PAD.encode(secret)
        ));
    }
    crate::keyfile::write_private(path, text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(vec![TokenKey::new(1, &[7u8; 32], None).unwrap()]).unwrap()
    }

    #[test]
    fn round_trip_short_and_url_safe() {
        let k = keys();
        for subject in [0, 1, 300, u64::MAX] {
            let claims = Claims {
                kind: TokenKind::Unsubscribe,
                subject,
                scope: purpose_tag("newsletter"),
            };
            let t = k.issue(claims);
            assert!(t.len() <= 64, "{t}");
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{t}"
            );
            assert_eq!(k.verify(&t, 0), Ok(claims));
        }
    }

    #[test]
    fn forged_truncated_and_foreign_tokens_are_refused() {
        let k = keys();
        let t = k.issue(Claims {
            kind: TokenKind::Unsubscribe,
            subject: 42,
            scope: 9,
        });
        assert_eq!(k.verify(&t[..t.len() - 1], 0), Err(TokenError::Invalid));
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[2] ^= 1; // another contact
        assert_eq!(
            k.verify(&URL_SAFE_NO_PAD.encode(&raw), 0),
            Err(TokenError::Invalid)
        );
        let other = TokenKeys::new(vec![TokenKey::new(1, &[8u8; 32], None).unwrap()]).unwrap();
        assert_eq!(other.verify(&t, 0), Err(TokenError::Invalid));
        assert_eq!(k.verify("not a token!", 0), Err(TokenError::Invalid));
        assert_eq!(k.verify("", 0), Err(TokenError::Invalid));
    }

    #[test]
    fn the_key_file_is_created_once_and_rotation_keeps_old_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token-keys");
        let first = TokenKeys::load_or_create(&file).unwrap();
        let t = first.issue(Claims {
            kind: TokenKind::Unsubscribe,
            subject: 3,
            scope: 4,
        });
        let again = TokenKeys::load_or_create(&file).unwrap();
        assert!(again.verify(&t, 0).is_ok(), "the same key is read back");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let id = TokenKeys::rotate(&file, 1000, std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(id, 2);
        let rotated = TokenKeys::load_or_create(&file).unwrap();
        assert!(rotated.verify(&t, 1060).is_ok());
        assert_eq!(rotated.verify(&t, 1061), Err(TokenError::Invalid));
        let fresh = rotated.issue(Claims {
            kind: TokenKind::Unsubscribe,
            subject: 3,
            scope: 4,
        });
        assert_ne!(fresh, t);
    }

    #[test]
    fn rotation_keeps_old_links_working_until_their_key_retires() {
        let old = TokenKeys::new(vec![TokenKey::new(1, &[1u8; 32], None).unwrap()]).unwrap();
        let t = old.issue(Claims {
            kind: TokenKind::Preferences,
            subject: 5,
            scope: 0,
        });
        let rotated = TokenKeys::new(vec![
            TokenKey::new(1, &[1u8; 32], Some(1000)).unwrap(),
            TokenKey::new(2, &[2u8; 32], None).unwrap(),
        ])
        .unwrap();
        assert!(rotated.verify(&t, 999).is_ok());
        assert_eq!(rotated.verify(&t, 1001), Err(TokenError::Invalid));
        let fresh = rotated.issue(Claims {
            kind: TokenKind::Preferences,
            subject: 5,
            scope: 0,
        });
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&fresh).unwrap()[1],
            2,
            "new links use the key in service"
        );
    }
}
