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

use crate::db::QuarantineFilter;
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
        let entries = self
            .store
            .db
            .list_quarantine(&QuarantineFilter::from(req.into_inner()))
            .await
            .map_err(db_status)?
            .into_iter()
            .map(wire::to_wire)
            .collect();
        let (total, total_bytes) = self.store.db.quarantine_totals().await.map_err(db_status)?;
        Ok(Response::new(ListQuarantineResponse {
            entries,
            total,
            total_bytes,
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
