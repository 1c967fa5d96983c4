//! Content-Transfer-Encodings as optgate writes them: quoted-printable and base64 with
//! CRLF line breaks, within RFC 2045's limits (76 octets a line), and line checks.

/// RFC 2045: an encoded line is at most 76 octets, the soft-break `=` included.
const QP_LINE: usize = 76;
/// Decoded octets per base64 line: 57 octets make 76 characters.
pub(super) const B64_CHUNK: usize = 57;
/// RFC 5322: no line longer than this, the CRLF not counted.
pub(super) const MAX_LINE: usize = 998;

const HEX: &[u8; 16] = b"0123456789ABCDEF";
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Bytes written as themselves in quoted-printable (whitespace only where a
/// printable character follows it on the line).
const QP_LITERAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 33;
    while b <= 126 {
        t[b] = b != b'=' as usize;
        b += 1;
    }
    t[b' ' as usize] = true;
    t[b'\t' as usize] = true;
    t
};

/// Quoted-printable encoding of `text`, which starts at the beginning of a line.
/// A line break in the text (CRLF, or a lone LF) is written as a hard CRLF break;
/// whitespace before a break or at the very end is encoded, because transports may
/// strip it. Callers cut the text only after line breaks, so no state crosses calls.
pub(super) fn qp_encode(text: &[u8], out: &mut Vec<u8>) {
    out.reserve(text.len() + text.len() / 8 + 8);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', text) {
        let line = &text[start..end];
        qp_line(line.strip_suffix(b"\r").unwrap_or(line), out);
        out.extend_from_slice(b"\r\n");
        start = end + 1;
    }
    qp_line(&text[start..], out);
}

