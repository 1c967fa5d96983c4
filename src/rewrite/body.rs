//! Where the link goes in a message body, and each changed text part prepared once
//! per message as chunks: pre-encoded runs plus the few bytes re-encoded per copy.

use std::borrow::Cow;
use std::ops::Range;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::{Encoding, Message, MessagePart, MimeHeaders, PartType};
use memchr::memmem;

use super::BodyLink;
use super::footer::{CompiledFooter, Piece};
use super::headers::PartHeaderEdit;
use super::mime::{
    B64_CHUNK, MAX_LINE, base64_encode, longest_line, longest_line_around, qp_encode,
};

/// The placeholders a mailer may put in its template instead of taking our footer.
pub(super) const UNSUBSCRIBE_PLACEHOLDER: &str = "%%unsubscribe_url%%";
pub(super) const PREFERENCES_PLACEHOLDER: &str = "%%preferences_url%%";

const QUOTED_PRINTABLE: &str = "quoted-printable";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Plain,
    Html,
}

/// How a changed part is written: as it was (7-bit, short lines), or re-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cte {
    Raw,
    Qp,
    Base64,
}

/// A piece of a changed part's decoded content, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Decoded text encoded per copy (it sits next to a per-copy insertion).
    Text(Range<usize>),
    /// Decoded text whose encoding is the same in every copy; `enc` (in the prepared
    /// message's buffer) is that encoding, `None` when the text is written as is.
    Fixed {
        text: Range<usize>,
        enc: Option<Range<usize>>,
    },
    Sep(&'static str),
    Unsubscribe,
    Preferences,
    Footer,
}

/// A text part that every copy changes.
#[derive(Debug)]
pub(super) struct PartPlan {
    pub kind: Kind,
    pub cte: Cte,
    pub decoded: Decoded,
    pub chunks: Vec<Chunk>,
    /// The original body ended with a line break (a single-part message does; a
    /// part of a multipart leaves its last one to the boundary).
    pub trailing_break: bool,
    /// Its header fields in the original message (empty for the top-level part,
    /// whose fields are the message's).
    pub header: Range<usize>,
    pub body: Range<usize>,
    pub top: bool,
    pub edit: PartHeaderEdit,
    /// The edit when a 7-bit part must become quoted-printable after all, because a
    /// URL made one of its lines too long.
    pub fallback: PartHeaderEdit,
}

/// A changed part's decoded text, which its copies re-encode around the URLs.
#[derive(Debug)]
pub(super) enum Decoded {
    /// The body as it is in the message (unencoded UTF-8 or ASCII): not copied.
    Original(Range<usize>),
    Owned(String),
}

/// The URLs of one copy, ready for either kind of part.
pub(super) struct Urls<'a> {
    pub unsubscribe: &'a str,
    pub unsubscribe_html: &'a str,
    pub preferences: Option<(&'a str, &'a str)>,
}

impl Urls<'_> {
    fn unsubscribe(&self, kind: Kind) -> &str {
        match kind {
            Kind::Plain => self.unsubscribe,
            Kind::Html => self.unsubscribe_html,
        }
    }

    /// With no preference centre yet, a preferences link leads to the unsubscribe
    /// page: the nearest thing we have, and never a dead link.
    fn preferences(&self, kind: Kind) -> &str {
        match (self.preferences, kind) {
            (Some((plain, _)), Kind::Plain) => plain,
            (Some((_, html)), Kind::Html) => html,
            (None, _) => self.unsubscribe(kind),
        }
    }
}

/// One place in a part's decoded text that changes: `at` is replaced by `inserts`.
pub(super) struct Event {
    at: Range<usize>,
    inserts: Vec<Chunk>,
}

