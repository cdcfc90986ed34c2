//! The statistics rollups (migration 0016) and the `Stats` gRPC service that reads them.
//!
//! What is counted: the events that decide on a message, that is every event with a
//! verdict except mb-smtpd's `received` (the scan of that message has its own `scanned`
//! event): the filter's `scanned` (any path: inline, content filter, milter) and
//! mb-smtpd's refusals before it takes a message (`rejected`, `greylisted`, and `deferred`
//! by an account's sending limit). Delivery events carry no verdict and are not counted.
//!
//! How: `Db::store_events` adds each event it stores to a `Tally`, and `Db::count` writes
//! the tally in the same transaction, so an event is counted exactly when it is stored:
//! a batch sent again (its events are duplicates) counts nothing, and a crash before the
//! commit loses the events and their counts together. The rows of a tally are written in
//! key order, so concurrent writers lock the shared rows in one order and never deadlock.
//! A cluster main stores its children's uploaded events through the same `store_events`,
//! so its rollups cover the whole cluster (each child's cover its own node).
//!
//! Scopes: every event counts in scope `""` (all mail); an event also counts in the scope
//! of each of the message's own domains (the recipients' domains for inbound mail, the
//! sender's domain for outbound), except SMTP-time refusals (`rejected`), which may name a
//! recipient that is not ours (relay denied) and count in scope `""` only. A domain
//! administrator's statistics are the sum of their domains' scopes, so a message to two
//! of their domains counts twice there.
//!
//! Bounds: `stats_counts` has one row per hour, scope, direction, stage and verdict.
//! `stats_top` counts every value while its hour runs; `maintain` then keeps the top
//! `TOP_KEEP` values of each hour, scope and dimension (ties broken by value) once the
//! hour has been over for an hour, and deletes every row older than
//! `stats.retention_days`. A top list over several hours adds up those kept hours, so a
//! value that never made an hour's top 100 is missing from it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_proto::v1::stats_server::Stats;
use mb_proto::v1::{StatsBucket, StatsCount, StatsQuery, StatsReport, StatsTopEntry};
use mb_runtime::lifecycle::Shutdown;
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::db::{Db, DbError, Dialect, EventRecord};
use crate::store::Store;

/// Values kept per hour, scope and dimension once the hour is over.
pub const TOP_KEEP: i64 = 100;
/// The top lists' dimensions, as stored.
pub const DIMENSIONS: [&str; 4] = ["sender", "recipient", "client", "sender_domain"];
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// How often pruning and trimming run; a changed `stats.retention_days` applies at the next.
const EVERY: Duration = Duration::from_secs(300);
/// Longest stored scope and value (the columns' widths).
const SCOPE_MAX: usize = 255;
const ITEM_MAX: usize = 320;

/// One row of `stats_counts`' key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CountKey {
    hour: i64,
    scope: String,
    direction: String,
    stage: String,
    verdict: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sums {
    messages: i64,
    recipients: i64,
    bytes: i64,
    viruses: i64,
}

