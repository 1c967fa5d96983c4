//! The byte work on a received message, with no I/O: reading DATA (strict end at
//! CRLF.CRLF, dot-unstuffing, size cap), CRLF normalisation, line length, `Received:`.

use memchr::memmem;

/// Reads a DATA body as RFC 5321 §4.1.1.4 sends it. The end is the sequence
/// CRLF "." CRLF and nothing else: bare LF or CR around a dot ("\n.\n", "\r.\r",
/// "\r\n.\n", "\r\n.\r\r\n"…) is content, so that a message can neither end early nor
/// be split in two by a sender and a receiver that disagree (SMTP smuggling).
///
/// The message is decoded where it was read, in the session's input buffer: the
/// bytes are copied once, from the socket, and only the stuffed dots move them
/// (see [`DotReader::feed`]).
///
/// smtp-proto's `DataReceiver` is not used here: it also ends at CRLF "." CR+ LF and,
/// started fresh, misses an end or a stuffed dot on the very first line.
pub(super) struct DotReader {
    state: State,
    /// How many bytes at the front of the buffer are decoded content.
    kept: usize,
    /// Bytes of content seen, kept or not.
    size: usize,
    max: usize,
    /// CRLF ".": the only place where the end or a stuffed dot can be.
    line_dot: memmem::Finder<'static>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: just after CRLF (or the CRLF that ended "DATA").
    LineStart,
    /// Inside a line.
    Text,
    /// Just after a CR that may begin a CRLF.
    Cr,
    /// After CRLF "." — the dot is never content.
    Dot,
    /// After CRLF "." CR — an LF now ends the message; anything else makes the CR content.
    DotCr,
}

impl DotReader {
    /// Keeps at most `max` bytes of content; past that it only looks for the end.
    pub fn new(max: usize) -> DotReader {
        DotReader {
            state: State::LineStart,
            kept: 0,
            size: 0,
            max,
            line_dot: memmem::Finder::new(b"\r\n."),
        }
    }

    /// Decodes the bytes read into `buf` since the last call. `buf` holds the message
    /// decoded so far, then the new bytes: these are decoded where they lie, content
    /// moving left over each stuffed dot, and `buf` is cut after the content for the
    /// next read to be appended. Once the end is seen, returns the message (`buf`'s
    /// own allocation) or `Err(size)` if it was over the limit, and leaves in `buf`
    /// what followed the end: the client's next commands.
    pub fn feed(&mut self, buf: &mut Vec<u8>) -> Option<Result<Vec<u8>, usize>> {
        // Content goes to `write`, the next byte to decode is at `read`. Each dot that
        // is dropped puts one byte between them; within one call the gap only grows.
        let mut write = self.kept;
        let mut read = self.kept;
        while read < buf.len() {
            if self.state == State::Text {
                // Most of a message: all up to the next CRLF "." is content.
                let rest = &buf[read..];
                let (len, next) = match self.line_dot.find(rest) {
                    Some(p) => (p + 2, State::Dot),
                    None if rest.ends_with(b"\r\n") => (rest.len(), State::LineStart),
                    None if rest.ends_with(b"\r") => (rest.len(), State::Cr),
                    None => (rest.len(), State::Text),
                };
                if write != read {
                    buf.copy_within(read..read + len, write);
                }
                write += len;
                // The dot, if one was found, is never content.
                read += if next == State::Dot { len + 1 } else { len };
                self.state = next;
                continue;
            }
            let b = buf[read];
            read += 1;
            self.state = match (self.state, b) {
                (State::LineStart, b'.') => State::Dot,
                (State::Dot, b'\r') => State::DotCr,
                (State::DotCr, b'\n') => {
                    self.size = self.size.saturating_add(write - self.kept);
                    return Some(self.end(buf, write, read));
                }
                (State::DotCr, _) => {
                    // The dropped dot was read in this same call (an undecided one is
                    // decoded again, see below): the CR and `b` fit in its place.
                    buf[write] = b'\r';
                    write += 1;
                    content(buf, &mut write, State::Cr, b)
                }
                (state, _) => content(buf, &mut write, state, b),
            };
        }
        self.size = self.size.saturating_add(write - self.kept);
        // A dot at a line start, or a dot and a CR, may yet be the end: they stay
        // in the buffer, to be decoded again from the line start with what follows.
        let undecided = match self.state {
            State::Dot => 1,
            State::DotCr => 2,
            _ => 0,
        };
        if undecided > 0 {
            self.state = State::LineStart;
        }
        let decided = buf.len() - undecided;
        if self.size > self.max {
            // Past the limit nothing is kept, and the buffer goes back to a read's size.
            *buf = buf[decided..].to_vec();
            self.kept = 0;
        } else {
            buf.drain(write..decided);
            self.kept = write;
        }
        None
    }

