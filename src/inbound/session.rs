//! One SMTP connection: read a command line, parse it with smtp-proto, hand it to the
//! step that handles it, queue the reply; replies are flushed only before a wait.
//!
//! Flushing only when the input runs dry is what PIPELINING asks for: a client that
//! sends MAIL, RCPT×n and DATA in one packet gets every answer in one packet.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Inbound;
use super::reply::Reply;
use super::wire::{Input, Line, MAX_COMMAND_LINE, Stream, Wrapping};
use crate::address::Address;
use crate::spool::Admission;

/// Errors in a row (unknown commands, bad syntax, bad sequence) before we hang up.
const MAX_ERRORS_IN_A_ROW: u32 = 10;

/// What the client said in HELO/EHLO.
pub(super) struct Helo {
    pub name: String,
    /// EHLO rather than HELO.
    pub extended: bool,
}

/// A mail transaction: from MAIL to the end of data (or RSET).
pub(super) struct Transaction {
    /// The normalised reverse-path; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Address>,
    /// BDAT chunks received so far, once the first BDAT has come.
    pub chunks: Option<Chunks>,
}

#[derive(Default)]
pub(super) struct Chunks {
    pub body: Vec<u8>,
    /// Bytes announced so far, kept or not.
    pub size: usize,
}

/// What the session does after a command.
pub(super) enum Flow {
    Continue,
    /// Reply sent; flush it and close.
    Close,
    /// "220 Ready to start TLS" sent; do the handshake.
    StartTls,
}

/// Why the session has no command line to read.
pub(super) enum Next {
    Line(Vec<u8>),
    TooLong,
    Closed,
    Idle,
    Shutdown,
}

/// What a read waits for: a command (which shutdown may interrupt) or message data
/// (which it may not: a transaction in flight is finished first).
#[derive(Clone, Copy)]
pub(super) enum Wait {
    Command,
    Data,
}

pub(super) enum Filled {
    More,
    Closed,
    Idle,
    Shutdown,
}

pub(super) struct Session {
    pub inbound: Arc<Inbound>,
    pub stream: Stream,
    pub peer: SocketAddr,
    /// The peer is in `trusted_networks`: it may relay, and AUTH, without TLS.
    pub trusted: bool,
    pub input: Input,
    /// Replies queued since the last flush.
    out: Vec<u8>,
    tls: TlsAcceptor,
    shutdown: CancellationToken,
    pub helo: Option<Helo>,
    /// The account the client authenticated as.
    pub account: Option<String>,
    pub tx: Option<Transaction>,
    errors_in_a_row: u32,
    pub auth_failures: u32,
    /// Room in delivery's backlog (see `spool::intake`): waited for before the
    /// greeting and before each later MAIL, let go when that transaction ends.
    admission: Option<Admission>,
}

/// Serves one accepted connection to its end. I/O errors end it quietly: a client
/// going away is not our failure.
pub(super) async fn run(
    inbound: Arc<Inbound>,
    tcp: TcpStream,
    wrapping: Wrapping,
    peer: SocketAddr,
    tls: TlsAcceptor,
    shutdown: CancellationToken,
) {
    let trusted = inbound.config.is_trusted(peer.ip());
    tracing::debug!(peer = %peer.ip(), trusted, ?wrapping, "connection opened");
    let stream = match wrapping {
        Wrapping::Plain => Stream::Plain(tcp),
        // The greeting, like everything after it, goes over TLS.
        Wrapping::Implicit => match handshake(&tls, tcp, &inbound, peer).await {
            Some(tls) => Stream::Tls(Box::new(tls)),
            None => return,
        },
    };
    let mut session = Session {
        inbound,
        stream,
        peer,
        trusted,
        input: Input::default(),
        out: Vec::new(),
        tls,
        shutdown,
        helo: None,
        account: None,
        tx: None,
        errors_in_a_row: 0,
        auth_failures: 0,
        admission: None,
    };
    match session.serve().await {
        Ok(()) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), session.stream.shutdown()).await;
            tracing::debug!(peer = %peer.ip(), "connection closed");
        }
        Err(e) => tracing::debug!(peer = %peer.ip(), error = %e, "connection broken"),
    }
}

