//! Consent rows from outside — a CSV file or the admin API — checked one by one and
//! turned into history events, so that both paths accept and refuse the same things.

use serde::Deserialize;

use crate::address::Address;
use crate::clock;
use crate::config::Config;
use crate::store::{ALL_PURPOSES, ConsentAction, NewConsentEvent};

/// One row as written: the CSV columns, or the API's JSON fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsentRow {
    pub email: String,
    /// A purpose id, or `*` for every purpose (withdrawals only).
    pub purpose: String,
    /// `granted` or `withdrawn`.
    pub status: String,
    /// RFC 3339: when the person gave or withdrew consent.
    pub timestamp: String,
    #[serde(default)]
    pub source: String,
    /// A JSON object, as text (CSV) or inline (API); empty for none.
    #[serde(default)]
    pub evidence: Option<serde_json::Value>,
}

/// Checks a row; the error says which field is wrong and why.
pub fn validate(config: &Config, row: &ConsentRow, now: i64) -> Result<NewConsentEvent, String> {
    let address = Address::parse(&row.email).map_err(|e| format!("email: {e}"))?;
    let action = match row.status.trim() {
        "granted" => ConsentAction::Grant,
        "withdrawn" => ConsentAction::Withdraw,
        other => {
            return Err(format!(
                "status: '{other}' is not \"granted\" or \"withdrawn\""
            ));
        }
    };
    let purpose = match row.purpose.trim() {
        "*" if action == ConsentAction::Grant => {
            return Err(
                "purpose: consent is given per purpose; '*' is only for withdrawals".into(),
            );
        }
        "*" => ALL_PURPOSES.to_string(),
        id if config.purpose(id).is_some() => id.to_string(),
        other => return Err(format!("purpose: unknown purpose '{other}'")),
    };
    let at = clock::parse_rfc3339(row.timestamp.trim()).ok_or_else(|| {
        format!(
            "timestamp: '{}' is not RFC 3339 (e.g. 2024-05-01T12:00:00Z)",
            row.timestamp
        )
    })?;
    if at > now + 300 {
        return Err(format!("timestamp: '{}' is in the future", row.timestamp));
    }
    let evidence = match &row.evidence {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => serde_json::json!({}),
        Some(serde_json::Value::String(s)) => serde_json::from_str::<serde_json::Value>(s)
            .ok()
            .filter(|v| v.is_object())
            .ok_or("evidence: not a JSON object")?,
        Some(v @ serde_json::Value::Object(_)) => v.clone(),
        Some(_) => return Err("evidence: not a JSON object".into()),
    };
    let source = match row.source.trim() {
        "" => "import".to_string(),
        s => s.to_string(),
    };
    Ok(NewConsentEvent {
        address,
        purpose,
        action,
        at,
        source,
        evidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/optgate.toml");
        Config::load(&path).unwrap()
    }

    fn row(
        email: &str,
        purpose: &str,
        status: &str,
        timestamp: &str,
        evidence: Option<&str>,
    ) -> ConsentRow {
        ConsentRow {
            email: email.into(),
            purpose: purpose.into(),
            status: status.into(),
            timestamp: timestamp.into(),
            source: String::new(),
            evidence: evidence.map(|e| serde_json::Value::String(e.into())),
        }
    }

    #[test]
    fn good_rows_become_events() {
        let c = config();
        let e = validate(
            &c,
            &row(
                "A@Example.COM",
                "newsletter",
                "granted",
                "2024-05-01T12:00:00Z",
                Some(r#"{"ip":"192.0.2.1"}"#),
            ),
            clock::now(),
        )
        .unwrap();
        assert_eq!(e.address.as_str(), "A@example.com");
        assert_eq!(
            (e.purpose.as_str(), e.action, e.at),
            ("newsletter", ConsentAction::Grant, 1_714_564_800)
        );
        assert_eq!(e.source, "import");
        assert_eq!(e.evidence["ip"], "192.0.2.1");
        let all = validate(
            &c,
            &row(
                "a@example.com",
                "*",
                "withdrawn",
                "2024-05-01T12:00:00+02:00",
                None,
            ),
            clock::now(),
        )
        .unwrap();
        assert_eq!(all.purpose, ALL_PURPOSES);
    }

    #[test]
    fn bad_rows_name_the_field() {
        let c = config();
        let now = clock::now();
        let err = |r: ConsentRow| validate(&c, &r, now).unwrap_err();
        assert!(
            err(row(
                "nope",
                "newsletter",
                "granted",
                "2024-05-01T12:00:00Z",
                None
            ))
            .starts_with("email:")
        );
        assert!(
            err(row(
                "a@example.com",
                "spam",
                "granted",
                "2024-05-01T12:00:00Z",
                None
            ))
            .contains("unknown purpose 'spam'")
        );
        assert!(
            err(row(
                "a@example.com",
                "*",
                "granted",
                "2024-05-01T12:00:00Z",
                None
            ))
            .starts_with("purpose:")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "yes",
                "2024-05-01T12:00:00Z",
                None
            ))
            .starts_with("status:")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "granted",
                "yesterday",
                None
            ))
            .starts_with("timestamp:")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "granted",
                "2999-01-01T00:00:00Z",
                None
            ))
            .contains("future")
        );
        assert!(
            err(row(
                "a@example.com",
                "newsletter",
                "granted",
                "2024-05-01T12:00:00Z",
                Some("[1]")
            ))
            .starts_with("evidence:")
        );
    }
}
