//! The legal bases turned into one decision per recipient. Pure: it reads the facts
//! the store derived from the consent history and says allow (by which record) or why not.

use super::{Basis, Purpose};
use crate::store::{ConsentAction, ConsentFacts, LatestEvent};

const DAY: i64 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed under `basis`; `record` is the consent-history event that satisfies
    /// it, where the basis needs one.
    Allow {
        basis: Basis,
        record: Option<i64>,
    },
    Suppress(SuppressReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SuppressReason {
    /// Opt-in purpose and no consent was ever recorded.
    NoConsent,
    /// Opt-in purpose and the consent was withdrawn (for it, or for everything).
    ConsentWithdrawn,
    /// Opt-in purpose whose consent is older than `expires_after_days`.
    ConsentExpired,
    /// Opt-out purpose and the person objected (to it, or to everything).
    Objected,
    /// Soft opt-in purpose and the person is not marked an existing customer.
    NotCustomer,
    /// On the suppression list (a hard bounce): nothing at all may be sent.
    Suppressed,
    /// The person had their data erased: they are never mailed again.
    Erased,
}

impl SuppressReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressReason::NoConsent => "no consent",
            SuppressReason::ConsentWithdrawn => "consent withdrawn",
            SuppressReason::ConsentExpired => "consent expired",
            SuppressReason::Objected => "objected",
            SuppressReason::NotCustomer => "not a customer",
            SuppressReason::Suppressed => "suppressed",
            SuppressReason::Erased => "erased",
        }
    }
}

