//! The `Backup` service for mb-backup: every table that holds an installation's state,
//! exported as engine-neutral rows from one consistent snapshot and imported in one
//! transaction into an empty installation, on SQLite, MariaDB or PostgreSQL alike.
//!
//! `TABLES` names what a backup carries, column by column, and `EXCLUDED` what it leaves
//! out and why; a test holds the two to the tables the migrations create, so a table or
//! a column added later cannot be forgotten.

use std::collections::BTreeMap;
use std::sync::Arc;

use mb_proto::v1::backup_chunk::Item;
use mb_proto::v1::backup_server::{Backup, BackupServer};
use mb_proto::v1::backup_value::Kind as WireKind;
use mb_proto::v1::{
    BackupChunk, BackupEnd, BackupExportRequest, BackupHeader, BackupImportResponse, BackupRow,
    BackupRows, BackupTable, BackupValue,
};
use mb_runtime::uds::caller;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::db::{Db, DbError, Dialect};
use crate::store::Store;

/// The row format this version writes and the newest it reads.
pub const FORMAT: u32 = 1;

/// Largest message either side sends: a batch of rows (quarantine rows carry recipient
/// lists) stays far below it.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Rows per exported batch, and at most this many bytes of text in one.
const BATCH_ROWS: usize = 500;
const BATCH_BYTES: usize = 2 << 20;

/// A column's type, as every engine can store and return it through sqlx's `Any`
/// (times are Unix seconds or milliseconds in integers, flags 0/1 integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Real,
    Text,
}

/// How a table is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Rows copied as they are.
    State,
    /// Only with `--with-quarantine`: the quarantine index (the files go with it).
    Quarantine,
    /// A one-row counter (`id = 1`) that a migration creates: carried as its value and
    /// restored by raising the target's counter past both.
    Counter,
}

/// A backed-up table.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    pub part: Part,
    pub columns: &'static [(&'static str, Kind)],
    /// The ORDER BY of the export (the primary key), so archives compare.
    pub order: &'static str,
    /// An auto-increment column whose values are carried (they are shown: `mb-policy
    /// list` prints policy ids); PostgreSQL's sequence is moved past them after import.
    pub serial: Option<&'static str>,
}

use Kind::{Int, Real, Text};

const fn state(
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    order: &'static str,
) -> Table {
    Table {
        name,
        part: Part::State,
        columns,
        order,
        serial: None,
    }
}

