//! One recipient's copy of a message, made just before DKIM and relay: the List-*
//! unsubscribe fields, the link in the body, MIME-correct re-encoding. Sans-IO.

mod body;
mod footer;
mod headers;
mod mime;
mod parse;
mod scan;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use mail_parser::{Message, PartType};

use body::{PartPlan, Urls};
use footer::html_escape_text;
pub use footer::{CompiledFooter, Footer};
use headers::{CONTROL_PREFIX, TopEdit};

/// What happened to the body of a copy, for the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLink {
    /// The mailer's `%%unsubscribe_url%%` / `%%preferences_url%%` were filled in.
    Placeholder,
    /// A footer was added to the displayed text part(s).
    Footer,
    /// Signed or encrypted: the body was left as it was, only headers changed.
    SkippedSigned,
    /// Nothing we could put a link in (or a message we could not parse): headers only.
    NoTextPart,
}

/// The URLs of one copy.
#[derive(Debug, Clone, Copy)]
pub struct Links<'a> {
    pub unsubscribe: &'a str,
    pub preferences: Option<&'a str>,
    /// An address or a `mailto:` URI, offered second in List-Unsubscribe.
    pub mailto: Option<&'a str>,
}

/// One recipient's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub bytes: Vec<u8>,
    pub body_link: BodyLink,
}

/// A piece of every copy, in order.
#[derive(Debug)]
enum Segment {
    Original(Range<usize>),
    Owned(Range<usize>),
    /// The header block of a changed part (the message's own for a single-part
    /// body): `fallback` when a 7-bit part had to become quoted-printable.
    Head {
        part: usize,
        primary: Range<usize>,
        fallback: Range<usize>,
    },
    ListUnsubscribe,
    Body(usize),
}

/// Everything about a message that is the same for all its recipients, computed once
/// per message (parsing, locating the text parts, the placeholder or footer
/// insertion points, the pre-encoded runs). Delivery caches it beside the message.
///
/// The work is split so that a message with many recipients is understood once:
/// `new` parses it (mail-parser), decides where the link goes and encodes every run
/// of the changed parts that is the same in every copy; `render` only splices byte
/// ranges and encodes the few bytes around each URL. What it does not change stays
/// byte for byte.
///
/// Boxed slices keep it small (under 100 bytes) for the caches that hold it.
#[derive(Debug)]
pub struct Prepared {
    /// The message as queued, shared with the queue's copy rather than duplicated:
    /// a large message is then held once, not once more per prepared template.
    original: Arc<Vec<u8>>,
    /// Header blocks and pre-encoded runs, addressed by range.
    owned: Box<[u8]>,
    segments: Box<[Segment]>,
    parts: Box<[PartPlan]>,
    footer: Arc<CompiledFooter>,
    body_link: BodyLink,
    replaced: Option<Box<str>>,
}

impl Prepared {
    /// Never fails: a message it cannot understand gets the headers only. A missing
    /// Date is today; a missing Message-ID is random: one each per message, shared
    /// by its copies, like the ones a mailer would have set.
    pub fn new(message: Arc<Vec<u8>>, footer: Arc<CompiledFooter>, hostname: &str) -> Prepared {
        Prepared::new_at(
            message,
            footer,
            hostname,
            crate::clock::now(),
            rand::random::<u128>(),
        )
    }

    /// [`Prepared::new`] with the clock and the randomness given: the pure core.
    pub fn new_at(
        shared: Arc<Vec<u8>>,
        footer: Arc<CompiledFooter>,
        hostname: &str,
        now: i64,
        unique: u128,
    ) -> Prepared {
        Prepared::new_with(parse::parse, shared, footer, hostname, now, unique)
    }

