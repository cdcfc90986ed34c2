//! The `Quarantine` service: the index of quarantined messages (the files are stored by
//! the filter workers, see `mb_runtime::quarantine`), release by reinjection through
//! `filter.next_hop`, deletion, and the retention pass (`quarantine.retention_days`,
//! `max_size_mb`, `max_messages`) that runs every few minutes and on `Purge`.
//!
//! Entries are `mb_core::quarantine::Entry` throughout; `QuarantineEntry` exists only in
//! the handlers' requests and answers (`mb_runtime::quarantine::wire` converts).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_core::quarantine::Entry;
use mb_proto::v1::quarantine_server::Quarantine;
use mb_proto::v1::{
    AddQuarantineResponse, DeleteQuarantineResponse, ListQuarantineRequest, ListQuarantineResponse,
    PurgeQuarantineRequest, PurgeQuarantineResponse, QuarantineEntry, QuarantineId,
    ReleaseQuarantineResponse, ShowQuarantineResponse,
};
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::quarantine::{self as files, wire};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::db::{
    Db, DbError, Dialect, QUARANTINE_COLUMNS, QuarantineFilter, like_escape, quarantine_entry,
    row_limit,
};
use crate::message_log::Scope;
use crate::store::Store;

/// How often the retention pass runs.
const RETENTION_EVERY: Duration = Duration::from_secs(300);
/// The largest message `Show --raw` returns.
const MAX_RAW: u64 = 64 << 20;

pub struct QuarantineService {
    pub store: Arc<Store>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn db_status(e: crate::db::DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

fn io_status(what: &str, e: &std::io::Error) -> Status {
    tracing::error!(cause = %e, "{what}");
    Status::internal(format!("{what}: {e}"))
}

impl QuarantineService {
    async fn entry(&self, id: &str) -> Result<Entry, Status> {
        if !files::valid_id(id) {
            return Err(Status::invalid_argument(format!(
                "{id:?} is not a quarantine id"
            )));
        }
        self.store
            .db
            .quarantine_entry(id)
            .await
            .map_err(db_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no message {id} in the quarantine (mb-quarantine list shows what is there)"
                ))
            })
    }
}

/// Removes an entry's files, then its index row.
async fn remove(store: &Store, root: &std::path::Path, e: &Entry) -> Result<(), Status> {
    let (root, entry) = (root.to_path_buf(), e.clone());
    tokio::task::spawn_blocking(move || files::remove(&root, &entry))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|err| io_status("cannot remove a quarantined message", &err))?;
    store
        .db
        .remove_quarantine(&e.id, store.cluster_main().is_some())
        .await
        .map_err(db_status)?;
    Ok(())
}

/// On a cluster main, the node holding an entry when that is another node (its file is
/// not here): release and delete are carried out there.
fn remote_node(store: &Store, e: &Entry) -> Option<String> {
    let cfg = store.effective();
    (cfg.is_cluster_main()
        && e.node != cfg.node_name()
        && !files::root(&cfg).join(&e.path).exists())
    .then(|| e.node.clone())
}

/// Asks the main's mb-cluster to run `action` on the child holding `e`, and waits for
/// the child's answer.
async fn on_node(
    store: &Store,
    node: &str,
    action: &str,
    e: &Entry,
) -> Result<mb_proto::v1::CommandResult, Status> {
    let cfg = store.effective();
    let ch = mb_runtime::uds::connect(&cfg.socket("mb-cluster"), "mb-cluster")
        .await
        .map_err(|err| {
            Status::unavailable(format!(
                "message {} is quarantined on node {node}, and mb-cluster does not answer here: {err}",
                e.id
            ))
        })?;
    let r = mb_proto::v1::cluster_client::ClusterClient::new(ch)
        .run_on_node(mb_proto::v1::RunOnNodeRequest {
            node: node.to_string(),
            command: Some(mb_proto::v1::NodeCommand {
                id: 0,
                action: action.into(),
                quarantine_id: e.id.clone(),
            }),
        })
        .await?
        .into_inner();
    if r.code != 0 {
        return Err(Status::new(
            tonic::Code::from_i32(r.code),
            format!("on node {node}: {}", r.error),
        ));
    }
    // The child also reports the removal; dropping the entry now keeps the list true.
    store
        .db
        .remove_quarantine(&e.id, false)
        .await
        .map_err(db_status)?;
    Ok(r)
}