impl Session {
    async fn serve(&mut self) -> io::Result<()> {
        let intake = self.inbound.spool.intake().clone();
        tokio::select! {
            admission = intake.admit() => self.admission = Some(admission),
            _ = self.shutdown.cancelled() => {
                self.send(Reply::new(421, "4.3.2", "Service shutting down"));
                return self.flush().await;
            }
        }
        let greeting = self.greeting();
        self.send(greeting);
        loop {
            let flow = match self.next_line().await? {
                Next::Line(line) => {
                    let flow = self.command(&line).await?;
                    if self.tx.is_none() && self.admission.as_ref().is_some_and(Admission::begun) {
                        // The transaction it let in is over (queued, reset or refused).
                        self.admission = None;
                    }
                    flow
                }
                Next::TooLong => {
                    self.send(Reply::new(500, "5.5.2", "Line too long"));
                    Flow::Continue
                }
                other => self.hang_up(other),
            };
            match flow {
                Flow::Continue => {}
                Flow::Close => return self.flush().await,
                Flow::StartTls => {
                    if !self.start_tls().await? {
                        return Ok(());
                    }
                }
            }
            if self.errors_in_a_row >= MAX_ERRORS_IN_A_ROW {
                tracing::warn!(peer = %self.peer.ip(), "too many errors in a row; closing");
                self.send(Reply::new(
                    421,
                    "4.7.0",
                    "Too many errors, closing connection",
                ));
                return self.flush().await;
            }
        }
    }

    /// Parses one command line and runs it.
    async fn command(&mut self, line: &[u8]) -> io::Result<Flow> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => {
                self.send(parse_error(e));
                return Ok(Flow::Continue);
            }
        };
        let reply = match request {
            Request::Ehlo { host } => self.ehlo(&host, true),
            Request::Helo { host } => self.ehlo(&host, false),
            Request::StartTls => {
                if self.stream.is_tls() {
                    Reply::new(503, "5.5.1", "TLS already active")
                } else {
                    self.send(Reply::new(220, "2.0.0", "Ready to start TLS"));
                    return Ok(Flow::StartTls);
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, &initial_response).await,
            Request::Mail { from } => {
                if self.admission.is_none() {
                    // A later transaction on this connection waits for room too.
                    self.flush().await?;
                    let intake = self.inbound.spool.intake().clone();
                    tokio::select! {
                        admission = intake.admit() => self.admission = Some(admission),
                        _ = self.shutdown.cancelled() => return Ok(self.hang_up(Next::Shutdown)),
                    }
                }
                let reply = self.mail(&from, line);
                if self.tx.is_some()
                    && let Some(admission) = &mut self.admission
                {
                    admission.begin();
                }
                reply
            }
            Request::Rcpt { to } => self.rcpt(&to),
            Request::Data => return self.data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size, is_last).await,
            Request::Rset => {
                self.tx = None;
                Reply::new(250, "2.0.0", "Reset")
            }
            Request::Noop { .. } => Reply::new(250, "2.0.0", "OK"),
            Request::Quit => {
                self.send(Reply::new(221, "2.0.0", "Bye"));
                return Ok(Flow::Close);
            }
            Request::Vrfy { .. } => {
                Reply::new(252, "2.5.0", "Cannot VRFY user, but will accept message")
            }
            Request::Help { .. } => Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
            ),
            other => Reply::new(502, "5.5.1", format!("{} not implemented", other.name())),
        };
        self.send(reply);
        Ok(Flow::Continue)
    }

    /// Queues a reply, logs refusals, and counts the client's errors.
    pub(super) fn send(&mut self, reply: Reply) {
        if reply.code() >= 500 || reply.code() == 452 {
            tracing::warn!(peer = %self.peer.ip(), reply = %reply, "refused");
        }
        if reply.is_protocol_error() {
            self.errors_in_a_row += 1;
        } else if reply.code() < 400 {
            self.errors_in_a_row = 0;
        }
        self.out.extend_from_slice(reply.as_bytes());
    }

    /// Writes the queued replies.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let idle = self.inbound.config.smtp.idle_timeout;
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(idle, write).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client does not read its replies",
                ));
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Whether a BDAT transfer is under way: it is message data, so shutdown waits
    /// for it as it waits for DATA.
    fn in_data(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.chunks.is_some())
    }

    /// The next command line (or AUTH response), reading more if need be.
    pub(super) async fn next_line(&mut self) -> io::Result<Next> {
        let wait = if self.in_data() {
            Wait::Data
        } else {
            Wait::Command
        };
        loop {
            if matches!(wait, Wait::Command) && self.shutdown.is_cancelled() {
                return Ok(Next::Shutdown);
            }
            match self.input.next_line(MAX_COMMAND_LINE) {
                Some(Line::Complete(line)) => return Ok(Next::Line(line)),
                Some(Line::TooLong) => return Ok(Next::TooLong),
                None => {}
            }
            match self.fill(wait).await? {
                Filled::More => {}
                Filled::Closed => return Ok(Next::Closed),
                Filled::Idle => return Ok(Next::Idle),
                Filled::Shutdown => return Ok(Next::Shutdown),
            }
        }
    }

    /// Flushes the replies, then reads at least one more byte into the input.
    pub(super) async fn fill(&mut self, wait: Wait) -> io::Result<Filled> {
        self.flush().await?;
        let idle = self.inbound.config.smtp.idle_timeout;
        let read = tokio::time::timeout(idle, self.stream.read_buf(self.input.for_read()));
        let read = match wait {
            Wait::Data => read.await,
            Wait::Command => tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Filled::Shutdown),
                r = read => r,
            },
        };
        match read {
            Err(_) => Ok(Filled::Idle),
            Ok(Ok(0)) => Ok(Filled::Closed),
            Ok(Ok(_)) => Ok(Filled::More),
            Ok(Err(e)) => Err(e),
        }
    }

    /// The goodbye for a session that cannot go on; the caller flushes and closes.
    pub(super) fn hang_up(&mut self, why: Next) -> Flow {
        match why {
            Next::Idle => {
                tracing::debug!(peer = %self.peer.ip(), "idle timeout");
                self.send(Reply::new(421, "4.4.2", "Idle timeout, closing"));
            }
            Next::Shutdown => self.send(Reply::new(421, "4.3.2", "Service shutting down")),
            Next::Closed => tracing::debug!(peer = %self.peer.ip(), "client closed the connection"),
            Next::Line(_) | Next::TooLong => {}
        }
        Flow::Close
    }

    /// Upgrades to TLS after "220 Ready to start TLS". Anything the client sent
    /// before the handshake is dropped (a man in the middle could have injected it),
    /// and the session starts over: EHLO again, no AUTH, no transaction.
    /// Returns false if the handshake failed and the connection is gone.
    async fn start_tls(&mut self) -> io::Result<bool> {
        self.flush().await?;
        self.input.clear();
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            return Ok(false);
        };
        let Some(tls) = handshake(&self.tls, tcp, &self.inbound, self.peer).await else {
            return Ok(false);
        };
        self.stream = Stream::Tls(Box::new(tls));
        self.helo = None;
        self.account = None;
        self.tx = None;
        self.errors_in_a_row = 0;
        Ok(true)
    }
}

