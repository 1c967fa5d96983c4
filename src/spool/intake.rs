//! Backpressure: intake keeps pace with delivery. A new SMTP session waits for its
//! greeting while `queue.backpressure_copies` copies or more are waiting to be made
//! or expected from the sessions already let in.
//!
//! Without it a fast mailer queues messages far faster than their copies can be
//! signed (each copy costs an RSA signature), and every message then waits behind the
//! whole backlog: latency and memory grow with the campaign. Waiting before the
//! greeting, before any transaction starts, is the gentlest signal SMTP has (Postfix's
//! `in_flow_delay` slows its clients in the same spirit). Waiting sessions are let in
//! one at a time, in arrival order, each reserving room for the copies its message is
//! expected to make, so that a wave of waiting clients is not let in all at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How fast the expected number of copies per message follows the messages queued.
const EWMA_WEIGHT: f64 = 0.2;
/// A session let in at its greeting holds its room this long for its first MAIL; a
/// connection that idles (a pool opened ahead of need) then stops holding it.
const GREETING_HOLD: Duration = Duration::from_secs(2);

pub struct Intake {
    /// Copies waiting to be made (or expected) at which sessions wait; 0 never waits.
    limit: usize,
    /// A session waits at most this long, then is served anyway: slowness is the
    /// signal, mail is never refused for it.
    max_wait: Duration,
    state: Mutex<State>,
    changed: Notify,
    /// Waiting sessions queue here, so they are let in in the order they came.
    turn: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Copies due or being made: delivery's backlog.
    pending: usize,
    /// Copies the admitted sessions are expected to queue.
    reserved: usize,
    /// Recipients per queued message, averaged (0 until the first).
    per_message: f64,
    /// Sessions waiting for room.
    waiting: usize,
    /// Room held by sessions let in at their greeting and not yet at MAIL, by id:
    /// until when, and how many copies.
    greeted: BTreeMap<u64, (Instant, usize)>,
    next_id: u64,
}

impl State {
    fn expected(&self) -> usize {
        // Rounded, not rounded up: after larger messages the average comes back down
        // towards 1 but, in floating point, stops a few ulps above it, and its ceiling
        // would hold room for 2 copies per one-recipient session from then on (the
        // benchmark lost 15% of its 1-recipient throughput after its 10-recipient
        // case). Recipients per message are small counts: the cast cannot truncate.
        (self.per_message.round() as usize).max(1)
    }

    /// Gives back the room of greeted sessions that have not sent MAIL in time, and
    /// says when the next such room expires.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut lapsed = 0;
        self.greeted.retain(|_, (until, copies)| {
            let keep = *until > now;
            if !keep {
                lapsed += *copies;
            }
            keep
        });
        self.reserved = self.reserved.saturating_sub(lapsed);
        self.greeted.values().map(|(until, _)| *until).min()
    }
}