const fn serial(name: &'static str, columns: &'static [(&'static str, Kind)]) -> Table {
    Table {
        name,
        part: Part::State,
        columns,
        order: "id",
        serial: Some("id"),
    }
}

const fn counter(name: &'static str) -> Table {
    Table {
        name,
        part: Part::Counter,
        columns: &[("generation", Int)],
        order: "id",
        serial: None,
    }
}

/// Every table a backup carries, in the order it is written and restored.
pub const TABLES: &[Table] = &[
    state(
        "config_overrides",
        &[
            ("cfg_key", Text),
            ("cfg_value", Text),
            ("updated_at", Int),
            ("updated_by", Text),
        ],
        "cfg_key",
    ),
    serial(
        "config_audit",
        &[
            ("id", Int),
            ("cfg_key", Text),
            ("action", Text),
            ("old_value", Text),
            ("new_value", Text),
            ("uid", Int),
            ("username", Text),
            ("at", Int),
        ],
    ),
    counter("config_state"),
    state(
        "users",
        &[
            ("username", Text),
            ("password_hash", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
        "username",
    ),
    state(
        "user_aliases",
        &[("username", Text), ("address", Text), ("created_at", Int)],
        "username, address",
    ),
    state(
        "access_list",
        &[
            ("ip", Text),
            ("kind", Text),
            ("until_at", Int),
            ("reason", Text),
            ("added_by", Text),
            ("created_at", Int),
        ],
        "ip, kind",
    ),
    serial(
        "policies",
        &[
            ("id", Int),
            ("name", Text),
            ("priority", Int),
            ("object", Text),
            ("pattern", Text),
            ("direction", Text),
            ("action", Text),
            ("tag", Real),
            ("quarantine", Real),
            ("reject", Real),
            ("comment", Text),
            ("created_at", Int),
            ("unauthenticated", Int),
            ("recipient", Text),
        ],
    ),
    serial(
        "recipients",
        &[
            ("id", Int),
            ("pattern", Text),
            ("domain", Text),
            ("comment", Text),
            ("created_at", Int),
        ],
    ),
    counter("recipients_generation"),
    state(
        "greylist_triplets",
        &[
            ("network", Text),
            ("sender", Text),
            ("recipient", Text),
            ("first_seen", Int),
            ("last_seen", Int),
            ("passed", Int),
            ("attempts", Int),
            ("expires_at", Int),
        ],
        "network, sender, recipient",
    ),
    state(
        "greylist_clients",
        &[
            ("network", Text),
            ("passes", Int),
            ("last_seen", Int),
            ("expires_at", Int),
        ],
        "network",
    ),
    state(
        "web_accounts",
        &[
            ("name", Text),
            ("password_hash", Text),
            ("role", Text),
            ("domains", Text),
            ("addresses", Text),
            ("smtp_user", Text),
            ("totp_secret", Text),
            ("totp_pending", Text),
            ("totp_last_step", Int),
            ("failed_count", Int),
            ("failed_since", Int),
            ("locked_until", Int),
            ("created_at", Int),
            ("created_by", Text),
            ("updated_at", Int),
            ("last_login", Int),
        ],
        "name",
    ),
    state(
        "web_api_keys",
        &[
            ("id", Text),
            ("secret_hash", Text),
            ("description", Text),
            ("role", Text),
            ("domains", Text),
            ("addresses", Text),
            ("created_at", Int),
            ("created_by", Text),
            ("expires_at", Int),
            ("revoked_at", Int),
            ("last_used", Int),
        ],
        "id",
    ),
    Table {
        name: "quarantine",
        part: Part::Quarantine,
        columns: &[
            ("id", Text),
            ("node", Text),
            ("at_ms", Int),
            ("queue_id", Text),
            ("client_ip", Text),
            ("sender", Text),
            ("recipients", Text),
            ("subject", Text),
            ("reason", Text),
            ("score", Real),
            ("symbols", Text),
            ("size", Int),
            ("path", Text),
        ],
        order: "id",
        serial: None,
    },
];

/// The tables the migrations create that a backup leaves out, each with the reason.
pub const EXCLUDED: &[(&str, &str)] = &[
    (
        "_sqlx_migrations",
        "the migrations applied: the target's mb-rpcd migrates its own database",
    ),
    (
        "sqlite_sequence",
        "SQLite's AUTOINCREMENT counters, advanced by SQLite itself as rows with ids are inserted",
    ),
    (
        "message_events",
        "the message log: history rather than state, possibly millions of rows, pruned after log.retention_days",
    ),
    (
        "message_events_subject",
        "SQLite's full-text index of the message log's subjects",
    ),
    (
        "message_events_subject_data",
        "part of the message log's full-text index",
    ),
    (
        "message_events_subject_idx",
        "part of the message log's full-text index",
    ),
    (
        "message_events_subject_docsize",
        "part of the message log's full-text index",
    ),
    (
        "message_events_subject_config",
        "part of the message log's full-text index",
    ),
    (
        "message_event_subject_chunks",
        "MariaDB's index of the message log's subjects (migration 0014)",
    ),
    (
        "message_event_recipients",
        "the message log's recipient index (migration 0014), rows of message_events split per recipient",
    ),
    (
        "cluster_outbox",
        "what a cluster child still owes the main: it refers to message-log events, which are not carried; a restored node resynchronises",
    ),
    (
        "policy_upgrades",
        "a one-time notice list that migration 0008 fills and the next start empties",
    ),
    (
        "stats_counts",
        "the statistics rollups (migration 0016): history built from the message log, pruned after stats.retention_days",
    ),
    (
        "stats_top",
        "the statistics' top lists (migration 0016): history like stats_counts",
    ),
    (
        "stats_state",
        "how far the statistics' top lists are trimmed; a restored database trims again from the start, which keeps the same rows",
    ),
    (
        "web_sessions",
        "web logins in progress: ephemeral, and their users simply log in again",
    ),
    (
        "digest_recipients",
        "what each recipient's last quarantine digest listed (migration 0017): a restored database lists it once more at worst",
    ),
    (
        "digest_runs",
        "the digest scheduler's last run (migration 0017): the migration makes its row, and the next scheduled time runs",
    ),
    (
        "digest_links",
        "the single-use links of digests already sent (migration 0017): restoring them could make used links good again, so they are left behind",
    ),
];

/// Looks a backed-up table up by name.
pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}

/// One column value, whatever the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// What an import is told first.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub format: u32,
    pub engine: String,
    pub product_version: String,
    /// Each table with the columns its rows carry, in order.
    pub tables: Vec<(String, Vec<String>)>,
}

/// One message of an export or an import stream, as domain values.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Header(Header),
    Rows {
        table: String,
        rows: Vec<Vec<Value>>,
    },
    /// Rows per table: the receiver checks that it got exactly these.
    End(BTreeMap<String, u64>),
}

/// Why an import was refused; nothing of it was kept.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "this installation is not empty ({}): mb-backup restores only into an empty installation. \
         Point database.url at a new, empty database, start mb-rpcd and restore again; \
         nothing was changed",
        .0.iter().map(|(t, n)| format!("{t}: {n} row{}", if *n == 1 { "" } else { "s" })).collect::<Vec<_>>().join(", ")
    )]
    NotEmpty(Vec<(String, u64)>),
    #[error(
        "the backup's row format is {found}, newer than this mb-rpcd reads ({FORMAT}): restore it with the version that wrote it ({version}) or a newer one"
    )]
    Newer { found: u32, version: String },
    #[error(
        "the backup has table {0}, which this version does not know (written by a newer version?)"
    )]
    UnknownTable(String),
    #[error("the backup's table {table} has column {column}, which this version does not know")]
    UnknownColumn { table: String, column: String },
    #[error("the backup's table {table} names column {column} twice")]
    DuplicateColumn { table: String, column: String },
    #[error("table {table}, row {row}: {problem}")]
    BadRow {
        table: String,
        row: u64,
        problem: String,
    },
    #[error("the import stream is out of order: {0}")]
    Order(&'static str),
    #[error(
        "the backup promised {expected} rows of {table} and carried {got}: the archive is damaged"
    )]
    Count {
        table: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "the import ended before the backup's end (the archive is truncated or the tool stopped); nothing was restored"
    )]
    Truncated,
    #[error("the database refused a row of {table}: {cause}; nothing was restored")]
    Refused { table: String, cause: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for ImportError {
    fn from(e: sqlx::Error) -> Self {
        ImportError::Db(DbError::Query(e))
    }
}

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// An import in progress: one transaction, rolled back when dropped before `finish`.
pub struct Importer<'a> {
    db: &'a Db,
    tx: Tx,
    /// The header's columns of each table it announced.
    columns: BTreeMap<String, Vec<&'static (&'static str, Kind)>>,
    received: BTreeMap<String, u64>,
}