/// Index entries whose file was missing at the last retention pass.
static MISSING: std::sync::LazyLock<std::sync::Mutex<HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

/// Brings the index in line with the files (messages stored while mb-rpcd was away are
/// added, entries whose files are gone at two passes in a row are dropped), then enforces the limits; with
/// `older_than_days`, everything older goes too. Returns how many were removed.
pub async fn retention(store: &Store, older_than_days: u32) -> Result<u64, Status> {
    let cfg = store.effective();
    let root = files::root(&cfg);
    let on_disk = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || files::scan(&root))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    };
    let child = store.cluster_main().is_some();
    for e in &on_disk {
        if store.db.add_quarantine(e, child).await.map_err(db_status)? {
            tracing::info!(id = %e.id, "indexed a quarantined message found on disk");
        }
    }
    let indexed = store.db.all_quarantine().await.map_err(db_status)?;
    // On a cluster main, entries of other nodes have their files there: each node
    // enforces its own limits and reports what it removed.
    let (main, local) = (cfg.is_cluster_main(), cfg.node_name());
    let missing: HashSet<String> = indexed
        .iter()
        .filter(|e| !on_disk.iter().any(|d| d.id == e.id) && (!main || e.node == local))
        .map(|e| e.id.clone())
        .collect();
    // An entry is dropped only when its file was missing at the previous pass too: a
    // restore (`mb-backup restore --with-quarantine`) imports the index before it writes
    // the files, and a pass in between must not drop what is about to arrive.
    let confirmed: HashSet<String> = {
        let mut last = MISSING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let confirmed = missing.intersection(&last).cloned().collect();
        *last = missing;
        confirmed
    };
    for e in &indexed {
        if confirmed.contains(&e.id) {
            tracing::warn!(id = %e.id, path = %e.path, "quarantined message file is gone; dropping its index entry");
            store
                .db
                .remove_quarantine(&e.id, child)
                .await
                .map_err(db_status)?;
        }
    }
    let entries: Vec<Entry> = indexed
        .into_iter()
        .filter(|e| on_disk.iter().any(|d| d.id == e.id))
        .collect();
    let day = 86_400_000_i64;
    let mut max_age = cfg.int("quarantine.retention_days") * day;
    if older_than_days > 0 {
        max_age = max_age.min(i64::from(older_than_days) * day);
    }
    let max_messages = u64::try_from(cfg.int("quarantine.max_messages")).unwrap_or(0);
    let max_bytes = u64::try_from(cfg.int("quarantine.max_size_mb"))
        .unwrap_or(u64::MAX / 2)
        .saturating_mul(1 << 20);
    let gone = files::expired(&entries, now_ms(), max_age, max_messages, max_bytes);
    for id in &gone {
        if let Some(e) = entries.iter().find(|e| &e.id == id) {
            remove(store, &root, e).await?;
            tracing::info!(id = %e.id, age_days = (now_ms() - e.at_unix_ms) / day, "quarantined message expired");
        }
    }
    Ok(gone.len() as u64)
}

/// Runs the retention pass at start and every few minutes until shutdown.
pub fn spawn_retention(store: Arc<Store>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = retention(&store, 0).await {
                tracing::warn!(cause = %e.message(), "quarantine retention pass failed");
            }
            tokio::select! {
                () = shutdown.requested() => break,
                () = tokio::time::sleep(RETENTION_EVERY) => {}
            }
        }
    });
}

#[tonic::async_trait]
impl Quarantine for QuarantineService {
    async fn add(
        &self,
        req: Request<QuarantineEntry>,
    ) -> Result<Response<AddQuarantineResponse>, Status> {
        let e = wire::from_wire(req.into_inner())
            .map_err(|bad| Status::invalid_argument(bad.to_string()))?;
        let added = self
            .store
            .db
            .add_quarantine(&e, self.store.cluster_main().is_some())
            .await
            .map_err(db_status)?;
        Ok(Response::new(AddQuarantineResponse { added }))
    }