/// What a batch of new events adds to the rollups, kept in key order.
#[derive(Debug, Default)]
pub struct Tally {
    counts: BTreeMap<CountKey, Sums>,
    /// (hour, scope, dimension, value) to messages.
    top: BTreeMap<(i64, String, &'static str, String), i64>,
}

impl Tally {
    /// Adds one stored event, if it decides on a message.
    pub fn add(&mut self, e: &EventRecord) {
        if e.verdict.is_empty() || e.stage == "received" {
            return;
        }
        let hour = e.at_unix_ms.div_euclid(1000 * HOUR) * HOUR;
        // As everywhere else, anything but "outbound" is inbound.
        let outbound = e.direction == "outbound";
        let direction = if outbound { "outbound" } else { "inbound" };
        let sender = e.sender.trim().to_lowercase();
        let sender_domain = domain_of(&sender);
        let mut recipients: Vec<String> = e
            .recipients
            .iter()
            .map(|r| r.trim().to_lowercase())
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        let virus = e
            .symbols
            .iter()
            .any(|s| s == "VIRUS" || s.starts_with("VIRUS("));
        let mut scopes = vec![String::new()];
        if e.stage != "rejected" {
            let mut own: Vec<String> = if outbound {
                sender_domain.map(str::to_string).into_iter().collect()
            } else {
                recipients
                    .iter()
                    .filter_map(|r| domain_of(r))
                    .map(str::to_string)
                    .collect()
            };
            own.sort_unstable();
            own.dedup();
            scopes.extend(own.into_iter().map(|d| clip(&d, SCOPE_MAX)));
        }
        for scope in scopes {
            // The recipients a domain's scope counts: its own for inbound mail (the others
            // are other domains' business), all of them for its outbound mail.
            let mine: Vec<&String> = recipients
                .iter()
                .filter(|r| scope.is_empty() || outbound || domain_of(r) == Some(scope.as_str()))
                .collect();
            let sums = self
                .counts
                .entry(CountKey {
                    hour,
                    scope: scope.clone(),
                    direction: direction.into(),
                    stage: clip(&e.stage, 32),
                    verdict: clip(&e.verdict, 32),
                })
                .or_default();
            sums.messages += 1;
            sums.recipients += i64::try_from(mine.len()).unwrap_or(i64::MAX);
            sums.bytes = sums
                .bytes
                .saturating_add(i64::try_from(e.size).unwrap_or(i64::MAX));
            sums.viruses += i64::from(virus);
            let mut bump = |dimension: &'static str, value: &str| {
                *self
                    .top
                    .entry((hour, scope.clone(), dimension, clip(value, ITEM_MAX)))
                    .or_default() += 1;
            };
            bump("sender", if sender.is_empty() { "<>" } else { &sender });
            if let Some(d) = sender_domain {
                bump("sender_domain", d);
            }
            if !e.client_ip.is_empty() {
                bump("client", e.client_ip.trim());
            }
            for r in mine {
                bump("recipient", r);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// The domain of an address, when it has a non-empty one.
fn domain_of(address: &str) -> Option<&str> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.'))
        .filter(|d| !d.is_empty())
}

/// At most `max` characters of `s`.
fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// `step` of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Hour,
    Day,
}

/// Which rollups `Db::stats` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsFilter {
    /// Unix seconds; the hours starting in [from, to).
    pub from: i64,
    pub to: i64,
    pub step: Step,
    /// Scopes added up; empty for every message.
    pub domains: Vec<String>,
    /// Entries per top list.
    pub top: u32,
}

/// One row of a report: messages of a direction, stage and verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountRow {
    pub direction: String,
    pub stage: String,
    pub verdict: String,
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub viruses: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// (start, rows), in time order, only buckets with rows.
    pub buckets: Vec<(i64, Vec<CountRow>)>,
    pub totals: Vec<CountRow>,
    /// Per `DIMENSIONS` entry: (value, messages), most first.
    pub top: [Vec<(String, u64)>; 4],
}