impl Intake {
    pub fn new(limit: usize, max_wait: Duration) -> Arc<Intake> {
        Arc::new(Intake {
            limit,
            max_wait,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// Never waits: for tests and tools that queue outside any SMTP session.
    pub fn unlimited() -> Arc<Intake> {
        Intake::new(0, Duration::ZERO)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few counters, consistent after every update: a panic
        // elsewhere while it was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room before a session's greeting. The room is held for its first
    /// MAIL ([`Admission::begin`]) for a short while, so that the sessions waiting
    /// behind it see it taken.
    pub async fn admit(self: &Arc<Intake>) -> Admission {
        if self.limit == 0 {
            return self.unreserved();
        }
        let deadline = Instant::now() + self.max_wait;
        let _waiting = Waiting::new(self);
        let _turn = self.turn.lock().await;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let next_expiry = {
                let mut s = self.state();
                let next_expiry = s.expire(now);
                // Room left lets the next session in, whatever its message brings:
                // requiring room for all its copies would let delivery run dry while
                // a large message waits for the backlog to empty.
                if s.pending + s.reserved < self.limit || now >= deadline {
                    if now >= deadline {
                        tracing::debug!(wait = ?self.max_wait, "delivery is behind; a session waited its longest and is let in");
                    }
                    return self.greeted(&mut s, now);
                }
                next_expiry
            };
            let wake = next_expiry.map_or(deadline, |e| e.min(deadline));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn unreserved(self: &Arc<Intake>) -> Admission {
        Admission {
            intake: self.clone(),
            id: None,
            copies: 0,
            begun: false,
        }
    }

    fn greeted(self: &Arc<Intake>, s: &mut State, now: Instant) -> Admission {
        let copies = s.expected();
        let id = s.next_id;
        s.next_id += 1;
        s.greeted.insert(id, (now + GREETING_HOLD, copies));
        s.reserved += copies;
        Admission {
            intake: self.clone(),
            id: Some(id),
            copies,
            begun: false,
        }
    }

    /// A message was queued with this many copies to make.
    pub fn queued(&self, copies: usize) {
        let mut s = self.state();
        s.per_message = if s.per_message == 0.0 {
            copies as f64
        } else {
            s.per_message + EWMA_WEIGHT * (copies as f64 - s.per_message)
        };
    }

    /// One more copy is due (a new message's recipient, or a retry whose time came);
    /// the ticket is its place in the backlog, given back when the copy is made.
    pub fn due(self: &Arc<Intake>) -> Ticket {
        self.state().pending += 1;
        Ticket {
            intake: self.clone(),
        }
    }

    /// What `/metrics` shows of it.
    pub fn backlog(&self) -> Backlog {
        let s = self.state();
        Backlog {
            pending: s.pending,
            reserved: s.reserved,
            waiting: s.waiting,
        }
    }

    fn release(&self, pending: usize, reserved: usize) {
        {
            let mut s = self.state();
            s.pending = s.pending.saturating_sub(pending);
            s.reserved = s.reserved.saturating_sub(reserved);
        }
        self.changed.notify_waiters();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Copies due or being made.
    pub pending: usize,
    /// Copies the sessions let in are expected to queue.
    pub reserved: usize,
    /// Sessions waiting for room.
    pub waiting: usize,
}

/// Counts a session among those waiting for as long as it waits, however the wait
/// ends (let in, or given up at shutdown).
struct Waiting<'a>(&'a Intake);

impl<'a> Waiting<'a> {
    fn new(intake: &'a Intake) -> Waiting<'a> {
        intake.state().waiting += 1;
        Waiting(intake)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.waiting = s.waiting.saturating_sub(1);
    }
}

/// A session's room in the backlog: taken before its greeting (or its next MAIL),
/// given back when the transaction it let in ends (the admission is dropped).
pub struct Admission {
    intake: Arc<Intake>,
    /// Its entry among the greeted sessions, while it may still expire.
    id: Option<u64>,
    copies: usize,
    begun: bool,
}

impl Admission {
    /// The session's MAIL was accepted: its room is held until the admission is
    /// dropped, taken again if it had lapsed while the client took its time.
    pub fn begin(&mut self) {
        if self.begun || self.copies == 0 {
            self.begun = true;
            return;
        }
        self.begun = true;
        let mut s = self.intake.state();
        let held = self.id.take().and_then(|id| s.greeted.remove(&id));
        if held.is_none() {
            s.reserved += self.copies;
        }
    }

    /// Whether a transaction has begun under it.
    pub fn begun(&self) -> bool {
        self.begun
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.copies == 0 {
            return;
        }
        let held = {
            let mut s = self.intake.state();
            match self.id.take() {
                // Not begun: held only if it has not lapsed.
                Some(id) => s.greeted.remove(&id).is_some(),
                None => self.begun,
            }
        };
        if held {
            self.intake.release(0, self.copies);
        }
    }
}

/// A due copy's place in the backlog, given back when dropped.
pub struct Ticket {
    intake: Arc<Intake>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.intake.release(1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(intake: &Intake) -> (usize, usize) {
        let b = intake.backlog();
        (b.pending, b.reserved)
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_wait_while_delivery_is_behind_and_enter_in_order() {
        let intake = Intake::new(4, Duration::from_secs(60));
        let mut tickets: Vec<Ticket> = (0..4).map(|_| intake.due()).collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..2 {
            let (intake, tx) = (intake.clone(), tx.clone());
            tokio::spawn(async move {
                let admission = intake.admit().await;
                tx.send((n, admission)).unwrap();
            });
            // Let each reach the queue before the next, so the order is defined.
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rx.try_recv().is_err(), "let in with a full backlog");
        assert_eq!(intake.backlog().waiting, 2);

        // One copy made: room for one more, so exactly one session enters.
        drop(tickets.pop());
        let (first, mut admission) = rx.recv().await.unwrap();
        assert_eq!(first, 0);
        assert_eq!(intake.backlog().waiting, 1);
        admission.begin();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            rx.try_recv().is_err(),
            "the second came in before room was made"
        );
        assert_eq!(counts(&intake), (3, 1));

        // Its message queued (delivery counts its copy, the session lets go of its
        // room): still full; then a copy made lets the second in.
        let queued = intake.due();
        drop(admission);
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        drop(queued);
        let (second, _admission) = rx.recv().await.unwrap();
        assert_eq!(second, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_greeted_session_that_idles_stops_holding_room() {
        let intake = Intake::new(2, Duration::from_secs(60));
        let _ticket = intake.due();
        let mut idle = intake.admit().await;
        assert_eq!(counts(&intake), (1, 1));
        let started = Instant::now();
        let next = intake.admit().await;
        assert_eq!(started.elapsed(), GREETING_HOLD);
        assert_eq!(counts(&intake), (1, 1));
        // Its MAIL, late: the room is taken again; dropping it gives it back once.
        idle.begin();
        assert_eq!(counts(&intake), (1, 2));
        drop(idle);
        drop(next);
        assert_eq!(counts(&intake), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_waits_at_most_max_wait() {
        let intake = Intake::new(1, Duration::from_secs(20));
        let _ticket = intake.due();
        let started = Instant::now();
        let _admission = intake.admit().await;
        assert_eq!(started.elapsed(), Duration::from_secs(20));
        assert_eq!(counts(&intake), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_limit_enters_while_there_is_room() {
        let intake = Intake::new(4, Duration::from_secs(60));
        intake.queued(10);
        let started = Instant::now();
        let mut admission = intake.admit().await;
        admission.begin();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(counts(&intake), (0, 10));
        let next = tokio::spawn({
            let intake = intake.clone();
            async move { intake.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!next.is_finished());
        drop(admission);
        assert!(next.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_expected_copies_come_back_down_after_larger_messages() {
        let intake = Intake::new(16, Duration::from_secs(60));
        (0..20).for_each(|_| intake.queued(10));
        (0..100).for_each(|_| intake.queued(1));
        let mut admission = intake.admit().await;
        admission.begin();
        // One-recipient mail again: each session holds room for one copy, not two.
        assert_eq!(counts(&intake), (0, 1));
    }

    #[tokio::test]
    async fn unlimited_never_waits_or_counts() {
        let intake = Intake::unlimited();
        let _tickets: Vec<Ticket> = (0..100).map(|_| intake.due()).collect();
        let mut admission = intake.admit().await;
        admission.begin();
        assert_eq!(counts(&intake), (100, 0));
    }
}