    /// The end was seen: the content is `buf[..write]`, the next commands `buf[read..]`.
    fn end(&self, buf: &mut Vec<u8>, write: usize, read: usize) -> Result<Vec<u8>, usize> {
        let next_commands = buf[read..].to_vec();
        let mut message = std::mem::replace(buf, next_commands);
        if self.size > self.max {
            return Err(self.size);
        }
        message.truncate(write);
        Ok(message)
    }
}

/// Writes one byte of content decoded one at a time, and says what state it leads to.
fn content(buf: &mut [u8], write: &mut usize, prev: State, b: u8) -> State {
    buf[*write] = b;
    *write += 1;
    match (prev, b) {
        (State::Cr, b'\n') => State::LineStart,
        (_, b'\r') => State::Cr,
        _ => State::Text,
    }
}

/// A message with CRLF line endings throughout.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Normalized {
    pub message: Vec<u8>,
    /// The length of its longest line in octets, CRLF excluded.
    pub longest_line: usize,
}

/// Every bare LF and bare CR becomes CRLF, and a non-empty message ends with CRLF,
/// so that what is queued and relayed has one kind of line ending throughout.
/// Nearly every message has CRLF only already: it is then checked and kept, not copied.
pub(super) fn normalize_line_endings(mut message: Vec<u8>) -> Normalized {
    let Some(longest_line) = crlf_longest_line(&message) else {
        return rewrite_line_endings(&message);
    };
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        message.extend_from_slice(b"\r\n");
    }
    Normalized {
        message,
        longest_line,
    }
}

/// The longest line of a message whose line endings are all CRLF (the last line
/// may have none), or None if one is a bare LF or a bare CR.
fn crlf_longest_line(message: &[u8]) -> Option<usize> {
    let mut longest = 0;
    let mut line_start = 0;
    let mut crlfs = 0;
    for lf in memchr::memchr_iter(b'\n', message) {
        if lf == 0 || message[lf - 1] != b'\r' {
            return None;
        }
        longest = longest.max(lf - 1 - line_start);
        line_start = lf + 1;
        crlfs += 1;
    }
    // Every CR is one of those CRLFs, or there is a bare one.
    if memchr::memchr_iter(b'\r', message).count() != crlfs {
        return None;
    }
    Some(longest.max(message.len() - line_start))
}

/// The normalised copy of a message that has bare line endings.
fn rewrite_line_endings(input: &[u8]) -> Normalized {
    let mut out = Vec::with_capacity(input.len() + input.len() / 64 + 2);
    let mut longest_line = 0;
    let mut rest = input;
    while let Some(pos) = memchr::memchr2(b'\r', b'\n', rest) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(b"\r\n");
        longest_line = longest_line.max(pos);
        let skip = if rest[pos..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        rest = &rest[pos + skip..];
    }
    if !rest.is_empty() {
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
        longest_line = longest_line.max(rest.len());
    }
    Normalized {
        message: out,
        longest_line,
    }
}

/// What the `Received:` header records about one submission.
pub(super) struct Trace<'a> {
    /// The name the client gave in HELO/EHLO.
    pub helo: &'a str,
    pub ip: std::net::IpAddr,
    pub hostname: &'a str,
    pub protocol: &'static str,
    pub queue_id: &'a str,
    /// Named only when the message has exactly one recipient, as is customary: a
    /// list of recipients in a header would disclose them to each other.
    pub recipient: Option<&'a str>,
    /// RFC 5322 date.
    pub date: &'a str,
}

/// The `Received:` header (RFC 5321 §4.4), folded, CRLF-terminated.
pub(super) fn received_header(t: &Trace<'_>) -> String {
    let helo = sanitize_helo(t.helo);
    let mut h = format!(
        "Received: from {helo} ({ip})\r\n\tby {host} (optgate) with {proto} id {id}",
        ip = t.ip.to_canonical(),
        host = t.hostname,
        proto = t.protocol,
        id = t.queue_id,
    );
    match t.recipient {
        Some(r) => h.push_str(&format!("\r\n\tfor <{r}>; {}\r\n", t.date)),
        None => h.push_str(&format!(";\r\n\t{}\r\n", t.date)),
    }
    h
}

/// The RFC 3848 name of how the message came: SMTP, ESMTP, +S for TLS, +A for AUTH.
pub(super) fn protocol(esmtp: bool, tls: bool, authenticated: bool) -> &'static str {
    match (esmtp, tls, authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, false, true) => "ESMTPA",
        (true, true, false) => "ESMTPS",
        (true, true, true) => "ESMTPSA",
    }
}

