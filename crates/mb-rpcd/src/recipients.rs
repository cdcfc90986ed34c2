//! The `Recipients` service: the valid recipients of recipient verification in `list`
//! mode (`smtp.recipient_verification`), kept in the database, managed with
//! `mb-recipient`, read by mb-smtpd (which answers RCPT from its own copy) and shared
//! with cluster children through the `Replica` snapshot. The table's queries live here,
//! in this module's own `impl Db`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_core::recipients::{Lookup, Pattern, RecipientList};
use mb_proto::v1::recipients_server::Recipients;
use mb_proto::v1::{
    CheckRecipientRequest, CheckRecipientResponse, ImportRecipientsRequest, ListRecipientsRequest,
    ListRecipientsResponse, RecipientEntry, RecipientPatterns, RecipientsChanged,
};
use mb_runtime::uds::caller;
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::db::{Db, DbError};
use crate::store::Store;

/// Most patterns one request may carry (an import of a large directory is split by
/// the client).
pub const MAX_PATTERNS: usize = 100_000;

/// One stored pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRecord {
    /// Lowercase, as `Pattern` prints it.
    pub pattern: String,
    pub comment: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// What a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    pub added: u32,
    pub removed: u32,
    pub unchanged: u32,
}

impl Db {
    /// Stores the patterns not stored yet.
    pub async fn add_recipients(
        &self,
        patterns: &[Pattern],
        comment: &str,
        at: i64,
    ) -> Result<Changed, DbError> {
        let entries: Vec<(Pattern, &str)> = patterns.iter().map(|p| (p.clone(), comment)).collect();
        self.add_recipient_entries(&entries, at).await
    }

