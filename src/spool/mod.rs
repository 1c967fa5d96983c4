//! The durable queue's front door: accepted messages are committed to the store in
//! groups (one fsync for many messages), and only then acknowledged and handed on.
//!
//! A session calls [`Spool::accept`] and waits; the writer task takes every message
//! waiting at that moment, commits them in one transaction, answers them all, and
//! passes the allowed recipients to delivery. Under load this turns one fsync per
//! message into one per batch without adding latency when idle.
//!
//! The door also says when to wait ([`intake`]): new sessions are held at their
//! greeting while delivery is behind.

mod intake;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::store::{NewMessage, QueuedMessage, Store, StoreError};
pub use intake::{Admission, Backlog, Intake, Ticket};

/// Largest group committed in one transaction.
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the queue could not store the message: {0}")]
    Store(#[from] StoreError),
    #[error("the queue is shutting down")]
    Closed,
}

/// A committed message whose allowed recipients are ready for delivery.
#[derive(Debug, Clone)]
pub struct Ready {
    pub message: QueuedMessage,
    /// Each allowed recipient, with their contact number (what their links carry).
    pub recipients: Vec<(String, i64)>,
}

struct Job {
    message: NewMessage,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Handle to the spool writer; cheap to clone. The writer stops once every handle
/// is dropped and the messages already submitted are committed.
#[derive(Clone)]
pub struct Spool {
    jobs: mpsc::Sender<Job>,
    intake: Arc<Intake>,
}

impl Spool {
    /// Starts the writer. Committed messages come out of the returned receiver.
    pub fn start(
        store: Arc<dyn Store>,
        intake: Arc<Intake>,
    ) -> (Spool, mpsc::UnboundedReceiver<Ready>, JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(store, rx, ready_tx));
        (Spool { jobs, intake }, ready_rx, writer)
    }

    /// Where sessions wait for room and delivery reports its backlog.
    pub fn intake(&self) -> &Arc<Intake> {
        &self.intake
    }

    /// Stores the message durably; returns once it is committed and fsync'd.
    pub async fn accept(&self, message: NewMessage) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job { message, done })
            .await
            .map_err(|_| SpoolError::Closed)?;
        wait.await.map_err(|_| SpoolError::Closed)?
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
    ready: mpsc::UnboundedSender<Ready>,
) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let (messages, waiters): (Vec<NewMessage>, Vec<_>) =
            jobs.drain(..).map(|j| (j.message, j.done)).unzip();
        let store = store.clone();
        let committed = tokio::task::spawn_blocking(move || {
            store.enqueue(&messages).map(|queued| (messages, queued))
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Internal(format!("spool writer panicked: {e}"))));
        match committed {
            Ok((messages, queued)) => {
                for (m, recipients) in messages.into_iter().zip(queued) {
                    if !recipients.is_empty() {
                        // Delivery gone means we are shutting down: the queue resumes it.
                        let _ = ready.send(Ready {
                            message: m.message,
                            recipients,
                        });
                    }
                }
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = waiters.len(), "spool commit failed; the mailer is told to retry");
                for w in waiters {
                    let _ = w.send(Err(SpoolError::Store(StoreError::Database(e.to_string()))));
                }
            }
        }
    }
}

/// A new queue id: time-ordered, unique, safe in a file name and an SMTP reply.
pub fn new_queue_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default();
    format!("{micros:013X}{:06X}", rand::random::<u32>() & 0xFF_FFFF)
}
