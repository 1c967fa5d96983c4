//! Bounce reports: the RFC 3464 delivery status notification sent back to the envelope
//! sender when recipients fail for good. A pure function from facts to message bytes.

use crate::clock;
use crate::rewrite;

/// Longest line the report writes, in octets without CRLF (RFC 5322 §2.1.1).
const MAX_LINE: usize = 998;
/// Where header-style fields are folded when they can be (RFC 5322 §2.1.1).
const FOLD_AT: usize = 78;

/// One recipient that will not get the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    pub address: String,
    /// RFC 3463 status, such as `5.1.1`, or `4.4.7` when the message expired.
    pub status: String,
    /// The upstream's reply, such as `550 5.1.1 <x@y>: no such user`, or our own
    /// account of the last problem (a timeout has no reply).
    pub diagnostic: String,
    pub expired: bool,
}

/// Everything a report says.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// optgate's own name, the Reporting-MTA.
    pub hostname: &'a str,
    /// The original envelope sender: the report's recipient.
    pub sender: &'a str,
    pub queue_id: &'a str,
    /// Unix seconds.
    pub received_at: i64,
    /// Unix seconds.
    pub now: i64,
    /// The original message; only its header block is returned.
    pub original: &'a [u8],
    pub recipients: &'a [FailedRecipient],
    /// Random text that makes the boundary and Message-ID unique.
    pub unique: &'a str,
}

