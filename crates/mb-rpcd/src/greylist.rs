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

use crate::db::{Db, DbError, Dialect};
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

/// How long a count of the triplet table is trusted before `Check` counts again: a
/// COUNT(*) of a million rows on every new triplet would be the attacker's lever.
const RECOUNT: Duration = Duration::from_secs(60);

/// How often a cap that keeps being hit is logged again.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// The triplet table's size as last counted, plus the rows added since, and when a cap
/// was last logged. One per process: mb-rpcd serves one database.
struct Tally {
    rows: u64,
    counted: Option<std::time::Instant>,
    cap_logged: Option<std::time::Instant>,
    capped_since_log: u64,
}

static TALLY: std::sync::Mutex<Tally> = std::sync::Mutex::new(Tally {
    rows: 0,
    counted: None,
    cap_logged: None,
    capped_since_log: 0,
});

fn tally() -> std::sync::MutexGuard<'static, Tally> {
    TALLY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Db {
    /// Rows in the triplet table.
    pub async fn greylist_triplet_count(&self) -> Result<u64, DbError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM greylist_triplets")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl GreylistService {
    /// The caps for the next check, from `greylist.max_pending_per_network` and
    /// `greylist.max_triplets` (0: no limit) and the table's size, counted at most once a
    /// minute.
    async fn caps(&self, cfg: &mb_core::Config) -> Result<Caps, DbError> {
        let per_network = u64::try_from(cfg.int("greylist.max_pending_per_network")).unwrap_or(0);
        let total = u64::try_from(cfg.int("greylist.max_triplets")).unwrap_or(0);
        let stale = tally().counted.is_none_or(|at| at.elapsed() >= RECOUNT);
        if total > 0 && stale {
            let rows = self.store.db.greylist_triplet_count().await?;
            let mut t = tally();
            t.rows = rows;
            t.counted = Some(std::time::Instant::now());
        }
        Ok(Caps {
            per_network: if per_network == 0 {
                u64::MAX
            } else {
                per_network
            },
            full: total > 0 && tally().rows >= total,
        })
    }

    /// Keeps the tally and logs a cap, at most once a minute with how many checks it hit.
    fn record(&self, stored: Stored, t: &greylist::Triplet, caps: Caps) {
        let mut tally = tally();
        match stored {
            Stored::Updated => {}
            Stored::Added => tally.rows += 1,
            Stored::NetworkCapped | Stored::TableCapped => {
                tally.capped_since_log += 1;
                if tally
                    .cap_logged
                    .is_none_or(|at| at.elapsed() >= CAP_LOG_EVERY)
                {
                    let checks = std::mem::take(&mut tally.capped_since_log);
                    tally.cap_logged = Some(std::time::Instant::now());
                    if stored == Stored::NetworkCapped {
                        tracing::warn!(
                            network = %t.network,
                            limit = caps.per_network,
                            checks,
                            "greylist cap hit: the network has greylist.max_pending_per_network pending triplets; new ones are deferred without being stored"
                        );
                    } else {
                        tracing::warn!(
                            rows = tally.rows,
                            checks,
                            "greylist cap hit: the table holds greylist.max_triplets triplets; new ones are deferred without being stored"
                        );
                    }
                }
            }
        }
    }
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

/// Bounds on the rows attacker-chosen triplets may add: every RCPT from a made-up sender
/// is a new triplet, kept for greylist.retry_window in the shared database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most pending (not yet passed, unexpired) triplets of one client network.
    pub per_network: u64,
    /// The table already holds greylist.max_triplets rows (or more): no new triplet is
    /// stored.
    pub full: bool,
}

/// What a check did to the table, besides deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// An existing row was updated, or nothing needed storing (whitelisted).
    Updated,
    /// A new triplet row was added.
    Added,
    /// A new triplet was deferred without storing it: its network has `per_network`
    /// pending triplets.
    NetworkCapped,
    /// A new triplet was deferred without storing it: the table is full.
    TableCapped,
}

