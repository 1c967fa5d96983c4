//! `optgate serve`: the pipeline assembled, run until SIGTERM or SIGINT, then wound
//! down in order: stop accepting, finish sessions, finish attempts, commit the queue.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inbound::{self, Inbound};
use crate::policy::Policy;
use crate::relay::Relay;
use crate::spool::Spool;
use crate::store::{SqliteStore, Store};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.storage.data_dir).with_context(|| {
        format!(
            "cannot create data_dir {}",
            config.storage.data_dir.display()
        )
    })?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
        &config.storage.database(),
        config.storage.fsync,
    )?);
    let relay = Relay::new(&config.upstream, &config.smtp.hostname)?;

    let (spool, ready, spool_writer) = Spool::start(store.clone());
    let shutdown = CancellationToken::new();
    let delivery = crate::delivery::start(
        config.clone(),
        store.clone(),
        relay,
        spool.clone(),
        ready,
        shutdown.child_token(),
    );
    let inbound = Arc::new(Inbound {
        config: config.clone(),
        policy: Policy::new(store.clone()),
        spool,
    });
    let mut smtp = tokio::spawn(inbound::serve(inbound, shutdown.child_token()));

    let early_end = tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("shutting down: no new connections; finishing what is in flight");
            None
        }
        // The listeners end on their own only when they fail (a port already in use).
        r = &mut smtp => Some(r),
    };
    shutdown.cancel();
    let smtp_result = match early_end {
        Some(r) => r,
        None => smtp.await,
    };
    delivery.await.context("delivery task")?;
    // Every Spool handle is gone now, so the writer commits what it holds and ends.
    spool_writer.await.context("spool writer")?;
    smtp_result.context("smtp listener task")??;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
