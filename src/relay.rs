//! Talking to the upstream: pooled SMTP connections (lettre) or a folder of .eml
//! files, with every reply mapped to delivered, transient or permanent.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::config::{SmtpUpstream, UpstreamConfig, UpstreamTls};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// Try again later: 4xx replies, connection and TLS failures, timeouts.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Will never succeed: 5xx replies. `enhanced` is the RFC 3463 status, if given.
    #[error("permanent failure: {message}")]
    Permanent {
        enhanced: Option<[u16; 3]>,
        message: String,
    },
}

/// The upstream, chosen once at start.
pub struct Relay {
    inner: Inner,
}

enum Inner {
    File { dir: PathBuf },
    Smtp(Box<SmtpPool>),
}

impl Relay {
    pub fn new(config: &UpstreamConfig, hostname: &str) -> Result<Relay, RelayError> {
        let inner = match config {
            UpstreamConfig::File { path } => {
                std::fs::create_dir_all(path).map_err(|e| {
                    RelayError::Transient(format!(
                        "cannot create the upstream folder {}: {e}",
                        path.display()
                    ))
                })?;
                Inner::File { dir: path.clone() }
            }
            UpstreamConfig::Smtp(up) => Inner::Smtp(Box::new(SmtpPool::new(up, hostname)?)),
        };
        Ok(Relay { inner })
    }

    /// Sends one copy, given as parts that follow one another (such as its
    /// signature fields and the rest); `sender` empty means the null reverse-path.
    /// Returns the upstream's reply text on success.
    pub async fn send(
        &self,
        sender: &str,
        recipient: &str,
        message: &[&[u8]],
    ) -> Result<String, RelayError> {
        match &self.inner {
            Inner::File { dir } => write_eml(dir, sender, recipient, message).await,
            Inner::Smtp(pool) => pool.send(&envelope(sender, recipient)?, message).await,
        }
    }

    /// Closes idle upstream connections politely (QUIT), at shutdown.
    pub async fn shutdown(&self) {
        if let Inner::Smtp(pool) = &self.inner {
            pool.shutdown().await;
        }
    }
}

/// Idle connections older than this are closed rather than reused: servers drop
/// idle clients after a few minutes (RFC 5321 §4.5.3.2.7 suggests 5).
const MAX_IDLE: Duration = Duration::from_secs(60);
/// A connection idle for less than this is reused as it is; one idle longer must
/// first answer a NOOP. Under load connections are idle for milliseconds, and a
/// NOOP per copy would be one more round trip each. A connection reused unprobed
/// that turns out closed (the server hung up meanwhile) costs one more try on a new
/// connection, within the same attempt (see [`SmtpPool::send`]).
const PROBE_AFTER: Duration = Duration::from_secs(2);

/// Connections to the upstream, opened and reused by hand around lettre's
/// `AsyncSmtpConnection`.
///
/// Not lettre's `AsyncSmtpTransport`: its `timeout` bounds only the TCP connect, so
/// a server that accepts and then stalls holds an attempt (and its delivery slot)
/// for ever; and cancelling its `send_raw` from outside would put a connection
/// left mid-transaction back into its pool. Here every step runs under a deadline,
/// and a connection that misses one is dropped (closed), never reused. The sockets
/// are opened here too, to turn Nagle's algorithm off (see [`SmtpPool::tcp`]).
struct SmtpPool {
    host: String,
    port: u16,
    /// `host:port`, to say which upstream failed.
    name: String,
    hello: ClientId,
    /// TLS from the first byte (`tls = "tls"`).
    wrapper: Option<TlsParameters>,
    /// STARTTLS, required (`tls = "starttls"`).
    starttls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    timeout: Duration,
    /// Connections open at once, at most `pool_size`.
    slots: Semaphore,
    max_idle: usize,
    idle: Mutex<Vec<(Connection, Instant)>>,
}

/// One session with the upstream.
struct Connection {
    smtp: AsyncSmtpConnection,
    /// The stream under `smtp`, to write messages to (see [`write_data`]); None
    /// after STARTTLS, when lettre has put its own TLS layer over it.
    wire: Option<Wire>,
    /// The server offers PIPELINING (RFC 2920) and we can write to `wire`: MAIL,
    /// RCPT and DATA go in one write, and their replies are read after.
    pipelining: bool,
}

/// How a pooled connection was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkout {
    /// Opened for this copy, or idle long enough to have answered a NOOP first.
    Checked,
    /// Reused at once (see [`PROBE_AFTER`]): it may have been closed meanwhile.
    Unprobed,
}

/// Why a mail transaction failed.
enum Failure {
    /// The connection was gone before MAIL got its reply: nothing reached the
    /// server, so the copy can be sent again on another connection.
    Closed(RelayError),
    /// Anything else, including every reply the server did give.
    Failed(RelayError),
}

impl From<Failure> for RelayError {
    fn from(failure: Failure) -> RelayError {
        match failure {
            Failure::Closed(e) | Failure::Failed(e) => e,
        }
    }
}

