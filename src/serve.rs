//! `optgate serve`: the pipeline assembled, run until SIGTERM or SIGINT, then wound
//! down in order: stop accepting, finish sessions, finish attempts, commit the queue.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::CopyMaker;
use crate::dkim::KeyRing;
use crate::inbound::{self, Inbound};
use crate::policy::Policy;
use crate::relay::Relay;
use crate::spool::{Intake, Spool};
use crate::store::{SqliteStore, Store};
use crate::token::TokenKeys;
use crate::web::{self, Web};

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
    let tokens = Arc::new(TokenKeys::load_or_create(&config.tokens.keys_file)?);
    let dkim = Arc::new(KeyRing::load(&config.dkim, &config.storage.data_dir)?);
    let copies = CopyMaker::new(config.clone(), store.clone(), tokens.clone(), dkim);

    let intake = Intake::new(
        config.queue.backpressure_copies,
        config.queue.backpressure_max_wait,
    );
    let (spool, ready, spool_writer) = Spool::start(store.clone(), intake);
    let shutdown = CancellationToken::new();
    let delivery = crate::delivery::start(
        config.clone(),
        store.clone(),
        relay,
        copies,
        spool.clone(),
        ready,
        shutdown.child_token(),
    );
    let webhooks = crate::webhook::start(&config.webhooks, store.clone(), shutdown.child_token())?;
    let inbound = Arc::new(Inbound {
        config: config.clone(),
        policy: Policy::new(store.clone()),
        spool,
    });
    let web = Arc::new(Web {
        config: config.clone(),
        store: store.clone(),
        tokens,
        // Confirmation mails go through the queue like any accepted message.
        spool: inbound.spool.clone(),
    });
    // A listener that fails (a port already in use) stops everything, like a signal.
    let listeners = {
        let stop_all = shutdown.clone();
        let smtp = inbound::serve(inbound, shutdown.child_token());
        let http = web::serve(web, shutdown.child_token());
        tokio::spawn(async move {
            let stop_on_error = |r: anyhow::Result<()>| {
                if r.is_err() {
                    stop_all.cancel();
                }
                r
            };
            tokio::join!(async { stop_on_error(smtp.await) }, async {
                stop_on_error(http.await)
            })
        })
    };

    tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("shutting down: no new connections; finishing what is in flight");
        }
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    let (smtp_result, http_result) = listeners.await.context("listener task")?;
    delivery.await.context("delivery task")?;
    webhooks.await.context("webhook workers")?;
    // Every Spool handle is gone now, so the writer commits what it holds and ends.
    spool_writer.await.context("spool writer")?;
    smtp_result.context("smtp")?;
    http_result.context("http")?;
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