    async fn list(
        &self,
        req: Request<ListQuarantineRequest>,
    ) -> Result<Response<ListQuarantineResponse>, Status> {
        let q = req.into_inner();
        let (offset, scope) = (
            q.offset,
            Scope::from_wire(q.scoped, q.domains.clone(), q.addresses.clone()),
        );
        let filter = QuarantineFilter::from(q);
        let page = self
            .store
            .db
            .quarantine_page(&filter, scope.as_ref(), offset)
            .await
            .map_err(db_status)?;
        Ok(Response::new(ListQuarantineResponse {
            entries: page.entries.into_iter().map(wire::to_wire).collect(),
            total: page.total.0,
            total_bytes: page.total.1,
            matched: page.matched.0,
            matched_bytes: page.matched.1,
        }))
    }

    async fn show(
        &self,
        req: Request<QuarantineId>,
    ) -> Result<Response<ShowQuarantineResponse>, Status> {
        let q = req.into_inner();
        let entry = self.entry(&q.id).await?;
        if let Some(node) = remote_node(&self.store, &entry) {
            return Ok(Response::new(ShowQuarantineResponse {
                headers: format!(
                    "(stored on node {node}: `mb-quarantine show {}` there shows the message)\r\n",
                    entry.id
                ),
                message: Vec::new(),
                entry: Some(wire::to_wire(entry)),
            }));
        }
        let path = files::root(&self.store.effective()).join(&entry.path);
        let data = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let f = std::fs::File::open(&path)?;
            let mut data = Vec::new();
            f.take(MAX_RAW).read_to_end(&mut data)?;
            Ok::<_, std::io::Error>(data)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| io_status("cannot read a quarantined message", &e))?;
        let end = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(data.len(), |p| p + 2);
        Ok(Response::new(ShowQuarantineResponse {
            headers: String::from_utf8_lossy(&data[..end]).into_owned(),
            message: if q.raw { data } else { Vec::new() },
            entry: Some(wire::to_wire(entry)),
        }))
    }

    async fn show_entry(
        &self,
        req: Request<QuarantineId>,
    ) -> Result<Response<QuarantineEntry>, Status> {
        // The index alone: the file is not touched, so its state cannot answer first.
        let entry = self.entry(&req.get_ref().id).await?;
        Ok(Response::new(wire::to_wire(entry)))
    }

    async fn release(
        &self,
        req: Request<QuarantineId>,
    ) -> Result<Response<ReleaseQuarantineResponse>, Status> {
        let who = caller(&req).name.clone();
        let entry = self.entry(&req.get_ref().id).await?;
        if let Some(node) = remote_node(&self.store, &entry) {
            let r = on_node(&self.store, &node, "quarantine.release", &entry).await?;
            tracing::info!(id = %entry.id, node = %node, by = %who, to = %entry.recipients.join(","), reply = %r.reply, "quarantined message released on its node");
            return Ok(Response::new(ReleaseQuarantineResponse {
                reply: r.reply,
                recipients: r.recipients,
            }));
        }
        let cfg = self.store.effective();
        let root = files::root(&cfg);
        let path = root.join(&entry.path);
        let message = tokio::fs::read(&path)
            .await
            .map_err(|e| io_status("cannot read a quarantined message", &e))?;
        let hop = cfg.text("filter.next_hop");
        let helo = match cfg.text("smtp.hostname") {
            h if h.is_empty() => "localhost".to_string(),
            h => h,
        };
        let outcomes = mb_smtp::client::reinject(
            &hop,
            &helo,
            &entry.sender,
            &entry.recipients,
            &message,
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| {
            Status::unavailable(format!(
                "cannot reinject through filter.next_hop {hop}: {e}; the message stays in the quarantine"
            ))
        })?;
        let refused: Vec<String> = outcomes
            .iter()
            .filter(|o| !o.response.is_positive())
            .map(|o| format!("{}: {}", o.recipient, o.response.text()))
            .collect();
        if !refused.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{hop} refused {}; the message stays in the quarantine",
                refused.join("; ")
            )));
        }
        let reply = outcomes
            .first()
            .map(|o| o.response.text())
            .unwrap_or_default();
        remove(&self.store, &root, &entry).await?;
        tracing::info!(id = %entry.id, by = %who, to = %entry.recipients.join(","), reply = %reply, "quarantined message released");
        Ok(Response::new(ReleaseQuarantineResponse {
            reply,
            recipients: entry.recipients,
        }))
    }

    async fn delete(
        &self,
        req: Request<QuarantineId>,
    ) -> Result<Response<DeleteQuarantineResponse>, Status> {
        let who = caller(&req).name.clone();
        let entry = self.entry(&req.get_ref().id).await?;
        if let Some(node) = remote_node(&self.store, &entry) {
            on_node(&self.store, &node, "quarantine.delete", &entry).await?;
            tracing::info!(id = %entry.id, node = %node, by = %who, "quarantined message deleted on its node");
            return Ok(Response::new(DeleteQuarantineResponse {}));
        }
        remove(&self.store, &files::root(&self.store.effective()), &entry).await?;
        tracing::info!(id = %entry.id, by = %who, "quarantined message deleted");
        Ok(Response::new(DeleteQuarantineResponse {}))
    }

    async fn purge(
        &self,
        req: Request<PurgeQuarantineRequest>,
    ) -> Result<Response<PurgeQuarantineResponse>, Status> {
        let removed = retention(&self.store, req.get_ref().older_than_days).await?;
        let (remaining, remaining_bytes) =
            self.store.db.quarantine_totals().await.map_err(db_status)?;
        Ok(Response::new(PurgeQuarantineResponse {
            removed,
            remaining,
            remaining_bytes,
        }))
    }
}

