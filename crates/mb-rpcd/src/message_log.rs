//! Keeps the message log bounded: events older than `log.retention_days` are deleted at
//! start and every few minutes, in batches (on a cluster main, those its children
//! uploaded as well: they are rows of the same table).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_runtime::lifecycle::Shutdown;

use crate::db::DbError;
use crate::store::Store;

/// How often the retention pass runs; a changed `log.retention_days` applies at the next.
const EVERY: Duration = Duration::from_secs(300);

const DAY_MS: i64 = 86_400_000;

/// Deletes the events older than the configured retention; returns how many went.
pub async fn prune(store: &Store) -> Result<u64, DbError> {
    let days = store.effective().int("log.retention_days");
    if days <= 0 {
        return Ok(0);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let gone = store.db.prune_events(now - days * DAY_MS).await?;
    if gone > 0 {
        tracing::info!(events = gone, retention_days = days, "message log pruned");
    }
    Ok(gone)
}

/// Runs `prune` now and then every few minutes until shutdown.
pub fn spawn_retention(store: Arc<Store>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = prune(&store).await {
                tracing::warn!(cause = %e, "message log retention pass failed");
            }
            tokio::select! {
                () = shutdown.requested() => break,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    });
}
