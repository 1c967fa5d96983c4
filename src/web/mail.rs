//! The double opt-in confirmation mail: a complete MIME message (text and HTML, UTF-8,
//! CRLF) in the purposes' language, queued through the spool like any other message.

use askama::Template;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message, MultiPart, SinglePart};

use super::i18n::{Lang, Texts};
use crate::address::Address;

/// A purpose as the mail names it.
pub(super) struct Named<'a> {
    pub name: &'a str,
    pub description: &'a str,
}

#[derive(Template)]
#[template(path = "confirm_mail.txt")]
struct Text<'a> {
    t: &'static Texts,
    purposes: &'a [Named<'a>],
    link: &'a str,
    valid_until: &'a str,
}

#[derive(Template)]
#[template(path = "confirm_mail.html")]
struct Html<'a> {
    t: &'static Texts,
    purposes: &'a [Named<'a>],
    link: &'a str,
    valid_until: &'a str,
}

/// Everything one confirmation mail says.
pub(super) struct Confirmation<'a> {
    /// `double_opt_in.from`: `Name <address>` or a bare address.
    pub from: &'a str,
    pub to: &'a Address,
    pub lang: Lang,
    pub purposes: &'a [Named<'a>],
    pub link: &'a str,
    /// Unix seconds: when the link stops working.
    pub valid_until: i64,
    /// The Message-ID, with its angle brackets.
    pub message_id: String,
}

/// The message bytes, ready for the spool; the error says what could not be written
/// (an unusable From in the config, an address the builder refuses).
pub(super) fn build(mail: &Confirmation<'_>) -> Result<Vec<u8>, String> {
    let t = mail.lang.texts();
    let valid_until = human_time(mail.valid_until);
    let text = Text {
        t,
        purposes: mail.purposes,
        link: mail.link,
        valid_until: &valid_until,
    }
    .render()
    .map_err(|e| format!("text part: {e}"))?;
    let html = Html {
        t,
        purposes: mail.purposes,
        link: mail.link,
        valid_until: &valid_until,
    }
    .render()
    .map_err(|e| format!("html part: {e}"))?;
    let from: Mailbox = mail
        .from
        .parse()
        .map_err(|e| format!("double_opt_in.from '{}': {e}", mail.from))?;
    let to: Mailbox = mail
        .to
        .as_str()
        .parse()
        .map_err(|e| format!("recipient: {e}"))?;
    let message = Message::builder()
        .from(from)
        .to(to)
        .subject(t.mail_subject)
        .date(std::time::SystemTime::now())
        .message_id(Some(mail.message_id.clone()))
        .header(AutoSubmitted)
        .multipart(
            MultiPart::alternative()
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(text),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(html),
                ),
        )
        .map_err(|e| format!("message: {e}"))?;
    Ok(message.formatted())
}

/// `2026-03-09 10:00 UTC`: readable in both languages, unambiguous across zones.
fn human_time(unix: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| crate::clock::rfc3339(unix))
}

/// `Auto-Submitted: auto-generated` (RFC 3834): out-of-office robots must not answer it.
#[derive(Clone)]
struct AutoSubmitted;

impl lettre::message::header::Header for AutoSubmitted {
    fn name() -> lettre::message::header::HeaderName {
        lettre::message::header::HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> lettre::message::header::HeaderValue {
        lettre::message::header::HeaderValue::new(Self::name(), "auto-generated".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(lang: Lang, from: &str) -> Result<Vec<u8>, String> {
        let to = Address::parse("élodie@exemple.fr").unwrap();
        build(&Confirmation {
            from,
            to: &to,
            lang,
            purposes: &[Named {
                name: "Lettre d’information",
                description: "Nos nouvelles & <articles>.",
            }],
            link: "http://127.0.0.1:8080/confirm/AbC-_123",
            valid_until: 1_773_050_400,
            message_id: "<20260309@optgate.test>".into(),
        })
    }

    #[test]
    fn a_complete_mime_message_in_the_purposes_language() {
        let bytes = sample(Lang::Fr, "Nouvelles <news@example.com>").unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
        assert!(
            text.lines().all(|l| l.len() <= 998),
            "no line over 998 octets"
        );
        let parsed = mail_parser::MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(
            parsed.subject(),
            Some("Merci de confirmer votre inscription")
        );
        assert_eq!(
            parsed
                .from()
                .and_then(|a| a.first())
                .and_then(|a| a.address()),
            Some("news@example.com")
        );
        assert_eq!(parsed.message_id(), Some("20260309@optgate.test"));
        assert!(parsed.date().is_some());
        assert!(text.contains("Auto-Submitted: auto-generated"));
        assert!(text.contains("MIME-Version: 1.0"));
        assert!(text.contains("multipart/alternative"));
        let plain = parsed.body_text(0).unwrap();
        assert!(plain.contains("Lettre d’information: Nos nouvelles & <articles>."));
        assert!(plain.contains("http://127.0.0.1:8080/confirm/AbC-_123"));
        assert!(plain.contains("2026-03-09 10:00 UTC"), "{plain}");
        let html = parsed.body_html(0).unwrap();
        assert!(html.contains("href=\"http://127.0.0.1:8080/confirm/AbC-_123\""));
        assert!(
            html.contains("Nos nouvelles &#38; &#60;articles&#62;."),
            "{html}"
        );
        assert!(html.contains("<html lang=\"fr\">"));
    }

    #[test]
    fn english_and_an_unusable_from() {
        let bytes = sample(Lang::En, "news@example.com").unwrap();
        let parsed = mail_parser::MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(parsed.subject(), Some("Please confirm your subscription"));
        assert!(sample(Lang::En, "not an address").is_err());
    }
}
