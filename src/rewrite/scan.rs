//! A message's MIME structure found with a substring search, for the shapes bulk
//! mail has, instead of mail-parser's scan a byte at a time.
//!
//! [`structure`] builds what `parser.parse(raw)` builds (the parser being
//! parse.rs's, which parses Content-Type and Content-Disposition only), except for
//! the text of transfer-encoded text parts: parse.rs replaces that with its own
//! decoding right after, so mail-parser's lossy UTF-8 copy of the encoded bytes is
//! not made. It follows mail-parser's reading step by step: each header block is
//! parsed by mail-parser itself from where mail-parser would start it, each body
//! ends where mail-parser's scan would end it, and each part is classified (text,
//! HTML, attachment) by the same rules, restated from its `message.rs`. Only the
//! search for the next boundary delimiter is ours, with `memchr::memmem`.
//!
//! It keeps to the shapes where that search and mail-parser's provably agree: a
//! single part, or multiparts (nested up to [`MAX_DEPTH`]) of leaf parts whose
//! delimiters start a line and end it, after optional spaces or tabs, or close the
//! multipart; no nested message. Anything else (a delimiter inside a line, one
//! followed by other text, a missing one, a nested message, a message without a
//! header block) returns `None`, and the caller parses with mail-parser.

use std::borrow::Cow;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::parsers::MessageStream;
use mail_parser::{
    ContentType, Encoding, GetHeader, Header, HeaderName, Message, MessageParser, MessagePart,
    PartType,
};
use memchr::memmem::Finder;

use super::parse::read_transfer_encoding;

/// Multipart levels followed (mixed > related > alternative is three); deeper
/// structures are left to mail-parser, which also bounds our recursion on a
/// peer's input.
const MAX_DEPTH: usize = 4;

/// mail-parser's classification of a part by its Content-Type (its private
/// `MimeType`; mixed and unknown multiparts are alike to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mime {
    Alternative,
    Related,
    Digest,
    OtherMultipart,
    Plain,
    Html,
    TextOther,
    Inline,
    Message,
    Other,
}

impl Mime {
    /// mail-parser's `mime_type`: a part without a Content-Type is plain text, or a
    /// message inside a digest.
    fn of(content_type: Option<&ContentType<'_>>, parent: Mime) -> Mime {
        let Some(ct) = content_type else {
            return if parent == Mime::Digest {
                Mime::Message
            } else {
                Mime::Plain
            };
        };
        match (ct.ctype(), ct.subtype()) {
            ("multipart", Some("alternative")) => Mime::Alternative,
            ("multipart", Some("related")) => Mime::Related,
            ("multipart", Some("digest")) => Mime::Digest,
            ("multipart", _) => Mime::OtherMultipart,
            ("text", Some("plain")) => Mime::Plain,
            ("text", Some("html")) => Mime::Html,
            ("text", _) => Mime::TextOther,
            ("image" | "audio" | "video", _) => Mime::Inline,
            ("message", Some("rfc822" | "global")) => Mime::Message,
            _ => Mime::Other,
        }
    }

    fn is_multipart(self) -> bool {
        matches!(
            self,
            Mime::Alternative | Mime::Related | Mime::Digest | Mime::OtherMultipart
        )
    }

    /// Shown inline unless its headers say otherwise.
    fn is_inline(self) -> bool {
        matches!(self, Mime::Plain | Mime::Html | Mime::Inline)
    }

    fn is_text(self) -> bool {
        matches!(self, Mime::Plain | Mime::Html | Mime::TextOther)
    }
}

/// What mail-parser keeps about the multipart whose parts it is reading (its
/// `MessageParserState`); the message itself is the outermost, of kind `Message`.
struct Level {
    kind: Mime,
    in_alternative: bool,
    /// Parts begun at this level so far.
    parts: usize,
    need_html: bool,
    need_text: bool,
}

/// What follows a boundary delimiter.
enum After {
    /// A part, starting at this offset (the delimiter line ended there).
    Part(usize),
    /// `--`: the multipart is closed; its epilogue starts at this offset.
    Close(usize),
}

