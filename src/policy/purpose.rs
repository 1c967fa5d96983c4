//! Purposes and how a message names its own: the `X-Optgate-Purpose` header, else the
//! account's default, else the configured default; accounts may be held to a list.

use serde::Deserialize;

use crate::config::{Account, Config};

/// The legal ground on which mail for a purpose may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Opt-in: only with a recorded, unwithdrawn, unexpired consent for the purpose.
    Consent,
    /// Existing customers, for similar products, until they object.
    SoftOptIn,
    /// B2B prospecting about the recipient's profession, until they object.
    LegitimateInterest,
    /// Mail the person needs (orders, password resets): no consent, no unsubscribe.
    Transactional,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Consent => "consent",
            Basis::SoftOptIn => "soft_opt_in",
            Basis::LegitimateInterest => "legitimate_interest",
            Basis::Transactional => "transactional",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purpose {
    pub id: String,
    pub name: String,
    pub basis: Basis,
    pub expires_after_days: Option<u32>,
    pub description: String,
    /// Language of the footer and pages for this purpose's mail ("en", "fr").
    pub locale: String,
    /// Footer templates overriding the default ({unsubscribe_url}, {preferences_url}).
    pub footer_text: Option<String>,
    pub footer_html: Option<String>,
    /// Listed in the preference centre and open to sign-ups.
    pub public: bool,
}

/// What the message and its session say about the purpose.
pub struct PurposeRequest<'a> {
    /// The value of the `X-Optgate-Purpose` header, if the message has one.
    pub header: Option<&'a str>,
    /// The account the mailer authenticated as, if any.
    pub account: Option<&'a Account>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PurposeError {
    #[error("unknown purpose '{0}'")]
    Unknown(String),
    #[error("account '{account}' may not send for purpose '{purpose}'")]
    NotAllowed { account: String, purpose: String },
}

/// Names the message's purpose, or says why it may not be sent at all.
pub fn resolve_purpose<'c>(
    config: &'c Config,
    req: &PurposeRequest<'_>,
) -> Result<&'c Purpose, PurposeError> {
    let id = req
        .header
        .map(str::trim)
        .or(req.account.and_then(|a| a.default_purpose.as_deref()))
        .unwrap_or(&config.default_purpose);
    let purpose = config
        .purpose(id)
        .ok_or_else(|| PurposeError::Unknown(id.to_string()))?;
    if let Some(account) = req.account
        && let Some(allowed) = &account.purposes
        && !allowed.iter().any(|p| p == id)
    {
        return Err(PurposeError::NotAllowed {
            account: account.username.clone(),
            purpose: id.to_string(),
        });
    }
    Ok(purpose)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            r#"
[policy]
default_purpose = "news"
[[smtp.account]]
username = "crm"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$YmFzZTY0aGFzaGJhc2U2NGhhc2g"
purposes = ["offers", "orders"]
default_purpose = "orders"
[[purpose]]
id = "news"
name = "News"
basis = "consent"
[[purpose]]
id = "offers"
name = "Offers"
basis = "soft_opt_in"
[[purpose]]
id = "orders"
name = "Orders"
basis = "transactional"
"#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn header_then_account_then_config_default() {
        let c = config();
        let crm = &c.smtp.accounts[0];
        let r = |header, account| {
            resolve_purpose(&c, &PurposeRequest { header, account }).map(|p| p.id.clone())
        };
        assert_eq!(r(Some("offers"), Some(crm)), Ok("offers".into()));
        assert_eq!(r(None, Some(crm)), Ok("orders".into()));
        assert_eq!(r(None, None), Ok("news".into()));
        assert_eq!(r(Some(" news "), None), Ok("news".into()));
    }

    #[test]
    fn unknown_and_forbidden_purposes_are_named() {
        let c = config();
        let crm = &c.smtp.accounts[0];
        let e = resolve_purpose(
            &c,
            &PurposeRequest {
                header: Some("news"),
                account: Some(crm),
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "account 'crm' may not send for purpose 'news'"
        );
        let e = resolve_purpose(
            &c,
            &PurposeRequest {
                header: Some("spam"),
                account: None,
            },
        )
        .unwrap_err();
        assert_eq!(e, PurposeError::Unknown("spam".into()));
    }
}
