//! The listeners: bind, admit connections within the limits (in total and per IP),
//! run a session for each, and on shutdown stop accepting and wait for them to end.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::wire::Wrapping;
use super::{Inbound, session, tls};

/// How long shutdown waits for sessions to finish what they are doing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) async fn serve(
    inbound: Arc<Inbound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before binding, so that "listening" means ready, certificate included.
    let tls = tls::acceptor(&inbound.config).context("cannot set up STARTTLS")?;
    let smtp = &inbound.config.smtp;
    let mut listeners = bind(&smtp.listen, Wrapping::Plain).await?;
    listeners.extend(bind(&smtp.listen_implicit_tls, Wrapping::Implicit).await?);
    run(inbound, listeners, tls, shutdown).await
}

/// Binds every address and announces it on stdout (scripts and tests wait for it):
/// `smtp listening on ADDR`, or `smtps listening on ADDR` for implicit TLS.
pub(super) async fn bind(
    addrs: &[SocketAddr],
    wrapping: Wrapping,
) -> anyhow::Result<Vec<(TcpListener, Wrapping)>> {
    let scheme = match wrapping {
        Wrapping::Plain => "smtp",
        Wrapping::Implicit => "smtps",
    };
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for SMTP on {addr}"))?;
        let local = listener.local_addr().unwrap_or(*addr);
        println!("{scheme} listening on {local}");
        let _ = std::io::stdout().flush();
        tracing::info!(%local, scheme, "smtp listening");
        listeners.push((listener, wrapping));
    }
    Ok(listeners)
}

/// Serves on bound listeners until `shutdown`, then drains.
pub(super) async fn run(
    inbound: Arc<Inbound>,
    listeners: Vec<(TcpListener, Wrapping)>,
    tls: TlsAcceptor,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let smtp = &inbound.config.smtp;
    let limits = Arc::new(Limits::new(
        smtp.max_connections,
        smtp.max_connections_per_ip,
    ));
    let mut loops = JoinSet::new();
    for (listener, wrapping) in listeners {
        loops.spawn(accept_loop(
            listener,
            wrapping,
            inbound.clone(),
            tls.clone(),
            limits.clone(),
            shutdown.clone(),
        ));
    }
    while let Some(done) = loops.join_next().await {
        done.context("smtp accept loop")?;
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    wrapping: Wrapping,
    inbound: Arc<Inbound>,
    tls: TlsAcceptor,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = ended && e.is_panic() {
                    tracing::error!(error = %e, "an SMTP session panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    match limits.admit(peer.ip()) {
                        Ok(permit) => {
                            let (inbound, tls, shutdown) = (inbound.clone(), tls.clone(), shutdown.clone());
                            sessions.spawn(async move {
                                session::run(inbound, tcp, wrapping, peer, tls, shutdown).await;
                                drop(permit);
                            });
                        }
                        Err(which) => {
                            tracing::warn!(peer = %peer.ip(), limit = which, "too many connections; refused");
                            sessions.spawn(refuse(tcp));
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    let open = sessions.len();
    if open > 0 {
        tracing::info!(sessions = open, "waiting for SMTP sessions to finish");
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            sessions = sessions.len(),
            "SMTP sessions still open after {DRAIN_TIMEOUT:?}; closing them"
        );
        sessions.shutdown().await;
    }
}

/// Tells a connection over the limits why it is closed.
async fn refuse(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        tcp.write_all(b"421 4.7.0 Too many connections\r\n").await?;
        tcp.shutdown().await
    })
    .await;
}

/// Open connections, in total and per client IP.
struct Limits {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// A connection's place within the limits, given back when dropped.
struct Permit {
    _total: OwnedSemaphorePermit,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Limits {
    fn new(max_total: usize, max_per_ip: usize) -> Limits {
        Limits {
            total: Arc::new(Semaphore::new(max_total.min(Semaphore::MAX_PERMITS))),
            per_ip: Arc::default(),
            max_per_ip,
        }
    }

    /// A permit, or which limit is reached.
    fn admit(&self, ip: IpAddr) -> Result<Permit, &'static str> {
        let ip = ip.to_canonical();
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "max_connections")?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err("max_connections_per_ip");
        }
        *n += 1;
        Ok(Permit {
            _total: total,
            per_ip: self.per_ip.clone(),
            ip,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_ip_and_in_total_and_free_on_drop() {
        let limits = Limits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let a_mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = limits.admit(a).unwrap();
        let _p2 = limits.admit(a_mapped).unwrap();
        assert_eq!(limits.admit(a).err(), Some("max_connections_per_ip"));
        let _p3 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).err(), Some("max_connections"));
        drop(p1);
        assert!(limits.admit(a).is_ok());
        assert!(limits.per_ip.lock().unwrap().get(&a).is_some());
    }
}
