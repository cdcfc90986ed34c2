//! The database mb-rpcd owns: SQLite by default, MariaDB or PostgreSQL by URL.
//!
//! Queries go through sqlx's `Any` driver with the SQL kept portable; the few
//! differences between dialects (placeholders, migrations) are handled here.
//!
//! `Db` takes and returns domain types (`mb_core::quarantine::Entry` and the records
//! below), never gRPC messages: each service converts at its edge.

use std::path::Path;
use std::time::{Duration, Instant};

use mb_core::config::redact_url;
use mb_core::quarantine::Entry;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Connection, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL {0} (use sqlite://, mysql:// or postgres://)")]
    Scheme(String),
    #[error("cannot open database {url}: {cause}")]
    Open { url: String, cause: String },
    #[error("cannot migrate database {url}: {cause}")]
    Migrate { url: String, cause: String },
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

pub struct Db {
    pub(crate) pool: AnyPool,
    pub dialect: Dialect,
    /// The URL with any password removed, for logs and status.
    pub url: String,
}

/// One stored override.
pub struct Override {
    pub key: String,
    pub value: String,
}

/// A change to record: the override and the audit entry that goes with it.
pub struct Change<'a> {
    pub key: &'a str,
    /// The new stored value, `None` to remove the override.
    pub value: Option<&'a str>,
    /// What the audit trail records (secrets already redacted).
    pub audit_old: Option<&'a str>,
    pub audit_new: Option<&'a str>,
    pub uid: Option<u32>,
    pub user: &'a str,
    pub at: i64,
}

/// A line to append to the audit trail (`Db::write_audit`); secrets already redacted.
pub struct AuditLine<'a> {
    pub key: &'a str,
    pub action: &'a str,
    pub old: Option<&'a str>,
    pub new: Option<&'a str>,
    pub uid: Option<u32>,
    pub user: &'a str,
    pub at: i64,
}

/// One entry of the configuration audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub id: i64,
    pub key: String,
    /// `set` or `unset`.
    pub action: String,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
    /// `None` for a caller without a uid (over TCP).
    pub uid: Option<u32>,
    pub user: String,
    /// Unix seconds.
    pub at: i64,
}

/// One event of the message log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventRecord {
    /// Unique: an event stored twice is stored once.
    pub event_id: String,
    pub node: String,
    pub daemon: String,
    pub at_unix_ms: i64,
    pub queue_id: String,
    pub message_id: String,
    pub client_ip: String,
    pub client_name: String,
    pub helo: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    pub stage: String,
    pub verdict: String,
    pub score: f64,
    pub symbols: Vec<String>,
    pub detail: String,
    pub subject: String,
    /// `inbound` or `outbound` where the daemon said (the statistics count it), else empty.
    pub direction: String,
}

/// Which events `query_events` returns; `None` does not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub since_ms: i64,
    pub until_ms: Option<i64>,
    pub queue_id: Option<String>,
    pub sender: Option<String>,
    /// Matches one of the recipients, whole.
    pub recipient: Option<String>,
    pub verdict: Option<String>,
    pub stage: Option<String>,
    pub newest_first: bool,
    /// At most 100 000; `None` for 1000.
    pub limit: Option<u32>,
    /// Contained in the subject, ignoring case.
    pub subject: Option<String>,
    /// The client address, whole.
    pub client_ip: Option<String>,
    /// The Message-ID without its angle brackets, whole.
    pub message_id: Option<String>,
    /// Only mail from or to these domains or addresses (mb-web's restricted roles).
    pub scope: Option<crate::message_log::Scope>,
}

/// Which quarantine entries `list_quarantine` returns; `None` does not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuarantineFilter {
    pub since_ms: i64,
    pub sender: Option<String>,
    /// Matches one of the recipients, whole.
    pub recipient: Option<String>,
    /// At most 100 000; `None` for 1000.
    pub limit: Option<u32>,
}

/// An SMTP AUTH account, without its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// A banned or trusted client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub ip: String,
    /// `ban` or `trust`.
    pub kind: String,
    /// Unix seconds after which the entry no longer applies.
    pub until: i64,
    pub reason: String,
    pub added_by: String,
    pub created_at: i64,
}

/// A policy as stored. Its words are kept as written, not parsed into
/// `mb_core::policy::Policy`: a stored row is listed even when it no longer parses (the
/// filter workers skip it), and the row carries a comment and a creation time the domain
/// type does not need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyRecord {
    /// 0 until stored; local to this node's database.
    pub id: i64,
    pub name: String,
    pub priority: i32,
    pub object: String,
    pub pattern: String,
    pub direction: String,
    pub action: String,
    pub tag: Option<f64>,
    pub quarantine: Option<f64>,
    pub reject: Option<f64>,
    pub comment: String,
    /// Unix seconds.
    pub created_at: i64,
    /// A sender allow that applies to unauthenticated senders too (migration 0008).
    pub unauthenticated: bool,
    /// Only for this recipient; empty for all (migration 0017).
    pub recipient: String,
}