impl Db {
    /// Streams every backed-up table (the quarantine index only `with_quarantine`) from
    /// one read-only snapshot to `out`; stops early when the receiver is gone.
    pub async fn export_backup(
        &self,
        with_quarantine: bool,
        out: &mpsc::Sender<Chunk>,
    ) -> Result<(), DbError> {
        let send = async |c: Chunk| out.send(c).await.is_ok();
        let mut tx = self.snapshot_tx().await?;
        let tables: Vec<&Table> = TABLES
            .iter()
            .filter(|t| with_quarantine || t.part != Part::Quarantine)
            .collect();
        let header = Header {
            format: FORMAT,
            engine: engine(self.dialect).into(),
            product_version: env!("CARGO_PKG_VERSION").into(),
            tables: tables
                .iter()
                .map(|t| {
                    (
                        t.name.to_string(),
                        t.columns.iter().map(|(c, _)| (*c).to_string()).collect(),
                    )
                })
                .collect(),
        };
        if !send(Chunk::Header(header)).await {
            return Ok(());
        }
        let mut totals = BTreeMap::new();
        for t in tables {
            let names: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
            let sql = match t.part {
                Part::Counter => {
                    format!("SELECT {} FROM {} WHERE id = 1", names.join(", "), t.name)
                }
                _ => format!(
                    "SELECT {} FROM {} ORDER BY {}",
                    names.join(", "),
                    t.name,
                    t.order
                ),
            };
            let mut count = 0u64;
            let mut batch = Vec::new();
            let mut bytes = 0;
            {
                let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
                while let Some(row) = rows.next().await {
                    let row = row?;
                    let mut values = Vec::with_capacity(t.columns.len());
                    for (i, (_, kind)) in t.columns.iter().enumerate() {
                        let v = match kind {
                            Int => row.try_get::<Option<i64>, _>(i)?.map(Value::Int),
                            Real => row.try_get::<Option<f64>, _>(i)?.map(Value::Real),
                            Text => row.try_get::<Option<String>, _>(i)?.map(|s| {
                                bytes += s.len();
                                Value::Text(s)
                            }),
                        };
                        values.push(v.unwrap_or(Value::Null));
                    }
                    batch.push(values);
                    count += 1;
                    if batch.len() >= BATCH_ROWS || bytes >= BATCH_BYTES {
                        let rows = std::mem::take(&mut batch);
                        bytes = 0;
                        if !send(Chunk::Rows {
                            table: t.name.into(),
                            rows,
                        })
                        .await
                        {
                            return Ok(());
                        }
                    }
                }
            }
            if !batch.is_empty()
                && !send(Chunk::Rows {
                    table: t.name.into(),
                    rows: batch,
                })
                .await
            {
                return Ok(());
            }
            totals.insert(t.name.to_string(), count);
        }
        tx.rollback().await?;
        send(Chunk::End(totals)).await;
        Ok(())
    }

