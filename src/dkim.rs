//! DKIM signing of each final copy (mail-auth), keyed by the From domain, and
//! the key generation behind `optgate dkim keygen`. It adds a header; it changes
//! nothing else in the message.
//!
//! mail-auth runs on its aws-lc-rs backend, not ring as the rest of optgate: one RSA
//! signature per copy is the largest cost of a delivery, and AWS-LC's RSA uses the
//! AVX-512 IFMA units where the CPU has them (405 µs against 690 µs for hash + sign
//! of the reference newsletter on this machine, `cargo bench --bench copy`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::generate::DkimKeyPair;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};

use crate::rewrite::header_value;

/// The fields every signature covers. Absent ones are signed as absent, so nobody
/// can add them later; both List-* fields are here so receivers trust the
/// one-click unsubscribe.
pub const SIGNED_HEADERS: [&str; 9] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Algorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("DKIM key {path}: {message}")]
    Key { path: String, message: String },
    #[error("cannot sign: {0}")]
    Sign(String),
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// Every configured key, by the From domain it signs for.
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Vec<Signer>>,
}

impl Signers {
    /// Loads a PEM private key (PKCS#1 or PKCS#8) for `domain` and `selector`.
    pub fn add_key_file(
        &mut self,
        domain: &str,
        selector: &str,
        algorithm: Algorithm,
        path: &Path,
    ) -> Result<(), DkimError> {
        let err = |message: String| DkimError::Key {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| err(format!("not a PEM private key ({e})")))?;
        let signer = match algorithm {
            Algorithm::RsaSha256 => {
                let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| err(e.to_string()))?;
                Signer::Rsa(configure(
                    DkimSigner::from_key(key)
                        .domain(domain)
                        .selector(selector)
                        .headers(SIGNED_HEADERS),
                ))
            }
            Algorithm::Ed25519Sha256 => {
                let PrivateKeyDer::Pkcs8(pkcs8) = der else {
                    return Err(err(
                        "an Ed25519 key must be PKCS#8 (BEGIN PRIVATE KEY)".into()
                    ));
                };
                let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                    .map_err(|e| err(e.to_string()))?;
                Signer::Ed25519(configure(
                    DkimSigner::from_key(key)
                        .domain(domain)
                        .selector(selector)
                        .headers(SIGNED_HEADERS),
                ))
            }
        };
        self.by_domain
            .entry(domain.to_ascii_lowercase())
            .or_default()
            .push(signer);
        Ok(())
    }

    pub fn has_domain(&self, domain: &str) -> bool {
        self.by_domain.contains_key(&domain.to_ascii_lowercase())
    }

    /// One DKIM-Signature field per key of the message's From domain, to be sent
    /// before the message; none if no key is configured for that domain. The
    /// message is left where it is: joining the two would copy it whole, per copy.
    pub fn signature_fields(&self, message: &[u8]) -> Result<Vec<u8>, DkimError> {
        let Some(signers) = from_domain(message).and_then(|d| self.by_domain.get(&d)) else {
            return Ok(Vec::new());
        };
        let mut headers = Vec::with_capacity(1024);
        for signer in signers {
            let signature = match signer {
                Signer::Rsa(s) => s.sign(message),
                Signer::Ed25519(s) => s.sign(message),
            }
            .map_err(|e| DkimError::Sign(e.to_string()))?;
            let mut field = Vec::with_capacity(512);
            signature.write_header(&mut field);
            headers.extend_from_slice(&close_b_tag(field));
        }
        Ok(headers)
    }
}

/// The selector of keys optgate makes itself for domains that have none configured.
pub const GENERATED_SELECTOR: &str = "optgate";

/// The configured keys, plus those optgate generated into `{data_dir}/dkim/` for
/// From domains that had none (`dkim.generate_missing`), so mail is always signed.
pub struct KeyRing {
    signers: RwLock<Signers>,
    /// Where generated keys live; None when generation is off.
    generated_dir: Option<PathBuf>,
}