/// The HELO name is the peer's to choose: only the characters of a domain or an
/// address literal reach a header.
fn sanitize_helo(helo: &str) -> String {
    let clean: String = helo
        .chars()
        .take(255)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']') {
                c
            } else {
                '?'
            }
        })
        .collect();
    if clean.is_empty() {
        "unknown".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `chunks` one after another to a buffer, as reads do, feeding the
    /// reader after each; returns the body and the unused tail.
    fn read(chunks: &[&[u8]]) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut r = DotReader::new(1 << 20);
        let mut buf = Vec::new();
        for (k, chunk) in chunks.iter().enumerate() {
            buf.extend_from_slice(chunk);
            if let Some(body) = r.feed(&mut buf) {
                for later in &chunks[k + 1..] {
                    buf.extend_from_slice(later);
                }
                return Some((body.unwrap(), buf));
            }
        }
        None
    }

    fn whole(data: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        read(&[data])
    }

    #[test]
    fn ends_at_crlf_dot_crlf_and_unstuffs() {
        assert_eq!(
            whole(b"a\r\n..b\r\n.c\r\n.\r\nQUIT\r\n"),
            Some((b"a\r\n.b\r\nc\r\n".to_vec(), b"QUIT\r\n".to_vec()))
        );
        // The first line starts right after the CRLF of "DATA".
        assert_eq!(whole(b".\r\n"), Some((Vec::new(), Vec::new())));
        assert_eq!(
            whole(b"..x\r\n.\r\n"),
            Some((b".x\r\n".to_vec(), Vec::new()))
        );
    }

    #[test]
    fn smuggling_sequences_neither_end_nor_split_a_message() {
        let smuggled =
            b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n";
        for fake_end in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r",
            b"\r.\r\n",
            b"\r\n.\r\r\n",
            b"\r\n.\r\r\r\n",
            b"\n.\r",
        ] {
            let mut data = b"Subject: hi\r\n\r\nbody".to_vec();
            data.extend_from_slice(fake_end);
            data.extend_from_slice(smuggled);
            data.extend_from_slice(b".\r\nQUIT\r\n");
            let (body, tail) =
                whole(&data).unwrap_or_else(|| panic!("no end found for {fake_end:?}"));
            assert_eq!(tail, b"QUIT\r\n", "ended early for {fake_end:?}");
            assert!(body.ends_with(b"forged\r\n"), "split for {fake_end:?}");
            assert!(body.windows(smuggled.len()).any(|w| w == smuggled));

            // Same, one byte at a time: the state survives every chunk boundary.
            let bytes: Vec<&[u8]> = data.chunks(1).collect();
            let (body1, tail1) = read(&bytes).unwrap();
            assert_eq!((body1, tail1), (body, tail.clone()));
        }
    }

    #[test]
    fn smtp_proto_receiver_is_not_strict_enough() {
        // Why DotReader exists: smtp-proto 0.2.5 ends here, at CRLF "." CR CR LF.
        use smtp_proto::request::receiver::DataReceiver;
        let mut r = DataReceiver::new();
        let mut buf = Vec::new();
        let data = b"a\r\n.\r\r\nMAIL FROM:<x@y>\r\n\r\n.\r\n";
        let ended = r.ingest(&mut data.iter(), &mut buf);
        assert!(ended, "if smtp-proto became strict, DotReader could go");
        assert!(whole(data).unwrap().0.ends_with(b"MAIL FROM:<x@y>\r\n\r\n"));
    }

    #[test]
    fn every_split_of_the_stream_reads_the_same() {
        // Stuffed dots on the first line, in the middle and on the last line, a CR
        // and a dot that are content, and the end: cut in two at every place, so
        // that a CRLF, a CRLF ".", a stuffed dot or the end straddles two reads.
        let data = b"..a\r\nb\r\r\n..c.\r\n.\r\r\n.d\r.\r\n..\r\n.\r\nQUIT\r\n";
        let expected = (
            b".a\r\nb\r\r\n.c.\r\n\r\r\nd\r.\r\n.\r\n".to_vec(),
            b"QUIT\r\n".to_vec(),
        );
        assert_eq!(whole(data), Some(expected.clone()));
        for cut in 0..=data.len() {
            let (a, b) = data.split_at(cut);
            assert_eq!(read(&[a, b]), Some(expected.clone()), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(read(&bytes), Some(expected));
    }

    #[test]
    fn a_dot_and_cr_left_undecided_by_one_read_are_content_after_the_next() {
        let mut r = DotReader::new(100);
        let mut buf = b"a\r\n.\r".to_vec();
        assert_eq!(r.feed(&mut buf), None);
        // The dot and the CR wait, after what is decoded.
        assert_eq!(buf, b"a\r\n.\r");
        buf.extend_from_slice(b"x\r\n.\r\n");
        assert_eq!(r.feed(&mut buf), Some(Ok(b"a\r\n\rx\r\n".to_vec())));
        assert_eq!(buf, b"");
    }

    #[test]
    fn over_the_limit_it_keeps_reading_to_the_end() {
        let mut r = DotReader::new(10);
        let mut buf = b"0123456789abcdef\r\n".to_vec();
        assert_eq!(r.feed(&mut buf), None);
        // Nothing is kept past the limit.
        assert_eq!(buf, b"");
        buf.extend_from_slice(b"more\r\n.");
        assert_eq!(r.feed(&mut buf), None);
        assert_eq!(buf, b".");
        buf.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(r.feed(&mut buf), Some(Err(24)));
        assert_eq!(buf, b"NOOP\r\n");

        let mut r = DotReader::new(10);
        let mut buf = b"01234567\r\n.\r\n".to_vec();
        assert_eq!(r.feed(&mut buf), Some(Ok(b"01234567\r\n".to_vec())));
        assert_eq!(buf, b"");
    }

    fn normalized(message: &[u8]) -> Vec<u8> {
        normalize_line_endings(message.to_vec()).message
    }

    #[test]
    fn bare_line_endings_become_crlf() {
        assert_eq!(normalized(b"a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(normalized(b"\r\r\n\n\r"), b"\r\n\r\n\r\n\r\n");
        assert_eq!(normalized(b"x\r\n"), b"x\r\n");
        assert_eq!(normalized(b"x\r\ny"), b"x\r\ny\r\n");
        assert_eq!(normalized(b"x\r\ny\r"), b"x\r\ny\r\n");
        assert_eq!(normalized(b"\n"), b"\r\n");
        assert_eq!(normalized(b""), b"");
    }

    #[test]
    fn line_length_excludes_the_crlf() {
        let longest = |m: &[u8]| normalize_line_endings(m.to_vec()).longest_line;
        assert_eq!(longest(&[&[b'x'; 998][..], b"\r\nshort\r\n"].concat()), 998);
        assert_eq!(longest(&[&b"short\n"[..], &[b'x'; 999][..]].concat()), 999);
        assert_eq!(longest(&[&b"ab\r\n"[..], &[b'x'; 7][..]].concat()), 7);
        assert_eq!(longest(b"abc\rde\r\n"), 3);
        assert_eq!(longest(b""), 0);
    }

    #[test]
    fn the_crlf_check_and_the_rewrite_agree() {
        // Messages with CRLF only take the path without a copy; the rewrite must
        // find the same lines in them.
        for message in [
            &b""[..],
            b"\r\n",
            b"\r\n\r\n",
            b"a",
            b"ab\r\nc",
            b"a\r\n\r\nbcd\r\n",
            b"Subject: x\r\n\r\nlonger line\r\n.\r\n",
        ] {
            let lines = rewrite_line_endings(message);
            assert_eq!(crlf_longest_line(message), Some(lines.longest_line));
            assert_eq!(normalize_line_endings(message.to_vec()), lines);
        }
        for bare in [
            &b"\n"[..],
            b"\r",
            b"a\nb",
            b"a\rb\r\n",
            b"a\r\n\n",
            b"a\r\r\n",
        ] {
            assert_eq!(crlf_longest_line(bare), None, "{bare:?}");
        }
    }

    #[test]
    fn received_header_names_the_path() {
        let t = Trace {
            helo: "mailer.example",
            ip: "::ffff:192.0.2.7".parse().unwrap(),
            hostname: "gw.example",
            protocol: protocol(true, true, true),
            queue_id: "ABC123",
            recipient: Some("a@b.example"),
            date: "Sun, 29 Nov 2026 13:24:19 +0000",
        };
        assert_eq!(
            received_header(&t),
            "Received: from mailer.example (192.0.2.7)\r\n\tby gw.example (optgate) with ESMTPSA id ABC123\r\n\tfor <a@b.example>; Sun, 29 Nov 2026 13:24:19 +0000\r\n"
        );
        let t = Trace {
            helo: "evil\r\nX-Injected: 1",
            recipient: None,
            protocol: protocol(false, false, false),
            ..t
        };
        assert_eq!(
            received_header(&t),
            "Received: from evil??X-Injected:?1 (192.0.2.7)\r\n\tby gw.example (optgate) with SMTP id ABC123;\r\n\tSun, 29 Nov 2026 13:24:19 +0000\r\n"
        );
    }
}
