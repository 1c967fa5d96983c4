//! A message's MIME structure as mail-parser reads it, with only the bodies the
//! rewrite reads decoded, and those by us.
//!
//! mail-parser's full parse (`MessageParser::default().parse`) decodes every body a
//! byte at a time and parses every header field (Received, addresses, dates): most
//! of a message's preparation time. Here mail-parser parses only Content-Type and
//! Content-Disposition, which the structure and the rewrite need, and skips every
//! other field, Content-Transfer-Encoding included: it then still finds every part
//! and its boundaries, but hands each body back as it is. We read each part's
//! Content-Transfer-Encoding, decode its body as mail-parser would have, and patch
//! the parsed message so that everything the rewrite reads (each part's text,
//! `encoding`, Content-Transfer-Encoding value, offsets, `is_encoding_problem`, the
//! text and HTML body lists) is what the full parse gives. Where we cannot be sure of
//! that (a part mail-parser finds damaged or would have, a nested message, an
//! encoded multipart), the message is parsed again in full: rare in bulk mail.
//!
//! Why skipping fields changes nothing else: each of mail-parser's field parsers
//! ends a field where the skipping one does (at a line break not followed by a space
//! or tab), and only Content-Type, Content-Disposition and Content-Transfer-Encoding
//! steer the structure. How a body is decoded steers it only where decoding fails
//! (the part is then flagged damaged and classified differently) and inside nested
//! messages (an encoded one is parsed apart from the stream): there we fall back.

use std::sync::LazyLock;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::parsers::MessageStream;
use mail_parser::{
    Encoding, HeaderName, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType,
};

use super::mime::qp_decode;

/// The fields the structure needs parsed; every other field is skipped.
pub(super) static STRUCTURE: LazyLock<MessageParser> = LazyLock::new(|| {
    MessageParser::new()
        .header_content_type(HeaderName::ContentType)
        .header_content_type(HeaderName::ContentDisposition)
        .default_header_ignore()
});

/// The decoding could differ from mail-parser's full parse: parse in full.
#[derive(Debug)]
pub(super) struct Unsure;

/// What `MessageParser::default().parse(raw)` gives, for every field the rewrite
/// reads; the other fields are left unparsed and non-text bodies undecoded.
pub(super) fn parse(raw: &[u8]) -> Option<Message<'_>> {
    structure(raw).unwrap_or_else(|Unsure| MessageParser::default().parse(raw))
}

/// [`parse`] without the fallback: `Err` where it would parse in full.
pub(super) fn structure(raw: &[u8]) -> Result<Option<Message<'_>>, Unsure> {
    let Some(mut message) =
        super::scan::structure(raw, &STRUCTURE).or_else(|| STRUCTURE.parse(raw))
    else {
        return Ok(None);
    };
    for (idx, part) in message.parts.iter_mut().enumerate() {
        // Where a nested message ends depends on how its own parts were decoded
        // (mail-parser parses an encoded one apart, a damaged one differently), and
        // a damaged part may be what a nested message that went wrong leaves: such
        // messages are parsed in full.
        if matches!(part.body, PartType::Message(_)) || part.is_encoding_problem {
            return Err(Unsure);
        }
        let encoding = transfer_encoding(raw, part)?;
        if encoding == Encoding::None {
            continue;
        }
        // An encoded multipart: not one mail-parser decodes.
        if matches!(part.body, PartType::Multipart(_)) {
            return Err(Unsure);
        }
        // Non-text bodies are decoded only to learn that mail-parser could decode them.
        let bytes = decode(raw, part, idx == 0, encoding == Encoding::QuotedPrintable)?;
        let charset = part
            .content_type()
            .and_then(|ct| ct.attribute("charset"))
            .and_then(|cs| charset_decoder(cs.as_bytes()));
        if let PartType::Text(text) | PartType::Html(text) = &mut part.body {
            *text = match charset {
                Some(decode) => decode(&bytes),
                None => utf8(bytes),
            }
            .into();
        }
        part.encoding = encoding;
    }
    Ok(Some(message))
}

