//! Small form bodies read into name/value pairs, whether urlencoded or
//! multipart/form-data: RFC 8058 allows both, and mail providers use both.

/// Why a body could not be read as a form.
#[derive(Debug, PartialEq, Eq)]
pub enum FormError {
    /// Neither urlencoded nor multipart/form-data.
    UnsupportedType,
    /// Multipart without a usable boundary, or not closed by it.
    Malformed,
}

/// The fields of a form body, in order. A missing Content-Type is read as urlencoded,
/// which is what a bare `curl -d` and most hand-written clients mean.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let content_type = content_type.unwrap_or("application/x-www-form-urlencoded");
    let mut params = content_type.split(';');
    let media = params.next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(form_urlencoded::parse(body).into_owned().collect())
    } else if media.eq_ignore_ascii_case("multipart/form-data") {
        let boundary = params
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, value)| unquote(value.trim()))
            .filter(|b| (1..=70).contains(&b.len()))
            .ok_or(FormError::Malformed)?;
        multipart(body, boundary.as_bytes())
    } else {
        Err(FormError::UnsupportedType)
    }
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// RFC 7578 / RFC 2046: parts between `--boundary` lines, each with headers, a blank
/// line and a value. Bare LF line ends are accepted too; file parts keep their name.
fn multipart(body: &[u8], boundary: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let delimiter = [b"--", boundary].concat();
    // The first delimiter may open the body or follow a preamble on its own line.
    let mut pos = if body.starts_with(&delimiter) {
        delimiter.len()
    } else {
        find(body, &[b"\n", delimiter.as_slice()].concat(), 0).ok_or(FormError::Malformed)?
            + 1
            + delimiter.len()
    };
    let next_delimiter = [b"\n", delimiter.as_slice()].concat();
    let mut fields = Vec::new();
    loop {
        let rest = body.get(pos..).ok_or(FormError::Malformed)?;
        if rest.starts_with(b"--") {
            return Ok(fields);
        }
        // Transport padding, then the end of the delimiter line.
        let line_end = find(rest, b"\n", 0).ok_or(FormError::Malformed)?;
        if !rest[..line_end]
            .iter()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r'))
        {
            return Err(FormError::Malformed);
        }
        let start = pos + line_end + 1;
        let end = find(body, &next_delimiter, start).ok_or(FormError::Malformed)?;
        let mut part = &body[start..end];
        if let Some(p) = part.strip_suffix(b"\r") {
            part = p;
        }
        if let Some(field) = field(part) {
            fields.push(field);
        }
        pos = end + next_delimiter.len();
    }
}

/// One part as a field, if it names one (`Content-Disposition: form-data; name=…`).
fn field(part: &[u8]) -> Option<(String, String)> {
    let (head, value) = match find(part, b"\r\n\r\n", 0) {
        Some(i) => (&part[..i], &part[i + 4..]),
        None => {
            let i = find(part, b"\n\n", 0)?;
            (&part[..i], &part[i + 2..])
        }
    };
    let head = String::from_utf8_lossy(head);
    let name = head.lines().find_map(|line| {
        let (header, params) = line.split_once(':')?;
        if !header.trim().eq_ignore_ascii_case("content-disposition") {
            return None;
        }
        params.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("name")
                .then(|| unquote(v.trim()).to_string())
        })
    })?;
    Some((name, String::from_utf8_lossy(value).into_owned()))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// Form fields from literals, for tests.
#[cfg(test)]
pub fn fields(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencoded_with_or_without_content_type() {
        let want = fields(&[("List-Unsubscribe", "One-Click")]);
        let body = b"List-Unsubscribe=One-Click";
        assert_eq!(
            parse(Some("application/x-www-form-urlencoded"), body),
            Ok(want.clone())
        );
        assert_eq!(
            parse(
                Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
                body
            ),
            Ok(want.clone())
        );
        assert_eq!(parse(None, body), Ok(want));
        assert_eq!(
            parse(None, b"action=un%73ubscribe&x=a+b"),
            Ok(fields(&[("action", "unsubscribe"), ("x", "a b")]))
        );
        assert_eq!(parse(None, b""), Ok(vec![]));
        assert_eq!(
            parse(Some("text/plain"), body),
            Err(FormError::UnsupportedType)
        );
    }

    #[test]
    fn multipart_as_mail_providers_and_curl_send_it() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--XyZ--\r\n";
        assert_eq!(
            parse(Some("multipart/form-data; boundary=XyZ"), body),
            Ok(fields(&[("List-Unsubscribe", "One-Click")]))
        );
        // Quoted boundary, a preamble, two parts, bare LF, transport padding.
        let body = b"preamble\n--a b  \nContent-Disposition: form-data; name=x\nContent-Type: text/plain\n\n1\n--a b\ncontent-disposition: form-data; filename=\"f\"; name=\"y\"\n\ntwo\nlines\n--a b--";
        assert_eq!(
            parse(Some("multipart/form-data; boundary=\"a b\""), body),
            Ok(fields(&[("x", "1"), ("y", "two\nlines")]))
        );
    }

    #[test]
    fn broken_multipart_is_refused() {
        let ct = Some("multipart/form-data; boundary=XyZ");
        assert_eq!(parse(ct, b""), Err(FormError::Malformed));
        assert_eq!(
            parse(
                ct,
                b"--XyZ\r\nContent-Disposition: form-data; name=a\r\n\r\nno end"
            ),
            Err(FormError::Malformed)
        );
        assert_eq!(
            parse(Some("multipart/form-data"), b"--x--"),
            Err(FormError::Malformed)
        );
        assert_eq!(
            parse(ct, b"--XyZjunk\r\n--XyZ--"),
            Err(FormError::Malformed)
        );
    }
}