/// Whether a failed check may be tried again: two first attempts of one triplet (or one
/// network's first pass) raced, and one lost a unique key or a deadlock.
fn retryable(e: &DbError) -> bool {
    let DbError::Query(sqlx::Error::Database(d)) = e else {
        return false;
    };
    d.is_unique_violation() || matches!(d.code().as_deref(), Some("40001" | "40P01"))
}

impl Db {
    /// Decides for `t` at `now` and records the attempt, in one transaction. On
    /// PostgreSQL and MariaDB the triplet's row is locked (`FOR UPDATE`) while deciding and
    /// rows are written with upserts, so concurrent checks of one triplet neither fail
    /// on its unique key nor count a client's pass twice; a check that still loses a race
    /// (a deadlock, a unique violation) is retried once.
    pub async fn greylist_check(
        &self,
        timing: &Timing,
        caps: Caps,
        t: &greylist::Triplet,
        now: i64,
    ) -> Result<(Decision, Stored), DbError> {
        match self.greylist_check_once(timing, caps, t, now).await {
            Err(e) if retryable(&e) => {
                tracing::debug!(cause = %e, "greylist check raced another; retrying");
                self.greylist_check_once(timing, caps, t, now).await
            }
            r => r,
        }
    }

    async fn greylist_check_once(
        &self,
        timing: &Timing,
        caps: Caps,
        t: &greylist::Triplet,
        now: i64,
    ) -> Result<(Decision, Stored), DbError> {
        use sqlx::Connection;
        let mut conn = self.pool.acquire().await?;
        // MariaDB's default REPEATABLE READ takes gap locks on a locking read of a missing
        // row, so two first attempts of neighbouring triplets deadlock on their inserts;
        // READ COMMITTED locks only rows that exist, as PostgreSQL does. It applies to the
        // next transaction only.
        if self.dialect == Dialect::MySql {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .execute(&mut *conn)
                .await?;
        }
        let mut tx = match self.dialect {
            // SQLite: the write lock up front serialises checks (see `write_tx`).
            Dialect::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
            _ => conn.begin().await?,
        };
        let lock = if self.dialect == Dialect::Sqlite {
            ""
        } else {
            " FOR UPDATE"
        };
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
            return Ok((Decision::Whitelisted, Stored::Updated));
        }
        let q = format!(
            "SELECT first_seen, last_seen, passed, attempts FROM greylist_triplets \
             WHERE network = ? AND sender = ? AND recipient = ?{lock}"
        );
        let stored = sqlx::query(self.sql(&q))
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
        let is_new = stored.is_none();
        let checked = greylist::check(timing, stored, now);
        let e = checked.entry;
        let outcome = if is_new {
            let capped = if caps.full {
                Some(Stored::TableCapped)
            } else {
                let pending: i64 = sqlx::query_scalar(self.sql(
                    "SELECT COUNT(*) FROM greylist_triplets \
                     WHERE network = ? AND passed = 0 AND expires_at >= ?",
                ))
                .bind(&t.network)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                (u64::try_from(pending).unwrap_or(0) >= caps.per_network)
                    .then_some(Stored::NetworkCapped)
            };
            if let Some(capped) = capped {
                // The deferral an honest sender gets, without a row: a retry is a new
                // triplet again, so an attacker's made-up senders gain nothing.
                tx.rollback().await?;
                return Ok((checked.decision, capped));
            }
            // A concurrent first attempt may have inserted the row since the read: then
            // this one counts as a second attempt.
            let q = if self.dialect == Dialect::MySql {
                "INSERT INTO greylist_triplets (network, sender, recipient, first_seen, \
                 last_seen, passed, attempts, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE attempts = attempts + 1, last_seen = VALUES(last_seen)"
            } else {
                "INSERT INTO greylist_triplets (network, sender, recipient, first_seen, \
                 last_seen, passed, attempts, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (network, sender, recipient) DO UPDATE SET \
                 attempts = greylist_triplets.attempts + 1, last_seen = excluded.last_seen"
            };
            sqlx::query(self.sql(q))
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
            Stored::Added
        } else {
            sqlx::query(self.sql(
                "UPDATE greylist_triplets SET first_seen = ?, last_seen = ?, passed = ?, \
                 attempts = ?, expires_at = ? WHERE network = ? AND sender = ? AND recipient = ?",
            ))
            .bind(e.first_seen)
            .bind(e.last_seen)
            .bind(i64::from(e.passed))
            .bind(i64::from(e.count))
            .bind(e.expires_at(timing))
            .bind(&t.network)
            .bind(&t.sender)
            .bind(&t.recipient)
            .execute(&mut *tx)
            .await?;
            Stored::Updated
        };
        if checked.newly_passed {
            // The client row was read without a lock (locking it would serialise all of a
            // network's checks): the increment happens in the statement, on the row as it
            // is now, as `greylist::client_passed` computes it (an expired record starts
            // over at one pass).
            let c = greylist::client_passed(timing, None, now);
            let q = if self.dialect == Dialect::MySql {
                "INSERT INTO greylist_clients (network, passes, last_seen, expires_at) \
                 VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
                 passes = IF(expires_at >= ?, passes + 1, 1), \
                 last_seen = VALUES(last_seen), expires_at = VALUES(expires_at)"
            } else {
                "INSERT INTO greylist_clients (network, passes, last_seen, expires_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (network) DO UPDATE SET \
                 passes = CASE WHEN greylist_clients.expires_at >= ? \
                 THEN greylist_clients.passes + 1 ELSE 1 END, \
                 last_seen = excluded.last_seen, expires_at = excluded.expires_at"
            };
            sqlx::query(self.sql(q))
                .bind(&t.network)
                .bind(i64::from(c.passes))
                .bind(c.last_seen)
                .bind(c.expires_at(timing))
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((checked.decision, outcome))
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
        let cfg = self.store.effective();
        let timing = Timing::from_config(&cfg);
        let caps = self.caps(&cfg).await.map_err(db_status)?;
        let (decision, stored) = self
            .store
            .db
            .greylist_check(&timing, caps, &t, now())
            .await
            .map_err(db_status)?;
        self.record(stored, &t, caps);
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

    const NO_CAPS: Caps = Caps {
        per_network: u64::MAX,
        full: false,
    };

    const TIMING: Timing = Timing {
        delay: 60,
        retry_window: 3600,
        lifetime: 86_400,
        auto_whitelist: 5,
    };

    fn triplet(network: &str, sender: &str) -> greylist::Triplet {
        greylist::Triplet {
            network: network.into(),
            sender: sender.into(),
            recipient: "b@y.test".into(),
        }
    }

    /// Many sessions check one new triplet at once, then retry it at once after the
    /// delay: every check answers (none fails on the unique key or a deadlock, which
    /// mb-smtpd would take as the store being down), all are deferred and then all pass,
    /// and the client network is counted as having passed once, not once per session.
    async fn concurrent_checks(url: &str) {
        const SESSIONS: usize = 12;
        let db = Arc::new(
            Db::open(url, SESSIONS as u32)
                .await
                .expect("the database opens"),
        );
        let t0 = 2_000_000;
        for (at, want) in [
            (t0, Decision::Defer { retry_in: 60 }),
            (t0 + 60, Decision::Pass),
        ] {
            let tasks: Vec<_> = (0..SESSIONS)
                .map(|_| {
                    let db = db.clone();
                    tokio::spawn(async move {
                        let t = triplet("198.51.100.0/24", "race@x.test");
                        db.greylist_check(&TIMING, NO_CAPS, &t, at).await
                    })
                })
                .collect();
            for task in tasks {
                let (decision, _) = task.await.unwrap().unwrap_or_else(|e| panic!("{url}: {e}"));
                assert_eq!(decision, want, "{url} at {at}");
            }
        }
        let (triplets, clients) = db.greylist_list().await.expect("a list");
        assert_eq!(triplets.len(), 1, "{url}");
        assert!(triplets[0].entry.passed, "{url}");
        assert_eq!(clients.len(), 1, "{url}");
        assert_eq!(clients[0].client.passes, 1, "{url}: one pass, counted once");
        // Another triplet of the network passing later counts as the second pass.
        let other = triplet("198.51.100.0/24", "other@x.test");
        db.greylist_check(&TIMING, NO_CAPS, &other, t0 + 100)
            .await
            .unwrap();
        db.greylist_check(&TIMING, NO_CAPS, &other, t0 + 200)
            .await
            .unwrap();
        let (_, clients) = db.greylist_list().await.expect("a list");
        assert_eq!(clients[0].client.passes, 2, "{url}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_checks_on_sqlite() {
        let dir = tempfile_dir("race");
        concurrent_checks(&format!("sqlite://{}/mb.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_checks_on_mariadb() {
        let db =
            mb_testkit::MariaDb::start().expect("MariaDB starts (apt-get install mariadb-server)");
        concurrent_checks(&db.url()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_checks_on_postgresql() {
        let db =
            mb_testkit::Postgres::start().expect("PostgreSQL starts (apt-get install postgresql)");
        concurrent_checks(&db.url()).await;
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mb-greylist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A network with `per_network` pending triplets gets its next new triplet deferred
    /// without a row (so retrying it never passes), its known triplets still advance, and
    /// a full table stores no new triplet from anyone.
    #[tokio::test]
    async fn caps_defer_new_triplets_without_storing_them() {
        let dir = tempfile_dir("caps");
        let db = Db::open(&format!("sqlite://{}/mb.db", dir.display()), 2)
            .await
            .expect("the database opens");
        let caps = Caps {
            per_network: 3,
            full: false,
        };
        let net = "203.0.113.0/24";
        let t0 = 3_000_000;
        for i in 0..3 {
            let t = triplet(net, &format!("s{i}@x.test"));
            let (d, stored) = db.greylist_check(&TIMING, caps, &t, t0).await.unwrap();
            assert_eq!(
                (d, stored),
                (Decision::Defer { retry_in: 60 }, Stored::Added)
            );
        }
        let fourth = triplet(net, "s3@x.test");
        for at in [t0, t0 + 60, t0 + 120] {
            let (d, stored) = db.greylist_check(&TIMING, caps, &fourth, at).await.unwrap();
            assert_eq!(
                (d, stored),
                (Decision::Defer { retry_in: 60 }, Stored::NetworkCapped),
                "at {at}"
            );
        }
        // Another network is not affected; a known triplet of the capped one passes.
        let elsewhere = triplet("192.0.2.0/24", "s3@x.test");
        let (_, stored) = db
            .greylist_check(&TIMING, caps, &elsewhere, t0)
            .await
            .unwrap();
        assert_eq!(stored, Stored::Added);
        let known = triplet(net, "s0@x.test");
        let (d, stored) = db
            .greylist_check(&TIMING, caps, &known, t0 + 60)
            .await
            .unwrap();
        assert_eq!((d, stored), (Decision::Pass, Stored::Updated));
        // One pending slot freed: a new triplet is stored again.
        let (_, stored) = db
            .greylist_check(&TIMING, caps, &fourth, t0 + 61)
            .await
            .unwrap();
        assert_eq!(stored, Stored::Added);
        // A full table stores nothing new.
        let full = Caps {
            per_network: u64::MAX,
            full: true,
        };
        let fresh = triplet("192.0.2.0/24", "new@x.test");
        let (d, stored) = db.greylist_check(&TIMING, full, &fresh, t0).await.unwrap();
        assert_eq!(
            (d, stored),
            (Decision::Defer { retry_in: 60 }, Stored::TableCapped)
        );
        let (triplets, _) = db.greylist_list().await.unwrap();
        assert_eq!(triplets.len(), 5);
        assert_eq!(db.greylist_triplet_count().await.unwrap(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

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
            async move {
                db.greylist_check(&timing, NO_CAPS, &t, at)
                    .await
                    .expect("a check")
                    .0
            }
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