    /// [`Prepared::new_at`] with the parser given, so that tests can compare ours
    /// with mail-parser's full parse.
    fn new_with(
        parse: fn(&[u8]) -> Option<Message<'_>>,
        shared: Arc<Vec<u8>>,
        footer: Arc<CompiledFooter>,
        hostname: &str,
        now: i64,
        unique: u128,
    ) -> Prepared {
        let message: &[u8] = &shared;
        let header_end = header_block_len(message);
        let rest = &message[header_end..];
        let blank_end = header_end
            + if rest.starts_with(b"\r\n") {
                2
            } else if rest.starts_with(b"\n") {
                1
            } else {
                0
            };
        // Room for every encoding made below without growing: the coders reserve a
        // quarter more than the text they encode (escapes), and growing copies what
        // is already there.
        let mut owned = Vec::with_capacity(message.len() + message.len() / 4 + 1024);

        let mut parsed = parse(message);
        let (mut body_link, targets) = match &parsed {
            Some(m) => body::analyse(m),
            None => (BodyLink::NoTextPart, Vec::new()),
        };
        let mut parts = Vec::with_capacity(targets.len());
        if let Some(m) = &mut parsed {
            for (idx, kind, events) in targets {
                let Some(part) = m.parts.get_mut(idx) else {
                    continue;
                };
                // Each part is a target once: its text moves into the plan.
                let (PartType::Text(text) | PartType::Html(text)) = std::mem::take(&mut part.body)
                else {
                    continue;
                };
                if let Some(plan) = body::plan(
                    message,
                    part,
                    text,
                    idx == 0,
                    kind,
                    events,
                    &footer,
                    &mut owned,
                ) {
                    parts.push(plan);
                }
            }
        }
        parts.sort_by_key(|p| p.body.start);
        // Our reading of the header block and mail-parser's must agree, and the parts
        // must follow each other; otherwise the body is not ours to touch.
        let mut pos = blank_end;
        let consistent = parts.iter().all(|p| {
            let ok = if p.top {
                p.body.start == blank_end
            } else {
                p.header.start >= pos && p.header.end <= p.body.start
            } && p.body.start <= p.body.end
                && p.body.end <= message.len();
            pos = p.body.end;
            ok
        });
        // Without the blank line, whatever we added would land in the header.
        if !consistent || blank_end == header_end {
            parts.clear();
        }
        if parts.is_empty() && matches!(body_link, BodyLink::Placeholder | BodyLink::Footer) {
            body_link = BodyLink::NoTextPart;
        }

        let block = &message[..header_end];
        let top_fields = headers::fields(block);
        let date = (!top_fields.iter().any(|f| f.is("date"))).then(|| crate::clock::rfc5322(now));
        let message_id = (!top_fields.iter().any(|f| f.is("message-id")))
            .then(|| format!("<{unique:032x}@{}>", clean_host(hostname)));
        let top = parts.iter().position(|p| p.top);
        let mut edit = TopEdit {
            part: top.map(|i| parts[i].edit),
            date: date.as_deref(),
            message_id: message_id.as_deref(),
        };
        let mut segments = Vec::with_capacity(parts.len() * 4 + 4);
        let start = owned.len();
        let replaced = headers::write_top(block, &edit, &mut owned);
        let primary = start..owned.len();
        match top {
            Some(i) if parts[i].cte == body::Cte::Raw => {
                edit.part = Some(parts[i].fallback);
                let start = owned.len();
                headers::write_top(block, &edit, &mut owned);
                segments.push(Segment::Head {
                    part: i,
                    primary,
                    fallback: start..owned.len(),
                });
            }
            _ => segments.push(Segment::Owned(primary)),
        }
        segments.push(Segment::ListUnsubscribe);
        let mut pos = header_end;
        for (i, p) in parts.iter().enumerate() {
            if !p.top {
                segments.push(Segment::Original(pos..p.header.start));
                let block = &message[p.header.clone()];
                let raw = p.cte == body::Cte::Raw;
                if p.edit.is_none() && !raw {
                    segments.push(Segment::Original(p.header.clone()));
                } else {
                    let start = owned.len();
                    if p.edit.is_none() {
                        owned.extend_from_slice(block);
                    } else {
                        headers::write_part(block, p.edit, &mut owned);
                    }
                    let primary = start..owned.len();
                    let start = owned.len();
                    if raw {
                        headers::write_part(block, p.fallback, &mut owned);
                    }
                    segments.push(Segment::Head {
                        part: i,
                        primary,
                        fallback: start..owned.len(),
                    });
                }
                pos = p.header.end;
            }
            segments.push(Segment::Original(pos..p.body.start));
            segments.push(Segment::Body(i));
            pos = p.body.end;
        }
        segments.push(Segment::Original(pos..message.len()));
        segments.retain(|s| !matches!(s, Segment::Original(r) if r.is_empty()));

        Prepared {
            original: shared.clone(),
            owned: owned.into_boxed_slice(),
            segments: segments.into_boxed_slice(),
            parts: parts.into_boxed_slice(),
            footer,
            body_link,
            replaced: (!replaced.is_empty()).then(|| replaced.join(", ").into_boxed_str()),
        }
    }

    /// The List-Unsubscribe value(s) the mailer had set, which we replace (for the
    /// event log).
    pub fn replaced_list_unsubscribe(&self) -> Option<&str> {
        self.replaced.as_deref()
    }

