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

/// Written as itself in quoted-printable (whitespace only where a printable
/// character follows it on the line): printable ASCII but `=`, space and tab. In
/// comparisons rather than a table, so that [`Flagged`] can test 16 bytes at once.
fn qp_literal_byte(b: u8) -> bool {
    (b' '..=b'~').contains(&b) && b != b'=' || b == b'\t'
}

/// Quoted-printable encoding of `text`, which starts at the beginning of a line.
/// A line break in the text (CRLF, or a lone LF) is written as a hard CRLF break;
/// whitespace before a break or at the very end is encoded, because transports may
/// strip it. Soft breaks keep every line within 76 octets and never split an `=XX`.
/// Callers cut the text only after line breaks, so no state crosses calls.
///
/// The bytes to escape and the line breaks are found 64 at a time (see [`Flagged`])
/// and the literal runs between them copied whole.
pub(super) fn qp_encode(text: &[u8], out: &mut Vec<u8>) {
    // An escape every ~20 bytes of accented text makes it 10% longer, an escaped
    // UTF-8 sequence three times as long.
    let mut w = Writer::new(std::mem::take(out), text.len() + text.len() / 4);
    let mut col = 0;
    // Where the text not encoded yet starts.
    let mut i = 0;
    let mut special = Flagged::new(text, |b| !qp_literal_byte(b));
    while let Some(p) = special.next_from(i) {
        let b = text[p];
        let rest = &text[p + 1..];
        if b == b'\n' || (b == b'\r' && rest.first() == Some(&b'\n')) {
            qp_line_end(&mut w, &mut col, &text[i..], p - i);
            w.put(b"\r\n");
            col = 0;
            i = p + 1 + usize::from(b == b'\r');
            continue;
        }
        qp_literal(&mut w, &mut col, &text[i..], p - i);
        // The last character of a line may use column 76; any other needs room for
        // the `=` of a soft break after it.
        if col + 3 > QP_LINE - 1
            && !(col + 3 == QP_LINE && matches!(rest, [] | [b'\n', ..] | [b'\r', b'\n', ..]))
        {
            w.put(b"=\r\n");
            col = 0;
        }
        w.put(&escaped(b));
        col += 3;
        i = p + 1;
    }
    qp_line_end(&mut w, &mut col, &text[i..], text.len() - i);
    *out = w.finish();
}

/// The first `run` bytes of `text`, written as themselves from column `col`, none of
/// them last on its line.
#[inline(always)]
fn qp_literal(w: &mut Writer, col: &mut usize, mut text: &[u8], mut run: usize) {
    while *col + run > QP_LINE - 1 {
        let fits = QP_LINE - 1 - *col;
        w.copy(text, fits);
        w.put(b"=\r\n");
        *col = 0;
        text = &text[fits..];
        run -= fits;
    }
    w.copy(text, run);
    *col += run;
}

/// The first `run` bytes of `text`, written as themselves from column `col` but the
/// last, which ends its line: there, whitespace is encoded (transports may strip it)
/// and column 76 may be used.
fn qp_line_end(w: &mut Writer, col: &mut usize, text: &[u8], run: usize) {
    let Some(last) = run.checked_sub(1).map(|k| text[k]) else {
        return;
    };
    qp_literal(w, col, text, run - 1);
    let literal = !matches!(last, b' ' | b'\t');
    let width = if literal { 1 } else { 3 };
    if *col + width > QP_LINE {
        w.put(b"=\r\n");
        *col = 0;
    }
    if literal {
        w.put(&[last]);
    } else {
        w.put(&escaped(last));
    }
    *col += width;
}

/// `b` as a quoted-printable escape.
fn escaped(b: u8) -> [u8; 3] {
    [b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]
}

/// The positions of the bytes of `data` that `flag` flags, in order, found 64 bytes
/// at a time as a bit mask (the compiler makes the mask's loop a few vector
/// compares). Where the next special byte is then comes from the mask, not from a
/// scan that starts where the work at the last one ended: the work at one special
/// byte (every ~20 bytes in accented HTML) overlaps the search for the next instead
/// of waiting for it. The coders before scanned a word at a time from the last
/// special byte and were bound by that chain: one with a quarter fewer instructions
/// ran slower.
struct Flagged<'a, F> {
    data: &'a [u8],
    flag: F,
    /// Where the block of `mask` starts.
    base: usize,
    /// The flagged bytes of the block not returned yet.
    mask: u64,
}

impl<'a, F: Fn(u8) -> bool> Flagged<'a, F> {
    fn new(data: &'a [u8], flag: F) -> Self {
        let mut f = Flagged {
            data,
            flag,
            base: 0,
            mask: 0,
        };
        f.mask = f.block_mask();
        f
    }

