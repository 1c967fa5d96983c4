//! One SMTP reply, formatted once: code, enhanced status code (RFC 3463) and text.
//! Handlers return these; the session queues them and writes them in batches.

use std::fmt;

/// A complete reply as it goes on the wire, CRLF included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    code: u16,
    wire: String,
}

impl Reply {
    /// `250 2.1.0 Sender OK`. Anything but printable ASCII in `text` (which may quote
    /// what the peer sent) becomes `?`, so a reply is always exactly one short line.
    pub fn new(code: u16, esc: &str, text: impl fmt::Display) -> Reply {
        Reply {
            code,
            wire: format!("{code} {esc} {}\r\n", clean(&text.to_string())),
        }
    }

    /// A reply without an enhanced status code. RFC 2034 leaves them out of the
    /// greeting and the HELO/EHLO answers, and they have no place in 334/354 prompts.
    pub fn bare(code: u16, text: impl fmt::Display) -> Reply {
        Reply {
            code,
            wire: format!("{code} {}\r\n", clean(&text.to_string())),
        }
    }

    /// `250-first`, `250-…`, `250 last`: the EHLO answer.
    pub fn multiline(code: u16, lines: &[String]) -> Reply {
        let mut wire = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            wire.push_str(&format!("{code}{sep}{}\r\n", clean(line)));
        }
        Reply { code, wire }
    }

    pub fn code(&self) -> u16 {
        self.code
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.wire.as_bytes()
    }

    /// The reply without its line ending, for logs and tests.
    pub fn text(&self) -> &str {
        self.wire.trim_end()
    }

    /// Replies that mean the client misbehaved (as opposed to a refused message or
    /// our own trouble). Too many of them in a row close the connection.
    pub fn is_protocol_error(&self) -> bool {
        matches!(self.code, 500..=504 | 530 | 535 | 538 | 555)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// Printable ASCII only, and not too long: replies may quote what the peer sent.
fn clean(text: &str) -> String {
    const MAX: usize = 400;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_whatever_the_text() {
        let r = Reply::new(550, "5.7.1", "unknown purpose 'a\r\nRCPT TO:<x@y>'");
        assert_eq!(
            r.as_bytes(),
            b"550 5.7.1 unknown purpose 'a??RCPT TO:<x@y>'\r\n"
        );
        assert_eq!(r.code(), 550);
        let r = Reply::new(
            555,
            "5.5.4",
            format!("Unsupported parameter X\u{e9}{}", "y".repeat(500)),
        );
        assert!(
            r.text()
                .starts_with("555 5.5.4 Unsupported parameter X?yyy")
                && r.text().ends_with("y...")
        );
        assert!(r.as_bytes().len() < 512);
    }

    #[test]
    fn multiline_marks_every_line_but_the_last() {
        let r = Reply::multiline(
            250,
            &["mx Hello".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            r.as_bytes(),
            b"250-mx Hello\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }
}
