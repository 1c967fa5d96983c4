//! Header-field surgery on raw bytes: removing and replacing whole fields (folded
//! lines included), changing one Content-Type parameter, writing the List-* fields.

/// Header fields whose name starts with this are instructions to optgate, never relayed.
pub(super) const CONTROL_PREFIX: &[u8] = b"x-optgate-";

/// Soft limit of RFC 5322 for the lines optgate writes itself.
const FOLD_AT: usize = 78;

/// One header field as it is on the wire: from its name to the end of its last
/// continuation line, line break included.
pub(super) struct Field<'a> {
    pub name: &'a [u8],
    pub raw: &'a [u8],
}

impl Field<'_> {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }

    /// The value unfolded and trimmed, for logs.
    pub fn value(&self) -> String {
        let colon = self
            .raw
            .iter()
            .position(|&b| b == b':')
            .map_or(0, |p| p + 1);
        String::from_utf8_lossy(&self.raw[colon..])
            .split(['\r', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The fields of a header block (the bytes before the blank line). A line that is
/// neither a field nor a continuation is kept as a field with an empty name, so
/// nothing is lost when the block is written back.
pub(super) fn fields(block: &[u8]) -> Vec<Field<'_>> {
    let mut out: Vec<Field<'_>> = Vec::with_capacity(24);
    let mut start = 0;
    let mut pos = 0;
    for line in block.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation && pos > start {
            out.push(field(&block[start..pos]));
            start = pos;
        }
        pos += line.len();
    }
    if pos > start {
        out.push(field(&block[start..pos]));
    }
    out
}

fn field(raw: &[u8]) -> Field<'_> {
    let name = raw
        .iter()
        .position(|&b| b == b':')
        .map_or(&raw[..0], |colon| raw[..colon].trim_ascii());
    Field { name, raw }
}

/// What to change in the header of a text part that is re-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct PartHeaderEdit {
    /// Replace (or add) Content-Transfer-Encoding with this.
    pub cte: Option<&'static str>,
    /// Set the charset parameter of Content-Type to utf-8.
    pub utf8: bool,
}

impl PartHeaderEdit {
    pub fn is_none(&self) -> bool {
        self.cte.is_none() && !self.utf8
    }
}

/// What to do with the top-level header block.
pub(super) struct TopEdit<'a> {
    /// The single body part is the message itself: its MIME fields change here.
    pub part: Option<PartHeaderEdit>,
    /// Added at the end when missing: Date and Message-ID values.
    pub date: Option<&'a str>,
    pub message_id: Option<&'a str>,
}

/// Writes the top-level header block without `X-Optgate-*` and the mailer's List-*
/// unsubscribe fields, with the MIME edit of a single-part body and the missing Date
/// and Message-ID added. Returns the List-Unsubscribe values it removed.
pub(super) fn write_top(block: &[u8], edit: &TopEdit<'_>, out: &mut Vec<u8>) -> Vec<String> {
    let floor = out.len();
    let mut replaced = Vec::new();
    let mut kept: Vec<Field<'_>> = Vec::with_capacity(24);
    for f in fields(block) {
        let control = f.name.len() >= CONTROL_PREFIX.len()
            && f.name[..CONTROL_PREFIX.len()].eq_ignore_ascii_case(CONTROL_PREFIX);
        if f.is("list-unsubscribe") {
            replaced.push(f.value());
        } else if !(control || f.is("list-unsubscribe-post")) {
            kept.push(f);
        }
    }
    match edit.part {
        Some(part) if !part.is_none() => write_part_fields(&kept, part, true, out),
        _ => kept.iter().for_each(|f| out.extend_from_slice(f.raw)),
    }
    end_line(out, floor);
    if let Some(date) = edit.date {
        push_field(out, "Date", date);
    }
    if let Some(id) = edit.message_id {
        push_field(out, "Message-ID", id);
    }
    replaced
}

/// Writes a part's header block with its Content-Type charset and/or
/// Content-Transfer-Encoding changed; other fields stay as they were.
pub(super) fn write_part(block: &[u8], edit: PartHeaderEdit, out: &mut Vec<u8>) {
    write_part_fields(&fields(block), edit, false, out);
}