    /// The next flagged position at or after `from`: the ones before it were taken
    /// with what came before (the LF of a CRLF, mostly). They are skipped one by
    /// one rather than masked off: a mask that depends on `from` would make finding
    /// the next position wait on the work at this one, the very chain this is here
    /// to break (measured: 1.3x slower).
    #[inline(always)]
    fn next_from(&mut self, from: usize) -> Option<usize> {
        loop {
            while self.mask == 0 {
                self.base += 64;
                if self.base >= self.data.len() {
                    return None;
                }
                self.mask = self.block_mask();
            }
            let at = self.base + self.mask.trailing_zeros() as usize;
            self.mask &= self.mask - 1;
            if at >= from {
                return Some(at);
            }
        }
    }

    /// The flagged bytes of the block at `base`; a short last block is padded.
    #[inline(always)]
    fn block_mask(&self) -> u64 {
        let rest = &self.data[self.base.min(self.data.len())..];
        match rest.first_chunk::<64>() {
            Some(block) => self.mask64(block),
            None => {
                let mut block = [0; 64];
                block[..rest.len()].copy_from_slice(rest);
                self.mask64(&block) & ((1 << rest.len()) - 1)
            }
        }
    }

    /// Bit k set where `block[k]` is flagged: one byte per flag, eight flag bytes
    /// gathered into eight bits by one multiplication (flag byte k, 0 or 1, lands
    /// on bit 56 + k; no two products meet).
    #[inline(always)]
    fn mask64(&self, block: &[u8; 64]) -> u64 {
        let flags: [u8; 64] = std::array::from_fn(|k| u8::from((self.flag)(block[k])));
        flags
            .chunks_exact(8)
            .enumerate()
            .fold(0, |mask, (k, eight)| {
                let eight = u64::from_le_bytes(eight.try_into().unwrap_or_default());
                mask | (eight.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * k)
            })
    }
}

/// Each byte's value as a hex digit, in either case as mail-parser reads them
/// (`char::to_digit(16)`), or [`NOT_HEX`].
const HEX_VALUE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut d = 0;
    while d < 16 {
        t[HEX[d] as usize] = d as u8;
        t[HEX[d].to_ascii_lowercase() as usize] = d as u8;
        d += 1;
    }
    t
};
const NOT_HEX: u8 = 0xff;