/// The wire's "unset" is an empty string or a zero limit.
impl From<ListQuarantineRequest> for QuarantineFilter {
    fn from(q: ListQuarantineRequest) -> Self {
        let set = |s: String| (!s.is_empty()).then_some(s);
        QuarantineFilter {
            since_ms: q.since_unix_ms,
            sender: set(q.sender),
            recipient: set(q.recipient),
            limit: (q.limit > 0).then_some(q.limit),
        }
    }
}

/// One page of a quarantine listing and the counts around it, as (messages, bytes).
#[derive(Debug, Default)]
pub struct Page {
    /// Newest first, from the offset asked for.
    pub entries: Vec<Entry>,
    /// The whole quarantine, or the scope's part of it.
    pub total: (u64, u64),
    /// The entries matching the filter and the scope, whatever the limit and offset.
    pub matched: (u64, u64),
}

impl Db {
    /// The entries matching `q` (and `scope`, when given), newest first, from `offset`,
    /// with the totals a pager needs: everything below runs in the database, so a
    /// restricted caller's page is as cheap as an administrator's and nothing beyond the
    /// page leaves mb-rpcd.
    pub async fn quarantine_page(
        &self,
        q: &QuarantineFilter,
        scope: Option<&Scope>,
        offset: u32,
    ) -> Result<Page, DbError> {
        let mut cond = String::from("at_ms >= ?");
        if q.sender.is_some() {
            cond.push_str(" AND sender = ?");
        }
        if q.recipient.is_some() {
            // As `Db::list_quarantine` (and so as the CLI always did): one whole line.
            cond.push_str(if self.dialect == Dialect::MySql {
                " AND CONCAT('\n', recipients, '\n') LIKE ? ESCAPE '!'"
            } else {
                " AND ('\n' || recipients || '\n') LIKE ? ESCAPE '!'"
            });
        }
        if let Some(scope) = scope {
            cond.push_str(&scope.condition(self.dialect, false));
        }
        let bind = |mut query: sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>| {
            query = query.bind(q.since_ms);
            if let Some(sender) = &q.sender {
                query = query.bind(sender.clone());
            }
            if let Some(recipient) = &q.recipient {
                query = query.bind(format!("%\n{}\n%", like_escape(recipient)));
            }
            match scope {
                Some(scope) => scope.bind(query, false),
                None => query,
            }
        };
        let sql = format!(
            "SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE {cond} ORDER BY at_ms DESC, id LIMIT ? OFFSET ?"
        );
        let rows = bind(sqlx::query(self.sql(&sql)))
            .bind(i64::from(row_limit(q.limit)))
            .bind(i64::from(offset))
            .fetch_all(&self.pool)
            .await?;
        let entries = rows
            .iter()
            .map(quarantine_entry)
            .collect::<Result<Vec<_>, _>>()?;
        let total = match scope {
            None => self.quarantine_totals().await?,
            Some(scope) => {
                let c = format!("1 = 1{}", scope.condition(self.dialect, false));
                self.count_quarantine(&c, |query| scope.bind(query, false))
                    .await?
            }
        };
        // Without a filter, everything in the quarantine (or the scope) matches.
        let unfiltered = q.since_ms <= 0 && q.sender.is_none() && q.recipient.is_none();
        let matched = if unfiltered {
            total
        } else {
            self.count_quarantine(&cond, bind).await?
        };
        Ok(Page {
            entries,
            total,
            matched,
        })
    }