impl SmtpPool {
    fn new(up: &SmtpUpstream, hostname: &str) -> Result<SmtpPool, RelayError> {
        let tls_parameters = || {
            // A certificate that "does not verify" includes one for another name:
            // self-signed test relays rarely match the host they are reached by.
            TlsParameters::builder(up.host.clone())
                .dangerous_accept_invalid_certs(up.accept_invalid_certs)
                .dangerous_accept_invalid_hostnames(up.accept_invalid_certs)
                .build()
                .map_err(|e| {
                    RelayError::Transient(format!(
                        "cannot set up TLS for upstream {}: {e}",
                        up.host
                    ))
                })
        };
        let (wrapper, starttls) = match up.tls {
            UpstreamTls::None => (None, None),
            UpstreamTls::Starttls => (None, Some(tls_parameters()?)),
            UpstreamTls::Tls => (Some(tls_parameters()?), None),
        };
        let pool_size = up.pool_size.max(1) as usize;
        Ok(SmtpPool {
            host: up.host.clone(),
            port: up.port,
            name: format!("{}:{}", up.host, up.port),
            hello: ClientId::Domain(hostname.to_string()),
            wrapper,
            starttls,
            credentials: match (&up.username, &up.password) {
                (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p.clone())),
                _ => None,
            },
            timeout: up.timeout,
            slots: Semaphore::new(pool_size),
            max_idle: pool_size,
            idle: Mutex::new(Vec::new()),
        })
    }

    async fn send(&self, envelope: &Envelope, message: &[&[u8]]) -> Result<String, RelayError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| RelayError::Transient("the relay is shutting down".into()))?;
        let (conn, checkout) = self.checkout().await?;
        match self.deliver(conn, envelope, message).await {
            Err(Failure::Closed(e)) if checkout == Checkout::Unprobed => {
                tracing::debug!(upstream = %self.name, error = %e, "a reused connection was closed; sending on a new one");
                let conn = self.open().await?;
                Ok(self.deliver(conn, envelope, message).await?)
            }
            sent => Ok(sent?),
        }
    }

    /// One mail transaction under its deadline; the connection goes back to the
    /// pool after a success only.
    async fn deliver(
        &self,
        mut conn: Connection,
        envelope: &Envelope,
        message: &[&[u8]],
    ) -> Result<String, Failure> {
        let size = message.iter().map(|part| part.len()).sum();
        let deadline = transaction_deadline(self.timeout, size);
        match tokio::time::timeout(deadline, self.transaction(&mut conn, envelope, message)).await {
            Ok(Ok(response)) => {
                self.checkin(conn);
                Ok(reply_text(&response))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Failure::Failed(RelayError::Transient(format!(
                "upstream {}: no answer within {}s during the mail transaction",
                self.name,
                deadline.as_secs()
            )))),
        }
    }

    /// MAIL, RCPT, DATA and the message: lettre's `send`, but pipelined where the
    /// server allows it, and for a message in parts, written without lettre's
    /// full-size dot-stuffed copy of it. After a failure the connection is closed
    /// (QUIT first, if it still answers), as lettre does.
    async fn transaction(
        &self,
        conn: &mut Connection,
        envelope: &Envelope,
        message: &[&[u8]],
    ) -> Result<Response, Failure> {
        let info = conn.smtp.server_info();
        let mut parameters = Vec::new();
        let mut addresses = envelope.from().into_iter().chain(envelope.to());
        if addresses.any(|a| !AsRef::<str>::as_ref(a).is_ascii()) {
            if !info.supports_feature(Extension::SmtpUtfEight) {
                return Err(Failure::Failed(
                    self.unsupported("a non-ASCII address", "SMTPUTF8"),
                ));
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !message.iter().all(|part| part.is_ascii()) {
            if !info.supports_feature(Extension::EightBitMime) {
                return Err(Failure::Failed(
                    self.unsupported("8-bit content", "8BITMIME"),
                ));
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let fail = |e: smtp::Error| Failure::Failed(map_error(&e, &self.name));
        // No reply to MAIL, or 421 (closing): the server had hung up.
        let mail_fail = |e: smtp::Error| match e.status() {
            Some(code) if code.to_string() != "421" => fail(e),
            _ => Failure::Closed(map_error(&e, &self.name)),
        };
        let cannot_write = |e: std::io::Error, what: &str| {
            RelayError::Transient(format!("upstream {}: cannot send {what}: {e}", self.name))
        };
        let mail = Mail::new(envelope.from().cloned(), parameters);
        let sent = async {
            match (&mut conn.wire, conn.pipelining) {
                (Some(wire), true) => {
                    let mut commands = mail.to_string();
                    for to in envelope.to() {
                        commands.push_str(&Rcpt::new(to.clone(), vec![]).to_string());
                    }
                    commands.push_str(&Data.to_string());
                    // A write to a connection the server closed may still succeed
                    // (into the socket's buffer): the missing reply tells.
                    wire.write_all(commands.as_bytes())
                        .await
                        .map_err(|e| Failure::Closed(cannot_write(e, "the envelope")))?;
                    // Every reply is read, in order, before the first is acted on.
                    let mail = conn.smtp.read_response().await;
                    let mut rcpts = Vec::with_capacity(envelope.to().len());
                    for _ in envelope.to() {
                        rcpts.push(conn.smtp.read_response().await);
                    }
                    let data = conn.smtp.read_response().await;
                    mail.map_err(mail_fail)?;
                    for rcpt in rcpts {
                        rcpt.map_err(fail)?;
                    }
                    data.map_err(fail)?;
                }
                _ => {
                    conn.smtp.command(mail).await.map_err(mail_fail)?;
                    for to in envelope.to() {
                        conn.smtp
                            .command(Rcpt::new(to.clone(), vec![]))
                            .await
                            .map_err(fail)?;
                    }
                    conn.smtp.command(Data).await.map_err(fail)?;
                }
            }
            match &mut conn.wire {
                Some(wire) => {
                    write_data(wire, message)
                        .await
                        .map_err(|e| Failure::Failed(cannot_write(e, "the message")))?;
                    conn.smtp.read_response().await.map_err(fail)
                }
                None => conn
                    .smtp
                    .message_iter(lettre_chunks(message))
                    .await
                    .map_err(fail),
            }
        }
        .await;
        if sent.is_err() {
            conn.smtp.abort().await;
        }
        sent
    }

    /// The message needs an extension the upstream does not offer: perhaps another
    /// day (or upstream) will.
    fn unsupported(&self, what: &str, extension: &str) -> RelayError {
        RelayError::Transient(format!(
            "upstream {}: the message has {what} but the server does not offer {extension}",
            self.name
        ))
    }

    /// A connection idle for a moment only, one idle longer that still answers
    /// NOOP, or a new one.
    async fn checkout(&self) -> Result<(Connection, Checkout), RelayError> {
        loop {
            let parked = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            let Some((mut conn, since)) = parked else {
                break;
            };
            let idle = since.elapsed();
            if idle < PROBE_AFTER {
                return Ok((conn, Checkout::Unprobed));
            }
            if idle > MAX_IDLE {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.smtp.quit()).await;
                continue;
            }
            if let Ok(true) = tokio::time::timeout(self.timeout, conn.smtp.test_connected()).await {
                return Ok((conn, Checkout::Checked));
            }
        }
        Ok((self.open().await?, Checkout::Checked))
    }

    /// A new connection, within its deadline.
    async fn open(&self) -> Result<Connection, RelayError> {
        // Connect, greeting, EHLO, STARTTLS, EHLO again, AUTH: each may take a while.
        let setup = 2 * self.timeout;
        match tokio::time::timeout(setup, self.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            // Even a 5xx here (a refused greeting, bad AUTH credentials) is about
            // this gateway, not the recipient: bouncing would wrongly fail every
            // message until the operator fixes it.
            Ok(Err(e)) => Err(RelayError::Transient(format!(
                "upstream {}: {e}",
                self.name
            ))),
            Err(_) => Err(RelayError::Transient(format!(
                "upstream {}: no answer within {}s while connecting",
                self.name,
                setup.as_secs()
            ))),
        }
    }

    /// A new session, greeted, secured and authenticated as configured.
    async fn connect(&self) -> Result<Connection, String> {
        let tcp = self.tcp().await?;
        let stream: Box<dyn AsyncTokioStream> = match &self.wrapper {
            None => Box::new(tcp),
            Some(tls) => {
                #[allow(deprecated)]
                let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                stream
                    .upgrade_tls(tls.clone())
                    .await
                    .map_err(|e| describe(&e))?;
                Box::new(ImplicitTls(stream.compat()))
            }
        };
        // With STARTTLS, lettre puts its TLS layer over the stream given here, so
        // writing to that stream directly would bypass it.
        let (transport, wire): (Box<dyn AsyncTokioStream>, _) = match &self.starttls {
            None => {
                let wire = Wire(Arc::new(Mutex::new(stream)));
                (Box::new(wire.clone()), Some(wire))
            }
            Some(_) => (stream, None),
        };
        let mut smtp = AsyncSmtpConnection::connect_with_transport(transport, &self.hello)
            .await
            .map_err(|e| describe(&e))?;
        if let Some(tls) = &self.starttls {
            smtp.starttls(tls.clone(), &self.hello)
                .await
                .map_err(|e| describe(&e))?;
        }
        // lettre keeps only the extensions it knows from the EHLO reply, not
        // PIPELINING: ask again (before AUTH, which a new EHLO would reset).
        let pipelining = wire.is_some()
            && smtp
                .command(Ehlo::new(self.hello.clone()))
                .await
                .map_err(|e| describe(&e))?
                .message()
                .any(|line| offers(line, "PIPELINING"));
        if let Some(credentials) = &self.credentials {
            smtp.auth(DEFAULT_MECHANISMS, credentials)
                .await
                .map_err(|e| describe(&e))?;
        }
        Ok(Connection {
            smtp,
            wire,
            pipelining,
        })
    }

    /// The TCP connection, with Nagle's algorithm off. A message's last segment is
    /// often small (and lettre, after STARTTLS, writes the final `CRLF.CRLF` on its
    /// own); with Nagle on, that small last write waits for the ACK of the one
    /// before, which the server delays (40 ms on Linux) while it waits for the rest:
    /// one stall per message per connection.
    async fn tcp(&self) -> Result<TcpStream, String> {
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?;
        let mut last = format!("{} resolves to no address", self.host);
        for addr in addrs {
            match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    return Ok(stream);
                }
                Ok(Err(e)) => last = format!("cannot connect to {addr}: {e}"),
                Err(_) => last = format!("cannot connect to {addr}: timed out"),
            }
        }
        Err(last)
    }

    fn checkin(&self, conn: Connection) {
        if conn.smtp.has_broken() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push((conn, Instant::now()));
        }
    }

    async fn shutdown(&self) {
        self.slots.close();
        let idle: Vec<_> = match self.idle.lock() {
            Ok(mut idle) => idle.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for (mut conn, _) in idle {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.smtp.quit()).await;
        }
    }
}