/// A change a cluster child owes the main, in the order it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    pub seq: u64,
    pub change: OutboxChange,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutboxChange {
    Event(EventRecord),
    Quarantined(Entry),
    /// The id of a message that left the quarantine.
    Unquarantined(String),
    /// The event or entry it referred to is gone; it is acknowledged like the others.
    Gone,
}

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static MYSQL: sqlx::migrate::Migrator = sqlx::migrate!("migrations/mysql");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl Db {
    /// Opens (creating a SQLite file and its directory if needed) and migrates.
    pub async fn open(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let shown = redact_url(url);
        let (dialect, connect_url) = if let Some(path) = url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path);
            if let Some(dir) = Path::new(path).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| DbError::Open {
                    url: shown.clone(),
                    cause: format!("cannot create {}: {e}", dir.display()),
                })?;
            }
            (Dialect::Sqlite, format!("sqlite://{path}?mode=rwc"))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            (Dialect::MySql, url.replacen("mariadb://", "mysql://", 1))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_string())
        } else {
            return Err(DbError::Scheme(shown));
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10));
        if dialect == Dialect::Sqlite {
            // WAL lets status readers run beside a writer; the busy timeout covers the rest.
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = FULL")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        // One direct connection first: the pool would retry a refused connection until
        // its timeout, while the administrator wants the reason now.
        let open_err = |e: sqlx::Error| DbError::Open {
            url: shown.clone(),
            cause: describe(&e),
        };
        let probe = tokio::time::timeout(
            Duration::from_secs(10),
            AnyConnection::connect(&connect_url),
        )
        .await
        .map_err(|_| DbError::Open {
            url: shown.clone(),
            cause: "no answer within 10s".into(),
        })?
        .map_err(open_err)?;
        let _ = probe.close().await;
        let pool = options.connect(&connect_url).await.map_err(open_err)?;
        let migrator = match dialect {
            Dialect::Sqlite => &SQLITE,
            Dialect::MySql => &MYSQL,
            Dialect::Postgres => &POSTGRES,
        };
        migrator.run(&pool).await.map_err(|e| DbError::Migrate {
            url: shown.clone(),
            cause: e.to_string(),
        })?;
        let db = Db {
            pool,
            dialect,
            url: shown,
        };
        if dialect == Dialect::Postgres {
            db.index_subjects().await;
        }
        Ok(db)
    }

    /// On PostgreSQL, a trigram index lets `mb-log --subject` find a substring without
    /// reading every event. It needs the pg_trgm extension (shipped with the server,
    /// trusted since PostgreSQL 13, so the database's owner may create it); without it
    /// the search still works, by scanning, and the log says how to speed it up.
    async fn index_subjects(&self) {
        for statement in [
            "CREATE EXTENSION IF NOT EXISTS pg_trgm",
            "CREATE INDEX IF NOT EXISTS message_events_subject_trgm ON message_events USING gin (subject gin_trgm_ops)",
        ] {
            if let Err(e) = sqlx::query(statement).execute(&self.pool).await {
                tracing::warn!(
                    cause = %e,
                    "subject searches of the message log will scan it: the pg_trgm extension is not available (CREATE EXTENSION pg_trgm as a superuser once)"
                );
                return;
            }
        }
    }

    /// The sender allow policies migration 0008 made authenticated-only, each returned
    /// once: the rows the migration wrote are removed as they are read, so the upgrade
    /// is reported at the first start after it and never again.
    pub async fn take_policy_upgrades(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT name FROM policy_upgrades ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let names = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        if !names.is_empty() {
            sqlx::query("DELETE FROM policy_upgrades")
                .execute(&self.pool)
                .await?;
        }
        Ok(names)
    }

    /// Rewrites `?` placeholders to `$1, $2, ...` for PostgreSQL. Every statement is
    /// built from constants in this file (or a service module's own `impl Db`); values
    /// always go through `bind`.
    pub(crate) fn sql(&self, q: &str) -> AssertSqlSafe<String> {
        if self.dialect != Dialect::Postgres {
            return AssertSqlSafe(q.to_string());
        }
        let mut out = String::with_capacity(q.len() + 8);
        let mut n = 0;
        for c in q.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        AssertSqlSafe(out)
    }

    pub async fn ping(&self) -> Result<Duration, DbError> {
        let start = Instant::now();
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(start.elapsed())
    }

    pub async fn overrides(&self) -> Result<Vec<Override>, DbError> {
        let rows = sqlx::query("SELECT cfg_key, cfg_value FROM config_overrides ORDER BY cfg_key")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Override {
                    key: r.try_get(0)?,
                    value: r.try_get(1)?,
                })
            })
            .collect()
    }

    pub async fn generation(&self) -> Result<u64, DbError> {
        let g: i64 = sqlx::query("SELECT generation FROM config_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(u64::try_from(g).unwrap_or(0))
    }

    /// A transaction that will write. SQLite starts it `IMMEDIATE`: a deferred transaction
    /// that reads first and writes later fails with SQLITE_BUSY_SNAPSHOT (517, "database is
    /// locked", which the busy timeout does not retry) when another connection committed
    /// in between; taking the write lock up front makes it wait its turn instead.
    pub(crate) async fn write_tx(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            _ => self.pool.begin().await,
        }
    }

    /// A read-only transaction that reads one snapshot, so several queries agree with each
    /// other even while writers commit between them.
    pub(crate) async fn snapshot_tx(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            // A deferred transaction reads one snapshot of a WAL database.
            Dialect::Sqlite => self.pool.begin().await,
            Dialect::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
            }
            Dialect::MySql => {
                self.pool
                    .begin_with("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                    .await
            }
        }
    }

    /// Stores or removes an override and its audit entry in one transaction; returns the
    /// new configuration generation and whether an override was there before.
    pub async fn apply(&self, c: &Change<'_>) -> Result<(u64, bool), DbError> {
        let mut tx = self.write_tx().await?;
        let existed = sqlx::query(self.sql("SELECT 1 FROM config_overrides WHERE cfg_key = ?"))
            .bind(c.key)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        sqlx::query(self.sql("DELETE FROM config_overrides WHERE cfg_key = ?"))
            .bind(c.key)
            .execute(&mut *tx)
            .await?;
        if let Some(value) = c.value {
            sqlx::query(self.sql(
                "INSERT INTO config_overrides (cfg_key, cfg_value, updated_at, updated_by) VALUES (?, ?, ?, ?)",
            ))
            .bind(c.key)
            .bind(value)
            .bind(c.at)
            .bind(c.user)
            .execute(&mut *tx)
            .await?;
        }
        let action = if c.value.is_some() { "set" } else { "unset" };
        self.write_audit(
            &mut tx,
            &AuditLine {
                key: c.key,
                action,
                old: c.audit_old,
                new: c.audit_new,
                uid: c.uid,
                user: c.user,
                at: c.at,
            },
        )
        .await?;
        sqlx::query("UPDATE config_state SET generation = generation + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let g: i64 = sqlx::query("SELECT generation FROM config_state WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        tx.commit().await?;
        Ok((u64::try_from(g).unwrap_or(0), existed))
    }

    /// Appends one line to the audit trail, inside the caller's transaction (every
    /// change and its line commit together).
    pub(crate) async fn write_audit(
        &self,
        conn: &mut sqlx::AnyConnection,
        a: &AuditLine<'_>,
    ) -> Result<(), DbError> {
        sqlx::query(self.sql(
            "INSERT INTO config_audit (cfg_key, action, old_value, new_value, uid, username, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(a.key)
        .bind(a.action)
        .bind(a.old)
        .bind(a.new)
        .bind(a.uid.map_or(-1, i64::from))
        .bind(a.user)
        .bind(a.at)
        .execute(conn)
        .await?;
        Ok(())
    }

    pub async fn history(&self, key: &str, limit: u32) -> Result<Vec<AuditRecord>, DbError> {
        let limit = i64::from(limit.clamp(1, 10_000));
        let base =
            "SELECT id, cfg_key, action, old_value, new_value, uid, username, at FROM config_audit";
        let rows = if key.is_empty() {
            sqlx::query(self.sql(&format!("{base} ORDER BY id DESC LIMIT ?")))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
        } else {
            sqlx::query(self.sql(&format!(
                "{base} WHERE cfg_key = ? ORDER BY id DESC LIMIT ?"
            )))
            .bind(key)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
        };
        rows.iter().map(audit_record).collect()
    }

    /// Stores events whose id is new; returns (stored, duplicates). With `outbox` (a
    /// cluster child) each new event is also queued for the main.
    pub async fn store_events(
        &self,
        events: &[EventRecord],
        outbox: bool,
    ) -> Result<(u32, u32), DbError> {
        let mut tx = self.write_tx().await?;
        let (mut stored, mut dupes) = (0, 0);
        // The statistics rollups (stats.rs) count the new events in the same transaction:
        // an event is counted exactly when it is stored, so never twice and never lost.
        let mut tally = crate::stats::Tally::default();
        for e in events {
            let seen = sqlx::query(self.sql("SELECT 1 FROM message_events WHERE event_id = ?"))
                .bind(&e.event_id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if seen {
                dupes += 1;
                continue;
            }
            let recipients = e.recipients.join("\n");
            let inserted = sqlx::query(self.sql(
                "INSERT INTO message_events (event_id, node, daemon, at_ms, queue_id, message_id, client_ip, client_name, helo, sender, recipients, size, stage, verdict, score, symbols, detail, subject, direction) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ))
            .bind(&e.event_id)
            .bind(&e.node)
            .bind(&e.daemon)
            .bind(e.at_unix_ms)
            .bind(&e.queue_id)
            .bind(&e.message_id)
            .bind(&e.client_ip)
            .bind(&e.client_name)
            .bind(&e.helo)
            .bind(&e.sender)
            .bind(&recipients)
            .bind(i64::try_from(e.size).unwrap_or(i64::MAX))
            .bind(&e.stage)
            .bind(&e.verdict)
            .bind(e.score)
            .bind(e.symbols.join("\n"))
            .bind(&e.detail)
            .bind(&e.subject)
            .bind(&e.direction)
            .execute(&mut *tx)
            .await?;
            tally.add(e);
            // The search tables (message_log.rs) follow in the same transaction.
            self.index_event(&mut tx, e, inserted.last_insert_id(), &recipients)
                .await?;
            if outbox {
                self.queue_outbox(&mut tx, "event", &e.event_id).await?;
            }
            stored += 1;
        }
        self.count(&mut tx, &tally).await?;
        tx.commit().await?;
        Ok((stored, dupes))
    }

    pub async fn query_events(&self, q: &EventFilter) -> Result<Vec<EventRecord>, DbError> {
        self.query_events_walking(q, None).await
    }

    /// `query_events`, where `walk` (tests only) says whether a subject search on SQLite
    /// walks the events or reads the trigram index; `None` lets the matches decide.
    pub(crate) async fn query_events_walking(
        &self,
        q: &EventFilter,
        walk: Option<bool>,
    ) -> Result<Vec<EventRecord>, DbError> {
        let limit = row_limit(q.limit);
        let (source, chunk_join) = self.event_source(q, limit).await?;
        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM {source} WHERE at_ms >= ?");
        if q.queue_id.is_some() {
            sql.push_str(" AND queue_id = ?");
        }
        if q.sender.is_some() {
            sql.push_str(" AND sender = ?");
        }
        if q.verdict.is_some() {
            sql.push_str(" AND verdict = ?");
        }
        if q.stage.is_some() {
            sql.push_str(" AND stage = ?");
        }
        if q.until_ms.is_some() {
            sql.push_str(" AND at_ms < ?");
        }
        if q.recipient.is_some() {
            // Recipients are stored one per line; match a whole line. The recipient
            // table (migration 0014) finds the candidates by index.
            sql.push_str(
                " AND id IN (SELECT event_row FROM message_event_recipients WHERE recipient = ?)",
            );
            sql.push_str(self.recipient_match());
        }
        if q.client_ip.is_some() {
            sql.push_str(" AND client_ip = ?");
        }
        if q.message_id.is_some() {
            sql.push_str(" AND message_id = ?");
        }
        let subject_index = q
            .subject
            .as_deref()
            .is_some_and(|t| self.dialect == Dialect::Sqlite && t.chars().count() >= 3);
        let subject_walk = match (subject_index, walk) {
            (false, _) => false,
            (true, Some(walk)) => walk,
            (true, None) => self.sqlite_subject_walk(q, limit).await?,
        };
        if subject_walk {
            // A text in many events: walk them in the order asked for, each checked
            // on its own, and stop at the limit (`sqlite_subject_walk`).
            sql.push_str(crate::message_log::sqlite_subject_walk_sql(
                q.subject.as_deref().is_some_and(str::is_ascii),
            ));
        } else if subject_index {
            // The trigram index matches a quoted phrase as a substring, ignoring case.
            sql.push_str(" AND id IN (SELECT rowid FROM message_events_subject WHERE message_events_subject MATCH ?)");
        } else if q.subject.is_some() {
            sql.push_str(self.subject_match());
        }
        if let Some(scope) = &q.scope {
            sql.push_str(&scope.condition(self.dialect, true));
        }
        sql.push_str(if q.newest_first {
            " ORDER BY at_ms DESC, id DESC LIMIT ?"
        } else {
            " ORDER BY at_ms, id LIMIT ?"
        });
        let mut query = sqlx::query(self.sql(&sql));
        if let (true, Some(subject)) = (chunk_join, &q.subject) {
            query = query.bind(subject);
        }
        query = query.bind(q.since_ms);
        if let Some(queue_id) = &q.queue_id {
            query = query.bind(queue_id);
        }
        if let Some(sender) = &q.sender {
            query = query.bind(sender);
        }
        if let Some(verdict) = &q.verdict {
            query = query.bind(verdict);
        }
        if let Some(stage) = &q.stage {
            query = query.bind(stage);
        }
        if let Some(until) = q.until_ms {
            query = query.bind(until);
        }
        if let Some(recipient) = &q.recipient {
            query = query.bind(recipient).bind(recipient_pattern(recipient));
        }
        if let Some(ip) = &q.client_ip {
            query = query.bind(ip);
        }
        if let Some(id) = &q.message_id {
            query = query.bind(id);
        }
        if let Some(subject) = &q.subject {
            if subject_walk && subject.is_ascii() {
                query = query.bind(format!("%{}%", like_escape(subject)));
            }
            query = query.bind(if subject_index {
                crate::message_log::fts_phrase(subject)
            } else if self.dialect == Dialect::MySql {
                subject.clone()
            } else {
                format!("%{}%", like_escape(subject))
            });
        }
        if let Some(scope) = &q.scope {
            query = scope.bind(query, true);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(event_record).collect()
    }
}

impl Db {
    /// Adds a user; false when the name is taken.
    pub async fn add_user(&self, name: &str, hash: &str, at: i64) -> Result<bool, DbError> {
        let mut tx = self.write_tx().await?;
        let exists = sqlx::query(self.sql("SELECT 1 FROM users WHERE username = ?"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if exists {
            return Ok(false);
        }
        sqlx::query(self.sql("INSERT INTO users (username, password_hash, created_at, updated_at) VALUES (?, ?, ?, ?)"))
            .bind(name)
            .bind(hash)
            .bind(at)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Replaces a user's hash; false when there is no such user.
    pub async fn set_user_hash(&self, name: &str, hash: &str, at: i64) -> Result<bool, DbError> {
        let r = sqlx::query(
            self.sql("UPDATE users SET password_hash = ?, updated_at = ? WHERE username = ?"),
        )
        .bind(hash)
        .bind(at)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn remove_user(&self, name: &str) -> Result<bool, DbError> {
        let r = sqlx::query(self.sql("DELETE FROM users WHERE username = ?"))
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn user_hash(&self, name: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query(self.sql("SELECT password_hash FROM users WHERE username = ?"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// Every account with its hash, by name (what a cluster snapshot carries).
    pub async fn user_records(&self) -> Result<Vec<(String, String)>, DbError> {
        let rows = sqlx::query("SELECT username, password_hash FROM users ORDER BY username")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub async fn list_users(&self) -> Result<Vec<Account>, DbError> {
        let rows =
            sqlx::query("SELECT username, created_at, updated_at FROM users ORDER BY username")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(Account {
                    name: r.try_get(0)?,
                    created_at: r.try_get(1)?,
                    updated_at: r.try_get(2)?,
                })
            })
            .collect()
    }
}

impl Db {
    /// Adds or replaces a ban/trust entry.
    pub async fn put_access(
        &self,
        ip: &str,
        kind: &str,
        until: i64,
        reason: &str,
        added_by: &str,
        at: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(self.sql("DELETE FROM access_list WHERE ip = ? AND kind = ?"))
            .bind(ip)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        sqlx::query(self.sql(
            "INSERT INTO access_list (ip, kind, until_at, reason, added_by, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        ))
        .bind(ip)
        .bind(kind)
        .bind(until)
        .bind(reason)
        .bind(added_by)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn remove_access(&self, ip: &str, kind: &str) -> Result<bool, DbError> {
        let r = sqlx::query(self.sql("DELETE FROM access_list WHERE ip = ? AND kind = ?"))
            .bind(ip)
            .bind(kind)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Unexpired entries (expired ones are deleted on the way).
    pub async fn list_access(
        &self,
        kind: Option<&str>,
        now: i64,
    ) -> Result<Vec<AccessRecord>, DbError> {
        sqlx::query(self.sql("DELETE FROM access_list WHERE until_at <= ?"))
            .bind(now)
            .execute(&self.pool)
            .await?;
        let base = "SELECT ip, kind, until_at, reason, added_by, created_at FROM access_list";
        let rows = match kind {
            Some(k) => {
                sqlx::query(self.sql(&format!("{base} WHERE kind = ? ORDER BY kind, ip")))
                    .bind(k)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(self.sql(&format!("{base} ORDER BY kind, ip")))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(AccessRecord {
                    ip: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    until: r.try_get(2)?,
                    reason: r.try_get(3)?,
                    added_by: r.try_get(4)?,
                    created_at: r.try_get(5)?,
                })
            })
            .collect()
    }
}

fn audit_record(r: &AnyRow) -> Result<AuditRecord, DbError> {
    // A caller without a uid is stored as -1 (see `apply`).
    let uid: i64 = r.try_get(5)?;
    Ok(AuditRecord {
        id: r.try_get(0)?,
        key: r.try_get(1)?,
        action: r.try_get(2)?,
        old_value: r.try_get(3)?,
        new_value: r.try_get(4)?,
        uid: u32::try_from(uid).ok(),
        user: r.try_get(6)?,
        at: r.try_get(7)?,
    })
}

impl Db {
    /// Recipients are stored one per line; this matches a whole line (see
    /// `recipient_pattern`).
    /// A case-insensitive substring match of the subject: LIKE ignores ASCII case in
    /// SQLite (used for searches shorter than a trigram); PostgreSQL needs ILIKE (its
    /// trigram index serves it); MariaDB compares lower-cased bytes (message_log.rs),
    /// with the search text bound as it is rather than as a LIKE pattern.
    fn subject_match(&self) -> &'static str {
        if self.dialect == Dialect::Postgres {
            " AND subject ILIKE ? ESCAPE '!'"
        } else if self.dialect == Dialect::MySql {
            crate::message_log::MYSQL_SUBJECT_MATCH
        } else {
            " AND subject LIKE ? ESCAPE '!'"
        }
    }

    /// Deletes message log events older than `before_ms`, in batches so that writers
    /// are never held up for long; returns how many went.
    pub async fn prune_events(&self, before_ms: i64) -> Result<u64, DbError> {
        const BATCH: i64 = 10_000;
        let mut total = 0;
        loop {
            // MariaDB cannot use a LIMIT in an IN subquery of the same table; every
            // engine takes a range of ids.
            let max: Option<i64> = sqlx::query(self.sql(
                "SELECT MAX(id) FROM (SELECT id FROM message_events WHERE at_ms < ? ORDER BY id LIMIT ?) AS old",
            ))
            .bind(before_ms)
            .bind(BATCH)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
            let Some(max) = max else { break };
            let mut tx = self.write_tx().await?;
            // The search tables (message_log.rs) lose the same events in the same
            // transaction.
            self.unindex_recipients(&mut tx, max, before_ms).await?;
            let gone =
                sqlx::query(self.sql("DELETE FROM message_events WHERE id <= ? AND at_ms < ?"))
                    .bind(max)
                    .bind(before_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            self.prune_subject_chunks(&mut tx, max).await?;
            tx.commit().await?;
            total += gone;
            if gone < u64::try_from(BATCH).unwrap_or(u64::MAX) {
                break;
            }
        }
        Ok(total)
    }

    fn recipient_match(&self) -> &'static str {
        if self.dialect == Dialect::MySql {
            " AND CONCAT('\n', recipients, '\n') LIKE ? ESCAPE '!'"
        } else {
            " AND ('\n' || recipients || '\n') LIKE ? ESCAPE '!'"
        }
    }

    /// Indexes a quarantined message; false when its id was already there. With
    /// `outbox` (a cluster child) the entry is also queued for the main.
    pub async fn add_quarantine(&self, e: &Entry, outbox: bool) -> Result<bool, DbError> {
        let mut tx = self.write_tx().await?;
        let seen = sqlx::query(self.sql("SELECT 1 FROM quarantine WHERE id = ?"))
            .bind(&e.id)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if seen {
            return Ok(false);
        }
        sqlx::query(self.sql(
            "INSERT INTO quarantine (id, node, at_ms, queue_id, client_ip, sender, recipients, subject, reason, score, symbols, size, path) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(&e.id)
        .bind(&e.node)
        .bind(e.at_unix_ms)
        .bind(&e.queue_id)
        .bind(&e.client_ip)
        .bind(&e.sender)
        .bind(e.recipients.join("\n"))
        .bind(&e.subject)
        .bind(&e.reason)
        .bind(e.score)
        .bind(e.symbols.join("\n"))
        .bind(i64::try_from(e.size).unwrap_or(i64::MAX))
        .bind(&e.path)
        .execute(&mut *tx)
        .await?;
        if outbox {
            self.queue_outbox(&mut tx, "quarantined", &e.id).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Entries newest first.
    pub async fn list_quarantine(&self, q: &QuarantineFilter) -> Result<Vec<Entry>, DbError> {
        let mut sql = format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE at_ms >= ?");
        if q.sender.is_some() {
            sql.push_str(" AND sender = ?");
        }
        if q.recipient.is_some() {
            sql.push_str(self.recipient_match());
        }
        sql.push_str(" ORDER BY at_ms DESC, id LIMIT ?");
        let mut query = sqlx::query(self.sql(&sql)).bind(q.since_ms);
        if let Some(sender) = &q.sender {
            query = query.bind(sender);
        }
        if let Some(recipient) = &q.recipient {
            query = query.bind(recipient_pattern(recipient));
        }
        let rows = query
            .bind(i64::from(row_limit(q.limit)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(quarantine_entry).collect()
    }

    /// Every entry, oldest first (for the retention pass).
    pub async fn all_quarantine(&self) -> Result<Vec<Entry>, DbError> {
        let sql = format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine ORDER BY at_ms, id");
        let rows = sqlx::query(self.sql(&sql)).fetch_all(&self.pool).await?;
        rows.iter().map(quarantine_entry).collect()
    }

    pub async fn quarantine_entry(&self, id: &str) -> Result<Option<Entry>, DbError> {
        let sql = format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id = ?");
        let row = sqlx::query(self.sql(&sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(quarantine_entry).transpose()
    }

    /// Drops an index entry; false when there was none. With `outbox` (a cluster child)
    /// the removal is also queued for the main.
    pub async fn remove_quarantine(&self, id: &str, outbox: bool) -> Result<bool, DbError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(self.sql("DELETE FROM quarantine WHERE id = ?"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let removed = done.rows_affected() > 0;
        if removed && outbox {
            self.queue_outbox(&mut tx, "unquarantined", id).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn queue_outbox(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        kind: &str,
        id: &str,
    ) -> Result<(), DbError> {
        sqlx::query(self.sql("INSERT INTO cluster_outbox (kind, ref_id) VALUES (?, ?)"))
            .bind(kind)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The oldest `limit` outbox items with what they refer to, and how many wait in
    /// all. An item whose event or entry is gone comes without content (it is
    /// acknowledged like the others).
    pub async fn outbox(&self, limit: u32) -> Result<(Vec<OutboxItem>, u64), DbError> {
        let rows = sqlx::query(
            self.sql("SELECT seq, kind, ref_id FROM cluster_outbox ORDER BY seq LIMIT ?"),
        )
        .bind(i64::from(limit.clamp(1, 10_000)))
        .fetch_all(&self.pool)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get(0)?;
            let kind: String = r.try_get(1)?;
            let id: String = r.try_get(2)?;
            let change = match kind.as_str() {
                "event" => {
                    let sql =
                        format!("SELECT {EVENT_COLUMNS} FROM message_events WHERE event_id = ?");
                    let row = sqlx::query(self.sql(&sql))
                        .bind(&id)
                        .fetch_optional(&self.pool)
                        .await?;
                    match row.as_ref().map(event_record).transpose()? {
                        Some(e) => OutboxChange::Event(e),
                        None => OutboxChange::Gone,
                    }
                }
                "quarantined" => match self.quarantine_entry(&id).await? {
                    Some(e) => OutboxChange::Quarantined(e),
                    None => OutboxChange::Gone,
                },
                _ => OutboxChange::Unquarantined(id),
            };
            items.push(OutboxItem {
                seq: u64::try_from(seq).unwrap_or(0),
                change,
            });
        }
        let pending: i64 = sqlx::query("SELECT COUNT(*) FROM cluster_outbox")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok((items, u64::try_from(pending).unwrap_or(0)))
    }

    /// Forgets outbox items the main has stored.
    pub async fn acknowledge_outbox(&self, seqs: &[u64]) -> Result<(), DbError> {
        let mut tx = self.write_tx().await?;
        for seq in seqs {
            sqlx::query(self.sql("DELETE FROM cluster_outbox WHERE seq = ?"))
                .bind(i64::try_from(*seq).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// (messages, bytes) in the quarantine.
    pub async fn quarantine_totals(&self) -> Result<(u64, u64), DbError> {
        // SUM is DECIMAL on MariaDB and NUMERIC on PostgreSQL, which Any cannot read.
        let sql = if self.dialect == Dialect::MySql {
            "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS SIGNED) FROM quarantine"
        } else {
            "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM quarantine"
        };
        let row = sqlx::query(sql).fetch_one(&self.pool).await?;
        let n: i64 = row.try_get(0)?;
        let bytes: i64 = row.try_get(1)?;
        Ok((
            u64::try_from(n).unwrap_or(0),
            u64::try_from(bytes).unwrap_or(0),
        ))
    }
}

impl Db {
    /// Stores a new policy; false when its name is taken.
    pub async fn add_policy(&self, p: &PolicyRecord) -> Result<bool, DbError> {
        let taken = sqlx::query(self.sql("SELECT 1 FROM policies WHERE name = ?"))
            .bind(&p.name)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        if taken {
            return Ok(false);
        }
        sqlx::query(self.sql(
            "INSERT INTO policies (name, priority, object, pattern, direction, action, tag, quarantine, reject, comment, created_at, unauthenticated, recipient) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(&p.name)
        .bind(i64::from(p.priority))
        .bind(&p.object)
        .bind(&p.pattern)
        .bind(&p.direction)
        .bind(&p.action)
        .bind(p.tag)
        .bind(p.quarantine)
        .bind(p.reject)
        .bind(&p.comment)
        .bind(p.created_at)
        .bind(i64::from(p.unauthenticated))
        .bind(&p.recipient)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// Every policy, by priority then id.
    pub async fn list_policies(&self) -> Result<Vec<PolicyRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, priority, object, pattern, direction, action, tag, quarantine, reject, comment, created_at, unauthenticated, recipient \
             FROM policies ORDER BY priority, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PolicyRecord {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    priority: i32::try_from(r.try_get::<i64, _>(2)?).unwrap_or(i32::MAX),
                    object: r.try_get(3)?,
                    pattern: r.try_get(4)?,
                    direction: r.try_get(5)?,
                    action: r.try_get(6)?,
                    tag: r.try_get(7)?,
                    quarantine: r.try_get(8)?,
                    reject: r.try_get(9)?,
                    comment: r.try_get(10)?,
                    created_at: r.try_get(11)?,
                    unauthenticated: r.try_get::<i64, _>(12)? != 0,
                    recipient: r.try_get(13)?,
                })
            })
            .collect()
    }

    /// Removes a policy by id (or by name when `id` is 0); false when there was none.
    pub async fn remove_policy(&self, id: i64, name: &str) -> Result<bool, DbError> {
        let done = if id != 0 {
            sqlx::query(self.sql("DELETE FROM policies WHERE id = ?"))
                .bind(id)
                .execute(&self.pool)
                .await?
        } else {
            sqlx::query(self.sql("DELETE FROM policies WHERE name = ?"))
                .bind(name)
                .execute(&self.pool)
                .await?
        };
        Ok(done.rows_affected() > 0)
    }
}

pub(crate) const QUARANTINE_COLUMNS: &str = "id, node, at_ms, queue_id, client_ip, sender, recipients, subject, reason, score, symbols, size, path";
const EVENT_COLUMNS: &str = "event_id, node, daemon, at_ms, queue_id, message_id, client_ip, client_name, helo, sender, recipients, size, stage, verdict, score, symbols, detail, subject, direction";

/// The rows a listing returns: 1000 unless asked, never more than 100 000.
pub(crate) fn row_limit(limit: Option<u32>) -> u32 {
    limit.map_or(1000, |n| n.min(100_000))
}

/// The LIKE pattern for one whole recipient line. `%` and `_` are ordinary characters of
/// an address (`first_last@x`): they are escaped with `!`, an escape character that needs
/// no quoting in any dialect (a backslash would mean different things in MariaDB's and
/// PostgreSQL's string literals).
fn recipient_pattern(recipient: &str) -> String {
    format!("%\n{}\n%", like_escape(recipient))
}

/// Text taken literally inside a LIKE pattern with `ESCAPE '!'`.
pub(crate) fn like_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '!' | '%' | '_') {
            escaped.push('!');
        }
        escaped.push(c);
    }
    escaped
}

fn lines(s: String) -> Vec<String> {
    s.lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

pub(crate) fn quarantine_entry(r: &AnyRow) -> Result<Entry, DbError> {
    Ok(Entry {
        id: r.try_get(0)?,
        node: r.try_get(1)?,
        at_unix_ms: r.try_get(2)?,
        queue_id: r.try_get(3)?,
        client_ip: r.try_get(4)?,
        sender: r.try_get(5)?,
        recipients: lines(r.try_get(6)?),
        subject: r.try_get(7)?,
        reason: r.try_get(8)?,
        score: r.try_get(9)?,
        symbols: lines(r.try_get(10)?),
        size: u64::try_from(r.try_get::<i64, _>(11)?).unwrap_or(0),
        path: r.try_get(12)?,
    })
}

fn event_record(r: &AnyRow) -> Result<EventRecord, DbError> {
    Ok(EventRecord {
        event_id: r.try_get(0)?,
        node: r.try_get(1)?,
        daemon: r.try_get(2)?,
        at_unix_ms: r.try_get(3)?,
        queue_id: r.try_get(4)?,
        message_id: r.try_get(5)?,
        client_ip: r.try_get(6)?,
        client_name: r.try_get(7)?,
        helo: r.try_get(8)?,
        sender: r.try_get(9)?,
        recipients: lines(r.try_get(10)?),
        size: u64::try_from(r.try_get::<i64, _>(11)?).unwrap_or(0),
        stage: r.try_get(12)?,
        verdict: r.try_get(13)?,
        score: r.try_get(14)?,
        symbols: lines(r.try_get(15)?),
        detail: r.try_get(16)?,
        subject: r.try_get::<Option<String>, _>(17)?.unwrap_or_default(),
        direction: r.try_get(18)?,
    })
}

/// A connection error in words: the driver's message, without the URL's password.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::PoolTimedOut => "timed out connecting".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_round_trip() {
        let dir = std::env::temp_dir().join(format!("mb-db-test-{}", std::process::id()));
        let url = format!("sqlite://{}/sub/mb.db", dir.display());
        let db = Db::open(&url, 2).await.expect("open");
        assert_eq!(db.generation().await.unwrap(), 0);
        let change = |value| Change {
            key: "smtp.max_recipients",
            value,
            audit_old: None,
            audit_new: value,
            uid: Some(0),
            user: "root",
            at: 1,
        };
        assert_eq!(db.apply(&change(Some("50"))).await.unwrap(), (1, false));
        assert_eq!(db.apply(&change(Some("60"))).await.unwrap(), (2, true));
        let o = db.overrides().await.unwrap();
        assert_eq!(
            (o[0].key.as_str(), o[0].value.as_str()),
            ("smtp.max_recipients", "60")
        );
        assert_eq!(db.apply(&change(None)).await.unwrap(), (3, true));
        assert!(db.overrides().await.unwrap().is_empty());
        let h = db.history("smtp.max_recipients", 10).await.unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(
            (h[0].action.as_str(), h[2].new_value.as_deref()),
            ("unset", Some("50"))
        );
        assert_eq!((h[0].new_value.as_deref(), h[0].uid), (None, Some(0)));
        // Reopening applies no migration twice.
        drop(db);
        let db = Db::open(&url, 1).await.expect("reopen");
        assert_eq!(db.generation().await.unwrap(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Writers that read first on several connections at once: with deferred transactions
    /// SQLite failed some of them with "database is locked" (SQLITE_BUSY_SNAPSHOT).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_on_sqlite_all_succeed() {
        let dir = std::env::temp_dir().join(format!("mb-db-conc-{}", std::process::id()));
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = std::sync::Arc::new(Db::open(&url, 8).await.expect("open"));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    let value = i.to_string();
                    db.apply(&Change {
                        key: if i % 2 == 0 {
                            "smtp.max_recipients"
                        } else {
                            "smtp.hostname"
                        },
                        value: Some(&value),
                        audit_old: None,
                        audit_new: Some(&value),
                        uid: Some(0),
                        user: "root",
                        at: i,
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().expect("every concurrent write succeeds");
        }
        assert_eq!(db.generation().await.unwrap(), 64);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `_` and `%` in a searched address are the address's own characters, not
    /// wildcards: `first_last@` is found, and neither `first%` nor `firstXlast` is.
    #[tokio::test]
    async fn recipient_search_takes_underscores_and_percents_literally() {
        let dir = std::env::temp_dir().join(format!("mb-db-like-{}", std::process::id()));
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 2).await.expect("open");
        let event = |id: &str, rcpt: &str| EventRecord {
            event_id: id.into(),
            at_unix_ms: 100,
            stage: "scanned".into(),
            recipients: vec![rcpt.into()],
            ..EventRecord::default()
        };
        let events = [
            event("u", "first_last@served.test"),
            event("x", "firstXlast@served.test"),
            event("p", "100%!@served.test"),
        ];
        db.store_events(&events, false).await.unwrap();
        for (search, want) in [
            ("first_last@served.test", &["u"][..]),
            ("first%@served.test", &[]),
            ("first_last@served.tes_", &[]),
            ("100%!@served.test", &["p"]),
            ("100%@served.test", &[]),
        ] {
            let found: Vec<String> = db
                .query_events(&EventFilter {
                    recipient: Some(search.to_string()),
                    ..EventFilter::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event_id)
                .collect();
            assert_eq!(found, want, "{search}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Every record goes in and comes back out unchanged, and the filters select what
    /// they say.
    #[tokio::test]
    async fn records_round_trip_and_filters_select() {
        let dir = std::env::temp_dir().join(format!("mb-db-records-{}", std::process::id()));
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 2).await.expect("open");

        let event = |id: &str, at: i64, verdict: &str| EventRecord {
            event_id: id.into(),
            node: "mx1".into(),
            daemon: "mb-filter".into(),
            at_unix_ms: at,
            queue_id: format!("Q{id}"),
            message_id: format!("<{id}@sender.test>"),
            client_ip: "192.0.2.7".into(),
            client_name: "mail.sender.test".into(),
            helo: "mail.sender.test".into(),
            sender: "x@sender.test".into(),
            recipients: vec!["a@served.test".into(), "b@served.test".into()],
            size: 10,
            stage: "scanned".into(),
            verdict: verdict.into(),
            score: 1.5,
            symbols: vec!["S1".into(), "S2".into()],
            detail: "d".into(),
            subject: "hi".into(),
            direction: "inbound".into(),
        };
        let events = [
            event("e1", 100, "accept"),
            event("e2", 200, "reject"),
            event("e3", 300, "accept"),
        ];
        assert_eq!(db.store_events(&events, true).await.unwrap(), (3, 0));
        assert_eq!(db.store_events(&events[..1], true).await.unwrap(), (0, 1));
        assert_eq!(
            db.query_events(&EventFilter::default()).await.unwrap(),
            events.to_vec()
        );
        let some = |s: &str| Some(s.to_string());
        for (filter, expected) in [
            (
                EventFilter {
                    verdict: some("accept"),
                    newest_first: true,
                    ..EventFilter::default()
                },
                &["e3", "e1"][..],
            ),
            (
                EventFilter {
                    since_ms: 150,
                    until_ms: Some(300),
                    ..EventFilter::default()
                },
                &["e2"],
            ),
            (
                EventFilter {
                    queue_id: some("Qe3"),
                    recipient: some("b@served.test"),
                    ..EventFilter::default()
                },
                &["e3"],
            ),
            (
                EventFilter {
                    recipient: some("served.test"),
                    ..EventFilter::default()
                },
                &[],
            ),
            (
                EventFilter {
                    limit: Some(1),
                    ..EventFilter::default()
                },
                &["e1"],
            ),
        ] {
            let found: Vec<String> = db
                .query_events(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event_id)
                .collect();
            assert_eq!(found, expected, "{filter:?}");
        }

        let entry = |id: &str, at: i64, rcpt: &str| Entry {
            id: id.into(),
            node: "mx1".into(),
            at_unix_ms: at,
            queue_id: id.into(),
            client_ip: "192.0.2.7".into(),
            sender: "x@sender.test".into(),
            recipients: vec![rcpt.into()],
            subject: "s".into(),
            reason: "r".into(),
            score: 9.5,
            symbols: vec!["S".into()],
            size: 100,
            path: format!("1970/01/01/{id}.eml"),
        };
        let (q1, q2) = (
            entry("Q1", 10, "a@served.test"),
            entry("Q2", 20, "b@served.test"),
        );
        assert!(db.add_quarantine(&q1, true).await.unwrap());
        assert!(db.add_quarantine(&q2, true).await.unwrap());
        assert!(!db.add_quarantine(&q2, true).await.unwrap());
        assert_eq!(
            db.all_quarantine().await.unwrap(),
            vec![q1.clone(), q2.clone()]
        );
        let listed = db
            .list_quarantine(&QuarantineFilter {
                recipient: some("b@served.test"),
                ..QuarantineFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(listed, vec![q2.clone()]);
        assert_eq!(db.quarantine_totals().await.unwrap(), (2, 200));
        assert!(db.remove_quarantine("Q1", true).await.unwrap());
        assert_eq!(db.quarantine_entry("Q1").await.unwrap(), None);

        // What a cluster child owes, in order; the removed entry's item has no content.
        let (items, pending) = db.outbox(100).await.unwrap();
        let changes: Vec<OutboxChange> = items.iter().map(|i| i.change.clone()).collect();
        assert_eq!(
            changes,
            vec![
                OutboxChange::Event(events[0].clone()),
                OutboxChange::Event(events[1].clone()),
                OutboxChange::Event(events[2].clone()),
                OutboxChange::Gone,
                OutboxChange::Quarantined(q2),
                OutboxChange::Unquarantined("Q1".into()),
            ]
        );
        assert_eq!(pending, 6);
        let seqs: Vec<u64> = items.iter().map(|i| i.seq).collect();
        db.acknowledge_outbox(&seqs).await.unwrap();
        assert_eq!(db.outbox(100).await.unwrap(), (Vec::new(), 0));

        db.put_access("192.0.2.1", "ban", 1_100, "spam", "root", 1_000)
            .await
            .unwrap();
        db.put_access("192.0.2.2", "trust", 1_010, "", "root", 1_000)
            .await
            .unwrap();
        assert_eq!(
            db.list_access(Some("ban"), 1_050).await.unwrap(),
            vec![AccessRecord {
                ip: "192.0.2.1".into(),
                kind: "ban".into(),
                until: 1_100,
                reason: "spam".into(),
                added_by: "root".into(),
                created_at: 1_000,
            }]
        );
        assert_eq!(
            db.list_access(None, 1_050).await.unwrap().len(),
            1,
            "the expired trust is gone"
        );

        assert!(db.add_user("alice", "hash", 5).await.unwrap());
        assert!(db.set_user_hash("alice", "hash2", 6).await.unwrap());
        assert_eq!(
            db.list_users().await.unwrap(),
            vec![Account {
                name: "alice".into(),
                created_at: 5,
                updated_at: 6,
            }]
        );

        let policy = PolicyRecord {
            id: 0,
            name: "strict".into(),
            priority: 10,
            object: "address".into(),
            pattern: "ceo@served.test".into(),
            direction: "to".into(),
            action: "score".into(),
            tag: Some(2.5),
            quarantine: None,
            reject: Some(9.0),
            comment: "c".into(),
            created_at: 7,
            unauthenticated: true,
            recipient: String::new(),
        };
        assert!(db.add_policy(&policy).await.unwrap());
        assert!(!db.add_policy(&policy).await.unwrap());
        let stored = db.list_policies().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(stored[0].id > 0);
        assert_eq!(
            PolicyRecord {
                id: 0,
                ..stored[0].clone()
            },
            policy
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A database from before migration 0008: its sender allows become authenticated-only
    /// and are reported once; other policies are not reported.
    #[tokio::test]
    async fn the_authenticated_allow_upgrade_reports_each_sender_allow_once() {
        let dir = std::env::temp_dir().join(format!("mb-db-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 1).await.expect("open");
        assert_eq!(
            db.take_policy_upgrades().await.unwrap(),
            Vec::<String>::new()
        );
        // Back to the schema before 0008, with the policies an old version stored.
        for q in [
            "DROP TABLE policy_upgrades",
            "ALTER TABLE policies DROP COLUMN unauthenticated",
            "DELETE FROM _sqlx_migrations WHERE version = 8",
        ] {
            sqlx::query(q).execute(&db.pool).await.unwrap();
        }
        for (name, object, pattern, direction, action) in [
            ("partners", "address", "*@partner.test", "from", "allow"),
            ("either", "domain", "friend.test", "from-or-to", "allow"),
            ("vip", "address", "vip@served.test", "to", "allow"),
            ("office", "network", "192.0.2.0/24", "from", "allow"),
            ("spammer", "domain", "spammer.test", "from", "block"),
        ] {
            sqlx::query(
                "INSERT INTO policies (name, priority, object, pattern, direction, action, comment, created_at) \
                 VALUES (?, 10, ?, ?, ?, ?, '', 1)",
            )
            .bind(name)
            .bind(object)
            .bind(pattern)
            .bind(direction)
            .bind(action)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        db.pool.close().await;
        let db = Db::open(&url, 1).await.expect("reopen migrates");
        assert_eq!(
            db.take_policy_upgrades().await.unwrap(),
            ["either", "partners"]
        );
        assert_eq!(
            db.take_policy_upgrades().await.unwrap(),
            Vec::<String>::new()
        );
        let stored = db.list_policies().await.unwrap();
        assert!(stored.iter().all(|p| !p.unauthenticated), "{stored:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn bad_urls_say_why() {
        let e = Db::open("oracle://x", 1).await.err().unwrap();
        assert!(e.to_string().contains("unsupported database URL"), "{e}");
        let e = Db::open("postgres://mb:hunter2@127.0.0.1:1/mb", 1)
            .await
            .err()
            .unwrap();
        let text = e.to_string();
        assert!(
            text.contains("cannot open database postgres://mb:********@127.0.0.1:1/mb"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
}