/// What the body of every copy gets, and the parts that change.
pub(super) fn analyse(message: &Message<'_>) -> (BodyLink, Vec<(usize, Kind, Vec<Event>)>) {
    if is_signed(message) {
        return (BodyLink::SkippedSigned, Vec::new());
    }
    let mut placed = Vec::new();
    for (idx, part) in message.parts.iter().enumerate() {
        let (Some(kind), Some(text)) = (text_kind(part), decoded(part)) else {
            continue;
        };
        // Each placeholder's matches do not overlap one another, as with
        // `str::match_indices`; SIMD search, as every message's text is searched.
        let find = |placeholder: &'static str, chunk: Chunk| {
            memmem::find_iter(text.as_bytes(), placeholder.as_bytes())
                .map(move |at| (at, chunk.clone(), placeholder.len()))
        };
        let mut hits: Vec<(usize, Chunk, usize)> =
            find(UNSUBSCRIBE_PLACEHOLDER, Chunk::Unsubscribe)
                .chain(find(PREFERENCES_PLACEHOLDER, Chunk::Preferences))
                .collect();
        if hits.is_empty() {
            continue;
        }
        hits.sort_by_key(|h| h.0);
        // `%%unsubscribe_url%%preferences_url%%` shares its `%%`: first one wins.
        let mut end = 0;
        hits.retain(|&(at, _, len)| {
            let keep = at >= end;
            if keep {
                end = at + len;
            }
            keep
        });
        let events = hits
            .into_iter()
            .map(|(at, chunk, len)| Event {
                at: at..at + len,
                inserts: vec![chunk],
            })
            .collect();
        placed.push((idx, kind, events));
    }
    if !placed.is_empty() {
        return (BodyLink::Placeholder, placed);
    }

    // The footer goes at the end of what is displayed: the last text/plain body part
    // and the last text/html one (the same part when a message has only one).
    let last = |ids: &[u32]| {
        ids.iter().rev().map(|&i| i as usize).find(|&i| {
            message
                .parts
                .get(i)
                .is_some_and(|p| text_kind(p).is_some() && !is_named(p) && decoded(p).is_some())
        })
    };
    let mut targets: Vec<usize> = [last(&message.text_body), last(&message.html_body)]
        .into_iter()
        .flatten()
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let mut footed = Vec::new();
    for idx in targets {
        let Some(part) = message.parts.get(idx) else {
            continue;
        };
        let (Some(kind), Some(text)) = (text_kind(part), decoded(part)) else {
            continue;
        };
        footed.push((idx, kind, vec![footer_event(kind, text)]));
    }
    if footed.is_empty() {
        (BodyLink::NoTextPart, footed)
    } else {
        (BodyLink::Footer, footed)
    }
}

/// Text: after the last line, a blank line apart. HTML: just before the last
/// `</body>`, or at the end when there is none.
fn footer_event(kind: Kind, text: &str) -> Event {
    let d = text.as_bytes();
    let newline_end = d.last() == Some(&b'\n');
    let end = d.len();
    let inserts = match kind {
        Kind::Plain => {
            let lead = match (d.is_empty(), newline_end) {
                (true, _) => "",
                (false, true) => "\r\n",
                (false, false) => "\r\n\r\n",
            };
            let trail = if newline_end { "\r\n" } else { "" };
            return Event {
                at: end..end,
                inserts: seps(lead, trail),
            };
        }
        Kind::Html => match last_body_close(d) {
            Some(at) => {
                let line_start = at == 0 || d[at - 1] == b'\n';
                return Event {
                    at: at..at,
                    inserts: seps(if line_start { "" } else { "\r\n" }, "\r\n"),
                };
            }
            None => seps(
                if d.is_empty() || newline_end {
                    ""
                } else {
                    "\r\n"
                },
                if newline_end { "\r\n" } else { "" },
            ),
        },
    };
    Event {
        at: end..end,
        inserts,
    }
}

fn seps(lead: &'static str, trail: &'static str) -> Vec<Chunk> {
    let mut v = Vec::with_capacity(3);
    if !lead.is_empty() {
        v.push(Chunk::Sep(lead));
    }
    v.push(Chunk::Footer);
    if !trail.is_empty() {
        v.push(Chunk::Sep(trail));
    }
    v
}