    /// Starts an import: checks the header and that every backed-up table is empty, in
    /// the import's own write transaction.
    pub async fn begin_import(&self, header: &Header) -> Result<Importer<'_>, ImportError> {
        if header.format > FORMAT {
            return Err(ImportError::Newer {
                found: header.format,
                version: header.product_version.clone(),
            });
        }
        let mut columns = BTreeMap::new();
        for (name, cols) in &header.tables {
            let t = table(name).ok_or_else(|| ImportError::UnknownTable(name.clone()))?;
            let mut known = Vec::new();
            for c in cols {
                let col = t.columns.iter().find(|(n, _)| n == c).ok_or_else(|| {
                    ImportError::UnknownColumn {
                        table: name.clone(),
                        column: c.clone(),
                    }
                })?;
                if known.iter().any(|k: &&(&str, Kind)| k.0 == c) {
                    return Err(ImportError::DuplicateColumn {
                        table: name.clone(),
                        column: c.clone(),
                    });
                }
                known.push(col);
            }
            columns.insert(name.clone(), known);
        }
        let mut tx = self.write_tx().await?;
        let mut filled = Vec::new();
        for t in TABLES.iter().filter(|t| t.part != Part::Counter) {
            let n: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {}",
                t.name
            )))
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            if n > 0 {
                filled.push((t.name.to_string(), u64::try_from(n).unwrap_or(0)));
            }
        }
        if !filled.is_empty() {
            return Err(ImportError::NotEmpty(filled));
        }
        Ok(Importer {
            db: self,
            tx,
            columns,
            received: BTreeMap::new(),
        })
    }
}

impl Importer<'_> {
    /// Writes a batch of one announced table's rows.
    pub async fn rows(&mut self, table: &str, rows: Vec<Vec<Value>>) -> Result<(), ImportError> {
        let Some(cols) = self.columns.get(table) else {
            return Err(ImportError::Order(
                "rows of a table the header did not announce",
            ));
        };
        let def = self::table(table).ok_or_else(|| ImportError::UnknownTable(table.into()))?;
        let first = *self.received.get(table).unwrap_or(&0);
        for (i, row) in rows.iter().enumerate() {
            let n = first + i as u64 + 1;
            if row.len() != cols.len() {
                return Err(ImportError::BadRow {
                    table: table.into(),
                    row: n,
                    problem: format!("{} values for {} columns", row.len(), cols.len()),
                });
            }
            for (v, (name, kind)) in row.iter().zip(cols.iter().copied()) {
                let fits = matches!(
                    (kind, v),
                    (_, Value::Null)
                        | (Int, Value::Int(_))
                        | (Real, Value::Real(_) | Value::Int(_))
                        | (Text, Value::Text(_))
                );
                if !fits {
                    return Err(ImportError::BadRow {
                        table: table.into(),
                        row: n,
                        problem: format!("column {name} holds {v:?}, not a {kind:?}"),
                    });
                }
            }
        }
        let refused = |e: sqlx::Error| match e {
            sqlx::Error::Database(d) => ImportError::Refused {
                table: table.into(),
                cause: d.message().to_string(),
            },
            e => ImportError::from(e),
        };
        if def.part == Part::Counter {
            if rows.len() != 1 || first > 0 || cols.len() != 1 {
                return Err(ImportError::BadRow {
                    table: table.into(),
                    row: first + 1,
                    problem: "a counter is one row with its generation".into(),
                });
            }
            let archived = match rows[0][0] {
                Value::Int(g) => g,
                _ => 0,
            };
            let current: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT generation FROM {table} WHERE id = 1"
            )))
            .fetch_optional(&mut *self.tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
            // Past both: a daemon that cached a version of either installation sees a
            // new one and reads the restored state.
            let generation = archived.max(current) + 1;
            sqlx::query(
                self.db
                    .sql(&format!("UPDATE {table} SET generation = ? WHERE id = 1")),
            )
            .bind(generation)
            .execute(&mut *self.tx)
            .await
            .map_err(refused)?;
        } else if !rows.is_empty() {
            // Several rows per statement, within every engine's limit on parameters.
            let per = (30_000 / cols.len().max(1)).clamp(1, 200);
            let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
            let one = format!("({})", vec!["?"; cols.len()].join(", "));
            for part in rows.chunks(per) {
                let sql = format!(
                    "INSERT INTO {table} ({}) VALUES {}",
                    names.join(", "),
                    vec![one.as_str(); part.len()].join(", ")
                );
                let sql = self.db.sql(&sql);
                let mut q = sqlx::query(sql);
                for row in part {
                    for (v, (_, kind)) in row.iter().zip(cols.iter().copied()) {
                        q = match (kind, v) {
                            (Int, Value::Int(i)) => q.bind(*i),
                            (Int, _) => q.bind(None::<i64>),
                            (Real, Value::Real(f)) => q.bind(*f),
                            #[allow(clippy::cast_precision_loss)]
                            (Real, Value::Int(i)) => q.bind(*i as f64),
                            (Real, _) => q.bind(None::<f64>),
                            (Text, Value::Text(s)) => q.bind(s.clone()),
                            (Text, _) => q.bind(None::<String>),
                        };
                    }
                }
                q.execute(&mut *self.tx).await.map_err(refused)?;
            }
        }
        *self.received.entry(table.to_string()).or_default() += rows.len() as u64;
        Ok(())
    }

    /// Checks the totals against what was received, moves PostgreSQL's sequences past
    /// the carried ids, and commits. Returns the rows written per table.
    pub async fn finish(
        mut self,
        expected: &BTreeMap<String, u64>,
    ) -> Result<BTreeMap<String, u64>, ImportError> {
        for name in self.columns.keys() {
            let got = *self.received.get(name).unwrap_or(&0);
            let want = *expected.get(name).unwrap_or(&0);
            if got != want {
                return Err(ImportError::Count {
                    table: name.clone(),
                    expected: want,
                    got,
                });
            }
        }
        if let Some(name) = expected.keys().find(|n| !self.columns.contains_key(*n)) {
            return Err(ImportError::Count {
                table: name.clone(),
                expected: expected[name],
                got: 0,
            });
        }
        if self.db.dialect == Dialect::Postgres {
            for t in TABLES.iter().filter(|t| t.serial.is_some()) {
                let col = t.serial.unwrap_or("id");
                // setval is strict: an empty table (MAX is NULL) leaves the sequence alone.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{col}'), MAX({col})) FROM {0}",
                    t.name
                )))
                .execute(&mut *self.tx)
                .await?;
            }
        }
        self.tx.commit().await?;
        Ok(self.received)
    }
}