fn write_part_fields(fields: &[Field<'_>], edit: PartHeaderEdit, top: bool, out: &mut Vec<u8>) {
    let floor = out.len();
    let mut wrote_type = false;
    let mut wrote_cte = false;
    for f in fields {
        if f.is("content-type") && !wrote_type {
            wrote_type = true;
            if edit.utf8 {
                set_charset_utf8(f.raw, out);
            } else {
                out.extend_from_slice(f.raw);
            }
        } else if f.is("content-transfer-encoding") {
            match edit.cte {
                Some(cte) if !wrote_cte => {
                    end_line(out, floor);
                    push_field(out, "Content-Transfer-Encoding", cte);
                }
                Some(_) => {}
                None => out.extend_from_slice(f.raw),
            }
            wrote_cte = true;
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    end_line(out, floor);
    if edit.utf8 && !wrote_type {
        push_field(out, "Content-Type", "text/plain; charset=utf-8");
    }
    if let Some(cte) = edit.cte
        && !wrote_cte
    {
        push_field(out, "Content-Transfer-Encoding", cte);
    }
    if top && !fields.iter().any(|f| f.is("mime-version")) {
        push_field(out, "MIME-Version", "1.0");
    }
}

/// Rewrites a Content-Type field so that its charset parameter says utf-8, keeping
/// every other parameter and the folding as they were.
pub(super) fn set_charset_utf8(raw: &[u8], out: &mut Vec<u8>) {
    let Some(colon) = raw.iter().position(|&b| b == b':') else {
        out.extend_from_slice(raw);
        return;
    };
    let spans = charset_params(raw, colon + 1);
    if let Some((first, others)) = spans.split_first() {
        let mut pos = 0;
        out.extend_from_slice(&raw[pos..first.0]);
        out.extend_from_slice(b"charset=utf-8");
        pos = first.1;
        for &(start, end) in others {
            // An RFC 2231 continuation of the old value: dropped with its `;`.
            let semi = raw[pos..start]
                .iter()
                .rposition(|&b| b == b';')
                .map_or(start, |p| pos + p);
            out.extend_from_slice(&raw[pos..semi]);
            pos = end;
        }
        out.extend_from_slice(&raw[pos..]);
        return;
    }
    // No charset yet: add one at the end of the value, on a new folded line when the
    // last line is already long.
    let body_end = raw.len() - trailing_break(raw);
    let value_end = colon + 1 + raw[colon + 1..body_end].trim_ascii_end().len();
    let last_line_len = raw[..value_end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(value_end, |p| value_end - p - 1);
    let ends_with_semi = raw[..value_end].last() == Some(&b';');
    out.extend_from_slice(&raw[..value_end]);
    if !ends_with_semi {
        out.push(b';');
    }
    if last_line_len + 16 > FOLD_AT {
        out.extend_from_slice(b"\r\n charset=utf-8");
    } else {
        out.extend_from_slice(b" charset=utf-8");
    }
    out.extend_from_slice(&raw[value_end..]);
}

/// Byte spans of the `charset` parameters (`charset`, `charset*`, `charset*0*`…) of
/// a Content-Type field, from the parameter name to the end of its value.
fn charset_params(raw: &[u8], from: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = from;
    let mut quoted = false;
    let mut comment = 0usize;
    while i < raw.len() {
        let b = raw[i];
        if quoted {
            match b {
                b'\\' => i += 1,
                b'"' => quoted = false,
                _ => {}
            }
        } else if comment > 0 {
            match b {
                b'\\' => i += 1,
                b'(' => comment += 1,
                b')' => comment -= 1,
                _ => {}
            }
        } else {
            match b {
                b'"' => quoted = true,
                b'(' => comment = 1,
                b';' => {
                    let mut j = i + 1;
                    while j < raw.len() && raw[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    let name_start = j;
                    while j < raw.len()
                        && !matches!(raw[j], b'=' | b';' | b'"' | b'(')
                        && !raw[j].is_ascii_whitespace()
                    {
                        j += 1;
                    }
                    let name = &raw[name_start..j];
                    let is_charset = name.eq_ignore_ascii_case(b"charset")
                        || (name.len() > 7 && name[..8].eq_ignore_ascii_case(b"charset*"));
                    while j < raw.len() && raw[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if is_charset && raw.get(j) == Some(&b'=') {
                        j += 1;
                        while j < raw.len() && matches!(raw[j], b' ' | b'\t') {
                            j += 1;
                        }
                        let end = if raw.get(j) == Some(&b'"') {
                            let mut k = j + 1;
                            while k < raw.len() && raw[k] != b'"' {
                                if raw[k] == b'\\' {
                                    k += 1;
                                }
                                k += 1;
                            }
                            (k + 1).min(raw.len())
                        } else {
                            let mut k = j;
                            while k < raw.len()
                                && !matches!(raw[k], b';' | b'(' | b'"')
                                && !raw[k].is_ascii_whitespace()
                            {
                                k += 1;
                            }
                            k
                        };
                        spans.push((name_start, end));
                        i = end;
                        continue;
                    }
                    i = name_start;
                    continue;
                }
                _ => {}
            }
        }
        i += 1;
    }
    spans
}

fn trailing_break(raw: &[u8]) -> usize {
    if raw.ends_with(b"\r\n") {
        2
    } else if raw.ends_with(b"\n") {
        1
    } else {
        0
    }
}

/// Makes sure what follows starts on a new line, when something was written since
/// `floor`.
fn end_line(out: &mut Vec<u8>, floor: usize) {
    if out.len() > floor && !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `List-Unsubscribe` (the HTTPS URI first, then the mailto if any) and
/// `List-Unsubscribe-Post` (RFC 2369, RFC 8058). The URLs are already 7-bit and free
/// of angle brackets; one longer than a line allows is folded inside its brackets,
/// where RFC 2369 says whitespace is ignored.
pub(super) fn write_list_unsubscribe(out: &mut Vec<u8>, https: &str, mailto: Option<&str>) {
    let start = out.len();
    out.extend_from_slice(b"List-Unsubscribe: ");
    push_bracketed(out, start, https);
    if let Some(mailto) = mailto {
        out.push(b',');
        let line_len = out.len() - line_start(out, start);
        let mailto_len = mailto.len() + 2 + if has_mailto_scheme(mailto) { 0 } else { 7 };
        if line_len + 1 + mailto_len > FOLD_AT {
            out.extend_from_slice(b"\r\n ");
        } else {
            out.push(b' ');
        }
        if has_mailto_scheme(mailto) {
            push_bracketed(out, start, mailto);
        } else {
            push_bracketed(out, start, &format!("mailto:{mailto}"));
        }
    }
    out.extend_from_slice(b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n");
}

fn has_mailto_scheme(s: &str) -> bool {
    s.len() >= 7 && s[..7].eq_ignore_ascii_case("mailto:")
}

fn line_start(out: &[u8], floor: usize) -> usize {
    out[floor..]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(floor, |p| floor + p + 1)
}

fn push_bracketed(out: &mut Vec<u8>, floor: usize, url: &str) {
    const ROOM: usize = super::mime::MAX_LINE - 2;
    out.push(b'<');
    for &b in url.as_bytes() {
        if out.len() - line_start(out, floor) >= ROOM {
            out.extend_from_slice(b"\r\n ");
        }
        out.push(b);
    }
    out.push(b'>');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charset(raw: &str) -> String {
        let mut out = Vec::new();
        set_charset_utf8(raw.as_bytes(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn charset_parameter_changes_and_the_rest_stays() {
        assert_eq!(
            charset("Content-Type: text/plain; charset=\"ISO-8859-1\"; format=flowed\r\n"),
            "Content-Type: text/plain; charset=utf-8; format=flowed\r\n"
        );
        assert_eq!(
            charset("Content-Type: text/html;\r\n\tCharSet=windows-1252\r\n"),
            "Content-Type: text/html;\r\n\tcharset=utf-8\r\n"
        );
        assert_eq!(
            charset("Content-Type: text/plain\r\n"),
            "Content-Type: text/plain; charset=utf-8\r\n"
        );
        assert_eq!(
            charset("Content-Type: text/plain; name=\"a;charset=x\"\r\n"),
            "Content-Type: text/plain; name=\"a;charset=x\"; charset=utf-8\r\n"
        );
        assert_eq!(
            charset("Content-Type: text/plain; charset*0*=iso-8859-1''a; charset*1=b\r\n"),
            "Content-Type: text/plain; charset=utf-8\r\n"
        );
    }

    #[test]
    fn list_unsubscribe_folds_before_the_mailto_when_long() {
        let mut out = Vec::new();
        write_list_unsubscribe(
            &mut out,
            "https://optgate.example/u/abc",
            Some("u@example.com"),
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "List-Unsubscribe: <https://optgate.example/u/abc>, <mailto:u@example.com>\r\n\
             List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        );
        let mut out = Vec::new();
        let long = format!("https://optgate.example/u/{}", "t".repeat(60));
        write_list_unsubscribe(&mut out, &long, Some("mailto:unsubscribe@optgate.example"));
        assert!(
            String::from_utf8_lossy(&out)
                .contains(">,\r\n <mailto:unsubscribe@optgate.example>\r\n")
        );
        let mut out = Vec::new();
        write_list_unsubscribe(&mut out, &"x".repeat(3000), None);
        assert!(out.split(|&b| b == b'\n').all(|l| l.len() <= 999));
    }
}