/// The position of the last `</body>` tag, matched case-insensitively.
fn last_body_close(d: &[u8]) -> Option<usize> {
    const TAG: &[u8] = b"</body";
    memchr::memrchr_iter(b'<', d).find(|&i| {
        d.get(i..i + TAG.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(TAG))
            && d.get(i + TAG.len())
                .is_none_or(|&b| b == b'>' || b.is_ascii_whitespace())
    })
}

/// Signed or encrypted content anywhere (S/MIME, PGP/MIME, inline PGP): changing a
/// byte of the body would break the signature or the message, so the body is left.
fn is_signed(message: &Message<'_>) -> bool {
    message.parts.iter().any(|p| {
        let by_type = p.content_type().is_some_and(|ct| {
            let sub = ct.subtype().unwrap_or_default();
            let is = |t: &str, s: &str| {
                ct.ctype().eq_ignore_ascii_case(t) && sub.eq_ignore_ascii_case(s)
            };
            is("multipart", "signed")
                || is("multipart", "encrypted")
                || is("application", "pkcs7-mime")
                || is("application", "x-pkcs7-mime")
                || is("application", "pgp-encrypted")
        });
        let inline_pgp = text_kind(p).is_some()
            && decoded(p).is_some_and(|t| {
                let t = t.as_bytes();
                memmem::find(t, b"-----BEGIN PGP SIGNED MESSAGE-----").is_some()
                    || memmem::find(t, b"-----BEGIN PGP MESSAGE-----").is_some()
            });
        by_type || inline_pgp
    })
}

/// text/plain or text/html content that is not an attachment.
fn text_kind(part: &MessagePart<'_>) -> Option<Kind> {
    if part.is_encoding_problem
        || part
            .content_disposition()
            .is_some_and(|d| d.is_attachment())
    {
        return None;
    }
    let kind = match part.content_type() {
        None => Kind::Plain,
        Some(ct) if ct.ctype().eq_ignore_ascii_case("text") => match ct.subtype() {
            Some(s) if s.eq_ignore_ascii_case("plain") => Kind::Plain,
            Some(s) if s.eq_ignore_ascii_case("html") => Kind::Html,
            _ => return None,
        },
        Some(_) => return None,
    };
    // An encoding we do not write back (uuencode, …) leaves the part alone.
    let known = part.content_transfer_encoding().is_none_or(|cte| {
        ["7bit", "8bit", "binary", "quoted-printable", "base64"]
            .iter()
            .any(|k| cte.trim().eq_ignore_ascii_case(k))
    });
    known.then_some(kind)
}

fn decoded<'a>(part: &'a MessagePart<'_>) -> Option<&'a str> {
    match &part.body {
        PartType::Text(t) | PartType::Html(t) => Some(t),
        _ => None,
    }
}