impl KeyRing {
    /// Loads every configured key and every key generated earlier.
    pub fn load(config: &crate::config::DkimConfig, data_dir: &Path) -> Result<KeyRing, DkimError> {
        let mut signers = Signers::default();
        for k in &config.keys {
            signers.add_key_file(&k.domain, &k.selector, k.algorithm, &k.private_key)?;
        }
        let generated_dir = config.generate_missing.then(|| data_dir.join("dkim"));
        if let Some(dir) = &generated_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(domain) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".pem"))
                else {
                    continue;
                };
                if !signers.has_domain(domain) {
                    signers.add_key_file(
                        domain,
                        GENERATED_SELECTOR,
                        Algorithm::RsaSha256,
                        &path,
                    )?;
                }
            }
        }
        Ok(KeyRing {
            signers: RwLock::new(signers),
            generated_dir,
        })
    }

    /// The signature fields of the From domain's keys (see
    /// [`Signers::signature_fields`]), first generating a key if the domain has none
    /// and generation is on. Slow the first time for a domain (RSA key generation):
    /// call it off the async runtime.
    pub fn signature_fields(&self, message: &[u8]) -> Result<Vec<u8>, DkimError> {
        let poisoned = || DkimError::Sign("the key ring lock was poisoned".into());
        if let (Some(dir), Some(domain)) = (&self.generated_dir, from_domain(message))
            && !self
                .signers
                .read()
                .map_err(|_| poisoned())?
                .has_domain(&domain)
            && crate::address::Address::parse(&format!("x@{domain}")).is_ok()
        {
            let mut signers = self.signers.write().map_err(|_| poisoned())?;
            if !signers.has_domain(&domain) {
                let path = generate_into(dir, &domain)?;
                signers.add_key_file(&domain, GENERATED_SELECTOR, Algorithm::RsaSha256, &path)?;
            }
        }
        self.signers
            .read()
            .map_err(|_| poisoned())?
            .signature_fields(message)
    }
}

/// Makes and stores an RSA key for `domain`, and asks the operator to publish it.
fn generate_into(dir: &Path, domain: &str) -> Result<PathBuf, DkimError> {
    let path = dir.join(format!("{domain}.pem"));
    let err = |e: std::io::Error| DkimError::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let key = generate(domain, GENERATED_SELECTOR, Algorithm::RsaSha256)?;
    std::fs::create_dir_all(dir).map_err(err)?;
    crate::keyfile::write_private(&path, key.private_pem.as_bytes()).map_err(err)?;
    tracing::warn!(
        domain,
        key = %path.display(),
        "generated a DKIM key for a From domain that had none; publish this DNS record: {}",
        key.dns_record
    );
    Ok(path)
}