impl Db {
    /// Writes a tally in the caller's transaction (`store_events`).
    pub(crate) async fn count(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        tally: &Tally,
    ) -> Result<(), DbError> {
        if tally.is_empty() {
            return Ok(());
        }
        let counts = if self.dialect == Dialect::MySql {
            "INSERT INTO stats_counts (hour_start, scope, direction, stage, verdict, messages, recipients, bytes, viruses) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE messages = messages + VALUES(messages), \
             recipients = recipients + VALUES(recipients), bytes = bytes + VALUES(bytes), viruses = viruses + VALUES(viruses)"
        } else {
            "INSERT INTO stats_counts (hour_start, scope, direction, stage, verdict, messages, recipients, bytes, viruses) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour_start, scope, direction, stage, verdict) DO UPDATE SET \
             messages = stats_counts.messages + excluded.messages, recipients = stats_counts.recipients + excluded.recipients, \
             bytes = stats_counts.bytes + excluded.bytes, viruses = stats_counts.viruses + excluded.viruses"
        };
        for (k, s) in &tally.counts {
            sqlx::query(self.sql(counts))
                .bind(k.hour)
                .bind(&k.scope)
                .bind(&k.direction)
                .bind(&k.stage)
                .bind(&k.verdict)
                .bind(s.messages)
                .bind(s.recipients)
                .bind(s.bytes)
                .bind(s.viruses)
                .execute(&mut **tx)
                .await?;
        }
        let top = if self.dialect == Dialect::MySql {
            "INSERT INTO stats_top (hour_start, scope, dimension, item, messages) VALUES (?, ?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE messages = messages + VALUES(messages)"
        } else {
            "INSERT INTO stats_top (hour_start, scope, dimension, item, messages) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (hour_start, scope, dimension, item) DO UPDATE SET messages = stats_top.messages + excluded.messages"
        };
        for ((hour, scope, dimension, item), n) in &tally.top {
            sqlx::query(self.sql(top))
                .bind(*hour)
                .bind(scope)
                .bind(*dimension)
                .bind(item)
                .bind(*n)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// `SUM(col)` as a BIGINT on every engine (MariaDB and PostgreSQL sum to decimals,
    /// which the `Any` driver does not read).
    fn sum(&self, col: &str) -> String {
        match self.dialect {
            Dialect::MySql => format!("CAST(SUM({col}) AS SIGNED)"),
            Dialect::Postgres => format!("CAST(SUM({col}) AS BIGINT)"),
            Dialect::Sqlite => format!("SUM({col})"),
        }
    }

    /// Reads the rollups of a range.
    pub async fn stats(&self, f: &StatsFilter) -> Result<Report, DbError> {
        let scopes: Vec<String> = if f.domains.is_empty() {
            vec![String::new()]
        } else {
            f.domains.iter().map(|d| d.trim().to_lowercase()).collect()
        };
        let marks = vec!["?"; scopes.len()].join(", ");
        // One snapshot: the totals and the top lists agree while a prune commits.
        let mut tx = self.snapshot_tx().await?;
        let sql = format!(
            "SELECT hour_start, direction, stage, verdict, {}, {}, {}, {} FROM stats_counts \
             WHERE hour_start >= ? AND hour_start < ? AND scope IN ({marks}) \
             GROUP BY hour_start, direction, stage, verdict ORDER BY hour_start",
            self.sum("messages"),
            self.sum("recipients"),
            self.sum("bytes"),
            self.sum("viruses"),
        );
        let mut q = sqlx::query(self.sql(&sql)).bind(f.from).bind(f.to);
        for s in &scopes {
            q = q.bind(s);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        let mut buckets: BTreeMap<i64, BTreeMap<(String, String, String), CountRow>> =
            BTreeMap::new();
        let mut totals: BTreeMap<(String, String, String), CountRow> = BTreeMap::new();
        for r in &rows {
            let hour: i64 = r.try_get(0)?;
            let start = match f.step {
                Step::Hour => hour,
                Step::Day => hour - hour.rem_euclid(DAY),
            };
            let key: (String, String, String) = (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            let n = |i: usize| -> Result<u64, DbError> {
                Ok(u64::try_from(r.try_get::<Option<i64>, _>(i)?.unwrap_or(0)).unwrap_or(0))
            };
            let (messages, recipients, bytes, viruses) = (n(4)?, n(5)?, n(6)?, n(7)?);
            for row in [
                buckets
                    .entry(start)
                    .or_default()
                    .entry(key.clone())
                    .or_default(),
                totals.entry(key.clone()).or_default(),
            ] {
                (row.direction, row.stage, row.verdict) = key.clone();
                row.messages += messages;
                row.recipients += recipients;
                row.bytes = row.bytes.saturating_add(bytes);
                row.viruses += viruses;
            }
        }
        let mut report = Report {
            buckets: buckets
                .into_iter()
                .map(|(start, rows)| (start, rows.into_values().collect()))
                .collect(),
            totals: totals.into_values().collect(),
            top: Default::default(),
        };
        let sql = format!(
            "SELECT item, {} AS n FROM stats_top WHERE hour_start >= ? AND hour_start < ? \
             AND scope IN ({marks}) AND dimension = ? GROUP BY item ORDER BY n DESC, item LIMIT ?",
            self.sum("messages")
        );
        for (i, dimension) in DIMENSIONS.iter().enumerate() {
            let mut q = sqlx::query(self.sql(&sql)).bind(f.from).bind(f.to);
            for s in &scopes {
                q = q.bind(s);
            }
            let rows = q
                .bind(*dimension)
                .bind(i64::from(f.top))
                .fetch_all(&mut *tx)
                .await?;
            report.top[i] = rows
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get::<String, _>(0)?,
                        u64::try_from(r.try_get::<Option<i64>, _>(1)?.unwrap_or(0)).unwrap_or(0),
                    ))
                })
                .collect::<Result<_, DbError>>()?;
        }
        tx.commit().await?;
        Ok(report)
    }