/// One line, without its break: runs of literal bytes are copied whole, soft breaks
/// keep every line within 76 octets and never split an `=XX`.
fn qp_line(line: &[u8], out: &mut Vec<u8>) {
    let n = line.len();
    let mut col = 0;
    let mut i = 0;
    while i < n {
        // Literal bytes that fit before a soft break would be needed, eight at a
        // time while they can be; the line's last byte is left to the check below,
        // as whitespace there is encoded.
        let stop = (n - 1).min(i + (QP_LINE - 1).saturating_sub(col));
        let mut j = i;
        while j + 8 <= stop && all_printable(&line[j..j + 8]) {
            j += 8;
        }
        while j < stop && QP_LITERAL[usize::from(line[j])] {
            j += 1;
        }
        out.extend_from_slice(&line[i..j]);
        col += j - i;
        i = j;
        let b = line[i];
        let last = i + 1 == n;
        let literal = QP_LITERAL[usize::from(b)] && !(last && matches!(b, b' ' | b'\t'));
        let width = if literal { 1 } else { 3 };
        // The last character of a line may use column 76; any other needs room for
        // the `=` of a soft break after it.
        let limit = if last { QP_LINE } else { QP_LINE - 1 };
        if col + width > limit {
            out.extend_from_slice(b"=\r\n");
            col = 0;
        }
        if literal {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
        col += width;
        i += 1;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Eight bytes as a word, or `None` past the end.
fn word(bytes: &[u8], at: usize) -> Option<u64> {
    let w: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// High bit set in the lowest byte of `w` that equals `b` (higher bytes may be
/// flagged wrongly, the lowest flagged one never is).
fn bytes_equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// All eight bytes are printable ASCII (space included) other than `=`: written as
/// themselves in quoted-printable anywhere but at the end of a line.
fn all_printable(bytes: &[u8]) -> bool {
    let Some(w) = word(bytes, 0) else {
        return false;
    };
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    // A byte of 0x7f or more, give or take a carry that only flags a byte too many.
    let above_tilde = (w.wrapping_add(ONES) | w) & HIGHS;
    (below_space | above_tilde | bytes_equal(w, b'=')) == 0
}

/// The first `=`, CR or LF in `hay`: what quoted-printable decoding stops at. Runs
/// between them are short (an escape every few bytes in HTML), too short for
/// memchr's setup to pay off, so a word at a time.
fn find_special(hay: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(w) = word(hay, at) {
        let hits = bytes_equal(w, b'=') | bytes_equal(w, b'\n') | bytes_equal(w, b'\r');
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    hay[at..]
        .iter()
        .position(|&b| matches!(b, b'=' | b'\n' | b'\r'))
        .map(|p| at + p)
}

/// A quoted-printable body decoded the way mail-parser 0.11 decodes one
/// (`MessageStream::decode_quoted_printable_mime`).
pub(super) struct QpDecoded {
    pub bytes: Vec<u8>,
    /// A CR was seen: mail-parser then ends every later hard line break with CRLF
    /// (and LF before it), whatever the break in the input was.
    pub crlf: bool,
}

/// Decodes quoted-printable exactly as mail-parser 0.11 does for a part's body, its
/// tolerance of malformed input included (an `=` before a character that is not a
/// hex digit is kept as text, a CR is dropped, an escape half-done at a line break
/// completes on the next line), but copies the runs between `=` and line breaks in
/// bulk where mail-parser goes a byte at a time. `None` where mail-parser gives up on
/// the part (an `=` inside an escape): its caller treats the part as damaged.
///
/// `data` ends where mail-parser's decoding would stop, the delimiter line not
/// included; the caller applies mail-parser's trimming at the delimiter.
pub(super) fn qp_decode(data: &[u8]) -> Option<QpDecoded> {
    #[derive(Clone, Copy)]
    enum State {
        Text,
        Equals,
        /// The first hex digit of an escape.
        Escape(u8),
    }
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(data.len());
    let mut crlf = false;
    // Bytes copied as they are since the last escape or line break: their trailing
    // whitespace is dropped at a hard line break.
    let mut copied_from = 0;
    let mut state = State::Text;
    let mut i = 0;
    while i < data.len() {
        let escape = match state {
            State::Text => {
                let run = find_special(&data[i..]).unwrap_or(data.len() - i);
                out.extend_from_slice(&data[i..i + run]);
                i += run;
                match data.get(i) {
                    None => break,
                    Some(b'=') => state = State::Equals,
                    Some(b'\n') => {
                        hard_break(&mut out, copied_from, crlf);
                        copied_from = out.len();
                    }
                    Some(_) => crlf = true,
                }
                i += 1;
                continue;
            }
            State::Equals => None,
            State::Escape(first) => Some(first),
        };
        let b = data[i];
        match (escape, b) {
            (_, b'=') => return None,
            (_, b'\r') => crlf = true,
            // A soft line break.
            (None, b'\n') => {
                state = State::Text;
                copied_from = out.len();
            }
            // mail-parser keeps the half escape across the break.
            (Some(_), b'\n') => {
                hard_break(&mut out, copied_from, crlf);
                copied_from = out.len();
            }
            (None, _) if hex(b).is_some() => state = State::Escape(b),
            (None, b' ' | b'\t' | 0x0c) => {}
            (None, _) => {
                out.extend_from_slice(&[b'=', b]);
                copied_from = out.len();
                state = State::Text;
            }
            (Some(first), _) => {
                match hex(first).zip(hex(b)) {
                    Some((hi, lo)) => out.push(hi << 4 | lo),
                    // What precedes `b` may be a CR or LF rather than `first`.
                    None => out.extend_from_slice(&[b'=', data[i - 1], b]),
                }
                copied_from = out.len();
                state = State::Text;
            }
        }
        i += 1;
    }
    Some(QpDecoded { bytes: out, crlf })
}

/// A hard line break while decoding: whitespace copied just before it goes.
fn hard_break(out: &mut Vec<u8>, copied_from: usize, crlf: bool) {
    let kept = out[copied_from..]
        .iter()
        .rposition(|&b| !matches!(b, b' ' | b'\t' | 0x0c))
        .map_or(copied_from, |p| copied_from + p + 1);
    out.truncate(kept);
    out.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
}

/// Base64 in lines of 76 characters separated by CRLF. `final_break` adds a CRLF
/// after the last line too, for output that more lines will follow.
pub(super) fn base64_encode(data: &[u8], final_break: bool, out: &mut Vec<u8>) {
    out.reserve(data.len() / 3 * 4 + data.len() / B64_CHUNK * 2 + 8);
    let mut lines = data.chunks(B64_CHUNK).peekable();
    while let Some(line) = lines.next() {
        for group in line.chunks(3) {
            let n = group.len();
            let b0 = group[0];
            let b1 = if n > 1 { group[1] } else { 0 };
            let b2 = if n > 2 { group[2] } else { 0 };
            out.push(B64[usize::from(b0 >> 2)]);
            out.push(B64[usize::from(((b0 & 0x03) << 4) | (b1 >> 4))]);
            out.push(if n > 1 {
                B64[usize::from(((b1 & 0x0f) << 2) | (b2 >> 6))]
            } else {
                b'='
            });
            out.push(if n > 2 {
                B64[usize::from(b2 & 0x3f)]
            } else {
                b'='
            });
        }
        if final_break || lines.peek().is_some() {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The length of the longest line of `bytes`, line breaks not counted.
pub(super) fn longest_line(bytes: &[u8]) -> usize {
    bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .max()
        .unwrap_or(0)
}

/// The length of the longest line that overlaps `range` in `buf`, looking no further
/// back than `floor`: the lines an insertion touched.
pub(super) fn longest_line_around(
    buf: &[u8],
    floor: usize,
    range: std::ops::Range<usize>,
) -> usize {
    let start = buf[floor..range.start]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(floor, |p| floor + p + 1);
    let end = buf[range.end..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |p| range.end + p);
    longest_line(&buf[start..end])
}

/// Makes a URL safe to put anywhere in a message: controls, spaces, quotes, angle
/// brackets and non-ASCII bytes are percent-encoded, so the URL is always 7-bit and
/// can never end a header field or an HTML attribute.
pub(super) fn clean_url(url: &str) -> std::borrow::Cow<'_, str> {
    let bad = |b: u8| b <= b' ' || b >= 0x7f || matches!(b, b'<' | b'>' | b'"' | b'\\' | b'`');
    if !url.bytes().any(bad) {
        return url.into();
    }
    let mut s = String::with_capacity(url.len() + 16);
    for b in url.bytes() {
        if bad(b) {
            s.push('%');
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        } else {
            s.push(char::from(b));
        }
    }
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp(s: &str) -> String {
        let mut out = Vec::new();
        qp_encode(s.as_bytes(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn qp_escapes_equals_controls_and_trailing_space() {
        assert_eq!(qp("a=b \r\nc\t\r\nd "), "a=3Db=20\r\nc=09\r\nd=20");
        assert_eq!(qp("\u{e9}t\u{e9}\n"), "=C3=A9t=C3=A9\r\n");
        assert_eq!(qp("x\ry"), "x=0Dy");
    }

    #[test]
    fn qp_lines_stay_within_76_and_never_split_an_escape() {
        let long = "\u{e9}".repeat(60) + &"a".repeat(200) + " " + &"=".repeat(40);
        let out = qp(&long);
        for line in out.split("\r\n") {
            assert!(line.len() <= 76, "{line:?}");
        }
        let exactly = "b".repeat(76);
        assert_eq!(qp(&exactly), exactly);
        assert_eq!(qp(&"b".repeat(77)), format!("{}=\r\nbb", "b".repeat(75)));
    }

    #[test]
    fn qp_round_trips_through_an_independent_decoder() {
        let alphabet: Vec<char> = "ab =\t.\u{e9}\u{20ac}\r\n%<>\"".chars().collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let mut s = String::new();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            // Line breaks as CRLF only, which is what message text holds.
            let s = s
                .replace("\r\n", "\n")
                .replace('\r', "")
                .replace('\n', "\r\n");
            let mut out = Vec::new();
            qp_encode(s.as_bytes(), &mut out);
            for line in out.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                assert!(line.len() <= 76);
                assert!(!matches!(line.last(), Some(b' ' | b'\t')));
                assert!(line.iter().all(|&b| (32..=126).contains(&b) || b == b'\t'));
            }
            let back = mail_parser::decoders::quoted_printable::quoted_printable_decode(&out);
            assert_eq!(back.as_deref(), Some(s.as_bytes()), "{s:?}");
        }
    }

    /// Random bytes rich in what quoted-printable treats specially.
    fn noise(seed: &mut u64, len: usize) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ab =\t.\r\n\n\x0c-3Dfg=\xc3\xa9\xff<>\"";
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                ALPHABET[(*seed % ALPHABET.len() as u64) as usize]
            })
            .collect()
    }

    /// The encoder as it was before it copied runs a word at a time: one decision a
    /// byte.
    fn qp_line_bytewise(line: &[u8], out: &mut Vec<u8>) {
        let n = line.len();
        let mut col = 0;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == n;
            let literal = QP_LITERAL[usize::from(b)] && !(last && matches!(b, b' ' | b'\t'));
            let width = if literal { 1 } else { 3 };
            if col + width > if last { QP_LINE } else { QP_LINE - 1 } {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            if literal {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            col += width;
        }
    }

    #[test]
    fn qp_encoding_a_word_at_a_time_matches_a_byte_at_a_time() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..600 {
            let mut line = noise(&mut seed, len);
            line.retain(|&b| b != b'\n');
            // Long printable stretches too, which the word-wise path takes.
            if len % 3 == 0 {
                line.splice(len / 2..len / 2, b"0123456789abcdefghij ".repeat(len % 7));
            }
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            qp_line(&line, &mut fast);
            qp_line_bytewise(&line, &mut slow);
            assert_eq!(fast, slow, "{:?}", String::from_utf8_lossy(&line));
        }
    }

    #[test]
    fn qp_decoding_matches_mail_parser_on_any_input() {
        use mail_parser::parsers::MessageStream;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut damaged = 0;
        for len in 0..3000 {
            let data = noise(&mut seed, len % 300);
            let (end, theirs) = MessageStream::new(&data).decode_quoted_printable_mime(b"");
            match qp_decode(&data) {
                Some(ours) => {
                    assert_ne!(end, usize::MAX, "{:?}", String::from_utf8_lossy(&data));
                    assert_eq!(
                        ours.bytes,
                        theirs.as_ref(),
                        "{:?}",
                        String::from_utf8_lossy(&data)
                    );
                    assert_eq!(ours.crlf, data.contains(&b'\r'));
                }
                None => {
                    assert_eq!(end, usize::MAX, "{:?}", String::from_utf8_lossy(&data));
                    damaged += 1;
                }
            }
        }
        // Both outcomes were exercised.
        assert!(damaged > 100 && damaged < 2900, "{damaged}");
    }

    /// Every short sequence of the pieces quoted-printable decoding tells apart (an
    /// escape in either case, soft breaks, `=` before a CR alone or at the very
    /// end, an escape split by a break, 8-bit bytes), after text that ends in the
    /// middle of a word and after text that fills words: mail-parser decodes them
    /// all the same.
    #[test]
    fn qp_decoding_matches_mail_parser_on_every_short_sequence() {
        use mail_parser::parsers::MessageStream;
        const PIECES: [&[u8]; 11] = [
            b"=", b"3", b"d", b"D", b"\r", b"\n", b" ", b"g", b"\xe9", b"=\r\n", b"=0a",
        ];
        let mut data = Vec::new();
        for prefix in [&b""[..], b"abc", b"0123456789abcde"] {
            for mut n in 0..PIECES.len().pow(4) {
                data.clear();
                data.extend_from_slice(prefix);
                for _ in 0..4 {
                    data.extend_from_slice(PIECES[n % PIECES.len()]);
                    n /= PIECES.len();
                }
                let (end, theirs) = MessageStream::new(&data).decode_quoted_printable_mime(b"");
                let ours = qp_decode(&data);
                let ours = ours.as_ref().map(|d| d.bytes.as_slice());
                let theirs = (end != usize::MAX).then_some(theirs.as_ref());
                assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&data));
            }
        }
    }

    #[test]
    fn qp_decoding_keeps_mail_parsers_tolerance() {
        let decode = |s: &str| {
            qp_decode(s.as_bytes()).map(|d| String::from_utf8_lossy(&d.bytes).into_owned())
        };
        assert_eq!(
            decode("caf=C3=a9 =\r\nau lait  \r\nx").as_deref(),
            Some("café au lait\r\nx")
        );
        // Not hex: kept as text. A lone `=` at the end: dropped.
        assert_eq!(decode("a=G1b=").as_deref(), Some("a=G1b"));
        assert_eq!(decode("a=4Gb").as_deref(), Some("a=4Gb"));
        // An escape split by a line break completes after it.
        assert_eq!(decode("=4\n1").as_deref(), Some("\nA"));
        assert_eq!(decode("a==b"), None);
        assert_eq!(decode("=4="), None);
    }

    #[test]
    fn base64_lines_are_76_and_decode_back() {
        use base64::Engine;
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut out = Vec::new();
        base64_encode(&data, false, &mut out);
        let text = String::from_utf8(out).unwrap_or_default();
        assert!(text.split("\r\n").all(|l| l.len() <= 76));
        assert!(!text.ends_with("\r\n"));
        let joined: String = text.split("\r\n").collect();
        let back = base64::engine::general_purpose::STANDARD.decode(joined);
        assert_eq!(back.ok(), Some(data));
    }

    #[test]
    fn urls_are_made_7bit() {
        assert_eq!(
            clean_url("https://a.example/u/x?y=1&z"),
            "https://a.example/u/x?y=1&z"
        );
        assert_eq!(
            clean_url("https://\u{e9}.example/a b>\r\n"),
            "https://%C3%A9.example/a%20b%3E%0D%0A"
        );
    }
}
