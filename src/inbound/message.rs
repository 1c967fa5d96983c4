//! The byte work on a received message, with no I/O: reading DATA (strict end at
//! CRLF.CRLF, dot-unstuffing, size cap), CRLF normalisation, line length, `Received:`.

/// Reads a DATA body as RFC 5321 §4.1.1.4 sends it. The end is the sequence
/// CRLF "." CRLF and nothing else: bare LF or CR around a dot ("\n.\n", "\r.\r",
/// "\r\n.\n", "\r\n.\r\r\n"…) is content, so that a message can neither end early nor
/// be split in two by a sender and a receiver that disagree (SMTP smuggling).
///
/// smtp-proto's `DataReceiver` is not used here: it also ends at CRLF "." CR+ LF and,
/// started fresh, misses an end or a stuffed dot on the very first line.
pub(super) struct DotReader {
    state: State,
    body: Vec<u8>,
    /// Bytes of content seen, kept or not.
    size: usize,
    max: usize,
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
            body: Vec::new(),
            size: 0,
            max,
        }
    }

    /// Feeds received bytes. Once the end is seen, returns how many bytes of `input`
    /// belonged to the message; the rest is the client's next command.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Text {
                // Most of a message: copy up to the next CR in one go.
                let rest = &input[i..];
                match rest.iter().position(|&b| b == b'\r') {
                    Some(p) => {
                        self.keep(&rest[..=p]);
                        self.state = State::Cr;
                        i += p + 1;
                    }
                    None => {
                        self.keep(rest);
                        i = input.len();
                    }
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (State::LineStart, b'.') => State::Dot,
                (State::Dot, b'\r') => State::DotCr,
                (State::DotCr, b'\n') => return Some(i),
                (State::DotCr, _) => {
                    self.keep(b"\r");
                    self.content(State::Cr, b)
                }
                (state, _) => self.content(state, b),
            };
        }
        None
    }

    /// The message, or `Err(size)` if it was over the limit.
    pub fn finish(self) -> Result<Vec<u8>, usize> {
        if self.size > self.max {
            Err(self.size)
        } else {
            Ok(self.body)
        }
    }

    fn content(&mut self, prev: State, b: u8) -> State {
        self.keep(&[b]);
        match (prev, b) {
            (State::Cr, b'\n') => State::LineStart,
            (_, b'\r') => State::Cr,
            _ => State::Text,
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len());
        if self.size <= self.max {
            self.body.extend_from_slice(bytes);
        } else if !self.body.is_empty() {
            self.body = Vec::new();
        }
    }
}

/// Every bare LF and bare CR becomes CRLF, and a non-empty message ends with CRLF,
/// so that what is queued and relayed has one kind of line ending throughout.
pub(super) fn normalize_line_endings(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 64 + 2);
    let mut rest = input;
    while let Some(pos) = rest.iter().position(|&b| b == b'\r' || b == b'\n') {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(b"\r\n");
        let skip = if rest[pos] == b'\r' && rest.get(pos + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[pos + skip..];
    }
    out.extend_from_slice(rest);
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Whether a line of a normalised message is longer than `max` octets, CRLF excluded.
pub(super) fn has_long_line(message: &[u8], max: usize) -> bool {
    message
        .split(|&b| b == b'\n')
        .any(|line| line.strip_suffix(b"\r").unwrap_or(line).len() > max)
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

    /// Feeds `chunks` one after another; returns the body and the unused tail.
    fn read(chunks: &[&[u8]]) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut r = DotReader::new(1 << 20);
        for (k, chunk) in chunks.iter().enumerate() {
            if let Some(n) = r.feed(chunk) {
                let mut tail = chunk[n..].to_vec();
                for later in &chunks[k + 1..] {
                    tail.extend_from_slice(later);
                }
                return Some((r.finish().unwrap(), tail));
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
    fn over_the_limit_it_keeps_reading_to_the_end() {
        let mut r = DotReader::new(10);
        assert_eq!(r.feed(b"0123456789abcdef\r\n"), None);
        assert_eq!(r.feed(b"more\r\n.\r\nNOOP\r\n"), Some(9));
        assert_eq!(r.finish(), Err(24));

        let mut r = DotReader::new(10);
        assert_eq!(r.feed(b"01234567\r\n.\r\n"), Some(13));
        assert_eq!(r.finish(), Ok(b"01234567\r\n".to_vec()));
    }

    #[test]
    fn bare_line_endings_become_crlf() {
        assert_eq!(
            normalize_line_endings(b"a\nb\rc\r\nd"),
            b"a\r\nb\r\nc\r\nd\r\n"
        );
        assert_eq!(normalize_line_endings(b"\r\r\n\n\r"), b"\r\n\r\n\r\n\r\n");
        assert_eq!(normalize_line_endings(b"x\r\n"), b"x\r\n");
        assert_eq!(normalize_line_endings(b""), b"");
    }

    #[test]
    fn line_length_excludes_the_crlf() {
        let ok = normalize_line_endings(&[&[b'x'; 998][..], b"\r\nshort\r\n"].concat());
        assert!(!has_long_line(&ok, 998));
        let long = normalize_line_endings(&[&b"short\n"[..], &[b'x'; 999][..]].concat());
        assert!(has_long_line(&long, 998));
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
