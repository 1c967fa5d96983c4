//! What an attempt's result means for the recipient: delivered, tried again later
//! (and when), or given up for good (and whether the address goes on the suppression list).

use std::time::Duration;

use crate::config::QueueConfig;
use crate::relay::RelayError;

/// What to do after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered {
        reply: String,
    },
    Deferred {
        /// Unix seconds.
        next_attempt_at: i64,
        delay: Duration,
        error: String,
    },
    Failed(Failure),
}

/// A recipient given up for good, with what the bounce report needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the store records as the last error.
    pub error: String,
    /// The mailbox does not exist: never mail it again.
    pub suppress: bool,
    /// The RFC 3463 status for the report, such as `5.1.1`.
    pub status: String,
    /// The upstream's reply (or our own account of the problem).
    pub diagnostic: String,
    pub expired: bool,
}

/// The delay before the next try, `attempts` being the tries already made (so the
/// first retry waits `schedule[0]`); the last delay repeats for ever after.
pub fn retry_delay(schedule: &[Duration], attempts: u32) -> Duration {
    let i = (attempts as usize).min(schedule.len().saturating_sub(1));
    schedule.get(i).copied().unwrap_or(Duration::from_secs(60))
}

/// Whether a message received at `received_at` has been queued longer than `max_age`.
pub fn is_expired(received_at: i64, now: i64, max_age: Duration) -> bool {
    let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
    now.saturating_sub(received_at) > max_age
}

/// RFC 3463 statuses that say the mailbox or its domain does not exist, so that
/// mailing it again can only harm the sender's reputation.
pub fn is_hard_bounce(enhanced: Option<[u16; 3]>) -> bool {
    matches!(enhanced, Some([5, 1, 1] | [5, 1, 10] | [5, 1, 2]))
}

/// Decides the fate of one recipient. `attempts` counts the tries made before this one.
pub fn decide(
    result: Result<String, RelayError>,
    received_at: i64,
    attempts: u32,
    now: i64,
    queue: &QueueConfig,
) -> Verdict {
    match result {
        Ok(reply) => Verdict::Delivered { reply },
        Err(RelayError::Transient(error)) => {
            if is_expired(received_at, now, queue.max_age) {
                let tries = attempts.saturating_add(1);
                let plural = if tries == 1 { "" } else { "s" };
                Verdict::Failed(Failure {
                    error: format!(
                        "4.4.7 message expired after {tries} attempt{plural}: last error {error}"
                    ),
                    suppress: false,
                    status: "4.4.7".into(),
                    diagnostic: error,
                    expired: true,
                })
            } else {
                let delay = retry_delay(&queue.retry_schedule, attempts);
                let secs = i64::try_from(delay.as_secs()).unwrap_or(i64::MAX);
                Verdict::Deferred {
                    next_attempt_at: now.saturating_add(secs),
                    delay,
                    error,
                }
            }
        }
        Err(RelayError::Permanent { enhanced, message }) => {
            let status = match enhanced {
                Some([class, subject, detail]) => format!("{class}.{subject}.{detail}"),
                None => "5.0.0".into(),
            };
            Verdict::Failed(Failure {
                error: message.clone(),
                suppress: is_hard_bounce(enhanced),
                status,
                diagnostic: message,
                expired: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::classify_reply;

    fn queue() -> QueueConfig {
        QueueConfig {
            retry_schedule: [60, 300, 900].map(Duration::from_secs).to_vec(),
            max_age: Duration::from_secs(5 * 86400),
            concurrency: 4,
            backpressure_copies: 0,
            backpressure_max_wait: Duration::ZERO,
        }
    }

    #[test]
    fn backoff_walks_the_schedule_and_repeats_the_last_delay() {
        let q = queue();
        assert_eq!(retry_delay(&q.retry_schedule, 0), Duration::from_secs(60));
        assert_eq!(retry_delay(&q.retry_schedule, 1), Duration::from_secs(300));
        assert_eq!(retry_delay(&q.retry_schedule, 2), Duration::from_secs(900));
        assert_eq!(retry_delay(&q.retry_schedule, 3), Duration::from_secs(900));
        assert_eq!(
            retry_delay(&q.retry_schedule, u32::MAX),
            Duration::from_secs(900)
        );
        assert_eq!(
            retry_delay(&[Duration::from_secs(7)], 0),
            Duration::from_secs(7)
        );
        // Config validation forbids an empty schedule; still, never panic.
        assert_eq!(retry_delay(&[], 3), Duration::from_secs(60));
    }

    #[test]
    fn expiry_is_strictly_after_max_age() {
        let max = Duration::from_secs(100);
        assert!(!is_expired(1000, 1100, max));
        assert!(is_expired(1000, 1101, max));
        assert!(!is_expired(1000, 900, max), "clock went backwards");
        assert!(!is_expired(0, i64::MAX, Duration::MAX));
    }

    #[test]
    fn transient_failures_are_deferred_by_the_schedule() {
        let v = decide(
            Err(classify_reply("451 4.3.0 Try again later")),
            1000,
            1,
            2000,
            &queue(),
        );
        assert_eq!(
            v,
            Verdict::Deferred {
                next_attempt_at: 2300,
                delay: Duration::from_secs(300),
                error: "451 4.3.0 Try again later".into()
            }
        );
    }

    #[test]
    fn transient_failures_of_an_old_message_expire() {
        let now = 1000 + 5 * 86400 + 1;
        let v = decide(
            Err(RelayError::Transient("upstream x:25: timed out".into())),
            1000,
            7,
            now,
            &queue(),
        );
        let Verdict::Failed(f) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            f.error,
            "4.4.7 message expired after 8 attempts: last error upstream x:25: timed out"
        );
        assert_eq!(f.status, "4.4.7");
        assert!(f.expired && !f.suppress);
    }

    #[test]
    fn permanent_failures_fail_and_only_missing_mailboxes_are_suppressed() {
        let fail = |reply: &str| match decide(Err(classify_reply(reply)), 0, 0, 10, &queue()) {
            Verdict::Failed(f) => f,
            other => panic!("{other:?}"),
        };
        let f = fail("550 5.1.1 <x@y>: no such user");
        assert!(f.suppress);
        assert_eq!(f.status, "5.1.1");
        assert_eq!(f.error, "550 5.1.1 <x@y>: no such user");
        assert!(fail("550 5.1.10 null MX").suppress);
        assert!(fail("550 5.1.2 no such domain").suppress);

        let f = fail("552 5.2.2 Mailbox full");
        assert!(!f.suppress);
        assert_eq!(f.status, "5.2.2");
        let f = fail("554 rejected");
        assert!(!f.suppress);
        assert_eq!(f.status, "5.0.0");
        assert!(!fail("550 5.7.1 policy").suppress);
    }

    #[test]
    fn success_is_delivered() {
        assert_eq!(
            decide(Ok("250 ok".into()), 0, 0, 0, &queue()),
            Verdict::Delivered {
                reply: "250 ok".into()
            }
        );
    }
}
