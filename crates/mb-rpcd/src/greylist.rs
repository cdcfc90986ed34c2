//! The `Greylist` service: greylisting's triplets and auto-whitelisted client networks
//! in the database, for gateways without Redis (`redis.url`). mb-smtpd asks `Check` at
//! each RCPT it greylists; the decision is `mb_core::greylist`'s, made with this
//! daemon's `greylist.*` settings inside one write transaction, so two sessions retrying
//! the same triplet at once cannot both count as its first pass. Expired rows are pruned
//! at start and every few minutes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_core::greylist::{self, Client, Decision, Entry, Timing};
use mb_proto::v1::greylist_server::Greylist;
use mb_proto::v1::{
    GreylistCheckRequest, GreylistCheckResponse, GreylistClient, GreylistDecision,
    GreylistFlushRequest, GreylistFlushResponse, GreylistListRequest, GreylistListResponse,
    GreylistTriplet,
};
use mb_runtime::lifecycle::Shutdown;
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::db::{Db, DbError};
use crate::store::Store;

/// How often expired entries are pruned.
const EVERY: Duration = Duration::from_secs(300);

/// Longest stored network, sender and recipient (the columns' sizes): longer ones are
/// refused rather than cut, since a cut key could stand for another triplet.
const MAX_NETWORK: usize = 64;
const MAX_ADDRESS: usize = 255;