    /// (messages, bytes) of the entries meeting `cond`, whose values `bind` binds.
    async fn count_quarantine(
        &self,
        cond: &str,
        bind: impl FnOnce(
            sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>,
        ) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<(u64, u64), DbError> {
        // SUM is DECIMAL on MariaDB and NUMERIC on PostgreSQL, which Any cannot read.
        let int = if self.dialect == Dialect::MySql {
            "SIGNED"
        } else {
            "BIGINT"
        };
        let sql = format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS {int}) FROM quarantine WHERE {cond}"
        );
        let row = bind(sqlx::query(self.sql(&sql)))
            .fetch_one(&self.pool)
            .await?;
        let n: i64 = sqlx::Row::try_get(&row, 0)?;
        let bytes: i64 = sqlx::Row::try_get(&row, 1)?;
        Ok((
            u64::try_from(n).unwrap_or(0),
            u64::try_from(bytes).unwrap_or(0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{EventFilter, EventRecord};

    fn scope(domains: &[&str], addresses: &[&str]) -> Scope {
        Scope::from_wire(
            true,
            domains.iter().map(|s| s.to_string()).collect(),
            addresses.iter().map(|s| s.to_string()).collect(),
        )
        .expect("scoped")
    }

    /// Quarantine pages and log searches restricted to a scope, on the database at
    /// `url`: a.test has 12 entries (some to two domains, some in capitals), b.test 60,
    /// and `_` in a domain is literal.
    async fn check(url: &str) {
        let db = Db::open(url, 2).await.expect("the database opens");
        let mut n = 0;
        let mut add = |rcpts: &[&str], sender: &str| {
            n += 1;
            Entry {
                id: format!("q{n:03}"),
                node: "n1".into(),
                at_unix_ms: 1_000 + i64::from(n),
                sender: sender.into(),
                recipients: rcpts.iter().map(|s| s.to_string()).collect(),
                size: 100,
                path: format!("2026/12/01/q{n:03}.eml"),
                ..Entry::default()
            }
        };
        let mut entries = Vec::new();
        for i in 0..60 {
            entries.push(add(&[&format!("u{i}@b.test")], "x@c.test"));
            if i % 5 == 0 {
                let a = match i % 3 {
                    0 => "jane@a.test",
                    1 => "Bob@A.TEST",
                    _ => "carol@a.test",
                };
                entries.push(add(&[a, "other@b.test"], "x@c.test"));
            }
        }
        entries.push(add(&["z@a_test"], "x@c.test"));
        for e in &entries {
            assert!(db.add_quarantine(e, false).await.unwrap());
        }
        let page = |s: Option<Scope>, limit: u32, offset: u32, recipient: Option<&str>| {
            let db = &db;
            let recipient = recipient.map(str::to_string);
            async move {
                let f = QuarantineFilter {
                    limit: Some(limit),
                    recipient,
                    ..QuarantineFilter::default()
                };
                db.quarantine_page(&f, s.as_ref(), offset).await.unwrap()
            }
        };
        // An admin (no scope): everything, as the CLI always saw it.
        let all = page(None, 1000, 0, None).await;
        assert_eq!(all.entries.len(), 73, "{url}");
        assert_eq!((all.total, all.matched), ((73, 7300), (73, 7300)), "{url}");
        // The domain admin of a.test pages through its 12, newest first, 5 at a time.
        let dora = scope(&["A.test."], &[]);
        let mut seen = Vec::new();
        for offset in [0, 5, 10, 15] {
            let p = page(Some(dora.clone()), 5, offset, None).await;
            assert_eq!((p.total, p.matched), ((12, 1200), (12, 1200)), "{url}");
            seen.extend(p.entries.into_iter().map(|e| e.id));
        }
        let mut want: Vec<String> = entries
            .iter()
            .filter(|e| {
                e.recipients
                    .iter()
                    .any(|r| r.to_ascii_lowercase().ends_with("@a.test"))
            })
            .map(|e| e.id.clone())
            .collect();
        want.reverse();
        assert_eq!(seen, want, "{url}");
        // A filter narrows what matched, not the total.
        let p = page(Some(dora.clone()), 5, 0, Some("jane@a.test")).await;
        assert_eq!(
            (p.total.0, p.matched.0, p.entries.len()),
            (12, 4, 4),
            "{url}"
        );
        // A user, by address (case ignored); `_` is no wildcard; an empty scope sees nothing.
        let bob = page(Some(scope(&[], &["bob@a.test"])), 100, 0, None).await;
        assert_eq!(bob.total.0, 4, "{url}");
        assert_eq!(
            page(Some(scope(&["a_test"], &[])), 100, 0, None)
                .await
                .total
                .0,
            1
        );
        assert_eq!(
            page(Some(scope(&["aXtest"], &[])), 100, 0, None)
                .await
                .total
                .0,
            0
        );
        let none = page(Some(scope(&[], &[])), 100, 0, None).await;
        assert_eq!((none.entries.len(), none.total.0), (0, 0), "{url}");

        // The log: mail from or to the scope; the limit counts the scope's events.
        let events: Vec<EventRecord> = entries
            .iter()
            .map(|e| EventRecord {
                event_id: format!("e-{}", e.id),
                at_unix_ms: e.at_unix_ms,
                stage: "scanned".into(),
                sender: e.sender.clone(),
                recipients: e.recipients.clone(),
                ..EventRecord::default()
            })
            .chain(std::iter::once(EventRecord {
                event_id: "e-from-a".into(),
                at_unix_ms: 500,
                stage: "received".into(),
                sender: "Boss@A.test".into(),
                recipients: vec!["far@d.test".into()],
                ..EventRecord::default()
            }))
            .collect();
        db.store_events(&events, false).await.unwrap();
        let search = |s: Option<Scope>, limit: u32| {
            let db = &db;
            async move {
                db.query_events(&EventFilter {
                    limit: Some(limit),
                    newest_first: true,
                    scope: s,
                    ..EventFilter::default()
                })
                .await
                .unwrap()
            }
        };
        assert_eq!(search(None, 1000).await.len(), 74, "{url}");
        let found = search(Some(dora.clone()), 1000).await;
        assert_eq!(found.len(), 13, "{url}");
        assert_eq!(found.last().unwrap().event_id, "e-from-a", "{url}");
        assert_eq!(search(Some(dora), 3).await.len(), 3, "{url}");
        assert_eq!(
            search(Some(scope(&[], &["boss@a.test"])), 10).await.len(),
            1
        );
        assert_eq!(search(Some(scope(&[], &[])), 10).await.len(), 0);
    }

    #[tokio::test]
    async fn scoped_pages_and_searches_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("mb-scope-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        check(&format!("sqlite://{}/mb.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn scoped_pages_and_searches_on_mariadb_and_postgresql() {
        let m =
            mb_testkit::MariaDb::start().expect("MariaDB starts (apt-get install mariadb-server)");
        check(&m.url()).await;
        let p =
            mb_testkit::Postgres::start().expect("PostgreSQL starts (apt-get install postgresql)");
        check(&p.url()).await;
    }
}
