//! MAIL and RCPT: who may open a transaction (never an open relay), the sender and
//! recipient syntax, SIZE and the recipient limit. Consent is not looked at here.

use std::borrow::Cow;

use smtp_proto::{MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS, MailFrom, RcptTo};

use super::reply::Reply;
use super::session::{Session, Transaction};
use crate::address::Address;

/// Only an authenticated client or a trusted network may submit mail. The refusal
/// says what to do next: without TLS, AUTH is not even offered.
pub(super) fn relay_access(authenticated: bool, trusted: bool, tls: bool) -> Result<(), Reply> {
    match (authenticated || trusted, tls) {
        (true, _) => Ok(()),
        (false, false) => Err(Reply::new(
            530,
            "5.7.0",
            "Authentication required: issue STARTTLS first, then AUTH",
        )),
        (false, true) => Err(Reply::new(530, "5.7.0", "Authentication required")),
    }
}

/// The SIZE= the client declared, read from the line itself: smtp-proto 0.2.5 turns
/// a value too large for usize into 999, which would pass any limit.
pub(super) fn declared_size(line: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(line)
        .split_ascii_whitespace()
        .find_map(|token| {
            let value = token.get(..5).filter(|k| k.eq_ignore_ascii_case("SIZE="))?;
            let digits = &token[value.len()..];
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse::<u64>().unwrap_or(u64::MAX))
        })
}

impl Session {
    pub(super) fn mail(&mut self, from: &MailFrom<Cow<'_, str>>, line: &[u8]) -> Reply {
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1", "Send EHLO or HELO first");
        }
        if self.tx.is_some() {
            return Reply::new(503, "5.5.1", "Nested MAIL command");
        }
        if let Err(refusal) =
            relay_access(self.account.is_some(), self.trusted, self.stream.is_tls())
        {
            return refusal;
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return Reply::new(555, "5.5.4", "BODY=BINARYMIME is not supported");
        }
        if from.flags & MAIL_REQUIRETLS != 0 {
            return Reply::new(555, "5.5.4", "REQUIRETLS is not supported");
        }
        let max = self.inbound.config.smtp.max_message_size;
        let size = declared_size(line).unwrap_or(from.size as u64);
        if size > max as u64 {
            return Reply::new(552, "5.3.4", format!("Message too big (max {max} bytes)"));
        }
        let sender = if from.address.is_empty() {
            String::new()
        } else {
            match Address::parse(&from.address) {
                Ok(a) => a.to_string(),
                Err(_) => return Reply::new(501, "5.1.7", "Bad sender address syntax"),
            }
        };
        self.tx = Some(Transaction {
            sender,
            recipients: Vec::new(),
            chunks: None,
        });
        Reply::new(250, "2.1.0", "Sender OK")
    }

    /// Every valid recipient is accepted here; the consent decision is made once, at
    /// the end of data, when the message names its purpose.
    pub(super) fn rcpt(&mut self, to: &RcptTo<Cow<'_, str>>) -> Reply {
        let max = self.inbound.config.smtp.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(503, "5.5.1", "Need MAIL before RCPT");
        };
        if tx.chunks.is_some() {
            return Reply::new(503, "5.5.1", "RCPT not allowed after BDAT");
        }
        let Ok(address) = Address::parse(&to.address) else {
            return Reply::new(501, "5.1.3", "Bad recipient address syntax");
        };
        if tx.recipients.contains(&address) {
            // The same person twice gets one copy.
            return Reply::new(250, "2.1.5", "Recipient OK");
        }
        if tx.recipients.len() >= max {
            return Reply::new(452, "4.5.3", "Too many recipients");
        }
        tx.recipients.push(address);
        Reply::new(250, "2.1.5", "Recipient OK")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_an_open_relay() {
        assert!(relay_access(true, false, true).is_ok());
        assert!(relay_access(false, true, false).is_ok());
        let plain = relay_access(false, false, false).unwrap_err();
        assert_eq!(
            plain.text(),
            "530 5.7.0 Authentication required: issue STARTTLS first, then AUTH"
        );
        let tls = relay_access(false, false, true).unwrap_err();
        assert_eq!(tls.text(), "530 5.7.0 Authentication required");
    }

    #[test]
    fn declared_size_survives_huge_values() {
        assert_eq!(declared_size(b"MAIL FROM:<a@b> SIZE=1000\r\n"), Some(1000));
        assert_eq!(
            declared_size(b"MAIL FROM:<a@b> body=8bitmime size=12\r\n"),
            Some(12)
        );
        assert_eq!(
            declared_size(b"MAIL FROM:<a@b> SIZE=99999999999999999999999\r\n"),
            Some(u64::MAX)
        );
        assert_eq!(declared_size(b"MAIL FROM:<a@b>\r\n"), None);
        assert_eq!(declared_size(b"MAIL FROM:<size=1@b>\r\n"), None);
    }
}