/// The server side of a TLS handshake, within the idle timeout; None (logged) if it
/// failed: the connection is then closed without a word, as there is no channel left.
async fn handshake(
    tls: &TlsAcceptor,
    tcp: TcpStream,
    inbound: &Inbound,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let idle = inbound.config.smtp.idle_timeout;
    match tokio::time::timeout(idle, tls.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer.ip(), error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %peer.ip(), "TLS handshake timed out");
            None
        }
    }
}

/// The reply to a line smtp-proto could not parse.
pub(super) fn parse_error(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::new(500, "5.5.1", "Command not recognized"),
        ParseError::InvalidSenderAddress => Reply::new(501, "5.1.7", "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, "5.1.3", "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid value for {param}"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        ParseError::ResponseTooLong => Reply::new(500, "5.5.2", "Line too long"),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            Reply::new(500, "5.5.2", "Syntax error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Reply {
        match Request::parse(&mut line.as_bytes().iter()) {
            Ok(r) => panic!("parsed: {r:?}"),
            Err(e) => parse_error(e),
        }
    }

    #[test]
    fn parse_errors_get_their_reply() {
        assert_eq!(
            parse("XYZZY\r\n").text(),
            "500 5.5.1 Command not recognized"
        );
        assert_eq!(parse("\r\n").text(), "500 5.5.1 Command not recognized");
        assert_eq!(
            parse("MAIL FROM:<a b@c>\r\n").text(),
            "501 5.1.7 Bad sender address syntax"
        );
        assert_eq!(
            parse("MAIL FROM:a@b\r\n").text(),
            "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]"
        );
        assert_eq!(
            parse("MAIL FROM:<a@b> FOO=bar\r\n").text(),
            "555 5.5.4 Unsupported parameter FOO=BAR"
        );
    }
}