fn hex_value(b: u8) -> Option<u8> {
    Some(HEX_VALUE[usize::from(b)]).filter(|&v| v != NOT_HEX)
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
/// completes on the next line), but copies the runs between `=` and line breaks
/// whole and takes well-formed escapes and line breaks in one step, where
/// mail-parser goes a byte at a time. `None` where mail-parser gives up on the part
/// (an `=` inside an escape): its caller treats the part as damaged.
///
/// `data` ends where mail-parser's decoding would stop, the delimiter line not
/// included; the caller applies mail-parser's trimming at the delimiter.
pub(super) fn qp_decode(data: &[u8]) -> Option<QpDecoded> {
    let mut d = QpDecoder {
        // Decoding shortens the text, save for lone LFs after a CR.
        out: Writer::new(Vec::new(), data.len()),
        crlf: false,
        copied_from: 0,
    };
    // Where the input not decoded yet starts.
    let mut i = 0;
    let mut specials = Flagged::new(data, |b| matches!(b, b'=' | b'\n' | b'\r'));
    while let Some(p) = specials.next_from(i) {
        d.out.copy(&data[i..], p - i);
        i = d.common(data, p).or_else(|| d.odd(data, p))?;
    }
    d.out.copy(&data[i..], data.len() - i);
    Some(QpDecoded {
        bytes: d.out.finish(),
        crlf: d.crlf,
    })
}

struct QpDecoder {
    out: Writer,
    crlf: bool,
    /// Where the bytes copied as they are since the last escape or line break start:
    /// their trailing whitespace is dropped at a hard line break.
    copied_from: usize,
}

impl QpDecoder {
    /// What nearly every `=`, CR or LF at `p` starts: an escape, a soft break after
    /// `=`, a CRLF hard break after text that does not end in whitespace. Taken
    /// without branching on which it is, as which comes next is as good as random
    /// (a mispredicted branch costs as much as the rest of the work); returns where
    /// text resumes, or `None` for anything else.
    #[inline]
    fn common(&mut self, data: &[u8], p: usize) -> Option<usize> {
        let &[c, x, y] = data.get(p..p + 3)? else {
            return None;
        };
        let (hi, lo) = (HEX_VALUE[usize::from(x)], HEX_VALUE[usize::from(y)]);
        let escape = c == b'=' && (hi | lo) < 16;
        let soft = c == b'=' && x == b'\r' && y == b'\n';
        let hard = c == b'\r' && x == b'\n' && !self.out.ends_in_space(self.copied_from);
        if !(escape | soft | hard) {
            return None;
        }
        let (bytes, written) = if escape {
            ([hi << 4 | lo, 0], 1)
        } else {
            (*b"\r\n", if hard { 2 } else { 0 })
        };
        self.out.put_prefix(bytes, written);
        self.copied_from = self.out.len();
        self.crlf |= !escape;
        Some(p + 3 - usize::from(hard))
    }

    /// Any `=`, CR or LF at `p` the way mail-parser reads it; returns where text
    /// resumes, `None` where mail-parser gives up.
    #[cold]
    fn odd(&mut self, data: &[u8], p: usize) -> Option<usize> {
        match data[p] {
            b'\n' => {
                self.hard_break();
                Some(p + 1)
            }
            b'\r' => {
                self.crlf = true;
                Some(p + 1)
            }
            _ => self.odd_escape(data, p + 1),
        }
    }

    /// A hard line break: whitespace copied just before it goes.
    fn hard_break(&mut self) {
        while self.out.ends_in_space(self.copied_from) {
            self.out.buf.pop();
        }
        self.out.put(if self.crlf { b"\r\n" } else { b"\n" });
        self.copied_from = self.out.len();
    }

    /// What follows an `=` (ending at `at`) that is neither a whole escape nor a soft
    /// break, a byte at a time as mail-parser reads it; returns where text resumes.
    fn odd_escape(&mut self, data: &[u8], mut at: usize) -> Option<usize> {
        // The first hex digit of the escape, once read.
        let mut first = None;
        while let Some(&b) = data.get(at) {
            at += 1;
            match (first, b) {
                (_, b'=') => return None,
                (_, b'\r') => self.crlf = true,
                // A soft line break.
                (None, b'\n') => break,
                // mail-parser keeps the half escape across the break.
                (Some(_), b'\n') => self.hard_break(),
                (None, _) if hex_value(b).is_some() => first = Some(b),
                (None, b' ' | b'\t' | 0x0c) => {}
                (None, _) => {
                    self.out.put(&[b'=', b]);
                    break;
                }
                (Some(first), _) => {
                    match hex_value(first).zip(hex_value(b)) {
                        Some((hi, lo)) => self.out.put(&[hi << 4 | lo]),
                        // What precedes `b` may be a CR or LF rather than `first`.
                        None => self.out.put(&[b'=', data[at - 2], b]),
                    }
                    break;
                }
            }
        }
        self.copied_from = self.out.len();
        Some(at)
    }
}

/// Output appended in fixed-size pieces, what was appended past the end of the
/// content cut off again: the runs between the bytes that quoted-printable treats
/// specially are short (a dozen bytes in accented HTML), too short for a `memcpy`
/// call to pay off, where a fixed 32 bytes are a couple of vector stores.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Continues `out`, with room for about `expected` bytes.
    fn new(mut out: Vec<u8>, expected: usize) -> Self {
        out.reserve(expected + 32);
        Writer { buf: out }
    }

    fn finish(self) -> Vec<u8> {
        self.buf
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    /// Appends the first `run` bytes of `data`, 32 at a time while `data` has them.
    #[inline(always)]
    fn copy(&mut self, data: &[u8], run: usize) {
        let mut rest = data;
        let mut left = run;
        loop {
            let Some((chunk, after)) = rest.split_first_chunk::<32>() else {
                self.buf.extend_from_slice(&rest[..left]);
                return;
            };
            self.buf.extend_from_slice(chunk);
            if left <= 32 {
                self.buf.truncate(self.buf.len() - (32 - left));
                return;
            }
            rest = after;
            left -= 32;
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends the first `n` (at most 2) of `bytes`, without a branch on `n`.
    #[inline(always)]
    fn put_prefix(&mut self, bytes: [u8; 2], n: usize) {
        self.buf.extend_from_slice(&bytes);
        self.buf.truncate(self.buf.len() - 2 + n);
    }

    /// The last byte written since `from` is whitespace, which a hard line break
    /// drops when decoding.
    #[inline]
    fn ends_in_space(&self, from: usize) -> bool {
        self.buf.len() > from && matches!(self.buf.last(), Some(b' ' | b'\t' | 0x0c))
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

    /// The reference encoder for one line: one decision a byte, nothing found
    /// ahead. The block-wise `qp_encode` must write exactly what it writes.
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

    /// The whole encoder the same way: line by line, a trailing CR dropped.
    fn qp_encode_bytewise(text: &[u8], out: &mut Vec<u8>) {
        let mut lines = text.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let line = match lines.peek() {
                Some(_) => line.strip_suffix(b"\r").unwrap_or(line),
                None => line,
            };
            qp_line_bytewise(line, out);
            if lines.peek().is_some() {
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    #[test]
    fn qp_encoding_a_block_at_a_time_matches_a_byte_at_a_time() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..1500 {
            let mut text = noise(&mut seed, len % 600);
            // Long lines too, with long printable stretches, and few line breaks.
            if len % 3 == 0 {
                text.retain(|&b| b != b'\n');
                let at = text.len() / 2;
                text.splice(at..at, b"0123456789abcdefghij ".repeat(len % 7));
            }
            let (mut fast, mut slow) = (b"kept".to_vec(), b"kept".to_vec());
            qp_encode(&text, &mut fast);
            qp_encode_bytewise(&text, &mut slow);
            assert_eq!(fast, slow, "{:?}", String::from_utf8_lossy(&text));
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

    /// Decodes `data` as mail-parser does, or fails the test.
    fn assert_decodes_like_mail_parser(data: &[u8]) {
        use mail_parser::parsers::MessageStream;
        let (end, theirs) = MessageStream::new(data).decode_quoted_printable_mime(b"");
        let ours = qp_decode(data);
        let ours = ours.as_ref().map(|d| d.bytes.as_slice());
        let theirs = (end != usize::MAX).then_some(theirs.as_ref());
        assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(data));
    }

    /// The shapes the decoder takes in one step, and the odd ones next to them, at
    /// every position around the edge of a 64-byte block (where the mask of special
    /// bytes is reloaded) and at the very end of the input.
    #[test]
    fn qp_decoding_matches_mail_parser_across_block_edges_and_at_the_end() {
        const TAILS: [&[u8]; 14] = [
            b"=C3=A9x",
            b"=c3=a9",
            b"=\r\nx",
            b"=\nx",
            b"=\r",
            b"=",
            b"=4",
            b"=4\r\n1",
            b" \r\nx",
            b"\t\r\n",
            b"\r\n\r\n",
            b"\rx=41",
            b"\n=20\n",
            b"= \r\nx",
        ];
        // What comes just before the tail: text, whitespace that a hard break
        // drops, an escape that ends there.
        for before in [&b"abc"[..], b"a  ", b"=41"] {
            for len in 56..=72 {
                for tail in TAILS {
                    let mut data = vec![b'x'; len - 3];
                    data.extend_from_slice(before);
                    data.extend_from_slice(tail);
                    assert_decodes_like_mail_parser(&data);
                    data.extend_from_slice(b"0123456789abcdef0123456789abcdef0123456789");
                    assert_decodes_like_mail_parser(&data);
                }
            }
        }
    }

    /// Every flagged byte is found, in order, whatever the block it falls in, and
    /// those before `from` are skipped.
    #[test]
    fn flagged_finds_each_flagged_byte_once_in_order() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for len in 0..300 {
            let data = noise(&mut seed, len);
            let want: Vec<usize> = (0..len).filter(|&k| !qp_literal_byte(data[k])).collect();
            let mut flagged = Flagged::new(&data, |b| !qp_literal_byte(b));
            let mut got = Vec::new();
            while let Some(p) = flagged.next_from(got.last().map_or(0, |&p| p + 1)) {
                got.push(p);
            }
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&data));
            // Skipping ahead, by up to 70 bytes.
            let mut flagged = Flagged::new(&data, |b| !qp_literal_byte(b));
            let mut from = 0;
            while let Some(p) = flagged.next_from(from) {
                assert_eq!(Some(&p), want.iter().find(|&&w| w >= from));
                from = p + 1 + (seed % 70) as usize;
                seed = seed.rotate_left(7) ^ 0x9e37;
            }
            assert!(want.iter().all(|&w| w < from));
        }
    }

    /// Literal runs and escapes that reach column 75 or 76 (a soft break before or
    /// after them, the last byte of a line allowed column 76), the edge of a 64-byte
    /// block, the end of a line or of the text.
    #[test]
    fn qp_encoding_matches_a_byte_at_a_time_at_line_and_block_edges() {
        const TAILS: [&[u8]; 10] = [
            b"\xc3\xa9",
            b"\xc3\xa9x",
            b" ",
            b" x",
            b"\t\r\n",
            b"=\r\n",
            b"\xc3\xa9\r\nab",
            b"\r",
            b"\r\r\n",
            b"ab\ncd",
        ];
        for lines in 1..=2 {
            for len in 60..=80 {
                for tail in TAILS {
                    let mut text = Vec::new();
                    for _ in 0..lines {
                        text.extend(b"0123456789".iter().cycle().take(len));
                        text.extend_from_slice(tail);
                    }
                    let (mut fast, mut slow) = (Vec::new(), Vec::new());
                    qp_encode(&text, &mut fast);
                    qp_encode_bytewise(&text, &mut slow);
                    assert_eq!(fast, slow, "{:?}", String::from_utf8_lossy(&text));
                }
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
