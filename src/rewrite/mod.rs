//! One recipient's copy of a message, made just before relay. Today: the
//! `X-Optgate-*` control headers are removed; everything else stays byte for byte.

/// Header fields whose name starts with this are instructions to optgate, never relayed.
const CONTROL_PREFIX: &[u8] = b"x-optgate-";

/// The copy to relay for one recipient.
pub fn personalise(message: &[u8]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"From: a@example.com\r\nX-Optgate-Purpose: news\r\n  letter\r\nSubject: Hi\r\n there\r\nx-optgate-trace: 1\r\n\r\nX-Optgate-Purpose: body stays\r\n";

    #[test]
    fn control_headers_go_and_the_rest_stays_byte_for_byte() {
        let out = strip_control_headers(MSG);
        assert_eq!(
            out,
            b"From: a@example.com\r\nSubject: Hi\r\n there\r\n\r\nX-Optgate-Purpose: body stays\r\n".to_vec()
        );
    }

    #[test]
    fn header_values_are_unfolded() {
        assert_eq!(
            header_value(MSG, "x-optgate-purpose").as_deref(),
            Some("news letter")
        );
        assert_eq!(header_value(MSG, "Subject").as_deref(), Some("Hi there"));
        assert_eq!(header_value(MSG, "To"), None);
        assert_eq!(
            header_value(b"Subject: no body", "subject").as_deref(),
            Some("no body")
        );
    }
}