/// mail-auth 0.13 may fold the field between the `b=` value and the `;` that ends
/// it. The signature was computed over `b=;`, but a verifier blanks only the value
/// and sees `b= ;`: the signature fails. Pull that `;` back onto the value's line.
fn close_b_tag(mut field: Vec<u8>) -> Vec<u8> {
    let body_end = field.len()
        - field
            .iter()
            .rev()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
    if body_end > 0 && field[body_end - 1] == b';' {
        let semicolon = body_end - 1;
        let ws = field[..semicolon]
            .iter()
            .rev()
            .take_while(|&&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .count();
        field.drain(semicolon - ws..semicolon);
    }
    field
}

fn configure<T: mail_auth::common::crypto::SigningKey>(
    s: DkimSigner<T, Done>,
) -> DkimSigner<T, Done> {
    s.header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

/// The domain of the first address in the From field, lower-cased.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let from = header_value(message, "From")?;
    let addr = match (from.rfind('<'), from.rfind('>')) {
        (Some(start), Some(end)) if start < end => &from[start + 1..end],
        _ => from.as_str(),
    };
    let domain = addr.rsplit_once('@')?.1.trim().trim_end_matches('>');
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

/// A new private key as PEM, and the DNS TXT record that publishes its public half.
pub struct GeneratedKey {
    pub private_pem: String,
    pub dns_record: String,
}

/// Makes a key for `selector._domainkey.domain`: RSA-2048 or Ed25519.
pub fn generate(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
) -> Result<GeneratedKey, DkimError> {
    let sign_err = |e: mail_auth::Error| DkimError::Sign(e.to_string());
    let (label, k, private, public) = match algorithm {
        Algorithm::RsaSha256 => {
            let pair = DkimKeyPair::generate_rsa(2048).map_err(sign_err)?;
            let (private, pkcs1_public) = pair.into_inner();
            // Receivers expect SubjectPublicKeyInfo in p=; mail-auth gives PKCS#1.
            ("RSA PRIVATE KEY", "rsa", private, rsa_spki(&pkcs1_public))
        }
        Algorithm::Ed25519Sha256 => {
            let pair = DkimKeyPair::generate_ed25519().map_err(sign_err)?;
            let (private, public) = pair.into_inner();
            (
                "PRIVATE KEY",
                "ed25519",
                ed25519_pkcs8_v1(&private)?,
                public,
            )
        }
    };
    let body = STANDARD.encode(&private);
    let mut private_pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        private_pem.push_str(&String::from_utf8_lossy(line));
        private_pem.push('\n');
    }
    private_pem.push_str(&format!("-----END {label}-----\n"));
    let dns_record = format!(
        "{selector}._domainkey.{domain}. IN TXT \"v=DKIM1; k={k}; p={}\"",
        STANDARD.encode(public)
    );
    Ok(GeneratedKey {
        private_pem,
        dns_record,
    })
}

/// ring writes PKCS#8 v2 (the public key inside), which OpenSSL 3.0 and Python's
/// `cryptography` cannot read; v1 is the seed alone in a fixed 48-byte wrapper.
fn ed25519_pkcs8_v1(v2: &[u8]) -> Result<Vec<u8>, DkimError> {
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V2_PREFIX_LEN: usize = 16;
    let seed = v2
        .get(V2_PREFIX_LEN..V2_PREFIX_LEN + 32)
        .filter(|_| v2.get(V2_PREFIX_LEN - 2..V2_PREFIX_LEN) == Some(&[0x04, 0x20]))
        .ok_or_else(|| DkimError::Sign("unexpected Ed25519 key encoding".into()))?;
    Ok([&V1_PREFIX[..], seed].concat())
}

/// Wraps a PKCS#1 RSAPublicKey in an X.509 SubjectPublicKeyInfo (DER).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ALGORITHM_ID: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(pkcs1);
    let mut inner = RSA_ALGORITHM_ID.to_vec();
    der_push(&mut inner, 0x03, &bit_string);
    let mut out = Vec::with_capacity(inner.len() + 4);
    der_push(&mut out, 0x30, &inner);
    out
}

fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"From: Shop <news@Example.COM>\r\nTo: a@example.net\r\nSubject: Hi\r\n\r\nHello\r\n";

    #[test]
    fn the_key_ring_generates_a_key_once_per_new_domain_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::DkimConfig {
            keys: Vec::new(),
            generate_missing: true,
        };
        let ring = KeyRing::load(&config, dir.path()).unwrap();
        let fields = ring.signature_fields(MSG).unwrap();
        assert!(String::from_utf8_lossy(&fields).contains("s=optgate"));
        let key_file = dir.path().join("dkim/example.com.pem");
        let pem = std::fs::read(&key_file).unwrap();
        ring.signature_fields(MSG).unwrap();
        assert_eq!(
            std::fs::read(&key_file).unwrap(),
            pem,
            "no second key for the same domain"
        );
        // After a restart the same key is used.
        let again = KeyRing::load(&config, dir.path()).unwrap();
        assert!(again.signers.read().unwrap().has_domain("example.com"));

        let off = crate::config::DkimConfig {
            keys: Vec::new(),
            generate_missing: false,
        };
        let other = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(&off, other.path()).unwrap();
        assert!(
            ring.signature_fields(MSG).unwrap().is_empty(),
            "no key and no generation: unsigned"
        );
    }

    #[test]
    fn the_b_tag_is_never_folded_away_from_its_semicolon() {
        assert_eq!(
            close_b_tag(b"DKIM-Signature: a=x; b=abc==\r\n\t;\r\n".to_vec()),
            b"DKIM-Signature: a=x; b=abc==;\r\n".to_vec()
        );
        assert_eq!(
            close_b_tag(b"DKIM-Signature: a=x; b=abc==;\r\n".to_vec()),
            b"DKIM-Signature: a=x; b=abc==;\r\n".to_vec()
        );
        // And in real signatures, whatever the layout.
        let dir = tempfile::tempdir().unwrap();
        let key = generate("example.com", "s1", Algorithm::RsaSha256).unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, key.private_pem).unwrap();
        let mut signers = Signers::default();
        signers
            .add_key_file("example.com", "s1", Algorithm::RsaSha256, &path)
            .unwrap();
        for n in 0..80 {
            let msg = format!(
                "From: {}@example.com\r\nSubject: x\r\n\r\nbody\r\n",
                "a".repeat(n + 1)
            );
            let fields = signers.signature_fields(msg.as_bytes()).unwrap();
            let field_end = fields.windows(2).position(|w| w == b";\r").unwrap_or(0);
            let text = String::from_utf8(fields).unwrap();
            assert!(
                !text
                    .trim_end()
                    .trim_end_matches(';')
                    .ends_with(['\t', ' ', '\n']),
                "{text}"
            );
            assert!(field_end > 0);
        }
    }

    #[test]
    fn ed25519_keys_are_written_as_pkcs8_v1() {
        let key = generate("example.com", "e1", Algorithm::Ed25519Sha256).unwrap();
        let der = PrivateKeyDer::from_pem_slice(key.private_pem.as_bytes()).unwrap();
        assert_eq!(der.secret_der().len(), 48);
    }

    #[test]
    fn from_domain_reads_the_address() {
        assert_eq!(from_domain(MSG).as_deref(), Some("example.com"));
        assert_eq!(
            from_domain(b"From: bare@x.org\r\n\r\n").as_deref(),
            Some("x.org")
        );
        assert_eq!(from_domain(b"Subject: none\r\n\r\n"), None);
    }

    #[test]
    fn generated_keys_load_and_sign_with_the_listed_headers() {
        let dir = tempfile::tempdir().unwrap();
        let mut signers = Signers::default();
        for (alg, sel) in [
            (Algorithm::RsaSha256, "r1"),
            (Algorithm::Ed25519Sha256, "e1"),
        ] {
            let key = generate("example.com", sel, alg).unwrap();
            assert!(key.dns_record.starts_with(&format!(
                "{sel}._domainkey.example.com. IN TXT \"v=DKIM1; k="
            )));
            let path = dir.path().join(format!("{sel}.pem"));
            std::fs::write(&path, &key.private_pem).unwrap();
            signers
                .add_key_file("example.com", sel, alg, &path)
                .unwrap();
        }
        let signed = String::from_utf8(signers.signature_fields(MSG).unwrap()).unwrap();
        assert_eq!(signed.matches("DKIM-Signature:").count(), 2, "{signed}");
        assert!(signed.contains("a=rsa-sha256") && signed.contains("a=ed25519-sha256"));
        assert!(signed.contains("s=r1") && signed.contains("s=e1"));
        let h = signed
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .replace(['\r', '\n', ' ', '\t'], "");
        assert!(
            h.to_ascii_lowercase()
                .contains("list-unsubscribe:list-unsubscribe-post"),
            "{h}"
        );
        assert!(
            signed.starts_with("DKIM-Signature:") && signed.ends_with("\r\n"),
            "whole fields, to go before the message: {signed}"
        );
        assert!(!signed.contains("Hello"), "the fields alone: {signed}");
        // A domain with no key gets no field.
        let other = b"From: x@other.org\r\n\r\nbody\r\n";
        assert!(signers.signature_fields(other).unwrap().is_empty());
    }
}