/// Gives each Content-Transfer-Encoding field of the part the value the full parse
/// gives it; the encoding is the last field's, as mail-parser takes it.
fn transfer_encoding<'a>(raw: &'a [u8], part: &mut MessagePart<'a>) -> Result<Encoding, Unsure> {
    let mut encoding = Encoding::None;
    for field in part
        .headers
        .iter_mut()
        .filter(|f| f.name == HeaderName::ContentTransferEncoding)
    {
        let value = raw
            .get(field.offset_start as usize..field.offset_end as usize)
            .ok_or(Unsure)?;
        (field.value, encoding) = read_transfer_encoding(value);
    }
    Ok(encoding)
}

/// A Content-Transfer-Encoding field's value (its raw bytes) as the full parse reads
/// it, and the encoding that names: `None` for anything but base64 and
/// quoted-printable, which is what mail-parser decodes.
pub(super) fn read_transfer_encoding(value: &[u8]) -> (HeaderValue<'_>, Encoding) {
    let parsed = MessageStream::new(value).parse_unstructured();
    let encoding = match &parsed {
        HeaderValue::Text(v) if v.eq_ignore_ascii_case("base64") => Encoding::Base64,
        HeaderValue::Text(v) if v.eq_ignore_ascii_case("quoted-printable") => {
            Encoding::QuotedPrintable
        }
        _ => Encoding::None,
    };
    (parsed, encoding)
}

/// The part's body decoded as mail-parser decodes it while it looks for the part's
/// end (quoted-printable, else base64). `Unsure` where mail-parser would have
/// found it damaged.
fn decode(raw: &[u8], part: &MessagePart<'_>, top: bool, qp: bool) -> Result<Vec<u8>, Unsure> {
    let start = part.offset_body as usize;
    // The top-level part runs to the end of the message. Any other ends at the `--`
    // of a boundary delimiter, just after the line break at its end offset (or at
    // it, when the delimiter does not start a line); mail-parser decodes up to and
    // including the first `-`, then trims.
    let (data, after_break) = if top {
        (raw.get(start..).ok_or(Unsure)?, None)
    } else {
        let end = part.offset_end as usize;
        let dashes = match raw.get(end..end + 2) {
            Some(b"\r\n") => end + 2,
            Some([b'\n', _]) => end + 1,
            _ => end,
        };
        if dashes < start || raw.get(dashes..dashes + 2) != Some(b"--") {
            return Err(Unsure);
        }
        // The byte before the dashes, as far as mail-parser saw it (from the body on).
        let after_break = dashes > start && raw[dashes - 1] == b'\n';
        (&raw[start..=dashes], Some(after_break))
    };
    if !qp {
        // mail-parser's own decoder, stopped where it would have stopped: the lone
        // `-` it is given last is skipped, as base64 skips it.
        let (end, bytes) = MessageStream::new(data).decode_base64_mime(b"");
        return if end == usize::MAX {
            Err(Unsure)
        } else {
            Ok(bytes.into_owned())
        };
    }
    let decoded = qp_decode(data).ok_or(Unsure)?;
    let mut bytes = decoded.bytes;
    if let Some(after_break) = after_break {
        // mail-parser drops the `-` it decoded and, at the start of a line, as many
        // bytes as its line break takes; when there are fewer, its subtraction wraps
        // and it drops none.
        let trim = match (after_break, decoded.crlf) {
            (false, _) => 1,
            (true, false) => 2,
            (true, true) => 3,
        };
        if let Some(keep) = bytes.len().checked_sub(trim) {
            bytes.truncate(keep);
        }
    }
    Ok(bytes)
}

/// The decoded text as a string, as `String::from_utf8` then `from_utf8_lossy` would
/// make it. Checked with simdutf8 (SIMD, several times faster than the standard
/// library's check on accented text; it showed at 1.7% of optgate's CPU in the bench).
fn utf8(bytes: Vec<u8>) -> String {
    if simdutf8::basic::from_utf8(&bytes).is_ok() {
        // SAFETY: simdutf8 has just checked that `bytes` is valid UTF-8.
        unsafe { String::from_utf8_unchecked(bytes) }
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