/// The engine's name in a backup's header.
pub fn engine(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "sqlite",
        Dialect::MySql => "mysql",
        Dialect::Postgres => "postgres",
    }
}

/// The gRPC service.
pub struct BackupService {
    pub store: Arc<Store>,
}

/// The service with its message limits, as mb-rpcd registers it.
pub fn server<G: tonic::service::Interceptor>(
    store: Arc<Store>,
    guard: G,
) -> tonic::service::interceptor::InterceptedService<BackupServer<BackupService>, G> {
    tonic::service::interceptor::InterceptedService::new(
        BackupServer::new(BackupService { store })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        guard,
    )
}

/// Backups carry password hashes and secrets: only root and mb-rpcd's own user, not
/// every member of the mailborder group.
fn allowed<T>(req: &Request<T>) -> Result<(), Status> {
    let uid = caller(req).uid;
    if uid == Some(0) || uid == Some(nix::unistd::geteuid().as_raw()) {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "backups carry password hashes and keys: run mb-backup as root or as mb-rpcd's user",
        ))
    }
}

fn import_status(e: ImportError) -> Status {
    match e {
        ImportError::NotEmpty(_) | ImportError::Newer { .. } => {
            Status::failed_precondition(e.to_string())
        }
        ImportError::Db(d) => {
            tracing::error!(cause = %d, "restore failed");
            Status::unavailable(format!("{d}; nothing was restored"))
        }
        e => Status::invalid_argument(e.to_string()),
    }
}

fn to_wire(c: Chunk) -> BackupChunk {
    let value = |v: Value| BackupValue {
        kind: Some(match v {
            Value::Null => WireKind::Null(true),
            Value::Int(i) => WireKind::Int(i),
            Value::Real(f) => WireKind::Real(f),
            Value::Text(s) => WireKind::Text(s),
        }),
    };
    BackupChunk {
        item: Some(match c {
            Chunk::Header(h) => Item::Header(BackupHeader {
                format: h.format,
                engine: h.engine,
                product_version: h.product_version,
                tables: h
                    .tables
                    .into_iter()
                    .map(|(name, columns)| BackupTable { name, columns })
                    .collect(),
            }),
            Chunk::Rows { table, rows } => Item::Rows(BackupRows {
                table,
                rows: rows
                    .into_iter()
                    .map(|r| BackupRow {
                        values: r.into_iter().map(value).collect(),
                    })
                    .collect(),
            }),
            Chunk::End(rows) => Item::End(BackupEnd {
                rows: rows.into_iter().collect(),
            }),
        }),
    }
}

fn from_wire(c: BackupChunk) -> Result<Chunk, ImportError> {
    let value = |v: BackupValue| match v.kind {
        None | Some(WireKind::Null(_)) => Value::Null,
        Some(WireKind::Int(i)) => Value::Int(i),
        Some(WireKind::Real(f)) => Value::Real(f),
        Some(WireKind::Text(s)) => Value::Text(s),
    };
    Ok(match c.item {
        None => return Err(ImportError::Order("an empty message")),
        Some(Item::Header(h)) => Chunk::Header(Header {
            format: h.format,
            engine: h.engine,
            product_version: h.product_version,
            tables: h.tables.into_iter().map(|t| (t.name, t.columns)).collect(),
        }),
        Some(Item::Rows(r)) => Chunk::Rows {
            table: r.table,
            rows: r
                .rows
                .into_iter()
                .map(|row| row.values.into_iter().map(value).collect())
                .collect(),
        },
        Some(Item::End(e)) => Chunk::End(e.rows.into_iter().collect()),
    })
}

