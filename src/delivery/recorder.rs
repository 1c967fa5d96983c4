//! Group commit of attempt results: one task gathers the outcomes that come in over a
//! few milliseconds and records them in one store transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{DeliveryOutcome, Store};

/// Largest group recorded in one transaction.
const MAX_BATCH: usize = 4096;
/// How long the first outcome of a group waits for others. Nobody waits on a record
/// (the copy is already delivered, or rescheduled in memory), and every transaction
/// has a fixed cost and rewrites the same few pages (the newest events, the queue's
/// index): under load, one transaction a few milliseconds holds dozens of outcomes
/// instead of one or two.
const LINGER: Duration = Duration::from_millis(10);
/// After shutdown, how long a failing store is retried before outcomes are left
/// unrecorded (their deliveries then stay pending and are retried on restart).
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts the recorder. It ends once every sender is dropped and all is recorded.
pub(super) fn start(
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> (mpsc::UnboundedSender<DeliveryOutcome>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, tokio::spawn(run(store, rx, shutdown)))
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<DeliveryOutcome>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            tokio::select! {
                // Closed: every sender is gone (shutdown); record what there is.
                got = rx.recv_many(&mut batch, room) => if got == 0 { break },
                () = &mut linger => break,
            }
        }
        let outcomes = Arc::new(std::mem::take(&mut batch));
        record(&store, outcomes, &shutdown).await;
    }
}

/// Records one group, retrying until it is stored: an outcome dropped here would
/// either resend a delivered copy or lose a bounce. Only at shutdown does it give up.
async fn record(
    store: &Arc<dyn Store>,
    outcomes: Arc<Vec<DeliveryOutcome>>,
    shutdown: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let mut give_up_at: Option<Instant> = None;
    loop {
        let s = store.clone();
        let batch = outcomes.clone();
        let error = match tokio::task::spawn_blocking(move || s.record_outcomes(&batch)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the store panicked: {e}"),
        };
        if shutdown.is_cancelled() {
            let deadline = *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_PATIENCE);
            if Instant::now() >= deadline {
                tracing::error!(
                    outcomes = outcomes.len(),
                    %error,
                    "giving up recording delivery outcomes at shutdown; those deliveries stay queued and will be retried (a delivered copy may be sent twice)"
                );
                return;
            }
        }
        tracing::error!(
            outcomes = outcomes.len(),
            %error,
            retry_in = ?backoff,
            "cannot record delivery outcomes; retrying"
        );
        // Shutdown cuts the wait short: the sooner it is known whether the store
        // answers, the sooner it can end.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled(), if give_up_at.is_none() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutcomeKind;
    use crate::store::testing::{Flaky, Op};

    fn deferred(i: i64) -> DeliveryOutcome {
        DeliveryOutcome {
            message_id: format!("M{i}"),
            recipient: "ann@example.com".into(),
            at: i,
            kind: OutcomeKind::Deferred {
                next_attempt_at: i + 60,
                error: "451 4.3.0 try later".into(),
            },
        }
    }

    fn recorder() -> (
        Arc<Flaky>,
        mpsc::UnboundedSender<DeliveryOutcome>,
        JoinHandle<()>,
    ) {
        let store = Arc::new(Flaky::default());
        let (tx, handle) = start(store.clone(), CancellationToken::new());
        (store, tx, handle)
    }

    // Paused time: the clock only moves while nothing else can run, and a store call
    // in progress (spawn_blocking) holds it, so what arrives 2 ms apart does.
    #[tokio::test(start_paused = true)]
    async fn outcomes_arriving_apart_share_one_transaction() {
        let (store, tx, handle) = recorder();
        for i in 0..4 {
            tx.send(deferred(i)).unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(tx);
        handle.await.unwrap();
        assert_eq!(store.calls(Op::RecordOutcomes), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_outcome_waits_only_the_linger() {
        let (store, tx, handle) = recorder();
        tx.send(deferred(1)).unwrap();
        tokio::time::sleep(LINGER / 2).await;
        assert_eq!(store.calls(Op::RecordOutcomes), 0);
        tokio::time::sleep(LINGER).await;
        assert_eq!(store.calls(Op::RecordOutcomes), 1);
        drop(tx);
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_records_at_once() {
        let (store, tx, handle) = recorder();
        tx.send(deferred(1)).unwrap();
        tokio::task::yield_now().await;
        let dropped = Instant::now();
        drop(tx);
        handle.await.unwrap();
        assert!(dropped.elapsed() < LINGER, "waited {:?}", dropped.elapsed());
        assert_eq!(store.calls(Op::RecordOutcomes), 1);
    }
}