/// What `parser.parse(raw)` gives (for parse.rs's parser only), with each
/// transfer-encoded text part's text left empty; `None` where the message is not
/// of a shape followed here.
pub(super) fn structure<'x>(raw: &'x [u8], parser: &MessageParser) -> Option<Message<'x>> {
    let mut scan = Scan {
        raw,
        parser,
        message: Message {
            raw_message: raw.into(),
            ..Message::default()
        },
    };
    let mut top = Level {
        kind: Mime::Message,
        in_alternative: false,
        // The message's own header block, about to be read.
        parts: 1,
        need_html: true,
        need_text: true,
    };
    let (headers, body) = scan.headers(0)?;
    let kind = Mime::of(content_type(&headers), top.kind);
    if kind.is_multipart() {
        scan.multipart(&top, kind, headers, 0, body, 1)?;
    } else {
        // Without a boundary to look for, mail-parser's scan runs to the end.
        scan.leaf(&mut top, kind, headers, 0, body, raw.len())?;
    }
    scan.message.parts[0].offset_end = u32::try_from(raw.len()).ok()?;
    Some(scan.message)
}

struct Scan<'x, 'p> {
    raw: &'x [u8],
    parser: &'p MessageParser,
    message: Message<'x>,
}

impl<'x> Scan<'x, '_> {
    /// The header block starting at `at`, parsed by mail-parser, and where the body
    /// starts; `None` when no empty line ends it.
    fn headers(&self, at: usize) -> Option<(Vec<Header<'x>>, usize)> {
        let mut stream = MessageStream::new(self.raw);
        stream.skip_bytes(at);
        let mut headers = Vec::new();
        stream
            .parse_headers(self.parser, &mut headers)
            .then(|| (headers, stream.offset()))
    }

    /// Adds a multipart and its parts, returns where its epilogue starts.
    fn multipart(
        &mut self,
        parent: &Level,
        kind: Mime,
        headers: Vec<Header<'x>>,
        offset_header: usize,
        offset_body: usize,
        depth: usize,
    ) -> Option<usize> {
        let boundary = content_type(&headers)?.attribute("boundary")?;
        if depth > MAX_DEPTH || boundary.is_empty() {
            return None;
        }
        let delimiter = [b"--", boundary.as_bytes()].concat();
        let finder = Finder::new(&delimiter);
        // mail-parser takes the first `--boundary` after the header block as the
        // first delimiter, wherever it is.
        let at = self.delimiter(&finder, offset_body)?;
        let After::Part(mut next) = self.after(at + delimiter.len())? else {
            return None;
        };
        let id = self.message.parts.len();
        self.message.parts.push(MessagePart {
            headers,
            offset_header: u32::try_from(offset_header).ok()?,
            offset_body: u32::try_from(offset_body).ok()?,
            offset_end: 0,
            is_encoding_problem: false,
            encoding: Encoding::None,
            body: PartType::default(),
        });
        let mut level = Level {
            kind,
            in_alternative: parent.in_alternative || kind == Mime::Alternative,
            parts: 0,
            need_html: parent.need_html,
            need_text: parent.need_text,
        };
        let html_before = self.message.html_body.len();
        let text_before = self.message.text_body.len();
        let mut children = Vec::new();
        loop {
            let (headers, body) = self.headers(next)?;
            level.parts += 1;
            let child = self.message.parts.len();
            children.push(u32::try_from(child).ok()?);
            let child_kind = Mime::of(content_type(&headers), level.kind);
            let at = if child_kind.is_multipart() {
                let epilogue =
                    self.multipart(&level, child_kind, headers, next, body, depth + 1)?;
                let at = self.delimiter(&finder, epilogue)?;
                self.message.parts[child].offset_end =
                    u32::try_from(line_end(self.raw, at, epilogue)).ok()?;
                at
            } else {
                let at = self.delimiter(&finder, body)?;
                let end = line_end(self.raw, at, body);
                self.leaf(&mut level, child_kind, headers, next, body, end)?;
                at
            };
            match self.after(at + delimiter.len())? {
                After::Part(start) => next = start,
                After::Close(epilogue) => {
                    self.close(&level, html_before, text_before);
                    self.message.parts[id].body = PartType::Multipart(children);
                    return Some(epilogue);
                }
            }
        }
    }

    /// An alternative that had neither a text nor an HTML part from outside lends
    /// each list the other's parts when it has only one kind.
    fn close(&mut self, level: &Level, html_before: usize, text_before: usize) {
        if level.kind != Mime::Alternative || !(level.need_html && level.need_text) {
            return;
        }
        let Message {
            html_body,
            text_body,
            ..
        } = &mut self.message;
        if text_before == text_body.len() && html_before != html_body.len() {
            text_body.extend_from_slice(&html_body[html_before..]);
        }
        if html_before == html_body.len() && text_before != text_body.len() {
            html_body.extend_from_slice(&text_body[text_before..]);
        }
    }

    /// Adds a part that is not a multipart, classified as mail-parser does.
    fn leaf(
        &mut self,
        level: &mut Level,
        kind: Mime,
        headers: Vec<Header<'x>>,
        offset_header: usize,
        offset_body: usize,
        offset_end: usize,
    ) -> Option<()> {
        // Where a nested message ends depends on its own parts.
        if kind == Mime::Message {
            return None;
        }
        let bytes = self.raw.get(offset_body..offset_end)?;
        let ct = content_type(&headers);
        let not_attachment = headers
            .header_value(&HeaderName::ContentDisposition)
            .is_none_or(|d| !d.as_content_type().is_some_and(|d| d.is_attachment()));
        let inline = kind.is_inline()
            && not_attachment
            && (level.parts == 1
                || level.kind != Mime::Related
                    && (kind == Mime::Inline || ct.is_none_or(|c| !c.has_attribute("name"))));
        let (to_html, to_text) = if level.kind == Mime::Alternative {
            (kind == Mime::Html, kind == Mime::Plain)
        } else if inline {
            if level.in_alternative && (level.need_text || level.need_html) {
                match kind {
                    Mime::Html => level.need_text = false,
                    Mime::Plain => level.need_html = false,
                    _ => {}
                }
            }
            (level.need_html, level.need_text)
        } else {
            (false, false)
        };
        let id = u32::try_from(self.message.parts.len()).ok()?;
        if to_html {
            self.message.html_body.push(id);
        }
        if to_text {
            self.message.text_body.push(id);
        }
        let body = if kind.is_text() {
            let html = kind == Mime::Html;
            if !to_html && html || !to_text && !html {
                self.message.attachments.push(id);
            }
            let text = if transfer_encoded(self.raw, &headers) {
                Cow::Borrowed("")
            } else {
                match ct
                    .and_then(|ct| ct.attribute("charset"))
                    .and_then(|cs| charset_decoder(cs.as_bytes()))
                {
                    Some(decode) => decode(bytes).into(),
                    None => String::from_utf8_lossy(bytes),
                }
            };
            if html {
                PartType::Html(text)
            } else {
                PartType::Text(text)
            }
        } else {
            self.message.attachments.push(id);
            if inline {
                PartType::InlineBinary(bytes.into())
            } else {
                PartType::Binary(bytes.into())
            }
        };
        self.message.parts.push(MessagePart {
            headers,
            encoding: Encoding::None,
            is_encoding_problem: false,
            body,
            offset_header: u32::try_from(offset_header).ok()?,
            offset_body: u32::try_from(offset_body).ok()?,
            offset_end: u32::try_from(offset_end).ok()?,
        });
        Some(())
    }

    /// Where the first delimiter from `from` on starts (its `--`), as mail-parser
    /// finds it; `None` when there is none or it does not start a line.
    fn delimiter(&self, finder: &Finder<'_>, from: usize) -> Option<usize> {
        let at = from + finder.find(self.raw.get(from..)?)?;
        (at.checked_sub(1).and_then(|i| self.raw.get(i)) == Some(&b'\n')).then_some(at)
    }

    /// What follows a delimiter that ends at `at`, where mail-parser reads on from
    /// it; `None` for anything but `--` or optional spaces and tabs and a line break.
    fn after(&self, at: usize) -> Option<After> {
        let rest = self.raw.get(at..)?;
        if rest.starts_with(b"--") {
            return Some(After::Close(at + 2));
        }
        let padding = rest
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        match rest.get(padding..)? {
            [b'\n', ..] => Some(After::Part(at + padding + 1)),
            [b'\r', b'\n', ..] => Some(After::Part(at + padding + 2)),
            _ => None,
        }
    }
}