/// A file shown inline (it has a name) is content, not the message's body text.
fn is_named(part: &MessagePart<'_>) -> bool {
    part.content_disposition()
        .is_some_and(|d| d.attribute("filename").is_some())
        || part
            .content_type()
            .is_some_and(|c| c.attribute("name").is_some())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charset {
    Utf8,
    Ascii,
    Other,
    Unknown,
}

fn charset_of(part: &MessagePart<'_>) -> Charset {
    let Some(cs) = part.content_type().and_then(|c| c.attribute("charset")) else {
        return Charset::Ascii;
    };
    let cs = cs.trim();
    let is = |names: &[&str]| names.iter().any(|n| cs.eq_ignore_ascii_case(n));
    if is(&["utf-8", "utf8"]) {
        Charset::Utf8
    } else if is(&["us-ascii", "ascii", "ansi_x3.4-1968"]) {
        Charset::Ascii
    } else if charset_decoder(cs.as_bytes()).is_some() {
        Charset::Other
    } else {
        Charset::Unknown
    }
}

/// RFC 2045 7bit data: short lines, no NUL, CR only before LF.
fn is_7bit_text(raw: &[u8]) -> bool {
    let bare_cr = raw
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\r' && raw.get(i + 1) != Some(&b'\n'));
    !bare_cr && !raw.contains(&0) && longest_line(raw) <= MAX_LINE
}

/// Plans one part, whose decoded text is `text` (taken out of the parsed message,
/// not copied): how it is written and which of its encoded runs are the same in
/// every copy (encoded now, into `owned`). `None` leaves the part as it is.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan(
    message: &[u8],
    part: &MessagePart<'_>,
    text: Cow<'_, str>,
    top: bool,
    kind: Kind,
    events: Vec<Event>,
    footer: &CompiledFooter,
    owned: &mut Vec<u8>,
) -> Option<PartPlan> {
    let body = part.offset_body as usize..part.offset_end as usize;
    let raw = message.get(body.clone())?;
    let charset = charset_of(part);
    if charset == Charset::Unknown && !text.is_ascii() {
        // We could not say which characters these are, so we could not write them.
        return None;
    }
    let footer_ascii = kind == Kind::Html || footer.text_is_ascii();
    let inserts_ascii = events
        .iter()
        .flat_map(|e| &e.inserts)
        .all(|c| *c != Chunk::Footer || footer_ascii);
    let new_ascii = text.is_ascii() && inserts_ascii;
    let (cte, cte_edit) = match part.encoding {
        Encoding::QuotedPrintable => (Cte::Qp, None),
        Encoding::Base64 => (Cte::Base64, None),
        Encoding::None => {
            if new_ascii && text.as_bytes() == raw && is_7bit_text(raw) {
                (Cte::Raw, None)
            } else {
                (Cte::Qp, Some(QUOTED_PRINTABLE))
            }
        }
    };
    let utf8 = match charset {
        Charset::Utf8 => false,
        Charset::Ascii => !new_ascii,
        Charset::Other | Charset::Unknown => cte != Cte::Raw,
    };
    let header = if top {
        0..0
    } else {
        let start = part.offset_header as usize;
        let block = message.get(start..body.start)?;
        start..start + super::header_block_len(block)
    };
    Some(PartPlan {
        kind,
        cte,
        chunks: chunks(text.as_bytes(), events, cte, owned),
        decoded: match text {
            // The same bytes at the same place: the body itself.
            Cow::Borrowed(t) if t.as_ptr() == raw.as_ptr() && t.len() == raw.len() => {
                Decoded::Original(body.clone())
            }
            text => Decoded::Owned(text.into_owned()),
        },
        trailing_break: raw.last() == Some(&b'\n'),
        header,
        body,
        top,
        edit: PartHeaderEdit {
            cte: cte_edit,
            utf8,
        },
        fallback: PartHeaderEdit {
            cte: Some(QUOTED_PRINTABLE),
            utf8,
        },
    })
}

/// Cuts the decoded text around the events. A run that starts a line and ends with
/// a line break encodes the same way in every copy, so it is encoded here, once;
/// for base64 only the first whole lines are.
fn chunks(d: &[u8], events: Vec<Event>, cte: Cte, owned: &mut Vec<u8>) -> Vec<Chunk> {
    let mut out = Vec::with_capacity(events.len() * 4 + 4);
    let mut pos = 0;
    for event in events {
        literal(d, pos, event.at.start, cte, owned, &mut out);
        out.extend(event.inserts);
        pos = event.at.end;
    }
    literal(d, pos, d.len(), cte, owned, &mut out);
    out
}

