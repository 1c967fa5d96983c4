//! The STARTTLS acceptor, built once at startup: the operator's certificate and key,
//! or a self-signed pair generated into `{data_dir}/tls/` on first start and reused.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::Config;

pub(super) fn acceptor(config: &Config) -> anyhow::Result<TlsAcceptor> {
    let (certs, key) = match &config.smtp.tls {
        Some(files) => load(&files.cert, &files.key)?,
        None => {
            let dir = config.storage.data_dir.join("tls");
            self_signed(&dir, &config.smtp.hostname)?;
            load(&dir.join("cert.pem"), &dir.join("key.pem"))?
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the STARTTLS certificate and key do not go together")?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn load(
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let pem = fs::read(cert)
        .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("TLS certificate {} is not valid PEM", cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "TLS certificate {} holds no certificate",
            cert.display()
        ));
    }
    let pem = fs::read(key).with_context(|| format!("cannot read TLS key {}", key.display()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("TLS key {} is not valid PEM", key.display()))?
        .ok_or_else(|| anyhow!("TLS key {} holds no private key", key.display()))?;
    Ok((certs, key))
}

/// Makes `cert.pem` and `key.pem` for `hostname` in `dir` unless both exist. The key
/// is written with mode 0600, and each file appears whole (write, then rename).
fn self_signed(dir: &Path, hostname: &str) -> anyhow::Result<()> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pair = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .with_context(|| format!("cannot make a self-signed certificate for '{hostname}'"))?;
    write_file(&key, pair.key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert, pair.cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), hostname, "generated a self-signed STARTTLS certificate");
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    crate::keyfile::write_with_mode(path, contents, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        self_signed(&tls, "localhost").unwrap();
        let first = fs::read(tls.join("cert.pem")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tls.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        self_signed(&tls, "localhost").unwrap();
        assert_eq!(fs::read(tls.join("cert.pem")).unwrap(), first);
        assert!(load(&tls.join("cert.pem"), &tls.join("key.pem")).is_ok());
    }
}