/// A stream lettre has already wrapped in TLS, handed back to it as a plain
/// transport so that the TCP socket under it could be set up here (see `tcp`).
#[allow(deprecated)]
#[derive(Debug)]
struct ImplicitTls(Compat<AsyncNetworkStream>);

#[allow(deprecated)]
impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().peer_addr()
    }
}

impl tokio::io::AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A connection's stream, shared by lettre (commands and replies) and
/// [`write_data`] (messages), which take turns. lettre offers no way to write a
/// message but its own, which first copies it whole into a dot-stuffed buffer.
#[derive(Debug, Clone)]
struct Wire(Arc<Mutex<Box<dyn AsyncTokioStream>>>);

impl Wire {
    /// Runs `f` on the stream. The lock is only ever held for one poll, and lettre
    /// and `write_data` never poll at the same time: it is never contended.
    fn with<T>(
        &self,
        f: impl FnOnce(Pin<&mut Box<dyn AsyncTokioStream>>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match self.0.lock() {
            Ok(mut stream) => f(Pin::new(&mut *stream)),
            Err(_) => Poll::Ready(Err(std::io::Error::other(
                "the connection's lock was poisoned",
            ))),
        }
    }
}

impl AsyncTokioStream for Wire {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self.0.lock() {
            Ok(stream) => stream.peer_addr(),
            Err(_) => Err(std::io::Error::other("the connection's lock was poisoned")),
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.with(|stream| stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.with(|stream| stream.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|stream| stream.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|stream| stream.poll_shutdown(cx))
    }
}

/// What [`write_data`] hands the connection at once: small pieces (the signature
/// fields, a stuffed dot, the final dot) gather into one write; larger ones go
/// straight through.
const DATA_BUFFER: usize = 64 * 1024;

/// Writes the message (its parts one after the other) as the content of DATA:
/// each line that starts with "." gets one more in front (RFC 5321 §4.5.2), then
/// the final "." line. Lines end in CRLF, as lettre's own writer has it: a bare LF
/// ends none (the queue holds messages with CRLF line endings only).
async fn write_data<W: AsyncWrite + Unpin>(out: &mut W, message: &[&[u8]]) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(DATA_BUFFER, out);
    // The last two bytes written, across parts: as after a line at the start.
    let mut tail = *b"\r\n";
    for part in message {
        // A line that starts at the very start of this part, or after a CR that
        // ended the part before.
        let first = match (tail, *part) {
            (_, []) => None,
            ([b'\r', b'\n'], [b'.', ..]) => Some(0),
            ([_, b'\r'], [b'\n', b'.', ..]) => Some(1),
            _ => None,
        };
        let dots = first
            .into_iter()
            .chain(memchr::memmem::find_iter(part, b"\r\n.").map(|at| at + 2));
        let mut from = 0;
        for dot in dots {
            out.write_all(&part[from..dot]).await?;
            out.write_all(b".").await?;
            from = dot;
        }
        out.write_all(&part[from..]).await?;
        tail = match **part {
            [] => tail,
            [only] => [tail[1], only],
            [.., a, b] => [a, b],
        };
    }
    let end: &[u8] = if tail == *b"\r\n" {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    };
    out.write_all(end).await?;
    out.flush().await
}

/// The message in pieces for lettre's own writer (after STARTTLS), which copies
/// each piece it is given (so these are small) and ends with CRLF.CRLF itself (so
/// the message's final CRLF is left out, or it would gain an empty line).
fn lettre_chunks<'a>(message: &'a [&'a [u8]]) -> impl Iterator<Item = &'a [u8]> {
    let last = message.iter().rposition(|part| !part.is_empty());
    message.iter().enumerate().flat_map(move |(i, part)| {
        let part = match last {
            Some(last) if last == i => part.strip_suffix(b"\r\n").unwrap_or(part),
            _ => part,
        };
        part.chunks(DATA_BUFFER)
    })
}

/// How long one mail transaction (MAIL, RCPT, DATA and the final reply) may take:
/// the per-command `timeout` for the replies, plus time to move the message at a
/// slow 64 KiB/s.
fn transaction_deadline(timeout: Duration, size: usize) -> Duration {
    timeout * 3 + Duration::from_secs((size / 65536) as u64)
}

/// An address lettre cannot carry can never be sent, whatever the upstream says.
fn envelope(sender: &str, recipient: &str) -> Result<Envelope, RelayError> {
    let to: lettre::Address = recipient.parse().map_err(|e| RelayError::Permanent {
        enhanced: Some([5, 1, 3]),
        message: format!("553 5.1.3 recipient <{recipient}> cannot be relayed: {e}"),
    })?;
    let from = if sender.is_empty() {
        None
    } else {
        Some(
            sender
                .parse::<lettre::Address>()
                .map_err(|e| RelayError::Permanent {
                    enhanced: Some([5, 1, 7]),
                    message: format!("553 5.1.7 sender <{sender}> cannot be relayed: {e}"),
                })?,
        )
    };
    Envelope::new(from, vec![to]).map_err(|e| RelayError::Permanent {
        enhanced: None,
        message: format!("554 envelope rejected: {e}"),
    })
}

/// `250 2.0.0 Ok: queued as 4Xk…`, the lines joined by spaces.
fn reply_text(response: &Response) -> String {
    let mut text = response.code().to_string();
    for line in response.message() {
        text.push(' ');
        text.push_str(line.trim());
    }
    text
}

/// Whether a line of an EHLO reply names `extension` (its first word).
fn offers(line: &str, extension: &str) -> bool {
    line.split_ascii_whitespace()
        .next()
        .is_some_and(|word| word.eq_ignore_ascii_case(extension))
}

/// Maps an error of the mail transaction (MAIL, RCPT, DATA): a negative reply by its
/// code, anything else (connection lost, I/O) as transient.
fn map_error(e: &smtp::Error, upstream: &str) -> RelayError {
    match reply_of(e) {
        Some(reply) => classify_reply(&reply),
        None => RelayError::Transient(format!("upstream {upstream}: {}", describe(e))),
    }
}

/// The upstream's reply behind an error, as `550 5.1.1 text`.
fn reply_of(e: &smtp::Error) -> Option<String> {
    let code = e.status()?;
    // lettre keeps the reply's text (all lines joined) as the error's source.
    Some(match std::error::Error::source(e) {
        Some(s) => format!("{code} {s}"),
        None => code.to_string(),
    })
}

fn describe(e: &smtp::Error) -> String {
    if let Some(reply) = reply_of(e) {
        reply
    } else if e.is_timeout() {
        "timed out".to_string()
    } else {
        error_chain(e)
    }
}

/// The error and its causes, as one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Maps a negative reply such as `550 5.1.1 <x@y>: no such user` to the error kind
/// its first digit says; anything but a 5xx is worth another try.
pub fn classify_reply(reply: &str) -> RelayError {
    let reply = reply.trim().to_string();
    if reply.starts_with('5') {
        RelayError::Permanent {
            enhanced: parse_enhanced_status(&reply),
            message: reply,
        }
    } else {
        RelayError::Transient(reply)
    }
}

/// The RFC 3463 status at the start of a reply's text (`5.1.1` in
/// `550 5.1.1 no such user` or `550-5.1.1 …`), if present and well formed.
pub fn parse_enhanced_status(reply: &str) -> Option<[u16; 3]> {
    let reply = reply.trim_start();
    let bytes = reply.as_bytes();
    let basic = bytes.len() >= 3
        && bytes[..3].iter().all(u8::is_ascii_digit)
        && matches!(bytes.get(3), None | Some(b' ' | b'-'));
    let text = if basic {
        reply.get(4..).unwrap_or("")
    } else {
        reply
    };
    let word = text.split_whitespace().next()?;
    let mut parts = word.split('.');
    let mut next = |max_len: usize| -> Option<u16> {
        let p = parts.next()?;
        if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let status = [next(1)?, next(3)?, next(3)?];
    if parts.next().is_some() || !matches!(status[0], 2 | 4 | 5) {
        return None;
    }
    // The class must agree with the reply code when there is one (RFC 2034 §4).
    if basic && u16::from(bytes[0] - b'0') != status[0] {
        return None;
    }
    Some(status)
}

async fn write_eml(
    dir: &Path,
    sender: &str,
    recipient: &str,
    message: &[&[u8]],
) -> Result<String, RelayError> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let name = format!("{millis}-{:016x}.eml", rand::random::<u64>());
    let path = dir.join(&name);
    let temp = dir.join(format!(".{name}.tmp"));
    let bytes = message.concat();
    let written = path.clone();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        let done = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&temp, &written));
        if done.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        done
    })
    .await;
    match result {
        Ok(Ok(())) => {
            tracing::debug!(sender, recipient, path = %path.display(), "copy written");
            Ok(format!("written to {}", path.display()))
        }
        Ok(Err(e)) => Err(RelayError::Transient(format!(
            "cannot write {}: {e}",
            path.display()
        ))),
        Err(e) => Err(RelayError::Transient(format!(
            "writing {} failed: {e}",
            path.display()
        ))),
    }
}

