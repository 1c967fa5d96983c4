//! What a webhook request carries: the JSON body made from one stored event, and the
//! `Optgate-Signature` header that lets the receiver check it came from us, unaltered.
//! Pure functions, so the contract documented in [`super`] is pinned by unit tests.

use ring::hmac;
use serde::Serialize;

use crate::clock;
use crate::store::{EVENT_CONTACT_FORGOTTEN, Event};

/// The event id as receivers see it: stable across retries and restarts, so they can
/// deduplicate (delivery is at least once).
pub fn event_id(event: &Event) -> String {
    format!("evt_{}", event.id)
}

#[derive(Serialize)]
struct Payload<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'a str,
    created_at: String,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    /// Absent from `contact.forgotten`: erasure must not send the address anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    purpose: Option<&'a str>,
    source: Option<&'a str>,
    detail: &'a str,
}

/// The request body for `event`, serialised once and sent byte for byte on every
/// attempt (the signature covers these exact bytes).
pub fn body(event: &Event) -> Vec<u8> {
    let forgotten = event.kind == EVENT_CONTACT_FORGOTTEN;
    let payload = Payload {
        id: event_id(event),
        kind: &event.kind,
        created_at: clock::rfc3339(event.at),
        data: Data {
            email: (!forgotten && !event.address.is_empty()).then_some(event.address.as_str()),
            purpose: event.purpose.as_deref(),
            source: event.origin.as_deref(),
            detail: &event.detail,
        },
    };
    // A struct of strings and options cannot fail to serialise; the fallback keeps the
    // worker free of panics all the same.
    serde_json::to_vec(&payload).unwrap_or_else(|_| b"{}".to_vec())
}

/// The signing key made once from the configured secret.
pub fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: Stripe's scheme, so
/// receivers can reuse their verification code. The timestamp is the attempt's, which
/// lets them refuse replays older than a tolerance of their choosing.
pub fn signature(key: &hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let mut context = hmac::Context::with_key(key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let mut out = format!("t={timestamp},v1=");
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EVENT_CONSENT_WITHDRAWN, EVENT_SUPPRESSION_ADDED};

    fn event(kind: &str, address: &str) -> Event {
        Event {
            id: 42,
            at: 1_764_426_259,
            kind: kind.into(),
            message_id: None,
            address: address.into(),
            purpose: Some("news".into()),
            detail: "17".into(),
            origin: Some("one-click".into()),
        }
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // python3 -c 'import hmac, hashlib; print(hmac.new(b"whsec_0123456789abcdef",
        //   b"1700000000." + b"{\"id\":\"evt_1\"}", hashlib.sha256).hexdigest())'
        let header = signature(
            &key("whsec_0123456789abcdef"),
            1_700_000_000,
            br#"{"id":"evt_1"}"#,
        );
        assert_eq!(
            header,
            "t=1700000000,v1=dea1657bd5053cb0f8a75ebf0bd3d22e0cdeb79563b44db6b88864e522fb8bc4"
        );
    }

    #[test]
    fn signature_depends_on_every_input() {
        let k = key("whsec_0123456789abcdef");
        let base = signature(&k, 1, b"{}");
        assert_ne!(base, signature(&k, 2, b"{}"));
        assert_ne!(base, signature(&k, 1, b"{ }"));
        assert_ne!(base, signature(&key("whsec_0123456789abcdeF"), 1, b"{}"));
    }

    #[test]
    fn body_is_the_documented_shape() {
        let body = body(&event(EVENT_CONSENT_WITHDRAWN, "ann@example.net"));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"id":"evt_42","type":"consent.withdrawn","created_at":"2025-11-29T14:24:19Z","data":{"email":"ann@example.net","purpose":"news","source":"one-click","detail":"17"}}"#
        );
    }

    #[test]
    fn missing_fields_are_null() {
        let mut e = event(EVENT_SUPPRESSION_ADDED, "bob@example.net");
        e.purpose = None;
        e.origin = None;
        let json: serde_json::Value = serde_json::from_slice(&body(&e)).unwrap();
        assert_eq!(
            json["data"],
            serde_json::json!({"email": "bob@example.net", "purpose": null, "source": null, "detail": "17"})
        );
    }

    #[test]
    fn forgotten_carries_no_address_even_if_the_store_had_one() {
        let json: serde_json::Value =
            serde_json::from_slice(&body(&event(EVENT_CONTACT_FORGOTTEN, "carol@example.net")))
                .unwrap();
        assert_eq!(json["type"], "contact.forgotten");
        assert!(json["data"].get("email").is_none(), "{json}");
        assert!(!json.to_string().contains("carol"), "{json}");
    }
}