/// Where mail-parser ends what precedes a delimiter that starts a line at `at`,
/// having read from `from`: before the line break, or at `from` when the
/// delimiter is the first thing it read.
fn line_end(raw: &[u8], at: usize, from: usize) -> usize {
    if at == from {
        from
    } else if at.checked_sub(2).and_then(|i| raw.get(i)) == Some(&b'\r') {
        at - 2
    } else {
        at - 1
    }
}

/// The Content-Type as mail-parser reads it for the structure: the last field's.
fn content_type<'a>(headers: &'a [Header<'_>]) -> Option<&'a ContentType<'a>> {
    headers
        .iter()
        .rev()
        .find(|h| h.name == HeaderName::ContentType)
        .and_then(|h| h.value.as_content_type())
}

/// Whether parse.rs decodes this part and replaces its text: its last
/// Content-Transfer-Encoding field names base64 or quoted-printable, read as
/// parse.rs reads it, so that every text left empty here is filled there.
fn transfer_encoded(raw: &[u8], headers: &[Header<'_>]) -> bool {
    headers
        .iter()
        .rev()
        .find(|h| h.name == HeaderName::ContentTransferEncoding)
        .and_then(|h| raw.get(h.offset_start as usize..h.offset_end as usize))
        .is_some_and(|value| read_transfer_encoding(value).1 != Encoding::None)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::rewrite::parse::STRUCTURE;

    /// [`structure`] declines the message or gives exactly what mail-parser gives,
    /// but for the text of transfer-encoded text parts, which it leaves empty.
    /// Returns whether it took the message.
    pub(in crate::rewrite) fn agrees(raw: &[u8]) -> bool {
        let shown = || String::from_utf8_lossy(raw).into_owned();
        let Some(ours) = structure(raw, &STRUCTURE) else {
            return false;
        };
        let Some(mut theirs) = STRUCTURE.parse(raw) else {
            panic!("mail-parser finds no message in {}", shown());
        };
        for (a, b) in ours.parts.iter().zip(&mut theirs.parts) {
            if let (PartType::Text(x) | PartType::Html(x), PartType::Text(y) | PartType::Html(y)) =
                (&a.body, &mut b.body)
                && x.is_empty()
                && transfer_encoded(raw, &b.headers)
            {
                *y = Cow::Borrowed("");
            }
        }
        assert_eq!(ours, theirs, "{}", shown());
        true
    }

    fn crlf(lf: &str) -> Vec<u8> {
        lf.replace('\n', "\r\n").into_bytes()
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../shared/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn the_fixtures_take_the_fast_path() {
        for name in ["newsletter.eml", "small.eml"] {
            let lf = fixture(name);
            let text = String::from_utf8(lf.clone()).expect("fixtures are UTF-8");
            assert!(agrees(&lf), "{name} (LF)");
            assert!(agrees(&crlf(&text)), "{name} (CRLF)");
        }
    }

    const HEAD: &str = "From: a@b.example\nSubject: s\nMIME-Version: 1.0\n";

    /// A multipart/alternative in `boundary` (as written in the field, and as used).
    fn alternative(param: &str, boundary: &str) -> String {
        format!(
            "{HEAD}Content-Type: multipart/alternative; boundary={param}\n\n--{boundary}\n\
Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n\
caf=C3=A9 %%unsubscribe_url%%\n--{boundary}\nContent-Type: text/html; charset=iso-8859-1\n\
Content-Transfer-Encoding: 8bit\n\n<p>caf\u{e9}</p>\n--{boundary}--\n"
        )
    }

    #[test]
    fn common_shapes_and_edges_take_the_fast_path_or_fall_back() {
        let alt = alternative("\"B\"", "B");
        let half = alt.len() / 2;
        let mut mixed_endings = crlf(&alt[..half]);
        mixed_endings.extend_from_slice(&alt.as_bytes()[half..]);
        let nested = format!(
            "{HEAD}Content-Type: multipart/mixed; boundary=M\n\nThis is a multi-part message.\n\
--M\nContent-Type: multipart/related; boundary=\"R\"\n\n--R\n\
Content-Type: multipart/alternative; boundary=A\n\n--A\nContent-Type: text/plain\n\nhi\n\
--A\nContent-Type: text/html\nContent-Transfer-Encoding: base64\n\nPHA+aGk8L3A+\n--A--\n\n\
--R\nContent-Type: image/png; name=a.png\nContent-ID: <a>\nContent-Transfer-Encoding: base64\n\n\
iVBORw0K\n--R--\nepilogue\n--M\nContent-Type: application/pdf; name=a.pdf\n\
Content-Disposition: attachment; filename=a.pdf\nContent-Transfer-Encoding: base64\n\n\
JVBERi0xLjQK\n--M\nContent-Type: text/plain; name=notes.txt\n\
Content-Disposition: attachment\n\nnotes\n--M--\n"
        );
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("alternative, CRLF", crlf(&alt), true),
            ("alternative, LF only", alt.clone().into_bytes(), true),
            ("alternative, CRLF then LF", mixed_endings, true),
            (
                "boundary with quotes and odd characters",
                crlf(&alternative(
                    "\"=_Part 0.1+/'()?:,-\"",
                    "=_Part 0.1+/'()?:,-",
                )),
                true,
            ),
            ("mixed > related > alternative", crlf(&nested), true),
            (
                "preamble and epilogue",
                crlf(
                    &alt.replace("\n\n--B\n", "\n\npreamble -- B\n\n--B\n")
                        .replace(
                            "--B--\n",
                            "--B--\nepilogue, even a mid-line --B here\n--B\n",
                        ),
                ),
                true,
            ),
            (
                "an empty part without headers and one with headers",
                crlf(&format!(
                    "{HEAD}Content-Type: multipart/mixed; boundary=B\n\n--B\n\n--B\n\
Content-Type: text/plain\n\n--B\nContent-Type: text/html\n\n\n--B--\n"
                )),
                true,
            ),
            (
                "transport padding after delimiters",
                crlf(
                    &alt.replace("--B\n", "--B \t\n")
                        .replace("--B--\n", "--B--  \n"),
                ),
                true,
            ),
            (
                "no close delimiter at the very end",
                crlf(&alt.replace("\n--B--\n", "\n--B--")),
                true,
            ),
            (
                "an alternative with HTML only",
                crlf(&format!(
                    "{HEAD}Content-Type: multipart/alternative; boundary=B\n\n--B\n\
Content-Type: text/html\n\n<p>x</p>\n--B--\n"
                )),
                true,
            ),
            (
                "a single text part",
                crlf(&format!(
                    "{HEAD}Content-Type: text/plain; charset=iso-8859-1\n\ncaf\u{e9}\n"
                )),
                true,
            ),
            (
                "a single quoted-printable part",
                crlf(&format!(
                    "{HEAD}Content-Transfer-Encoding: quoted-printable\n\ncaf=E9\n"
                )),
                true,
            ),
            (
                "a single attachment",
                crlf(&format!(
                    "{HEAD}Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n"
                )),
                true,
            ),
            (
                "headers and an empty body",
                crlf(&format!("{HEAD}\n")),
                true,
            ),
            // Falls back:
            ("no empty line after the headers", crlf("Subject: s"), false),
            (
                "the close delimiter missing",
                crlf(&alt.replace("--B--\n", "")),
                false,
            ),
            (
                "a delimiter ending a line of text",
                crlf(&alt.replace("%%unsubscribe_url%%\n--B\n", "%%unsubscribe_url%% --B\n")),
                false,
            ),
            (
                "a delimiter inside a line",
                crlf(&alt.replace("caf=C3=A9 %%", "caf=C3=A9 --B %%")),
                false,
            ),
            (
                "a delimiter followed by text",
                crlf(&alt.replace(
                    "\n--B\nContent-Type: text/html",
                    "\n--Bx\nContent-Type: text/html",
                )),
                false,
            ),
            (
                "a first delimiter that closes",
                crlf(&format!(
                    "{HEAD}Content-Type: multipart/mixed; boundary=B\n\n--B--\n"
                )),
                false,
            ),
            (
                "no boundary parameter",
                crlf(&alt.replace("; boundary=\"B\"", "")),
                false,
            ),
            (
                "a boundary never used",
                crlf(&alt.replace("boundary=\"B\"", "boundary=\"C\"")),
                false,
            ),
            (
                "a nested message",
                crlf(&alt.replace(
                    "Content-Type: text/html; charset=iso-8859-1\n",
                    "Content-Type: message/rfc822\n",
                )),
                false,
            ),
            (
                "a digest (its parts are messages)",
                crlf(&format!(
                    "{HEAD}Content-Type: multipart/digest; boundary=D\n\n--D\n\nSubject: in\n\nx\n--D--\n"
                )),
                false,
            ),
            (
                "a single nested message",
                crlf(&format!(
                    "{HEAD}Content-Type: message/rfc822\n\nSubject: in\n\nx\n"
                )),
                false,
            ),
        ];
        for (name, message, fast) in cases {
            assert_eq!(agrees(&message), fast, "{name}");
        }
    }

    #[test]
    fn nesting_deeper_than_followed_falls_back() {
        let nest = |depth: usize| {
            let mut open = String::new();
            let mut close = String::new();
            for level in 0..depth {
                open.push_str(&format!(
                    "Content-Type: multipart/mixed; boundary=L{level}\n\n--L{level}\n"
                ));
                close = format!("\n--L{level}--\n{close}");
            }
            crlf(&format!("{HEAD}{open}Content-Type: text/plain\n\nx{close}"))
        };
        assert!(agrees(&nest(MAX_DEPTH)));
        assert!(!agrees(&nest(MAX_DEPTH + 1)));
    }
}
