//! The connection's bytes: the stream (plain TCP, or TLS after STARTTLS) and the input
//! received but not yet used, cut into command lines with a length limit.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Longest command line accepted, LF included. RFC 5321 asks for 512; AUTH PLAIN
/// with a long password and the ESMTP parameters need more.
pub(super) const MAX_COMMAND_LINE: usize = 4096;

/// How much room each read is given (kept small: every idle session holds one).
const READ_CHUNK: usize = 16 * 1024;

/// How much room each read of message data is given, so that a message arrives in a
/// few large reads. Only a session reading DATA holds it.
const MESSAGE_READ_CHUNK: usize = 64 * 1024;

/// How a listener's connections begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wrapping {
    /// In clear, STARTTLS offered (ports 25, 587, 2525).
    Plain,
    /// TLS from the first byte, before the greeting (RFC 8314, port 465).
    Implicit,
}

/// The peer's connection, before or after STARTTLS.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is handed to the TLS handshake.
    Upgrading,
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

fn upgrading() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream is being upgraded to TLS",
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// One command line taken from the input.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// The line, LF (and CR) included: smtp-proto parses it whole.
    Complete(Vec<u8>),
    /// A line over the limit. Reported once; its bytes are dropped up to its LF, so
    /// that its tail is never read as a command.
    TooLong,
}

/// Bytes received and not yet used.
#[derive(Default)]
pub(super) struct Input {
    buf: Vec<u8>,
    /// Dropping the rest of a line that was too long.
    skipping: bool,
}

impl Input {
    /// The buffer to read into, with room for one more read.
    pub fn for_read(&mut self) -> &mut Vec<u8> {
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// The buffer that DATA is decoded in, where it was read (see `DotReader::feed`),
    /// so that the message's bytes are copied once, from the socket.
    pub fn message(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Makes room for a large read: the rest of a message is coming. The buffer grows
    /// only when less than a command read's room is left, as growing copies what it
    /// holds; and only once the message is known to go on, for the same reason.
    pub fn expect_message(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK {
            self.buf.reserve(MESSAGE_READ_CHUNK);
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Marks the first `n` bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
    }

    /// Forgets everything received so far (what a client pipelined after STARTTLS, or
    /// a message cut short).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }

    /// The next complete line, if there is one in the buffer.
    pub fn next_line(&mut self, max: usize) -> Option<Line> {
        loop {
            let newline = memchr::memchr(b'\n', &self.buf);
            if self.skipping {
                match newline {
                    Some(pos) => {
                        self.consume(pos + 1);
                        self.skipping = false;
                        continue;
                    }
                    None => {
                        self.buf.clear();
                        return None;
                    }
                }
            }
            return match newline {
                Some(pos) if pos < max => {
                    let line = self.buf[..=pos].to_vec();
                    self.consume(pos + 1);
                    Some(Line::Complete(line))
                }
                Some(pos) => {
                    self.consume(pos + 1);
                    Some(Line::TooLong)
                }
                None if self.buf.len() >= max => {
                    self.buf.clear();
                    self.skipping = true;
                    Some(Line::TooLong)
                }
                None => None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(bytes: &[u8]) -> Input {
        let mut i = Input::default();
        i.for_read().extend_from_slice(bytes);
        i
    }

    #[test]
    fn cuts_lines_and_keeps_the_partial_one() {
        let mut i = input(b"NOOP\r\nRSET\nQU");
        assert_eq!(i.next_line(100), Some(Line::Complete(b"NOOP\r\n".to_vec())));
        assert_eq!(i.next_line(100), Some(Line::Complete(b"RSET\n".to_vec())));
        assert_eq!(i.next_line(100), None);
        i.for_read().extend_from_slice(b"IT\r\n");
        assert_eq!(i.next_line(100), Some(Line::Complete(b"QUIT\r\n".to_vec())));
    }

    #[test]
    fn message_reads_get_room_and_the_buffer_grows_only_when_short_of_it() {
        let room = |i: &mut Input| i.message().capacity() - i.message().len();
        let mut i = Input::default();
        i.expect_message();
        assert!(room(&mut i) >= MESSAGE_READ_CHUNK);
        // A command read's room is still enough: no growing, which would copy.
        let cap = i.message().capacity();
        i.message().resize(cap - READ_CHUNK, b'x');
        i.expect_message();
        assert_eq!(i.message().capacity(), cap);
        i.message().push(b'x');
        i.expect_message();
        assert!(room(&mut i) >= MESSAGE_READ_CHUNK);
    }

    #[test]
    fn a_long_line_is_reported_once_and_its_tail_never_runs() {
        let mut i = input(&[b'x'; 20]);
        assert_eq!(i.next_line(10), Some(Line::TooLong));
        assert_eq!(i.next_line(10), None);
        // The tail arrives later and contains something that looks like a command.
        i.for_read().extend_from_slice(b"xxx QUIT\r\nNOOP\r\n");
        assert_eq!(i.next_line(10), Some(Line::Complete(b"NOOP\r\n".to_vec())));

        let mut i = input(b"0123456789abc\r\nNOOP\r\n");
        assert_eq!(i.next_line(10), Some(Line::TooLong));
        assert_eq!(i.next_line(10), Some(Line::Complete(b"NOOP\r\n".to_vec())));
    }
}