/// A scripted SMTP server for tests: it answers each RCPT by the recipient's local
/// part (`bad…` 550 5.1.1, `full…` 552 5.2.2, `later…` 451 4.3.0, `quota…` 452 at the
/// end of DATA, `stall…` never answers, anything else 250) and keeps what it received.
/// [`start_starttls`] makes one that offers STARTTLS (a self-signed certificate).
#[cfg(test)]
pub(crate) mod fake_upstream {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::{self, ServerConfig};

    #[derive(Debug, Clone, Default)]
    pub struct Received {
        pub sender: String,
        pub recipients: Vec<String>,
        pub data: Vec<u8>,
        /// Whether it came after STARTTLS.
        pub encrypted: bool,
        /// Whether RCPT and DATA had arrived with MAIL, before its reply.
        pub pipelined: bool,
    }

    trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

    pub struct FakeUpstream {
        pub port: u16,
        pub received: Arc<Mutex<Vec<Received>>>,
        pub connections: Arc<AtomicUsize>,
    }

    pub async fn start() -> FakeUpstream {
        start_with(None).await
    }

    pub async fn start_starttls() -> FakeUpstream {
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pair.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pair.cert.der().clone()], key)
            .unwrap();
        start_with(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let store = received.clone();
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (store, tls) = (store.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = session(Box::new(socket), store, tls).await;
                });
            }
        });
        FakeUpstream {
            port,
            received,
            connections,
        }
    }

    /// One SMTP session on `socket`, TLS from STARTTLS on if `tls` is given.
    async fn session(
        mut socket: Box<dyn Stream>,
        store: Arc<Mutex<Vec<Received>>>,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<()> {
        let mut encrypted = false;
        while let Some(plain) = commands(socket, &store, tls.is_some(), encrypted).await? {
            let Some(acceptor) = &tls else {
                return Ok(());
            };
            socket = Box::new(acceptor.accept(plain).await?);
            encrypted = true;
        }
        Ok(())
    }

    /// Answers commands until QUIT (None) or STARTTLS (the stream, to encrypt).
    async fn commands(
        socket: Box<dyn Stream>,
        store: &Mutex<Vec<Received>>,
        offer_tls: bool,
        encrypted: bool,
    ) -> std::io::Result<Option<Box<dyn Stream>>> {
        let (read, mut write) = tokio::io::split(socket);
        let mut read = BufReader::new(read);
        if !encrypted {
            write.write_all(b"220 fake ESMTP\r\n").await?;
        }
        let mut current = Received::default();
        let mut data_reply = "250 2.0.0 Ok: queued as FAKE";
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                return Ok(None);
            }
            let upper = line.to_ascii_uppercase();
            let reply: String = if upper.starts_with("EHLO") {
                let starttls = if offer_tls && !encrypted {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                format!(
                    "250-fake\r\n{starttls}250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000"
                )
            } else if upper.starts_with("STARTTLS") && offer_tls && !encrypted {
                write.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
                return Ok(Some(Box::new(read.into_inner().unsplit(write))));
            } else if upper.starts_with("MAIL FROM:") {
                let ahead = String::from_utf8_lossy(read.buffer()).to_ascii_uppercase();
                current = Received {
                    sender: line[10..].trim().trim_matches(['<', '>']).to_string(),
                    encrypted,
                    pipelined: ahead.contains("RCPT TO:") && ahead.contains("DATA"),
                    ..Received::default()
                };
                data_reply = "250 2.0.0 Ok: queued as FAKE";
                "250 2.1.0 Ok".into()
            } else if upper.starts_with("RCPT TO:") {
                let rcpt = line[8..].trim().trim_matches(['<', '>']).to_string();
                if rcpt.starts_with("stall") {
                    // A server that stops answering, connection open.
                    std::future::pending::<()>().await;
                }
                if rcpt.starts_with("bad") {
                    format!("550 5.1.1 <{rcpt}>: Recipient address rejected: no such user")
                } else if rcpt.starts_with("full") {
                    "552 5.2.2 Mailbox full".into()
                } else if rcpt.starts_with("later") {
                    "451 4.3.0 Try again later".into()
                } else {
                    if rcpt.starts_with("quota") {
                        data_reply = "452 4.2.2 Over quota, try later";
                    }
                    current.recipients.push(rcpt);
                    "250 2.1.5 Ok".into()
                }
            } else if upper.starts_with("DATA") && current.recipients.is_empty() {
                "554 5.5.1 Error: no valid recipients".into()
            } else if upper.starts_with("DATA") {
                write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if read.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(None);
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    let l = if l.starts_with(b"..") {
                        &l[1..]
                    } else {
                        &l[..]
                    };
                    data.extend_from_slice(l);
                }
                current.data = data;
                // A server that hangs up without a word after this message.
                let hang_up = current.recipients.iter().any(|r| r.starts_with("hangup"));
                if data_reply.starts_with('2') {
                    store.lock().unwrap().push(std::mem::take(&mut current));
                }
                if hang_up {
                    write.write_all(b"250 2.0.0 Ok: queued as FAKE\r\n").await?;
                    return Ok(None);
                }
                data_reply.into()
            } else if upper.starts_with("QUIT") {
                write.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(None);
            } else {
                "250 2.0.0 Ok".into()
            };
            write.write_all(reply.as_bytes()).await?;
            write.write_all(b"\r\n").await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn replies_are_classified_by_their_first_digit() {
        assert_eq!(
            classify_reply("550 5.1.1 <x@y>: no such user"),
            RelayError::Permanent {
                enhanced: Some([5, 1, 1]),
                message: "550 5.1.1 <x@y>: no such user".into()
            }
        );
        assert_eq!(
            classify_reply("552 5.2.2 Mailbox full"),
            RelayError::Permanent {
                enhanced: Some([5, 2, 2]),
                message: "552 5.2.2 Mailbox full".into()
            }
        );
        assert_eq!(
            classify_reply("451 4.3.0 Try again later"),
            RelayError::Transient("451 4.3.0 Try again later".into())
        );
        assert_eq!(
            classify_reply("554 Transaction failed"),
            RelayError::Permanent {
                enhanced: None,
                message: "554 Transaction failed".into()
            }
        );
    }

    #[test]
    fn enhanced_status_codes_are_parsed_strictly() {
        assert_eq!(
            parse_enhanced_status("550 5.1.10 null MX"),
            Some([5, 1, 10])
        );
        assert_eq!(
            parse_enhanced_status("550-5.7.25 multi-line"),
            Some([5, 7, 25])
        );
        assert_eq!(parse_enhanced_status("5.1.2 bad domain"), Some([5, 1, 2]));
        assert_eq!(parse_enhanced_status("550"), None);
        assert_eq!(parse_enhanced_status("550 no such user"), None);
        assert_eq!(parse_enhanced_status("550 5.1 short"), None);
        assert_eq!(parse_enhanced_status("550 5.1.1.1 long"), None);
        assert_eq!(parse_enhanced_status("550 3.1.1 bad class"), None);
        assert_eq!(parse_enhanced_status("550 5.1000.1 too long"), None);
        // A 4.x.x status in a 5xx reply contradicts itself: ignore it.
        assert_eq!(parse_enhanced_status("550 4.2.2 odd"), None);
    }

    fn smtp_config(port: u16) -> UpstreamConfig {
        smtp_config_with_timeout(port, Duration::from_secs(5))
    }

    fn smtp_config_with_timeout(port: u16, timeout: Duration) -> UpstreamConfig {
        UpstreamConfig::Smtp(SmtpUpstream {
            host: "127.0.0.1".into(),
            port,
            tls: UpstreamTls::None,
            username: None,
            password: None,
            accept_invalid_certs: false,
            pool_size: 2,
            timeout,
        })
    }

    const MSG: &[u8] =
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n";

    #[tokio::test]
    async fn smtp_replies_map_to_outcomes() {
        let up = fake_upstream::start().await;
        let relay = Relay::new(&smtp_config(up.port), "gw.example.com").unwrap();

        let ok = relay.send("a@example.com", "b@example.com", &[MSG]).await;
        assert_eq!(ok, Ok("250 2.0.0 Ok: queued as FAKE".to_string()));
        let again = relay.send("a@example.com", "b2@example.com", &[MSG]).await;
        assert!(again.is_ok(), "{again:?}");
        assert_eq!(
            up.connections.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "reused"
        );
        {
            let got = up.received.lock().unwrap();
            assert_eq!(got[0].sender, "a@example.com");
            assert_eq!(got[0].recipients, vec!["b@example.com".to_string()]);
            assert_eq!(got[0].data, MSG);
        }

        let bad = relay.send("a@example.com", "bad@example.com", &[MSG]).await;
        assert_eq!(
            bad,
            Err(RelayError::Permanent {
                enhanced: Some([5, 1, 1]),
                message: "550 5.1.1 <bad@example.com>: Recipient address rejected: no such user"
                    .into()
            })
        );
        let later = relay.send("", "later@example.com", &[MSG]).await;
        assert_eq!(
            later,
            Err(RelayError::Transient("451 4.3.0 Try again later".into()))
        );
        let quota = relay.send("", "quota@example.com", &[MSG]).await;
        assert_eq!(
            quota,
            Err(RelayError::Transient(
                "452 4.2.2 Over quota, try later".into()
            ))
        );
        // The pool still works after failures.
        let ok = relay.send("", "c@example.com", &[MSG]).await;
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(up.received.lock().unwrap().last().unwrap().sender, "");
    }

    #[tokio::test]
    async fn the_envelope_is_pipelined_when_the_server_offers_it() {
        let up = fake_upstream::start().await;
        let relay = Relay::new(&smtp_config(up.port), "gw.example.com").unwrap();
        let ok = relay.send("a@example.com", "b@example.com", &[MSG]).await;
        assert!(ok.is_ok(), "{ok:?}");
        let got = up.received.lock().unwrap();
        assert!(got[0].pipelined, "MAIL, RCPT and DATA in one write");
        assert_eq!(got[0].data, MSG);
    }

    #[tokio::test]
    async fn a_reused_connection_the_server_closed_is_replaced_within_the_attempt() {
        let up = fake_upstream::start().await;
        let relay = Relay::new(&smtp_config(up.port), "gw.example.com").unwrap();
        let first = relay
            .send("a@example.com", "hangup@example.com", &[MSG])
            .await;
        assert!(first.is_ok(), "{first:?}");
        // Reused at once, without a NOOP: the server is gone, so the copy goes
        // out on a new connection, in this same call.
        let second = relay.send("a@example.com", "b@example.com", &[MSG]).await;
        assert_eq!(second, Ok("250 2.0.0 Ok: queued as FAKE".to_string()));
        assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 2);
        let got = up.received.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].recipients, vec!["b@example.com".to_string()]);
    }

    #[tokio::test]
    async fn a_stalled_upstream_times_out_and_its_connection_is_not_reused() {
        let up = fake_upstream::start().await;
        let relay = Relay::new(
            &smtp_config_with_timeout(up.port, Duration::from_millis(300)),
            "gw",
        )
        .unwrap();
        let started = std::time::Instant::now();
        match relay
            .send("a@example.com", "stall@example.com", &[MSG])
            .await
        {
            Err(RelayError::Transient(text)) => {
                assert!(text.contains("no answer within"), "{text}")
            }
            other => panic!("expected transient, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        let ok = relay.send("a@example.com", "b@example.com", &[MSG]).await;
        assert!(ok.is_ok(), "{ok:?}");

        // A server that accepts and never greets.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let relay = Relay::new(
            &smtp_config_with_timeout(port, Duration::from_millis(300)),
            "gw",
        )
        .unwrap();
        match relay.send("a@example.com", "b@example.com", &[MSG]).await {
            Err(RelayError::Transient(text)) => {
                assert!(text.contains("while connecting"), "{text}")
            }
            other => panic!("expected transient, got {other:?}"),
        }
    }

    /// A server that greets with `greeting`, then answers EHLO with `ehlo` and every
    /// other command with `other`.
    async fn scripted(greeting: &'static str, ehlo: &'static str, other: &'static str) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(greeting.as_bytes()).await;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply = if line.to_ascii_uppercase().starts_with("EHLO") {
                            ehlo
                        } else {
                            other
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_refused_session_is_transient_even_with_a_5xx() {
        let port = scripted("554 5.7.1 No service for you\r\n", "", "").await;
        let relay = Relay::new(&smtp_config(port), "gw").unwrap();
        match relay.send("a@example.com", "b@example.com", &[MSG]).await {
            Err(RelayError::Transient(text)) => {
                assert!(text.starts_with("upstream 127.0.0.1:"), "{text}");
                assert!(text.contains("554 5.7.1 No service for you"), "{text}");
            }
            other => panic!("expected transient, got {other:?}"),
        }

        let port = scripted(
            "220 hi\r\n",
            "250-hi\r\n250 AUTH PLAIN LOGIN\r\n",
            "535 5.7.8 Authentication credentials invalid\r\n",
        )
        .await;
        let UpstreamConfig::Smtp(mut up) = smtp_config(port) else {
            unreachable!()
        };
        up.username = Some("u".into());
        up.password = Some("p".into());
        let relay = Relay::new(&UpstreamConfig::Smtp(up), "gw").unwrap();
        match relay.send("a@example.com", "b@example.com", &[MSG]).await {
            Err(RelayError::Transient(text)) => {
                assert!(text.contains("535 5.7.8"), "{text}");
            }
            other => panic!("expected transient, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn unreachable_upstream_is_transient_and_bad_addresses_permanent() {
        // A port nothing listens on: bind, learn the port, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let relay = Relay::new(&smtp_config(port), "gw.example.com").unwrap();
        match relay.send("a@example.com", "b@example.com", &[MSG]).await {
            Err(RelayError::Transient(text)) => {
                assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}")
            }
            other => panic!("expected transient, got {other:?}"),
        }
        match relay.send("a@example.com", "not an address", &[MSG]).await {
            Err(RelayError::Permanent {
                enhanced: Some([5, 1, 3]),
                ..
            }) => {}
            other => panic!("expected permanent, got {other:?}"),
        }
    }

    /// What lettre's own writer put on the wire for `message`, byte by byte as its
    /// ClientCodec does (after the final CRLF was cut, as it had to be).
    fn as_lettre_wrote(message: &[u8]) -> Vec<u8> {
        let data = message.strip_suffix(b"\r\n").unwrap_or(message);
        let mut out = Vec::new();
        let (mut line_start, mut after_cr) = (true, false);
        for &b in data {
            if b == b'.' && line_start {
                out.push(b'.');
            }
            out.push(b);
            line_start = after_cr && b == b'\n';
            after_cr = b == b'\r';
        }
        out.extend_from_slice(b"\r\n.\r\n");
        out
    }

    async fn written(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        write_data(&mut out, parts).await.unwrap();
        out
    }

    /// A message of `size` bytes whose lines around `at` all start with a dot, one
    /// of them exactly at `at`.
    fn dotted_around(at: usize, size: usize) -> Vec<u8> {
        let mut message = b"Subject: dots\r\n\r\n".to_vec();
        while message.len() < at - 40 {
            message.extend_from_slice(b"filler line\r\n");
        }
        let pad = at - message.len() - 2;
        message.extend_from_slice(&vec![b'x'; pad]);
        message.extend_from_slice(b"\r\n");
        assert_eq!(message.len(), at);
        for line in [&b".\r\n"[..], b"..\r\n", b".x\r\n", b"\r\n", b". .\r\n"] {
            message.extend_from_slice(line);
        }
        while message.len() < size {
            message.extend_from_slice(b"more text, and a dot. in the middle\r\n");
        }
        message
    }

    #[tokio::test]
    async fn data_is_dot_stuffed_as_lettre_did_wherever_the_parts_meet() {
        let messages: [&[u8]; 6] = [
            b".starts with a dot\r\nline\r\n.\r\n..\r\nend\r\n",
            b"From: a@b\r\n\r\nno final CRLF\r\n.dot",
            b"ends with a CR\r",
            b"\r\n.\r\n",
            b"bare\n.LF and\r.CR are no line ends\r\r\n.but this is\r\n",
            b".",
        ];
        for message in messages {
            let expected = as_lettre_wrote(message);
            assert_eq!(written(&[message]).await, expected, "{message:?}");
            for i in 0..=message.len() {
                let (a, b) = message.split_at(i);
                assert_eq!(written(&[a, b]).await, expected, "{a:?} | {b:?}");
                assert_eq!(written(&[a, b"", b, b""]).await, expected, "{a:?} || {b:?}");
            }
        }
        // Past the write buffer, a dot line right at its end, the parts meeting there.
        for at in [
            DATA_BUFFER - 1,
            DATA_BUFFER,
            DATA_BUFFER + 1,
            DATA_BUFFER + 2,
        ] {
            let message = dotted_around(at, 3 * DATA_BUFFER);
            let expected = as_lettre_wrote(&message);
            for cut in at - 2..at + 3 {
                let (a, b) = message.split_at(cut);
                assert!(
                    written(&[a, b]).await == expected,
                    "dot line at {at}, cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn lettre_gets_small_pieces_without_the_final_crlf() {
        let big = dotted_around(DATA_BUFFER + 10, 3 * DATA_BUFFER);
        let cases: [(&[&[u8]], &[u8]); 4] = [
            (&[b"Sig: 1\r\n", b"body\r\n"], b"Sig: 1\r\nbody"),
            (&[b"Sig: 1\r\n", b"no CRLF"], b"Sig: 1\r\nno CRLF"),
            (&[b"body\r\n", b""], b"body"),
            (&[b"", &big], &big[..big.len() - 2]),
        ];
        for (parts, expected) in cases {
            let chunks: Vec<&[u8]> = lettre_chunks(parts).collect();
            assert!(chunks.iter().all(|c| c.len() <= DATA_BUFFER));
            assert!(chunks.concat() == expected, "{parts:?}");
        }
    }

    #[tokio::test]
    async fn messages_in_parts_arrive_whole_and_unstuffed() {
        let up = fake_upstream::start().await;
        let relay = Relay::new(&smtp_config(up.port), "gw").unwrap();
        let big = dotted_around(DATA_BUFFER, 2 * DATA_BUFFER + 100);
        let cases: [(&[&[u8]], &[u8]); 4] = [
            (
                &[b"DKIM-Signature: x\r\n", MSG],
                &[b"DKIM-Signature: x\r\n", MSG].concat(),
            ),
            (&[b"", b".first\r\n.\r\n"], b".first\r\n.\r\n"),
            (
                &[b"X: 1\r\n", b"\r\nno final CRLF"],
                b"X: 1\r\n\r\nno final CRLF\r\n",
            ),
            (&[&big[..DATA_BUFFER], &big[DATA_BUFFER..]], &big),
        ];
        for (i, (parts, expected)) in cases.into_iter().enumerate() {
            let sent = relay.send("a@example.com", "b@example.com", parts).await;
            assert!(sent.is_ok(), "{sent:?}");
            let got = up.received.lock().unwrap()[i].data.clone();
            assert!(
                got == expected,
                "case {i}: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        assert_eq!(
            up.connections.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one connection for all: each transaction ended cleanly"
        );
    }

    #[tokio::test]
    async fn after_starttls_lettre_writes_the_message_and_it_arrives_whole() {
        let up = fake_upstream::start_starttls().await;
        let UpstreamConfig::Smtp(mut config) = smtp_config(up.port) else {
            unreachable!()
        };
        config.tls = UpstreamTls::Starttls;
        config.accept_invalid_certs = true;
        let relay = Relay::new(&UpstreamConfig::Smtp(config), "gw").unwrap();
        let big = dotted_around(DATA_BUFFER, 2 * DATA_BUFFER + 100);
        let cases: [(&[&[u8]], &[u8]); 3] = [
            (&[b"Sig: 1\r\n", MSG], &[b"Sig: 1\r\n", MSG].concat()),
            (
                &[b"X: 1\r\n", b"\r\nno final CRLF"],
                b"X: 1\r\n\r\nno final CRLF\r\n",
            ),
            (&[b"", &big], &big),
        ];
        for (i, (parts, expected)) in cases.into_iter().enumerate() {
            let sent = relay.send("a@example.com", "b@example.com", parts).await;
            assert!(sent.is_ok(), "{sent:?}");
            let got = up.received.lock().unwrap()[i].clone();
            assert!(got.encrypted);
            assert!(
                got.data == expected,
                "case {i}: {:?}",
                String::from_utf8_lossy(&got.data)
            );
        }
        let refused = relay.send("a@example.com", "bad@example.com", &[MSG]).await;
        assert!(
            matches!(refused, Err(RelayError::Permanent { .. })),
            "{refused:?}"
        );
        let ok = relay.send("a@example.com", "c@example.com", &[MSG]).await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[tokio::test]
    async fn file_upstream_writes_the_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("out/box");
        let relay = Relay::new(
            &UpstreamConfig::File {
                path: outbox.clone(),
            },
            "gw",
        )
        .unwrap();
        let reply = relay.send("", "b@example.com", &[MSG]).await.unwrap();
        let files: Vec<_> = std::fs::read_dir(&outbox)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "no temp file left behind: {files:?}");
        assert_eq!(reply, format!("written to {}", files[0].display()));
        assert!(files[0].extension().is_some_and(|e| e == "eml"));
        assert_eq!(std::fs::read(&files[0]).unwrap(), MSG);
    }
}