    /// Deletes the rollups of hours that started before `before` (Unix seconds); returns
    /// how many rows went.
    pub async fn prune_stats(&self, before: i64) -> Result<u64, DbError> {
        // One transaction: a report read meanwhile sees the hour either whole or gone,
        // never its totals gone and its top lists still there.
        let mut tx = self.write_tx().await?;
        let mut gone = 0;
        for table in ["stats_counts", "stats_top"] {
            gone += sqlx::query(self.sql(&format!("DELETE FROM {table} WHERE hour_start < ?")))
                .bind(before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(gone)
    }

    /// Cuts the top lists of the hours that started after the last trimmed one and at or
    /// before `through` to their `TOP_KEEP` first values (most messages, then by value);
    /// returns how many rows went. The watermark moves in the transaction of the last
    /// deletion, so a pass cut short is redone.
    pub async fn trim_stats(&self, through: i64) -> Result<u64, DbError> {
        let done: i64 = sqlx::query("SELECT trimmed_through FROM stats_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        if through <= done {
            return Ok(0);
        }
        let groups = sqlx::query(self.sql(
            "SELECT hour_start, scope, dimension FROM stats_top WHERE hour_start > ? AND hour_start <= ? \
             GROUP BY hour_start, scope, dimension HAVING COUNT(*) > ?",
        ))
        .bind(done)
        .bind(through)
        .bind(TOP_KEEP)
        .fetch_all(&self.pool)
        .await?;
        let mut gone = 0;
        for g in &groups {
            let (hour, scope, dimension): (i64, String, String) =
                (g.try_get(0)?, g.try_get(1)?, g.try_get(2)?);
            let mut tx = self.write_tx().await?;
            // The last value kept: everything after it in the same order goes.
            let last = sqlx::query(self.sql(
                "SELECT messages, item FROM stats_top WHERE hour_start = ? AND scope = ? AND dimension = ? \
                 ORDER BY messages DESC, item LIMIT 1 OFFSET ?",
            ))
            .bind(hour)
            .bind(&scope)
            .bind(&dimension)
            .bind(TOP_KEEP - 1)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(last) = last {
                let (n, item): (i64, String) = (last.try_get(0)?, last.try_get(1)?);
                gone += sqlx::query(self.sql(
                    "DELETE FROM stats_top WHERE hour_start = ? AND scope = ? AND dimension = ? \
                     AND (messages < ? OR (messages = ? AND item > ?))",
                ))
                .bind(hour)
                .bind(&scope)
                .bind(&dimension)
                .bind(n)
                .bind(n)
                .bind(&item)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
        }
        sqlx::query(self.sql("UPDATE stats_state SET trimmed_through = ? WHERE id = 1"))
            .bind(through)
            .execute(&self.pool)
            .await?;
        Ok(gone)
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One maintenance pass: prunes the hours older than `stats.retention_days` and trims the
/// top lists of the hours over for at least an hour (a late event, such as one a
/// cluster child uploads after an outage, still finds its hour whole until then).
pub async fn maintain(store: &Store) -> Result<(u64, u64), DbError> {
    let now = now_secs();
    let days = store.effective().int("stats.retention_days");
    let pruned = if days > 0 {
        store.db.prune_stats(now - days * DAY).await?
    } else {
        0
    };
    let current = now - now.rem_euclid(HOUR);
    let trimmed = store.db.trim_stats(current - 2 * HOUR).await?;
    if pruned > 0 {
        tracing::info!(rows = pruned, retention_days = days, "statistics pruned");
    }
    Ok((pruned, trimmed))
}

/// Runs `maintain` now and then every few minutes until shutdown, beside the message
/// log's retention.
pub fn spawn_maintenance(store: Arc<Store>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = maintain(&store).await {
                tracing::warn!(cause = %e, "statistics maintenance pass failed");
            }
            tokio::select! {
                () = shutdown.requested() => break,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    });
}

/// The `Stats` service on mb-rpcd's socket.
pub struct StatsService {
    pub store: Arc<Store>,
}

impl StatsService {
    /// The filter a query asks for: hour-aligned, `to` 0 meaning now (its hour included).
    fn filter(q: StatsQuery) -> Result<StatsFilter, Status> {
        let step = match q.step.as_str() {
            "" | "hour" => Step::Hour,
            "day" => Step::Day,
            other => {
                return Err(Status::invalid_argument(format!(
                    "step must be hour or day, not {other:?}"
                )));
            }
        };
        let to = if q.to_unix > 0 { q.to_unix } else { now_secs() };
        // The hour `to` falls in is reported: round up to the next hour.
        let to = to.saturating_add(HOUR - 1).div_euclid(HOUR) * HOUR;
        let from = q.from_unix.div_euclid(HOUR) * HOUR;
        if from >= to {
            return Err(Status::invalid_argument("from must be before to"));
        }
        Ok(StatsFilter {
            from,
            to,
            step,
            domains: q.domains,
            top: if q.top == 0 { 10 } else { q.top.min(100) },
        })
    }
}

fn wire(r: CountRow) -> StatsCount {
    StatsCount {
        direction: r.direction,
        stage: r.stage,
        verdict: r.verdict,
        messages: r.messages,
        recipients: r.recipients,
        bytes: r.bytes,
        viruses: r.viruses,
    }
}

#[tonic::async_trait]
impl Stats for StatsService {
    async fn query(&self, req: Request<StatsQuery>) -> Result<Response<StatsReport>, Status> {
        let f = Self::filter(req.into_inner())?;
        let report = self.store.db.stats(&f).await.map_err(|e| {
            tracing::error!(cause = %e, "database operation failed");
            Status::unavailable(e.to_string())
        })?;
        let [senders, recipients, clients, domains] = report.top;
        let top = |v: Vec<(String, u64)>| {
            v.into_iter()
                .map(|(value, messages)| StatsTopEntry { value, messages })
                .collect()
        };
        Ok(Response::new(StatsReport {
            buckets: report
                .buckets
                .into_iter()
                .map(|(start_unix, rows)| StatsBucket {
                    start_unix,
                    counts: rows.into_iter().map(wire).collect(),
                })
                .collect(),
            totals: report.totals.into_iter().map(wire).collect(),
            top_senders: top(senders),
            top_recipients: top(recipients),
            top_clients: top(clients),
            top_sender_domains: top(domains),
            from_unix: f.from,
            to_unix: f.to,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, at_ms: i64, verdict: &str, sender: &str, rcpts: &[&str]) -> EventRecord {
        EventRecord {
            event_id: id.into(),
            at_unix_ms: at_ms,
            stage: "scanned".into(),
            verdict: verdict.into(),
            sender: sender.into(),
            recipients: rcpts.iter().map(|r| (*r).to_string()).collect(),
            client_ip: "192.0.2.7".into(),
            size: 1000,
            direction: "inbound".into(),
            ..EventRecord::default()
        }
    }

    /// What one event adds: the scopes, the recipients each scope counts, viruses, and
    /// the events that count nothing.
    #[test]
    fn a_tally_counts_deciding_events_in_their_scopes() {
        let mut t = Tally::default();
        let mut virus = event(
            "a",
            7_200_500,
            "reject",
            "X@Spam.test",
            &["u@a.test", "v@b.test", "U@A.test"],
        );
        virus.symbols = vec!["VIRUS(0.0)".into()];
        t.add(&virus);
        t.add(&EventRecord {
            stage: "received".into(),
            ..event("b", 7_200_500, "accept", "x@spam.test", &["u@a.test"])
        });
        t.add(&EventRecord {
            stage: "delivered".into(),
            ..event("c", 7_200_500, "", "x@spam.test", &["u@a.test"])
        });
        t.add(&EventRecord {
            stage: "rejected".into(),
            ..event("d", 7_200_500, "reject", "", &["nobody@elsewhere.test"])
        });
        t.add(&EventRecord {
            direction: "outbound".into(),
            ..event("e", 7_200_500, "accept", "me@a.test", &["far@c.test"])
        });
        let get = |scope: &str, direction: &str, stage: &str, verdict: &str| {
            t.counts
                .get(&CountKey {
                    hour: 7200,
                    scope: scope.into(),
                    direction: direction.into(),
                    stage: stage.into(),
                    verdict: verdict.into(),
                })
                .copied()
        };
        let s = |m, r, b, v| {
            Some(Sums {
                messages: m,
                recipients: r,
                bytes: b,
                viruses: v,
            })
        };
        assert_eq!(get("", "inbound", "scanned", "reject"), s(1, 2, 1000, 1));
        assert_eq!(
            get("a.test", "inbound", "scanned", "reject"),
            s(1, 1, 1000, 1)
        );
        assert_eq!(
            get("b.test", "inbound", "scanned", "reject"),
            s(1, 1, 1000, 1)
        );
        assert_eq!(get("", "inbound", "rejected", "reject"), s(1, 1, 1000, 0));
        assert_eq!(get("elsewhere.test", "inbound", "rejected", "reject"), None);
        assert_eq!(
            get("a.test", "outbound", "scanned", "accept"),
            s(1, 1, 1000, 0)
        );
        assert_eq!(get("c.test", "outbound", "scanned", "accept"), None);
        // received and delivered count nothing: 3 + 1 + 2 rows.
        assert_eq!(t.counts.len(), 6);
        let top = |scope: &str, dim: &'static str, item: &str| {
            t.top
                .get(&(7200, scope.to_string(), dim, item.to_string()))
                .copied()
        };
        assert_eq!(top("", "sender", "x@spam.test"), Some(1));
        assert_eq!(top("", "sender", "<>"), Some(1));
        assert_eq!(top("", "sender_domain", "spam.test"), Some(1));
        assert_eq!(top("a.test", "recipient", "u@a.test"), Some(1));
        assert_eq!(top("a.test", "recipient", "v@b.test"), None);
        assert_eq!(top("a.test", "recipient", "far@c.test"), Some(1));
        assert_eq!(top("", "client", "192.0.2.7"), Some(3));
    }

    /// Stored on `url`: counted once however often a batch is sent, read back by hour
    /// and day and by scope, trimmed to the top 100 with ties broken by value, pruned.
    async fn round_trip(url: &str) {
        let db = Db::open(url, 4).await.expect("the database opens");
        let hour = 1_000 * HOUR * 500; // ms of hour 500
        let mut batch = vec![
            event("r1", hour + 10, "accept", "a@s.test", &["u@a.test"]),
            event(
                "r2",
                hour + 20,
                "accept",
                "a@s.test",
                &["u@a.test", "v@b.test"],
            ),
            event(
                "r3",
                hour + 1_000 * HOUR + 5,
                "reject",
                "b@t.test",
                &["u@a.test"],
            ),
        ];
        batch[2].symbols = vec!["VIRUS(0.0)".into()];
        assert_eq!(db.store_events(&batch, false).await.unwrap(), (3, 0));
        // Sent again (a publisher that did not see its acknowledgement): nothing counts.
        assert_eq!(db.store_events(&batch, false).await.unwrap(), (0, 3));
        let all = |step, domains: Vec<String>| StatsFilter {
            from: 500 * HOUR,
            to: 502 * HOUR,
            step,
            domains,
            top: 10,
        };
        let r = db.stats(&all(Step::Hour, vec![])).await.unwrap();
        assert_eq!(r.buckets.len(), 2, "{r:?}");
        assert_eq!(r.buckets[0].0, 500 * HOUR);
        assert_eq!(r.buckets[0].1[0].messages, 2);
        assert_eq!(r.buckets[0].1[0].recipients, 3);
        assert_eq!(r.buckets[0].1[0].bytes, 2000);
        assert_eq!(r.buckets[1].1[0].viruses, 1);
        let total: u64 = r.totals.iter().map(|c| c.messages).sum();
        assert_eq!(total, 3);
        assert_eq!(
            r.top[0],
            vec![("a@s.test".into(), 2), ("b@t.test".into(), 1)]
        );
        assert_eq!(r.top[1][0], ("u@a.test".into(), 3));
        let r = db.stats(&all(Step::Day, vec![])).await.unwrap();
        assert_eq!(r.buckets.len(), 1);
        assert_eq!(r.buckets[0].0, 500 * HOUR - (500 * HOUR).rem_euclid(DAY));
        // b.test sees only r2, and only its own recipient.
        let r = db
            .stats(&all(Step::Hour, vec!["B.test".into()]))
            .await
            .unwrap();
        assert_eq!(r.totals.len(), 1);
        assert_eq!((r.totals[0].messages, r.totals[0].recipients), (1, 1));
        assert_eq!(r.top[1], vec![("v@b.test".into(), 1)]);

        // 150 senders once each and one three times in hour 600: 100 kept after trimming.
        let mut many: Vec<EventRecord> = (0..150)
            .map(|i| {
                event(
                    &format!("m{i}"),
                    600 * HOUR * 1000,
                    "accept",
                    &format!("s{i:03}@x.test"),
                    &["u@a.test"],
                )
            })
            .collect();
        for i in 0..3 {
            many.push(event(
                &format!("z{i}"),
                600 * HOUR * 1000,
                "accept",
                "zz@x.test",
                &["u@a.test"],
            ));
        }
        db.store_events(&many, false).await.unwrap();
        assert!(db.trim_stats(600 * HOUR).await.unwrap() > 0);
        let r = db
            .stats(&StatsFilter {
                from: 600 * HOUR,
                to: 601 * HOUR,
                step: Step::Hour,
                domains: vec![],
                top: 100,
            })
            .await
            .unwrap();
        assert_eq!(r.top[0].len(), 100);
        assert_eq!(r.top[0][0], ("zz@x.test".into(), 3));
        assert_eq!(r.top[0][1], ("s000@x.test".into(), 1));
        assert_eq!(r.top[0][99], ("s098@x.test".into(), 1));
        // The counters are not trimmed.
        assert_eq!(r.totals[0].messages, 153);
        // A second pass over the same hours does nothing.
        assert_eq!(db.trim_stats(600 * HOUR).await.unwrap(), 0);

        // Hours 500 and 501 go, 600 stays.
        assert!(db.prune_stats(600 * HOUR).await.unwrap() > 0);
        let r = db.stats(&all(Step::Hour, vec![])).await.unwrap();
        assert!(
            r.buckets.is_empty() && r.top.iter().all(Vec::is_empty),
            "{r:?}"
        );
    }

    /// A report read while a prune commits sees each pruned hour whole or gone: never its
    /// totals gone and its top lists still there (the two tables are pruned in one
    /// transaction and read from one snapshot).
    async fn reports_never_see_half_a_prune(url: &str) {
        let db = Arc::new(Db::open(url, 4).await.expect("the database opens"));
        let filter = StatsFilter {
            from: 700 * HOUR,
            to: 800 * HOUR,
            step: Step::Hour,
            domains: vec![],
            top: 10,
        };
        let mut reads = 0;
        for round in 0..8 {
            let batch: Vec<EventRecord> = (0..400)
                .map(|i| {
                    event(
                        &format!("p{round}-{i}"),
                        (700 + round) * HOUR * 1000,
                        "accept",
                        &format!("s{i}@x{i}.test"),
                        &[&format!("u{i}@a.test")],
                    )
                })
                .collect();
            db.store_events(&batch, false).await.unwrap();
            let pruner = {
                let db = db.clone();
                tokio::spawn(async move { db.prune_stats(800 * HOUR).await })
            };
            loop {
                let done = pruner.is_finished();
                let r = db.stats(&filter).await.unwrap();
                reads += 1;
                let total: u64 = r.totals.iter().map(|c| c.messages).sum();
                assert!(
                    (total, r.top.iter().all(Vec::is_empty)) == (400, false)
                        || (total, r.top.iter().all(Vec::is_empty)) == (0, true),
                    "round {round}: half a prune: {total} messages, top {:?}",
                    r.top
                );
                if done {
                    break;
                }
            }
            assert!(pruner.await.unwrap().unwrap() > 0);
        }
        assert!(reads >= 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_never_see_half_a_prune_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("mb-stats-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        reports_never_see_half_a_prune(&format!("sqlite://{}/mb.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_never_see_half_a_prune_on_postgresql() {
        let server =
            mb_testkit::Postgres::start().expect("PostgreSQL starts (apt-get install postgresql)");
        reports_never_see_half_a_prune(&server.url()).await;
    }

    #[tokio::test]
    async fn rollups_round_trip_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("mb-stats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        round_trip(&format!("sqlite://{}/mb.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn rollups_round_trip_on_mariadb() {
        let server =
            mb_testkit::MariaDb::start().expect("MariaDB starts (apt-get install mariadb-server)");
        round_trip(&server.url()).await;
    }

    #[tokio::test]
    async fn rollups_round_trip_on_postgresql() {
        let server =
            mb_testkit::Postgres::start().expect("PostgreSQL starts (apt-get install postgresql)");
        round_trip(&server.url()).await;
    }

    /// Writers storing events of the same hours at once on MariaDB never deadlock (the
    /// tally's rows are written in key order) and every event is counted once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_on_mariadb_count_every_event_once() {
        let server =
            mb_testkit::MariaDb::start().expect("MariaDB starts (apt-get install mariadb-server)");
        let db = Arc::new(Db::open(&server.url(), 8).await.expect("opens"));
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let db = db.clone();
                tokio::spawn(async move {
                    for b in 0..10 {
                        // Each writer's batch touches the shared rows in its own order.
                        let mut batch: Vec<EventRecord> = ["accept", "reject", "tag"]
                            .iter()
                            .enumerate()
                            .map(|(i, v)| {
                                event(
                                    &format!("w{w}b{b}i{i}"),
                                    3_600_000,
                                    v,
                                    &format!("s{i}@x.test"),
                                    &["u@a.test"],
                                )
                            })
                            .collect();
                        if w % 2 == 1 {
                            batch.reverse();
                        }
                        db.store_events(&batch, false).await?;
                    }
                    Ok::<_, DbError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().expect("every concurrent store succeeds");
        }
        let r = db
            .stats(&StatsFilter {
                from: 0,
                to: 2 * HOUR,
                step: Step::Hour,
                domains: vec![],
                top: 10,
            })
            .await
            .unwrap();
        let total: u64 = r.totals.iter().map(|c| c.messages).sum();
        assert_eq!(total, 240);
    }
}