impl Decision {
    /// The reason as stored in the decision event and shown to operators.
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow {
                basis,
                record: Some(id),
            } => format!("allowed: {} (consent event {id})", basis.as_str()),
            Decision::Allow {
                basis,
                record: None,
            } => format!("allowed: {}", basis.as_str()),
            Decision::Suppress(SuppressReason::Suppressed) => {
                "suppressed: on the suppression list".into()
            }
            Decision::Suppress(r) => format!("suppressed: {}", r.as_str()),
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Decides whether `purpose` mail may go to the person described by `facts` at `now`.
pub fn decide(purpose: &Purpose, facts: &ConsentFacts, now: i64) -> Decision {
    if facts.erased {
        return Decision::Suppress(SuppressReason::Erased);
    }
    if facts.suppression.is_some() {
        return Decision::Suppress(SuppressReason::Suppressed);
    }
    // The newest statement of the person's will that applies: for this purpose or "all".
    let latest = newest(facts.purpose_event.as_ref(), facts.all_event.as_ref());
    let objected = latest.is_some_and(|e| e.action == ConsentAction::Withdraw);
    match purpose.basis {
        Basis::Transactional => Decision::Allow {
            basis: purpose.basis,
            record: None,
        },
        Basis::LegitimateInterest if objected => Decision::Suppress(SuppressReason::Objected),
        Basis::LegitimateInterest => Decision::Allow {
            basis: purpose.basis,
            record: None,
        },
        Basis::SoftOptIn if objected => Decision::Suppress(SuppressReason::Objected),
        Basis::SoftOptIn if !facts.customer => Decision::Suppress(SuppressReason::NotCustomer),
        Basis::SoftOptIn => Decision::Allow {
            basis: purpose.basis,
            record: None,
        },
        Basis::Consent => {
            // Consent is specific: only a grant for this very purpose counts.
            let Some(grant) = facts
                .purpose_event
                .as_ref()
                .filter(|e| e.action == ConsentAction::Grant)
            else {
                return Decision::Suppress(match facts.purpose_event {
                    Some(_) => SuppressReason::ConsentWithdrawn,
                    None => SuppressReason::NoConsent,
                });
            };
            if objected {
                return Decision::Suppress(SuppressReason::ConsentWithdrawn);
            }
            if let Some(days) = purpose.expires_after_days
                && grant.at + i64::from(days) * DAY <= now
            {
                return Decision::Suppress(SuppressReason::ConsentExpired);
            }
            Decision::Allow {
                basis: purpose.basis,
                record: Some(grant.id),
            }
        }
    }
}

fn newest<'a>(a: Option<&'a LatestEvent>, b: Option<&'a LatestEvent>) -> Option<&'a LatestEvent> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.id > a.id { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purpose(basis: Basis, expires_after_days: Option<u32>) -> Purpose {
        Purpose {
            id: "p".into(),
            name: "P".into(),
            basis,
            expires_after_days,
            description: String::new(),
            locale: "en".into(),
            footer_text: None,
            footer_html: None,
            public: false,
        }
    }
    fn ev(id: i64, action: ConsentAction, at: i64) -> Option<LatestEvent> {
        Some(LatestEvent { id, action, at })
    }
    use ConsentAction::{Grant, Withdraw};

    #[test]
    fn consent_needs_a_live_specific_grant() {
        let p = purpose(Basis::Consent, Some(365));
        let none = ConsentFacts::default();
        assert_eq!(
            decide(&p, &none, 0),
            Decision::Suppress(SuppressReason::NoConsent)
        );

        let granted = ConsentFacts {
            purpose_event: ev(7, Grant, 1000),
            ..Default::default()
        };
        assert_eq!(
            decide(&p, &granted, 2000),
            Decision::Allow {
                basis: Basis::Consent,
                record: Some(7)
            }
        );
        assert_eq!(
            decide(&p, &granted, 1000 + 365 * DAY),
            Decision::Suppress(SuppressReason::ConsentExpired)
        );

        let withdrawn = ConsentFacts {
            purpose_event: ev(8, Withdraw, 1000),
            ..Default::default()
        };
        assert_eq!(
            decide(&p, &withdrawn, 2000),
            Decision::Suppress(SuppressReason::ConsentWithdrawn)
        );

        // A withdrawal from everything after the grant wins; a grant after it wins back.
        let all_after = ConsentFacts {
            purpose_event: ev(7, Grant, 1000),
            all_event: ev(9, Withdraw, 1500),
            ..Default::default()
        };
        assert_eq!(
            decide(&p, &all_after, 2000),
            Decision::Suppress(SuppressReason::ConsentWithdrawn)
        );
        let regranted = ConsentFacts {
            purpose_event: ev(10, Grant, 1600),
            all_event: ev(9, Withdraw, 1500),
            ..Default::default()
        };
        assert!(decide(&p, &regranted, 2000).is_allowed());
    }

    #[test]
    fn opt_out_bases_allow_until_an_objection() {
        let li = purpose(Basis::LegitimateInterest, None);
        assert!(decide(&li, &ConsentFacts::default(), 0).is_allowed());
        let objected_all = ConsentFacts {
            all_event: ev(3, Withdraw, 10),
            ..Default::default()
        };
        assert_eq!(
            decide(&li, &objected_all, 20),
            Decision::Suppress(SuppressReason::Objected)
        );

        let soft = purpose(Basis::SoftOptIn, None);
        assert_eq!(
            decide(&soft, &ConsentFacts::default(), 0),
            Decision::Suppress(SuppressReason::NotCustomer)
        );
        let customer = ConsentFacts {
            customer: true,
            ..Default::default()
        };
        assert!(decide(&soft, &customer, 0).is_allowed());
        let customer_objected = ConsentFacts {
            customer: true,
            purpose_event: ev(4, Withdraw, 10),
            ..Default::default()
        };
        assert_eq!(
            decide(&soft, &customer_objected, 20),
            Decision::Suppress(SuppressReason::Objected)
        );
    }

    #[test]
    fn transactional_ignores_objections_but_not_the_suppression_list() {
        let t = purpose(Basis::Transactional, None);
        let objected_all = ConsentFacts {
            all_event: ev(3, Withdraw, 10),
            ..Default::default()
        };
        assert!(decide(&t, &objected_all, 20).is_allowed());
        let bounced = ConsentFacts {
            suppression: Some("hard bounce".into()),
            ..Default::default()
        };
        let erased = ConsentFacts {
            erased: true,
            ..Default::default()
        };
        assert_eq!(
            decide(&t, &erased, 20),
            Decision::Suppress(SuppressReason::Erased)
        );
        assert_eq!(
            decide(&t, &bounced, 20),
            Decision::Suppress(SuppressReason::Suppressed)
        );
    }
}
