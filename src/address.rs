//! Email addresses as optgate keys them: the local part kept as written, the domain
//! in IDNA ASCII form and lower case, so that one person is one contact.

use std::fmt;

/// A syntactically valid, normalised address (`local@domain`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("'{0}' is not an email address: it has no '@'")]
    NoAt(String),
    #[error("'{0}' is not an email address: the local part is empty or invalid")]
    BadLocal(String),
    #[error("'{0}' is not an email address: the domain is invalid")]
    BadDomain(String),
}

impl Address {
    /// Parses and normalises an address, with or without surrounding angle brackets.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let s = input.trim();
        let s = s
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(s);
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or_else(|| AddressError::NoAt(input.to_string()))?;
        if local.is_empty()
            || local.len() > 64
            || local
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | ','))
        {
            return Err(AddressError::BadLocal(input.to_string()));
        }
        let bad_domain = || AddressError::BadDomain(input.to_string());
        if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
            return Err(bad_domain());
        }
        let domain = if let Some(literal) = domain.strip_prefix('[') {
            // An address literal such as [127.0.0.1]: keep it, it has no IDNA form.
            literal
                .strip_suffix(']')
                .filter(|ip| {
                    ip.trim_start_matches("IPv6:")
                        .parse::<std::net::IpAddr>()
                        .is_ok()
                })
                .ok_or_else(bad_domain)?;
            domain.to_ascii_lowercase()
        } else {
            let ascii = idna::domain_to_ascii(domain).map_err(|_| bad_domain())?;
            if ascii.is_empty()
                || ascii.len() > 253
                || ascii.split('.').any(|label| {
                    label.is_empty()
                        || label.len() > 63
                        || !label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            {
                return Err(bad_domain());
            }
            ascii
        };
        Ok(Address(format!("{local}@{domain}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_the_domain_and_keeps_the_local_part() {
        let a = Address::parse("<Jean.Dupont@Exemple.FR>").unwrap();
        assert_eq!(a.as_str(), "Jean.Dupont@exemple.fr");
        let idn = Address::parse("amélie@Café.example").unwrap();
        assert_eq!(idn.as_str(), "amélie@xn--caf-dma.example");
        assert_eq!(idn.domain(), "xn--caf-dma.example");
    }

    #[test]
    fn rejects_what_is_not_an_address() {
        assert!(matches!(
            Address::parse("nobody"),
            Err(AddressError::NoAt(_))
        ));
        assert!(matches!(
            Address::parse("@example.com"),
            Err(AddressError::BadLocal(_))
        ));
        assert!(matches!(
            Address::parse("a b@example.com"),
            Err(AddressError::BadLocal(_))
        ));
        assert!(matches!(
            Address::parse("a@exa_mple.com"),
            Err(AddressError::BadDomain(_))
        ));
        assert!(matches!(
            Address::parse("a@.com"),
            Err(AddressError::BadDomain(_))
        ));
        assert!(Address::parse("postmaster@[127.0.0.1]").is_ok());
    }
}