#[tonic::async_trait]
impl Backup for BackupService {
    type ExportStream = ReceiverStream<Result<BackupChunk, Status>>;

    async fn export(
        &self,
        req: Request<BackupExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        allowed(&req)?;
        let who = caller(&req).name;
        let with_quarantine = req.into_inner().with_quarantine;
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        tokio::spawn(async move {
            let (chunks, mut read) = mpsc::channel(4);
            let export = async move { store.db.export_backup(with_quarantine, &chunks).await };
            let forward = async {
                while let Some(c) = read.recv().await {
                    if tx.send(Ok(to_wire(c))).await.is_err() {
                        return;
                    }
                }
            };
            let (result, ()) = tokio::join!(export, forward);
            match result {
                Ok(()) => tracing::info!(user = %who, with_quarantine, "backup exported"),
                Err(e) => {
                    tracing::error!(cause = %e, "backup export failed");
                    let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn import(
        &self,
        req: Request<Streaming<BackupChunk>>,
    ) -> Result<Response<BackupImportResponse>, Status> {
        allowed(&req)?;
        let who = caller(&req).name;
        let mut stream = req.into_inner();
        let next = async |s: &mut Streaming<BackupChunk>| -> Result<Option<Chunk>, Status> {
            match s.message().await? {
                Some(c) => from_wire(c).map(Some).map_err(import_status),
                None => Ok(None),
            }
        };
        let Some(Chunk::Header(header)) = next(&mut stream).await? else {
            return Err(import_status(ImportError::Order(
                "the first message must be the header",
            )));
        };
        let mut importer = self
            .store
            .db
            .begin_import(&header)
            .await
            .map_err(import_status)?;
        let rows = loop {
            // A stream cut short drops the importer: its transaction rolls back.
            match next(&mut stream).await? {
                Some(Chunk::Rows { table, rows }) => {
                    importer.rows(&table, rows).await.map_err(import_status)?
                }
                Some(Chunk::End(expected)) => {
                    break importer.finish(&expected).await.map_err(import_status)?;
                }
                Some(Chunk::Header(_)) => {
                    return Err(import_status(ImportError::Order("a second header")));
                }
                None => return Err(import_status(ImportError::Truncated)),
            }
        };
        let generation = self
            .store
            .refresh()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(
            user = %who,
            engine = %header.engine,
            version = %header.product_version,
            rows = rows.values().sum::<u64>(),
            generation,
            "backup restored"
        );
        Ok(Response::new(BackupImportResponse {
            rows: rows.into_iter().collect(),
            config_generation: generation,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A database in a directory removed when the test ends.
    struct TestDb {
        db: Db,
        dir: std::path::PathBuf,
    }

    impl std::ops::Deref for TestDb {
        type Target = Db;
        fn deref(&self) -> &Db {
            &self.db
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn open(name: &str) -> TestDb {
        let dir =
            std::env::temp_dir().join(format!("mb-backup-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Db::open(&format!("sqlite://{}/mb.db", dir.display()), 2)
            .await
            .expect("open");
        TestDb { db, dir }
    }

    /// Every table the SQLite migrations create is either backed up or excluded with a
    /// reason, and a backed-up table's columns are exactly the migrated table's: a table
    /// or a column added by a later migration fails here until the backup knows it.
    #[tokio::test]
    async fn every_table_and_column_is_accounted_for() {
        let db = open("tables").await;
        let names: Vec<String> =
            sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&db.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get(0).unwrap())
                .collect();
        assert!(names.iter().any(|n| n == "policies"), "{names:?}");
        let mut missing = Vec::new();
        for n in &names {
            let backed = table(n).is_some();
            let excluded = EXCLUDED.iter().any(|(e, why)| e == n && !why.is_empty());
            assert!(!(backed && excluded), "{n} is both backed up and excluded");
            if !backed && !excluded {
                missing.push(n.clone());
            }
        }
        assert!(
            missing.is_empty(),
            "tables neither backed up (backup::TABLES) nor excluded with a reason (backup::EXCLUDED): {missing:?}"
        );
        for t in TABLES {
            assert!(
                names.iter().any(|n| n == t.name),
                "{} is not a table",
                t.name
            );
            let cols: BTreeSet<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT name FROM pragma_table_info('{}')",
                t.name
            )))
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect();
            let mut ours: BTreeSet<String> =
                t.columns.iter().map(|(c, _)| (*c).to_string()).collect();
            if t.part == Part::Counter {
                ours.insert("id".into());
            }
            assert_eq!(ours, cols, "the columns of {}", t.name);
        }
        let everywhere = created_by_migrations();
        for (n, _) in EXCLUDED {
            assert!(
                names.iter().any(|m| m == n) || everywhere.contains(*n),
                "{n} is excluded but no migration creates it: drop it from EXCLUDED"
            );
        }
    }

    /// The tables every dialect's migrations create, read from their text: a table that
    /// only MariaDB or PostgreSQL has is accounted for as well.
    fn created_by_migrations() -> BTreeSet<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut names = BTreeSet::new();
        for dialect in ["sqlite", "mysql", "postgres"] {
            for f in std::fs::read_dir(root.join(dialect)).unwrap() {
                let sql = std::fs::read_to_string(f.unwrap().path()).unwrap();
                let words: Vec<String> = sql
                    .lines()
                    .map(|l| l.split("--").next().unwrap_or_default())
                    .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == '('))
                    .filter(|w| !w.is_empty())
                    .map(str::to_lowercase)
                    .collect();
                for (i, w) in words.iter().enumerate() {
                    if w != "table" || i == 0 {
                        continue;
                    }
                    if words[i - 1] != "create" && words[i - 1] != "virtual" {
                        continue;
                    }
                    let mut j = i + 1;
                    if words.get(j).is_some_and(|w| w == "if") {
                        j += 3;
                    }
                    if let Some(name) = words.get(j) {
                        names.insert(name.trim_matches('`').trim_matches('"').to_string());
                    }
                }
            }
        }
        names
    }

    #[test]
    fn every_dialects_tables_are_accounted_for() {
        let names = created_by_migrations();
        assert!(names.contains("greylist_triplets"), "{names:?}");
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| table(n).is_none() && !EXCLUDED.iter().any(|(e, _)| e == n))
            .collect();
        assert!(
            missing.is_empty(),
            "tables a migration creates, neither backed up (backup::TABLES) nor excluded with a reason (backup::EXCLUDED): {missing:?}"
        );
    }

    async fn fill(db: &Db) {
        for q in [
            "INSERT INTO config_overrides VALUES ('smtp.max_recipients', '50', 1, 'root')",
            "INSERT INTO config_audit (id, cfg_key, action, old_value, new_value, uid, username, at) VALUES (7, 'smtp.max_recipients', 'set', NULL, '50', 0, 'root', 1)",
            "UPDATE config_state SET generation = 9 WHERE id = 1",
            "INSERT INTO users VALUES ('alice', '$argon2id$x', 1, 2)",
            "INSERT INTO policies (id, name, priority, object, pattern, direction, action, tag, quarantine, reject, comment, created_at, unauthenticated) VALUES (5, 'p', 10, 'domain', 'x.test', 'from', 'score', 2.5, NULL, NULL, 'c', 3, 1)",
            "INSERT INTO quarantine VALUES ('Q1', 'mx', 5, 'Q1', '192.0.2.1', 's@x.test', 'r@y.test', 'subj', 'spam', 7.5, 'A', 10, '1970/01/01/Q1.eml')",
            "INSERT INTO web_accounts (name, password_hash, role, domains, addresses, smtp_user, totp_secret, totp_pending, totp_last_step, failed_count, failed_since, locked_until, created_at, created_by, updated_at, last_login) VALUES ('admin', '$argon2id$y', 'admin', '', '', '', 'sealed', '', 0, 0, 0, 0, 1, 'root', 1, 0)",
            "INSERT INTO web_api_keys (id, secret_hash, description, role, domains, addresses, created_at, created_by, expires_at, revoked_at, last_used) VALUES ('k1', 'abc', 'ci', 'admin', '', '', 1, 'admin', 0, 0, 0)",
            "INSERT INTO web_sessions (id_hash, account, csrf_token, client_ip, created_at, expires_at, last_seen) VALUES ('h', 'admin', 'c', '127.0.0.1', 1, 2, 1)",
        ] {
            sqlx::query(q).execute(&db.pool).await.unwrap();
        }
    }

    async fn export(db: &Db, with_quarantine: bool) -> Vec<Chunk> {
        let (tx, mut rx) = mpsc::channel(1 << 16);
        db.export_backup(with_quarantine, &tx).await.unwrap();
        drop(tx);
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            out.push(c);
        }
        out
    }

    async fn import(db: &Db, chunks: &[Chunk]) -> Result<BTreeMap<String, u64>, ImportError> {
        let Chunk::Header(h) = &chunks[0] else {
            panic!("no header")
        };
        let mut imp = db.begin_import(h).await?;
        for c in &chunks[1..] {
            match c {
                Chunk::Rows { table, rows } => imp.rows(table, rows.clone()).await?,
                Chunk::End(e) => return imp.finish(e).await,
                Chunk::Header(_) => panic!("two headers"),
            }
        }
        Err(ImportError::Truncated)
    }

    #[tokio::test]
    async fn an_export_imports_into_an_empty_database_and_nowhere_else() {
        let src = open("src").await;
        fill(&src).await;
        let chunks = export(&src, true).await;
        let Some(Chunk::End(totals)) = chunks.last() else {
            panic!("no end")
        };
        assert_eq!(totals["policies"], 1);
        assert_eq!(totals["quarantine"], 1);
        assert_eq!(totals["config_state"], 1);

        let dst = open("dst").await;
        let rows = import(&dst, &chunks).await.unwrap();
        assert_eq!(rows["users"], 1);
        assert_eq!((rows["web_accounts"], rows["web_api_keys"]), (1, 1));
        // Sessions are not carried: their users log in again.
        assert!(!rows.contains_key("web_sessions"));
        // The same rows come back out, ids and NULLs included; the counter is past both.
        let again = export(&dst, true).await;
        let rows_of = |cs: &[Chunk], t: &str| -> Vec<Vec<Value>> {
            cs.iter()
                .filter_map(|c| match c {
                    Chunk::Rows { table, rows } if table == t => Some(rows.clone()),
                    _ => None,
                })
                .flatten()
                .collect()
        };
        for t in TABLES.iter().filter(|t| t.part != Part::Counter) {
            assert_eq!(
                rows_of(&chunks, t.name),
                rows_of(&again, t.name),
                "{}",
                t.name
            );
        }
        assert_eq!(rows_of(&again, "config_state"), vec![vec![Value::Int(10)]]);
        // The next policy gets a new id, after the carried one.
        sqlx::query("INSERT INTO policies (name, priority, object, pattern, direction, action, comment, created_at) VALUES ('q', 1, 'default', '', 'to', 'allow', '', 1)")
            .execute(&dst.pool)
            .await
            .unwrap();
        let id: i64 = sqlx::query("SELECT id FROM policies WHERE name = 'q'")
            .fetch_one(&dst.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(id, 6);

        // A second restore is refused, naming what is there, and changes nothing.
        let e = import(&dst, &chunks).await.unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, ImportError::NotEmpty(_)) && text.contains("policies: 2 rows"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_damaged_or_cut_import_keeps_nothing() {
        let src = open("cut-src").await;
        fill(&src).await;
        let chunks = export(&src, false).await;
        let dst = open("cut-dst").await;
        let count = async |db: &Db| -> i64 {
            sqlx::query("SELECT (SELECT COUNT(*) FROM users) + (SELECT COUNT(*) FROM policies) + (SELECT COUNT(*) FROM config_overrides)")
                .fetch_one(&db.pool)
                .await
                .unwrap()
                .get(0)
        };
        // Cut before the end: every table's rows were written, then rolled back.
        let cut = &chunks[..chunks.len() - 1];
        assert!(matches!(
            import(&dst, cut).await,
            Err(ImportError::Truncated)
        ));
        assert_eq!(count(&dst).await, 0);
        // Totals that do not match what came.
        let mut wrong = chunks.clone();
        if let Some(Chunk::End(t)) = wrong.last_mut() {
            t.insert("users".into(), 2);
        }
        assert!(matches!(
            import(&dst, &wrong).await,
            Err(ImportError::Count { .. })
        ));
        assert_eq!(count(&dst).await, 0);
        // A row the database refuses (the same user twice), after other rows went in.
        let mut dup = chunks.clone();
        let pos = dup
            .iter()
            .position(|c| matches!(c, Chunk::Rows { table, .. } if table == "users"))
            .unwrap();
        dup.insert(pos + 1, dup[pos].clone());
        let e = import(&dst, &dup).await.unwrap_err();
        assert!(matches!(e, ImportError::Refused { .. }), "{e}");
        assert_eq!(count(&dst).await, 0);
        // A value of the wrong kind.
        let mut bad = chunks.clone();
        if let Chunk::Rows { rows, .. } = &mut bad[pos] {
            rows[0][2] = Value::Text("yesterday".into());
        }
        assert!(matches!(
            import(&dst, &bad).await,
            Err(ImportError::BadRow { .. })
        ));
        // A newer format, or a table this version does not know.
        let mut newer = chunks.clone();
        if let Chunk::Header(h) = &mut newer[0] {
            h.format = FORMAT + 1;
        }
        assert!(matches!(
            import(&dst, &newer).await,
            Err(ImportError::Newer { .. })
        ));
        let mut unknown = chunks.clone();
        if let Chunk::Header(h) = &mut unknown[0] {
            h.tables.push(("web_tokens".into(), vec!["id".into()]));
        }
        assert!(matches!(
            import(&dst, &unknown).await,
            Err(ImportError::UnknownTable(_))
        ));
        assert_eq!(count(&dst).await, 0);
        // And the whole archive still restores.
        import(&dst, &chunks).await.unwrap();
        assert_eq!(count(&dst).await, 3);
    }
}
