//! Group commit of attempt results: one task takes every outcome waiting and records
//! them in one store transaction, so thousands of deliveries a second cost few fsyncs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{DeliveryOutcome, Store};

/// Largest group recorded in one transaction.
const MAX_BATCH: usize = 4096;
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