    /// Stores the patterns not stored yet, each with its own comment, in one transaction.
    pub async fn add_recipient_entries(
        &self,
        entries: &[(Pattern, &str)],
        at: i64,
    ) -> Result<Changed, DbError> {
        let mut tx = self.write_tx().await?;
        let out = self.add_recipients_in(&mut tx, entries, at).await?;
        self.bump_recipients_generation(&mut tx, out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn add_recipients_in(
        &self,
        tx: &mut Tx,
        entries: &[(Pattern, &str)],
        at: i64,
    ) -> Result<Changed, DbError> {
        let mut out = Changed::default();
        for (p, comment) in entries {
            let text = p.to_string();
            let exists = sqlx::query(self.sql("SELECT 1 FROM recipients WHERE pattern = ?"))
                .bind(&text)
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
            if exists {
                out.unchanged += 1;
                continue;
            }
            sqlx::query(self.sql(
                "INSERT INTO recipients (pattern, domain, comment, created_at) VALUES (?, ?, ?, ?)",
            ))
            .bind(&text)
            .bind(&p.domain)
            .bind(*comment)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            out.added += 1;
        }
        Ok(out)
    }

    /// Removes the patterns; those not stored count as unchanged.
    pub async fn remove_recipients(&self, patterns: &[Pattern]) -> Result<Changed, DbError> {
        let mut tx = self.write_tx().await?;
        let out = self.remove_recipients_in(&mut tx, patterns).await?;
        self.bump_recipients_generation(&mut tx, out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn remove_recipients_in(
        &self,
        tx: &mut Tx,
        patterns: &[Pattern],
    ) -> Result<Changed, DbError> {
        let mut out = Changed::default();
        for p in patterns {
            let done = sqlx::query(self.sql("DELETE FROM recipients WHERE pattern = ?"))
                .bind(p.to_string())
                .execute(&mut **tx)
                .await?;
            if done.rows_affected() > 0 {
                out.removed += 1;
            } else {
                out.unchanged += 1;
            }
        }
        Ok(out)
    }

    /// A change to the list makes a new version, in the change's own transaction.
    async fn bump_recipients_generation(&self, tx: &mut Tx, c: Changed) -> Result<(), DbError> {
        if c.added + c.removed > 0 {
            sqlx::query(
                "UPDATE recipients_generation SET generation = generation + 1 WHERE id = 1",
            )
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Makes the list exactly `wanted` (a map from pattern text to the pattern and its
    /// comment) in one transaction, additions first; kept entries keep their comment and
    /// time. No reader sees a list missing a user that both lists have.
    async fn set_recipients(
        &self,
        wanted: &std::collections::BTreeMap<String, (Pattern, &str)>,
        at: i64,
    ) -> Result<(Changed, Changed), DbError> {
        let mut tx = self.write_tx().await?;
        let entries: Vec<(Pattern, &str)> = wanted.values().map(|(p, c)| (p.clone(), *c)).collect();
        let added = self.add_recipients_in(&mut tx, &entries, at).await?;
        let have: Vec<String> = sqlx::query_scalar("SELECT pattern FROM recipients")
            .fetch_all(&mut *tx)
            .await?;
        let gone: Vec<Pattern> = have
            .iter()
            .filter(|k| !wanted.contains_key(*k))
            .filter_map(|k| Pattern::parse(k).ok())
            .collect();
        let removed = self.remove_recipients_in(&mut tx, &gone).await?;
        self.bump_recipients_generation(
            &mut tx,
            Changed {
                added: added.added,
                removed: removed.removed,
                unchanged: 0,
            },
        )
        .await?;
        tx.commit().await?;
        Ok((added, removed))
    }

    /// Every pattern (of `domain` when given), sorted.
    pub async fn list_recipients(
        &self,
        domain: Option<&str>,
    ) -> Result<Vec<RecipientRecord>, DbError> {
        let rows = match domain {
            Some(d) => {
                sqlx::query(self.sql(
                    "SELECT pattern, comment, created_at FROM recipients WHERE domain = ? ORDER BY pattern",
                ))
                .bind(d.to_lowercase())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT pattern, comment, created_at FROM recipients ORDER BY pattern")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(RecipientRecord {
                    pattern: r.try_get(0)?,
                    comment: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// A text that changes whenever the list does: the generation every change bumps in
    /// its own transaction, with the count and largest id (so that a database created
    /// afresh, whose generation starts over, does not repeat an old version by chance).
    pub async fn recipients_version(&self) -> Result<String, DbError> {
        let row = sqlx::query(
            "SELECT (SELECT generation FROM recipients_generation WHERE id = 1), \
             COUNT(*), COALESCE(MAX(id), 0) FROM recipients",
        )
        .fetch_one(&self.pool)
        .await?;
        let generation: i64 = row.try_get(0)?;
        let count: i64 = row.try_get(1)?;
        let max: i64 = row.try_get(2)?;
        Ok(format!("{generation}:{count}:{max}"))
    }

    /// Makes the list exactly `patterns` (kept entries keep their comment and time), in
    /// one transaction.
    pub async fn replace_recipients(
        &self,
        patterns: &[Pattern],
        comment: &str,
        at: i64,
    ) -> Result<Changed, DbError> {
        let wanted = patterns
            .iter()
            .map(|p| (p.to_string(), (p.clone(), comment)))
            .collect();
        let (added, removed) = self.set_recipients(&wanted, at).await?;
        Ok(Changed {
            added: added.added,
            removed: removed.removed,
            unchanged: added.unchanged,
        })
    }
}

/// A write transaction of `Db::write_tx`.
type Tx = sqlx::Transaction<'static, sqlx::Any>;

pub struct RecipientsService {
    pub store: Arc<Store>,
}

fn db_status(e: DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// The valid patterns of a request, and the refused ones with their reason.
fn parse_all(texts: &[String]) -> Result<(Vec<Pattern>, Vec<String>), Status> {
    if texts.len() > MAX_PATTERNS {
        return Err(Status::invalid_argument(format!(
            "{} patterns in one request; at most {MAX_PATTERNS} (split the file)",
            texts.len()
        )));
    }
    let mut ok = Vec::with_capacity(texts.len());
    let mut invalid = Vec::new();
    for t in texts {
        match Pattern::parse(t) {
            Ok(p) => ok.push(p),
            Err(e) => invalid.push(e.to_string()),
        }
    }
    ok.sort();
    ok.dedup();
    Ok((ok, invalid))
}

fn changed(c: Changed, invalid: Vec<String>) -> RecipientsChanged {
    RecipientsChanged {
        added: c.added,
        removed: c.removed,
        unchanged: c.unchanged,
        invalid,
    }
}

impl From<RecipientRecord> for RecipientEntry {
    fn from(r: RecipientRecord) -> Self {
        RecipientEntry {
            pattern: r.pattern,
            comment: r.comment,
            created_unix: r.created_at,
        }
    }
}

/// Makes this node's list equal to the cluster main's (the `Replica` import); returns
/// the patterns added or removed. Entries that do not parse are skipped with a warning.
pub async fn import_from_main(db: &Db, entries: &[RecipientEntry]) -> Result<u32, DbError> {
    let mut wanted = std::collections::BTreeMap::new();
    for e in entries {
        match Pattern::parse(&e.pattern) {
            Ok(p) => {
                wanted.insert(p.to_string(), (p, e.comment.as_str()));
            }
            Err(err) => {
                tracing::warn!(pattern = %e.pattern, cause = %err, "cannot apply a recipient pattern from the main");
            }
        }
    }
    let (added, removed) = db.set_recipients(&wanted, now()).await?;
    Ok(added.added + removed.removed)
}

#[tonic::async_trait]
impl Recipients for RecipientsService {
    async fn add(
        &self,
        req: Request<RecipientPatterns>,
    ) -> Result<Response<RecipientsChanged>, Status> {
        let who = caller(&req).name.clone();
        self.store
            .refuse_on_child("valid recipients are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        let (patterns, invalid) = parse_all(&r.patterns)?;
        let c = self
            .store
            .db
            .add_recipients(&patterns, &r.comment, now())
            .await
            .map_err(db_status)?;
        tracing::info!(added = c.added, unchanged = c.unchanged, invalid = invalid.len(), by = %who, "recipients added");
        Ok(Response::new(changed(c, invalid)))
    }

    async fn delete(
        &self,
        req: Request<RecipientPatterns>,
    ) -> Result<Response<RecipientsChanged>, Status> {
        let who = caller(&req).name.clone();
        self.store
            .refuse_on_child("valid recipients are cluster-wide")
            .map_err(crate::grpc::status)?;
        let (patterns, invalid) = parse_all(&req.into_inner().patterns)?;
        let c = self
            .store
            .db
            .remove_recipients(&patterns)
            .await
            .map_err(db_status)?;
        tracing::info!(removed = c.removed, missing = c.unchanged, by = %who, "recipients removed");
        Ok(Response::new(changed(c, invalid)))
    }

    async fn list(
        &self,
        req: Request<ListRecipientsRequest>,
    ) -> Result<Response<ListRecipientsResponse>, Status> {
        let r = req.into_inner();
        let db = &self.store.db;
        let version = db.recipients_version().await.map_err(db_status)?;
        if !r.if_not_version.is_empty() && r.if_not_version == version {
            return Ok(Response::new(ListRecipientsResponse {
                entries: Vec::new(),
                version,
                unchanged: true,
            }));
        }
        let domain = (!r.domain.is_empty()).then_some(r.domain.as_str());
        let entries = db
            .list_recipients(domain)
            .await
            .map_err(db_status)?
            .into_iter()
            .map(RecipientEntry::from)
            .collect();
        Ok(Response::new(ListRecipientsResponse {
            entries,
            version,
            unchanged: false,
        }))
    }

    async fn check(
        &self,
        req: Request<CheckRecipientRequest>,
    ) -> Result<Response<CheckRecipientResponse>, Status> {
        let address = req.into_inner().address;
        let address = address.trim().trim_start_matches('<').trim_end_matches('>');
        let Some((local, domain)) = address.rsplit_once('@') else {
            return Err(Status::invalid_argument(format!(
                "{address:?} is not an address (user@example.org)"
            )));
        };
        if local.is_empty() || domain.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{address:?} is not an address (user@example.org)"
            )));
        }
        let entries = self
            .store
            .db
            .list_recipients(Some(domain))
            .await
            .map_err(db_status)?;
        let list = RecipientList::new(
            entries
                .iter()
                .filter_map(|e| Pattern::parse(&e.pattern).ok()),
        );
        let delimiter = self.store.effective().text("smtp.recipient_delimiter");
        let lookup = list.lookup(address, &delimiter);
        let full = address.to_lowercase();
        let (result, pattern) = match lookup {
            Lookup::Known(p) => ("known", p),
            Lookup::Unknown => ("unknown", String::new()),
            Lookup::Unlisted => ("unlisted", String::new()),
        };
        // The address the match was made on: without the extension when the full
        // address is not what matched.
        let looked_up = match mb_core::recipients::strip_address_extension(&full, &delimiter) {
            Some(base)
                if result == "known" && !matches!(list.lookup(&full, ""), Lookup::Known(_)) =>
            {
                base
            }
            _ => full,
        };
        Ok(Response::new(CheckRecipientResponse {
            result: result.into(),
            pattern,
            looked_up,
        }))
    }

    async fn import(
        &self,
        req: Request<ImportRecipientsRequest>,
    ) -> Result<Response<RecipientsChanged>, Status> {
        let who = caller(&req).name.clone();
        self.store
            .refuse_on_child("valid recipients are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        let (patterns, invalid) = parse_all(&r.patterns)?;
        let db = &self.store.db;
        let c = if r.replace {
            if !invalid.is_empty() {
                // A replace with refused lines would silently drop those users.
                return Err(Status::invalid_argument(format!(
                    "{} invalid pattern(s), nothing replaced: {}",
                    invalid.len(),
                    invalid.join("; ")
                )));
            }
            db.replace_recipients(&patterns, &r.comment, now())
                .await
                .map_err(db_status)?
        } else {
            db.add_recipients(&patterns, &r.comment, now())
                .await
                .map_err(db_status)?
        };
        tracing::info!(added = c.added, removed = c.removed, unchanged = c.unchanged, invalid = invalid.len(), replace = r.replace, by = %who, "recipients imported");
        Ok(Response::new(changed(c, invalid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids reused after an AUTO_INCREMENT reset (old MariaDB forgets the counter on a
    /// restart) give the same count and largest id for another list: the generation still
    /// tells them apart, so mb-smtpd does not keep a stale copy.
    #[tokio::test]
    async fn the_version_changes_even_when_ids_are_reused() {
        let dir = std::env::temp_dir().join(format!("mb-recipients-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Db::open(&format!("sqlite://{}/mb.db", dir.display()), 2)
            .await
            .unwrap();
        let p = |t: &str| Pattern::parse(t).unwrap();
        db.add_recipients(&[p("a@example.org"), p("b@example.org")], "", 1)
            .await
            .unwrap();
        let v1 = db.recipients_version().await.unwrap();
        db.remove_recipients(&[p("b@example.org")]).await.unwrap();
        sqlx::query("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'recipients'")
            .execute(&db.pool)
            .await
            .unwrap();
        db.add_recipients(&[p("c@example.org")], "", 2)
            .await
            .unwrap();
        let v2 = db.recipients_version().await.unwrap();
        assert_ne!(v1, v2, "a different list, the same version");
        // A change that changes nothing keeps the version.
        db.add_recipients(&[p("c@example.org")], "", 3)
            .await
            .unwrap();
        db.remove_recipients(&[p("zz@example.org")]).await.unwrap();
        assert_eq!(db.recipients_version().await.unwrap(), v2);
        // Replacing is one change: the list goes from {a, c} to {a, d}.
        let c = db
            .replace_recipients(&[p("a@example.org"), p("d@example.org")], "", 4)
            .await
            .unwrap();
        assert_eq!((c.added, c.removed, c.unchanged), (1, 1, 1));
        let all: Vec<String> = db
            .list_recipients(None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.pattern)
            .collect();
        assert_eq!(all, ["a@example.org", "d@example.org"]);
        assert_ne!(db.recipients_version().await.unwrap(), v2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn patterns_are_stored_listed_versioned_and_replaced() {
        let dir = std::env::temp_dir().join(format!("mb-recipients-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 2).await.unwrap();
        let p = |t: &str| Pattern::parse(t).unwrap();
        let v0 = db.recipients_version().await.unwrap();
        let c = db
            .add_recipients(&[p("bob@example.org"), p("*@b.example")], "hr", 5)
            .await
            .unwrap();
        assert_eq!((c.added, c.unchanged), (2, 0));
        let c = db
            .add_recipients(&[p("BOB@example.org")], "", 6)
            .await
            .unwrap();
        assert_eq!((c.added, c.unchanged), (0, 1));
        let v1 = db.recipients_version().await.unwrap();
        assert_ne!(v0, v1);
        let all = db.list_recipients(None).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.pattern.as_str()).collect::<Vec<_>>(),
            ["*@b.example", "bob@example.org"]
        );
        assert_eq!(all[1].comment, "hr");
        let one = db.list_recipients(Some("EXAMPLE.org")).await.unwrap();
        assert_eq!(one.len(), 1);
        // Remove the newest and add another: same count, yet a new version.
        db.remove_recipients(&[p("*@b.example")]).await.unwrap();
        db.add_recipients(&[p("carol@example.org")], "", 7)
            .await
            .unwrap();
        let v2 = db.recipients_version().await.unwrap();
        assert_ne!(v1, v2);
        let c = db
            .replace_recipients(&[p("bob@example.org"), p("dave@example.org")], "", 8)
            .await
            .unwrap();
        assert_eq!((c.added, c.removed, c.unchanged), (1, 1, 1));
        let c = db
            .remove_recipients(&[p("nobody@example.org")])
            .await
            .unwrap();
        assert_eq!((c.removed, c.unchanged), (0, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