fn literal(d: &[u8], a: usize, b: usize, cte: Cte, owned: &mut Vec<u8>, out: &mut Vec<Chunk>) {
    if a >= b {
        return;
    }
    let at_start = out.is_empty();
    let text = |out: &mut Vec<Chunk>, r: Range<usize>| {
        if !r.is_empty() {
            out.push(Chunk::Text(r));
        }
    };
    match cte {
        Cte::Raw => out.push(Chunk::Fixed {
            text: a..b,
            enc: None,
        }),
        Cte::Base64 => {
            let whole = if at_start {
                (b - a) / B64_CHUNK * B64_CHUNK
            } else {
                0
            };
            if whole > 0 {
                let start = owned.len();
                base64_encode(&d[a..a + whole], true, owned);
                out.push(Chunk::Fixed {
                    text: a..a + whole,
                    enc: Some(start..owned.len()),
                });
            }
            text(out, a + whole..b);
        }
        Cte::Qp => {
            let head_end = if at_start {
                a
            } else {
                memchr::memchr(b'\n', &d[a..b]).map_or(b, |p| a + p + 1)
            };
            text(out, a..head_end);
            let mid_end =
                memchr::memrchr(b'\n', &d[head_end..b]).map_or(head_end, |p| head_end + p + 1);
            if mid_end > head_end {
                let start = owned.len();
                qp_encode(&d[head_end..mid_end], owned);
                out.push(Chunk::Fixed {
                    text: head_end..mid_end,
                    enc: Some(start..owned.len()),
                });
            }
            text(out, mid_end..b);
        }
    }
}

impl PartPlan {
    /// Writes this part's body for one copy. Returns false when a 7-bit part written
    /// as is would get a line over 998 octets: the caller writes it again with
    /// `force_qp`.
    #[allow(clippy::too_many_arguments)]
    pub fn render(
        &self,
        original: &[u8],
        owned: &[u8],
        footer: &CompiledFooter,
        urls: &Urls<'_>,
        force_qp: bool,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> bool {
        let cte = if force_qp { Cte::Qp } else { self.cte };
        let d = match &self.decoded {
            Decoded::Original(r) => &original[r.clone()],
            Decoded::Owned(s) => s.as_bytes(),
        };
        let start = out.len();
        let mut inserted: Vec<Range<usize>> = Vec::new();
        scratch.clear();
        let flush = |scratch: &mut Vec<u8>, out: &mut Vec<u8>| {
            match cte {
                Cte::Qp => qp_encode(scratch, out),
                Cte::Base64 => base64_encode(scratch, false, out),
                Cte::Raw => out.extend_from_slice(scratch),
            }
            scratch.clear();
        };
        let footer = &match self.kind {
            Kind::Plain => &footer.text,
            Kind::Html => &footer.html,
        }[usize::from(urls.preferences.is_some())];
        for chunk in &self.chunks {
            let mark = scratch.len();
            match chunk {
                Chunk::Fixed { text, enc } => match enc {
                    Some(enc) if cte == self.cte => {
                        flush(scratch, out);
                        out.extend_from_slice(&owned[enc.clone()]);
                    }
                    _ => scratch.extend_from_slice(&d[text.clone()]),
                },
                Chunk::Text(text) => scratch.extend_from_slice(&d[text.clone()]),
                Chunk::Sep(s) => scratch.extend_from_slice(s.as_bytes()),
                Chunk::Unsubscribe => {
                    scratch.extend_from_slice(urls.unsubscribe(self.kind).as_bytes())
                }
                Chunk::Preferences => {
                    scratch.extend_from_slice(urls.preferences(self.kind).as_bytes())
                }
                Chunk::Footer => {
                    for piece in footer {
                        let s = match piece {
                            Piece::Lit(s) => s.as_str(),
                            Piece::Unsubscribe => urls.unsubscribe(self.kind),
                            Piece::Preferences => urls.preferences(self.kind),
                        };
                        scratch.extend_from_slice(s.as_bytes());
                    }
                }
            }
            if cte == Cte::Raw && !matches!(chunk, Chunk::Fixed { .. }) {
                let at = out.len() + mark;
                inserted.push(at..out.len() + scratch.len());
            }
        }
        flush(scratch, out);
        if self.trailing_break && !out[start..].ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        inserted
            .into_iter()
            .all(|r| longest_line_around(out, start, r) <= MAX_LINE)
    }
}