    /// What every copy's body gets.
    pub fn body_link(&self) -> BodyLink {
        self.body_link
    }

    /// One recipient's copy.
    pub fn render(&self, links: &Links<'_>) -> Rendered {
        let unsubscribe = mime::clean_url(links.unsubscribe);
        let unsubscribe_html = html_escape_url(&unsubscribe);
        let preferences = links.preferences.map(mime::clean_url);
        let preferences_html = preferences.as_deref().map(html_escape_url);
        let mailto = links.mailto.map(mime::clean_url);
        let urls = Urls {
            unsubscribe: &unsubscribe,
            unsubscribe_html: &unsubscribe_html,
            preferences: preferences.as_deref().zip(preferences_html.as_deref()),
        };
        let mut force = vec![false; self.parts.len()];
        let mut bytes = self.render_with(&urls, mailto.as_deref(), &mut force);
        if force.iter().any(|&f| f) {
            // A URL made a 7-bit line too long: those parts go quoted-printable.
            bytes = self.render_with(&urls, mailto.as_deref(), &mut force);
        }
        Rendered {
            bytes,
            body_link: self.body_link,
        }
    }

    /// Writes a copy; sets `force[i]` for each 7-bit part that needs re-encoding.
    fn render_with(&self, urls: &Urls<'_>, mailto: Option<&str>, force: &mut [bool]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.original.len() + self.owned.len() / 8 + 1024);
        let mut scratch = Vec::new();
        for segment in &self.segments {
            match segment {
                Segment::Original(r) => out.extend_from_slice(&self.original[r.clone()]),
                Segment::Owned(r) => out.extend_from_slice(&self.owned[r.clone()]),
                Segment::Head {
                    part,
                    primary,
                    fallback,
                } => {
                    let r = if force[*part] { fallback } else { primary };
                    out.extend_from_slice(&self.owned[r.clone()]);
                }
                Segment::ListUnsubscribe => {
                    headers::write_list_unsubscribe(&mut out, urls.unsubscribe, mailto)
                }
                Segment::Body(i) => {
                    let fits = self.parts[*i].render(
                        &self.original,
                        &self.owned,
                        &self.footer,
                        urls,
                        force[*i],
                        &mut out,
                        &mut scratch,
                    );
                    if !fits {
                        force[*i] = true;
                    }
                }
            }
        }
        out
    }
}

fn html_escape_url(url: &str) -> Cow<'_, str> {
    if url.contains(['&', '<', '>', '"', '\'']) {
        html_escape_text(url).into()
    } else {
        url.into()
    }
}

/// The right-hand side of a Message-ID we make: a hostname, nothing else.
fn clean_host(hostname: &str) -> String {
    let host: String = hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .collect();
    if host.is_empty() {
        "localhost".to_owned()
    } else {
        host
    }
}

/// Transactional mail and our own DSNs: nothing added, only `X-Optgate-*` removed.
pub fn transactional(message: &[u8]) -> Vec<u8> {
    strip_control_headers(message)
}

/// Removes every `X-Optgate-*` field (with its folded continuation lines) from the
/// header block; the body is not looked at.
pub fn strip_control_headers(message: &[u8]) -> Vec<u8> {
    let header_end = header_block_len(message);
    let mut out = Vec::with_capacity(message.len());
    let mut skipping = false;
    for line in message[..header_end].split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            skipping = line.len() >= CONTROL_PREFIX.len()
                && line[..CONTROL_PREFIX.len()].eq_ignore_ascii_case(CONTROL_PREFIX);
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&message[header_end..]);
    out
}

/// The header fields' length: up to the end of the line before the blank line that
/// ends them, or the whole message if it has no body.
pub fn header_block_len(message: &[u8]) -> usize {
    let mut pos = 0;
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            return pos;
        }
        pos += line.len();
    }
    message.len()
}

/// The value of the first header field called `name` (case-insensitive), unfolded
/// and trimmed.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let headers = &message[..header_block_len(message)];
    let mut found: Option<Vec<u8>> = None;
    for line in headers.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        match (&mut found, continuation) {
            (Some(v), true) => v.extend_from_slice(line),
            (Some(_), false) => break,
            (None, false) => {
                if let Some(colon) = line.iter().position(|&b| b == b':')
                    && line[..colon]
                        .trim_ascii()
                        .eq_ignore_ascii_case(name.as_bytes())
                {
                    found = Some(line[colon + 1..].to_vec());
                }
            }
            (None, true) => {}
        }
    }
    found.map(|v| {
        String::from_utf8_lossy(&v)
            .split(['\r', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    })
}
