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
    let mut lines = text.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let more = lines.peek().is_some();
        let line = if more {
            line.strip_suffix(b"\r").unwrap_or(line)
        } else {
            line
        };
        qp_line(line, out);
        if more {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// One line, without its break: runs of literal bytes are copied whole, soft breaks
/// keep every line within 76 octets and never split an `=XX`.
fn qp_line(line: &[u8], out: &mut Vec<u8>) {
    let n = line.len();
    let trailing_space = matches!(line.last(), Some(b' ' | b'\t'));
    let mut col = 0;
    let mut i = 0;
    while i < n {
        // Literal bytes that fit before a soft break would be needed.
        let stop = n.min(i + (QP_LINE - 1).saturating_sub(col));
        let mut j = i;
        while j < stop && QP_LITERAL[usize::from(line[j])] {
            j += 1;
        }
        if j == n && trailing_space {
            j -= 1;
        }
        out.extend_from_slice(&line[i..j]);
        col += j - i;
        i = j;
        if i == n {
            break;
        }
        let b = line[i];
        let last = i + 1 == n;
        let literal = QP_LITERAL[usize::from(b)] && !(last && trailing_space);
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
