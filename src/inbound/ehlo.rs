//! The greeting, HELO and EHLO: who the client says it is, and which ESMTP extensions
//! it is offered (STARTTLS before TLS; AUTH only over TLS or to a trusted network).

use super::reply::Reply;
use super::session::{Helo, Session};

/// Whether AUTH may be used: passwords never cross the network in clear, except from
/// a network the operator trusts (a mailer on the same host or LAN).
pub(super) fn auth_allowed(tls: bool, trusted: bool) -> bool {
    tls || trusted
}

/// The EHLO keywords, in the order they are listed.
pub(super) fn extensions(tls: bool, trusted: bool, max_message_size: usize) -> Vec<String> {
    let mut ext: Vec<String> = vec![
        "PIPELINING".into(),
        format!("SIZE {max_message_size}"),
        "8BITMIME".into(),
        "SMTPUTF8".into(),
        "ENHANCEDSTATUSCODES".into(),
        "CHUNKING".into(),
    ];
    if !tls {
        ext.push("STARTTLS".into());
    }
    if auth_allowed(tls, trusted) {
        ext.push("AUTH PLAIN LOGIN".into());
    }
    ext
}

impl Session {
    pub(super) fn greeting(&self) -> Reply {
        Reply::bare(
            220,
            format!("{} ESMTP optgate", self.inbound.config.smtp.hostname),
        )
    }

    /// HELO (`extended` false) or EHLO. Either one also ends any transaction (RFC 5321
    /// §4.1.4), as RSET would.
    pub(super) fn ehlo(&mut self, name: &str, extended: bool) -> Reply {
        self.tx = None;
        self.helo = Some(Helo {
            name: name.to_string(),
            extended,
        });
        let smtp = &self.inbound.config.smtp;
        let hello = format!(
            "{} Hello {} [{}]",
            smtp.hostname,
            name,
            self.peer.ip().to_canonical()
        );
        if !extended {
            return Reply::bare(250, hello);
        }
        let mut lines = vec![hello];
        lines.extend(extensions(
            self.stream.is_tls(),
            self.trusted,
            smtp.max_message_size,
        ));
        Reply::multiline(250, &lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttls_before_tls_and_auth_only_when_safe() {
        let plain_untrusted = extensions(false, false, 1000);
        assert!(plain_untrusted.contains(&"STARTTLS".to_string()));
        assert!(!plain_untrusted.iter().any(|e| e.starts_with("AUTH")));

        let plain_trusted = extensions(false, true, 1000);
        assert!(plain_trusted.contains(&"STARTTLS".to_string()));
        assert!(plain_trusted.contains(&"AUTH PLAIN LOGIN".to_string()));

        let tls = extensions(true, false, 1000);
        assert!(!tls.contains(&"STARTTLS".to_string()));
        assert!(tls.contains(&"AUTH PLAIN LOGIN".to_string()));

        for e in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ] {
            assert!(
                tls.contains(&e.to_string()) && plain_untrusted.contains(&e.to_string()),
                "{e}"
            );
        }
    }
}
