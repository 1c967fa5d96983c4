//! Counters of what the web side did, in the Prometheus text format at `/metrics`, so
//! an operator can alert on forged-link storms or a sudden wave of unsubscribes; and
//! the queue's backlog, to see when backpressure holds mailers back.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spool::Backlog;

/// Plain atomics: the set is small and fixed, and a metrics crate would be more code
/// than this.
#[derive(Default)]
pub struct Metrics {
    pub invalid_tokens: AtomicU64,
    pub unsubscribes_one_click: AtomicU64,
    pub unsubscribes_page: AtomicU64,
    pub resubscribes: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Grants and withdrawals recorded from the preference centre.
    pub preference_grants: AtomicU64,
    pub preference_withdrawals: AtomicU64,
    /// Sign-ups whose confirmation mail was queued, and those held back by a limit.
    pub signups_mailed: AtomicU64,
    pub signups_limited: AtomicU64,
    pub confirmations: AtomicU64,
    /// Admin API (and /metrics) requests without a valid bearer token.
    pub api_unauthorized: AtomicU64,
}

pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// The text exposition format, version 0.0.4; with the queue's backlog, which
    /// says when backpressure holds new SMTP sessions back.
    pub fn render(&self, backlog: Backlog) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut family = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "optgate_web_invalid_tokens_total",
            "Links refused as forged, truncated, unknown or of the wrong kind.",
            &[("", get(&self.invalid_tokens))],
        );
        family(
            "optgate_web_unsubscribes_total",
            "Withdrawals recorded from unsubscribe links (repeats not counted), by method.",
            &[
                ("{method=\"one-click\"}", get(&self.unsubscribes_one_click)),
                ("{method=\"page\"}", get(&self.unsubscribes_page)),
            ],
        );
        family(
            "optgate_web_resubscribes_total",
            "Unsubscriptions undone from the confirmation page.",
            &[("", get(&self.resubscribes))],
        );
        family(
            "optgate_web_rate_limited_total",
            "Requests refused by the per-IP rate limit.",
            &[("", get(&self.rate_limited))],
        );
        family(
            "optgate_web_preference_changes_total",
            "Consent events recorded from the preference centre, by action.",
            &[
                ("{action=\"grant\"}", get(&self.preference_grants)),
                ("{action=\"withdraw\"}", get(&self.preference_withdrawals)),
            ],
        );
        family(
            "optgate_web_signups_total",
            "Double opt-in sign-ups: confirmation mail queued, or held back by a rate limit.",
            &[
                ("{outcome=\"mailed\"}", get(&self.signups_mailed)),
                ("{outcome=\"limited\"}", get(&self.signups_limited)),
            ],
        );
        family(
            "optgate_web_confirmations_total",
            "Sign-ups confirmed (consent recorded).",
            &[("", get(&self.confirmations))],
        );
        family(
            "optgate_web_api_unauthorized_total",
            "Admin API and metrics requests refused for want of a valid bearer token.",
            &[("", get(&self.api_unauthorized))],
        );
        let gauges: [(&str, &str, usize); 3] = [
            (
                "optgate_queue_copies_pending",
                "Copies due or being made (signed): delivery's backlog.",
                backlog.pending,
            ),
            (
                "optgate_queue_copies_reserved",
                "Copies expected from the SMTP sessions let in and not yet queued.",
                backlog.reserved,
            ),
            (
                "optgate_smtp_sessions_waiting",
                "SMTP sessions held before their greeting or MAIL by backpressure.",
                backlog.waiting,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