pub struct GreylistService {
    pub store: Arc<Store>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn db_status(e: DbError) -> Status {
    tracing::error!(cause = %e, "greylist database operation failed");
    Status::unavailable(e.to_string())
}

fn count(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A stored triplet, as `List` shows it.
pub struct TripletRow {
    pub key: greylist::Triplet,
    pub entry: Entry,
    pub expires_at: i64,
}

/// A stored client network.
pub struct ClientRow {
    pub network: String,
    pub client: Client,
    pub expires_at: i64,
}

impl Db {
    /// Decides for `t` at `now` and records the attempt, in one transaction.
    pub async fn greylist_check(
        &self,
        timing: &Timing,
        t: &greylist::Triplet,
        now: i64,
    ) -> Result<Decision, DbError> {
        let mut tx = self.write_tx().await?;
        let client = sqlx::query(
            self.sql("SELECT passes, last_seen FROM greylist_clients WHERE network = ?"),
        )
        .bind(&t.network)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| -> Result<Client, sqlx::Error> {
            Ok(Client {
                passes: count(r.try_get(0)?),
                last_seen: r.try_get(1)?,
            })
        })
        .transpose()?;
        if let Some(c) = client
            && c.whitelisted(timing, now)
        {
            // Each use keeps a whitelisted client remembered for another lifetime.
            let touched = Client {
                last_seen: now,
                ..c
            };
            sqlx::query(self.sql(
                "UPDATE greylist_clients SET last_seen = ?, expires_at = ? WHERE network = ?",
            ))
            .bind(now)
            .bind(touched.expires_at(timing))
            .bind(&t.network)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Decision::Whitelisted);
        }
        let stored = sqlx::query(self.sql(
            "SELECT first_seen, last_seen, passed, attempts FROM greylist_triplets \
             WHERE network = ? AND sender = ? AND recipient = ?",
        ))
        .bind(&t.network)
        .bind(&t.sender)
        .bind(&t.recipient)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| -> Result<Entry, sqlx::Error> {
            Ok(Entry {
                first_seen: r.try_get(0)?,
                last_seen: r.try_get(1)?,
                passed: r.try_get::<i64, _>(2)? != 0,
                count: count(r.try_get(3)?),
            })
        })
        .transpose()?;
        let checked = greylist::check(timing, stored, now);
        sqlx::query(self.sql(
            "DELETE FROM greylist_triplets WHERE network = ? AND sender = ? AND recipient = ?",
        ))
        .bind(&t.network)
        .bind(&t.sender)
        .bind(&t.recipient)
        .execute(&mut *tx)
        .await?;
        let e = checked.entry;
        sqlx::query(self.sql(
            "INSERT INTO greylist_triplets (network, sender, recipient, first_seen, last_seen, \
             passed, attempts, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(&t.network)
        .bind(&t.sender)
        .bind(&t.recipient)
        .bind(e.first_seen)
        .bind(e.last_seen)
        .bind(i64::from(e.passed))
        .bind(i64::from(e.count))
        .bind(e.expires_at(timing))
        .execute(&mut *tx)
        .await?;
        if checked.newly_passed {
            let c = greylist::client_passed(timing, client, now);
            sqlx::query(self.sql("DELETE FROM greylist_clients WHERE network = ?"))
                .bind(&t.network)
                .execute(&mut *tx)
                .await?;
            sqlx::query(self.sql(
                "INSERT INTO greylist_clients (network, passes, last_seen, expires_at) \
                 VALUES (?, ?, ?, ?)",
            ))
            .bind(&t.network)
            .bind(i64::from(c.passes))
            .bind(c.last_seen)
            .bind(c.expires_at(timing))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(checked.decision)
    }

    /// Every stored triplet and client network, oldest first.
    pub async fn greylist_list(&self) -> Result<(Vec<TripletRow>, Vec<ClientRow>), DbError> {
        let rows = sqlx::query(
            "SELECT network, sender, recipient, first_seen, last_seen, passed, attempts, \
             expires_at FROM greylist_triplets ORDER BY first_seen, network, sender, recipient",
        )
        .fetch_all(&self.pool)
        .await?;
        let triplets = rows
            .iter()
            .map(|r| -> Result<TripletRow, sqlx::Error> {
                Ok(TripletRow {
                    key: greylist::Triplet {
                        network: r.try_get(0)?,
                        sender: r.try_get(1)?,
                        recipient: r.try_get(2)?,
                    },
                    entry: Entry {
                        first_seen: r.try_get(3)?,
                        last_seen: r.try_get(4)?,
                        passed: r.try_get::<i64, _>(5)? != 0,
                        count: count(r.try_get(6)?),
                    },
                    expires_at: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rows = sqlx::query(
            "SELECT network, passes, last_seen, expires_at FROM greylist_clients ORDER BY network",
        )
        .fetch_all(&self.pool)
        .await?;
        let clients = rows
            .iter()
            .map(|r| -> Result<ClientRow, sqlx::Error> {
                Ok(ClientRow {
                    network: r.try_get(0)?,
                    client: Client {
                        passes: count(r.try_get(1)?),
                        last_seen: r.try_get(2)?,
                    },
                    expires_at: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((triplets, clients))
    }

    /// Removes the entries that expired before `now` (all of them with `None`); returns
    /// how many triplets and client networks went.
    pub async fn greylist_flush(&self, now: Option<i64>) -> Result<(u64, u64), DbError> {
        let mut tx = self.write_tx().await?;
        let mut gone = [0; 2];
        for (i, table) in ["greylist_triplets", "greylist_clients"].iter().enumerate() {
            let r = match now {
                Some(now) => {
                    let q = format!("DELETE FROM {table} WHERE expires_at < ?");
                    sqlx::query(self.sql(&q))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                }
                None => {
                    let q = format!("DELETE FROM {table}");
                    sqlx::query(self.sql(&q)).execute(&mut *tx).await?
                }
            };
            gone[i] = r.rows_affected();
        }
        tx.commit().await?;
        Ok((gone[0], gone[1]))
    }
}

#[tonic::async_trait]
impl Greylist for GreylistService {
    async fn check(
        &self,
        req: Request<GreylistCheckRequest>,
    ) -> Result<Response<GreylistCheckResponse>, Status> {
        let r = req.into_inner();
        if r.network.is_empty()
            || r.network.len() > MAX_NETWORK
            || r.sender.len() > MAX_ADDRESS
            || r.recipient.is_empty()
            || r.recipient.len() > MAX_ADDRESS
        {
            return Err(Status::invalid_argument(
                "a greylist triplet needs a network (at most 64 bytes), a sender and a recipient (at most 255 bytes each)",
            ));
        }
        let t = greylist::Triplet {
            network: r.network,
            sender: r.sender.to_lowercase(),
            recipient: r.recipient.to_lowercase(),
        };
        let timing = Timing::from_config(&self.store.effective());
        let decision = self
            .store
            .db
            .greylist_check(&timing, &t, now())
            .await
            .map_err(db_status)?;
        let (decision, retry_in) = match decision {
            Decision::Pass => (GreylistDecision::Pass, 0),
            Decision::Whitelisted => (GreylistDecision::Whitelisted, 0),
            Decision::Defer { retry_in } => (GreylistDecision::Defer, retry_in),
        };
        Ok(Response::new(GreylistCheckResponse {
            decision: decision.into(),
            retry_in,
        }))
    }

    async fn list(
        &self,
        _req: Request<GreylistListRequest>,
    ) -> Result<Response<GreylistListResponse>, Status> {
        let timing = Timing::from_config(&self.store.effective());
        let now = now();
        let (triplets, clients) = self.store.db.greylist_list().await.map_err(db_status)?;
        Ok(Response::new(GreylistListResponse {
            triplets: triplets
                .into_iter()
                .map(|t| GreylistTriplet {
                    network: t.key.network,
                    sender: t.key.sender,
                    recipient: t.key.recipient,
                    first_seen_unix: t.entry.first_seen,
                    last_seen_unix: t.entry.last_seen,
                    passed: t.entry.passed,
                    count: t.entry.count,
                    expires_unix: t.expires_at,
                })
                .collect(),
            clients: clients
                .into_iter()
                .map(|c| GreylistClient {
                    whitelisted: c.client.whitelisted(&timing, now),
                    network: c.network,
                    passes: c.client.passes,
                    last_seen_unix: c.client.last_seen,
                    expires_unix: c.expires_at,
                })
                .collect(),
        }))
    }

    async fn flush(
        &self,
        req: Request<GreylistFlushRequest>,
    ) -> Result<Response<GreylistFlushResponse>, Status> {
        let all = req.into_inner().all;
        let (triplets, clients) = self
            .store
            .db
            .greylist_flush((!all).then(now))
            .await
            .map_err(db_status)?;
        tracing::info!(triplets, clients, all, "greylist flushed");
        Ok(Response::new(GreylistFlushResponse { triplets, clients }))
    }
}

/// Prunes expired entries now and then every few minutes until shutdown.
pub fn spawn_retention(store: Arc<Store>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            match store.db.greylist_flush(Some(now())).await {
                Ok((0, 0)) => {}
                Ok((triplets, clients)) => {
                    tracing::info!(triplets, clients, "expired greylist entries pruned");
                }
                Err(e) => tracing::warn!(cause = %e, "greylist pruning failed"),
            }
            tokio::select! {
                () = shutdown.requested() => break,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database store decides as `mb_core::greylist` does, across the rows it keeps:
    /// deferred, passed after the delay, auto-whitelisted, flushed.
    #[tokio::test]
    async fn the_database_keeps_triplets_and_clients() {
        let dir = std::env::temp_dir().join(format!("mb-greylist-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 2).await.expect("the database opens");
        let timing = Timing {
            delay: 60,
            retry_window: 3600,
            lifetime: 86_400,
            auto_whitelist: 2,
        };
        let t = |r: &str| greylist::Triplet {
            network: "192.0.2.0/24".into(),
            sender: "a@x.test".into(),
            recipient: r.into(),
        };
        let t0 = 1_000_000;
        let check = |r: &'static str, at: i64| {
            let db = &db;
            let t = t(r);
            async move { db.greylist_check(&timing, &t, at).await.expect("a check") }
        };
        assert_eq!(
            check("b@y.test", t0).await,
            Decision::Defer { retry_in: 60 }
        );
        assert_eq!(
            check("b@y.test", t0 + 30).await,
            Decision::Defer { retry_in: 30 }
        );
        assert_eq!(check("b@y.test", t0 + 60).await, Decision::Pass);
        assert_eq!(check("b@y.test", t0 + 61).await, Decision::Pass);
        assert_eq!(
            check("c@y.test", t0 + 100).await,
            Decision::Defer { retry_in: 60 }
        );
        let (triplets, clients) = db.greylist_list().await.expect("a list");
        assert_eq!(triplets.len(), 2);
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].client.passes, 1);
        assert_eq!(check("c@y.test", t0 + 200).await, Decision::Pass);
        // Two passes: the network is whitelisted, even for a triplet never seen.
        assert_eq!(check("d@y.test", t0 + 201).await, Decision::Whitelisted);
        // Nothing has expired an hour later; everything a lifetime later.
        assert_eq!(
            db.greylist_flush(Some(t0 + 3600)).await.expect("flush"),
            (0, 0)
        );
        assert_eq!(
            db.greylist_flush(Some(t0 + 201 + 86_401))
                .await
                .expect("flush"),
            (2, 1)
        );
        assert_eq!(
            check("b@y.test", t0 + 300).await,
            Decision::Defer { retry_in: 60 }
        );
        assert_eq!(db.greylist_flush(None).await.expect("flush"), (1, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
