//! Counters of what the web side did, in the Prometheus text format at `/metrics`, so
//! an operator can alert on forged-link storms or a sudden wave of unsubscribes.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Plain atomics: the set is small and fixed, and a metrics crate would be more code
/// than this.
#[derive(Default)]
pub struct Metrics {
    pub invalid_tokens: AtomicU64,
    pub unsubscribes_one_click: AtomicU64,
    pub unsubscribes_page: AtomicU64,
    pub resubscribes: AtomicU64,
    pub rate_limited: AtomicU64,
}

pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// The text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
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
        out
    }
}