/// The report as a complete message, CRLF line endings.
pub fn build(r: &Report<'_>) -> Vec<u8> {
    let boundary = format!("=_optgate-report-{}", r.unique);
    let text = human_part(r);
    let status = status_part(r);
    let headers = original_headers(r.original);
    let eight_bit = !text.is_ascii() || !headers.is_ascii();

    let mut out = Vec::with_capacity(2048 + headers.len());
    let mut field = |line: String| {
        out.extend_from_slice(fold(&line).as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    field(format!(
        "From: Mail Delivery System <MAILER-DAEMON@{}>",
        one_line(r.hostname)
    ));
    field(format!("To: <{}>", one_line(r.sender)));
    field("Subject: Undelivered Mail Returned to Sender".into());
    field(format!("Date: {}", clock::rfc5322(r.now)));
    field(format!(
        "Message-ID: <{}.{}@{}>",
        one_line(r.queue_id),
        one_line(r.unique),
        one_line(r.hostname)
    ));
    field("Auto-Submitted: auto-replied".into());
    field("MIME-Version: 1.0".into());
    if eight_bit {
        field("Content-Transfer-Encoding: 8bit".into());
    }
    // Written as is: `fold` would break it inside the quoted boundary.
    out.extend_from_slice(
        format!(
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");

    let mut part = |content_type: &str, eight_bit: bool, body: &[u8]| {
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        out.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        let cte = if eight_bit { "8bit" } else { "7bit" };
        out.extend_from_slice(format!("Content-Transfer-Encoding: {cte}\r\n\r\n").as_bytes());
        out.extend_from_slice(body);
    };
    let charset = if text.is_ascii() { "us-ascii" } else { "utf-8" };
    part(
        &format!("text/plain; charset={charset}"),
        !text.is_ascii(),
        text.as_bytes(),
    );
    part("message/delivery-status", false, status.as_bytes());
    part("text/rfc822-headers", !headers.is_ascii(), &headers);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Part 1: what happened, for a person.
fn human_part(r: &Report<'_>) -> String {
    let mut t = String::new();
    // Prose is not folded for looks (mail readers wrap it), only kept under 998.
    let mut line = |s: &str| {
        if s.len() <= MAX_LINE {
            t.push_str(s);
        } else {
            t.push_str(&fold(s));
        }
        t.push_str("\r\n");
    };
    line(&format!(
        "This is the mail system at host {}.",
        one_line(r.hostname)
    ));
    line("");
    line("I'm sorry to have to inform you that your message could not be delivered");
    line("to one or more recipients. It is attached below.");
    line("");
    line(&format!(
        "The message (queue id {}) was received on {}.",
        one_line(r.queue_id),
        clock::rfc5322(r.received_at)
    ));
    for f in r.recipients {
        line("");
        if f.expired {
            line(&format!(
                "<{}>: delivery was given up because the message stayed in the queue too long; last error: {}",
                one_line(&f.address),
                one_line(&f.diagnostic)
            ));
        } else {
            line(&format!(
                "<{}>: the receiving server said: {}",
                one_line(&f.address),
                one_line(&f.diagnostic)
            ));
        }
    }
    t
}

/// Part 2: the machine-readable report (RFC 3464 §2). US-ASCII only.
fn status_part(r: &Report<'_>) -> String {
    let mut t = String::new();
    let mut field = |s: String| {
        t.push_str(&fold(&s));
        t.push_str("\r\n");
    };
    field(format!("Reporting-MTA: dns; {}", ascii(r.hostname)));
    field(format!("Arrival-Date: {}", clock::rfc5322(r.received_at)));
    for f in r.recipients {
        t.push_str("\r\n");
        let mut field = |s: String| {
            t.push_str(&fold(&s));
            t.push_str("\r\n");
        };
        field(format!(
            "Final-Recipient: rfc822; {}",
            address_xtext(&f.address)
        ));
        field("Action: failed".into());
        field(format!("Status: {}", ascii(&f.status)));
        let diagnostic = ascii(&f.diagnostic);
        if is_smtp_reply(&diagnostic) {
            field(format!("Diagnostic-Code: smtp; {diagnostic}"));
        } else {
            field(format!("Diagnostic-Code: X-optgate; {diagnostic}"));
        }
        field(format!("Last-Attempt-Date: {}", clock::rfc5322(r.now)));
    }
    t
}

/// Part 3: the original header block, control headers removed, CRLF throughout.
fn original_headers(original: &[u8]) -> Vec<u8> {
    let stripped = rewrite::strip_control_headers(original);
    let block = &stripped[..rewrite::header_block_len(&stripped)];
    let mut out = Vec::with_capacity(block.len() + 16);
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        // Bare CRs and overlong lines cannot travel; a continuation keeps the text.
        let line: Vec<u8> = line
            .iter()
            .map(|&b| if b == b'\r' { b' ' } else { b })
            .collect();
        let mut chunks = line.chunks(MAX_LINE - 1);
        if let Some(first) = chunks.next() {
            out.extend_from_slice(first);
            out.extend_from_slice(b"\r\n");
        }
        for more in chunks {
            out.push(b' ');
            out.extend_from_slice(more);
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Whether a diagnostic is an SMTP reply (`550 …`) rather than our own words.
fn is_smtp_reply(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 3
        && matches!(b[0], b'2'..=b'5')
        && b[1..3].iter().all(u8::is_ascii_digit)
        && matches!(b.get(3), None | Some(b' ' | b'-'))
}

/// Text that came from elsewhere (upstream replies, addresses) on one line: controls,
/// CR and LF become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `one_line`, and US-ASCII only: what is left over shows as `?`.
fn ascii(s: &str) -> String {
    one_line(s)
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// An address in the ASCII-only report: non-ASCII characters as `\x{HEX}`
/// (RFC 6533 §3, utf-8-addr-xtext), which keeps it recoverable.
fn address_xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in one_line(s).chars() {
        if c.is_ascii() && c != '\\' {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", c as u32));
        }
    }
    out
}

/// Folds a header-style line at spaces so no line exceeds 78 characters where
/// possible and 998 octets ever; a word too long for that is cut.
fn fold(line: &str) -> String {
    if line.len() <= FOLD_AT {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len() + 16);
    let mut current = String::new();
    for (i, word) in line.split(' ').enumerate() {
        let sep = usize::from(i > 0);
        if !current.trim().is_empty() && current.len() + sep + word.len() > FOLD_AT {
            out.push_str(&current);
            out.push_str("\r\n");
            current = String::from(" ");
            current.push_str(word);
        } else {
            if i > 0 {
                current.push(' ');
            }
            current.push_str(word);
        }
        while current.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !current.is_char_boundary(cut) {
                cut -= 1;
            }
            let rest = current.split_off(cut);
            out.push_str(&current);
            out.push_str("\r\n");
            current = format!(" {rest}");
        }
    }
    out.push_str(&current);
    out
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders};

    use super::*;

    const ORIGINAL: &[u8] = b"From: News <news@shop.example>\r\nTo: bad@example.net\r\nX-Optgate-Purpose: newsletter\r\nSubject: Our news\r\nMessage-ID: <abc@shop.example>\r\n\r\nBody text that must not come back.\r\n";

    fn report<'a>(recipients: &'a [FailedRecipient]) -> Report<'a> {
        Report {
            hostname: "gw.example.com",
            sender: "bounces@shop.example",
            queue_id: "0001Q",
            received_at: 1_700_000_000,
            now: 1_700_000_100,
            original: ORIGINAL,
            recipients,
            unique: "r4nd0m",
        }
    }

    fn failed(address: &str, status: &str, diagnostic: &str, expired: bool) -> FailedRecipient {
        FailedRecipient {
            address: address.into(),
            status: status.into(),
            diagnostic: diagnostic.into(),
            expired,
        }
    }

    fn assert_wire_clean(bytes: &[u8]) {
        for line in bytes.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line too long: {}", line.len());
        }
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
    }

    #[test]
    fn a_report_has_the_three_parts_of_rfc_3464() {
        let rcpts = [failed(
            "bad@example.net",
            "5.1.1",
            "550 5.1.1 <bad@example.net>: no such user",
            false,
        )];
        let bytes = build(&report(&rcpts));
        assert_wire_clean(&bytes);
        let msg = MessageParser::default().parse(&bytes).expect("parses");

        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let from = msg.from().and_then(|a| a.first()).unwrap();
        assert_eq!(from.address(), Some("MAILER-DAEMON@gw.example.com"));
        assert_eq!(from.name(), Some("Mail Delivery System"));
        let to = msg.to().and_then(|a| a.first()).unwrap();
        assert_eq!(to.address(), Some("bounces@shop.example"));
        assert_eq!(
            msg.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        assert_eq!(msg.message_id(), Some("0001Q.r4nd0m@gw.example.com"));
        assert!(msg.date().is_some());

        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));

        let root = msg.root_part();
        let mail_parser::PartType::Multipart(ids) = &root.body else {
            panic!("not multipart")
        };
        assert_eq!(ids.len(), 3);
        let part = |i: usize| &msg.parts[ids[i] as usize];
        let kind = |i: usize| {
            let ct = part(i).content_type().unwrap();
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        };
        assert_eq!(kind(0), "text/plain");
        assert_eq!(kind(1), "message/delivery-status");
        assert_eq!(kind(2), "text/rfc822-headers");

        let text = String::from_utf8_lossy(part(0).contents()).to_string();
        assert!(text.contains("<bad@example.net>"), "{text}");
        assert!(
            text.contains("550 5.1.1 <bad@example.net>: no such user"),
            "{text}"
        );

        let status = String::from_utf8_lossy(part(1).contents()).to_string();
        for want in [
            "Reporting-MTA: dns; gw.example.com\r\n",
            "Arrival-Date: ",
            "\r\n\r\nFinal-Recipient: rfc822; bad@example.net\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            "Diagnostic-Code: smtp; 550 5.1.1 <bad@example.net>: no such user\r\n",
        ] {
            assert!(status.contains(want), "missing {want:?} in\n{status}");
        }

        let headers = String::from_utf8_lossy(part(2).contents()).to_string();
        assert!(headers.contains("Subject: Our news\r\n"), "{headers}");
        assert!(
            headers.contains("Message-ID: <abc@shop.example>"),
            "{headers}"
        );
        assert!(!headers.contains("X-Optgate"), "{headers}");
        assert!(!headers.contains("Body text"), "{headers}");
        assert!(!String::from_utf8_lossy(&bytes).contains("Body text"));
    }

    #[test]
    fn expiry_and_several_recipients() {
        let rcpts = [
            failed(
                "slow@example.net",
                "4.4.7",
                "upstream mx:25: timed out",
                true,
            ),
            failed("full@example.net", "5.2.2", "552 5.2.2 Mailbox full", false),
        ];
        let bytes = build(&report(&rcpts));
        let msg = MessageParser::default().parse(&bytes).unwrap();
        let mail_parser::PartType::Multipart(ids) = &msg.root_part().body else {
            panic!()
        };
        let status = String::from_utf8_lossy(msg.parts[ids[1] as usize].contents()).to_string();
        let groups: Vec<&str> = status.split("\r\n\r\n").collect();
        assert_eq!(groups.len(), 3, "{status}");
        assert!(groups[1].contains("Final-Recipient: rfc822; slow@example.net"));
        assert!(groups[1].contains("Action: failed"));
        assert!(groups[1].contains("Status: 4.4.7"));
        assert!(groups[1].contains("Diagnostic-Code: X-optgate; upstream mx:25: timed out"));
        assert!(groups[2].contains("Status: 5.2.2"));
        assert!(groups[2].contains("Diagnostic-Code: smtp; 552 5.2.2 Mailbox full"));
        let text = String::from_utf8_lossy(msg.parts[ids[0] as usize].contents()).to_string();
        assert!(text.contains("stayed in the queue too long"), "{text}");
    }

    #[test]
    fn hostile_input_stays_within_the_line_limits() {
        let long_word = "x".repeat(3000);
        let diagnostic = format!(
            "550 5.1.1 {long_word} and\r\nInjected: header ü {}",
            "word ".repeat(400)
        );
        let rcpts = [failed("jörg@example.net", "5.1.1", &diagnostic, false)];
        let mut original = b"Subject: ".to_vec();
        original.extend_from_slice("y".repeat(2500).as_bytes());
        original.extend_from_slice(b"\nX-Bare-Lf: yes\r\nX-Cr: a\rb\r\n\r\nbody\r\n");
        let mut r = report(&rcpts);
        r.original = &original;
        let bytes = build(&r);
        assert_wire_clean(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("\r\nInjected:"), "a reply cannot add fields");
        assert!(text.contains("Final-Recipient: rfc822; j\\x{F6}rg@example.net"));
        let msg = MessageParser::default().parse(&bytes).unwrap();
        let mail_parser::PartType::Multipart(ids) = &msg.root_part().body else {
            panic!()
        };
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn folding_keeps_short_lines_and_breaks_long_ones_at_spaces() {
        assert_eq!(fold("Status: 5.1.1"), "Status: 5.1.1");
        let folded = fold(&format!("Diagnostic-Code: smtp; {}", "abc ".repeat(40)));
        assert!(folded.split("\r\n").all(|l| l.len() <= FOLD_AT));
        assert!(folded.split("\r\n").skip(1).all(|l| l.starts_with(' ')));
        assert_eq!(
            folded.replace("\r\n", ""),
            format!("Diagnostic-Code: smtp; {}", "abc ".repeat(40))
        );
    }
}
