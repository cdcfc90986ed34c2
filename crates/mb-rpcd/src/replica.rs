//! The `Replica` service: what a cluster shares. The main's mb-cluster exports the
//! cluster-wide settings, policies and accounts; a child's mb-cluster imports the main's
//! snapshot, which is the only way those change on a child.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_proto::v1::AccountAlias;
use mb_proto::v1::replica_server::{Replica, ReplicaServer};
use mb_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, ExportRequest, ImportResponse, IngestRequest,
    MessageEvent, OutboxBatch, OutboxItem, OutboxRequest, Policy, Setting, Snapshot, UploadAck,
    UserRecord,
};
use mb_runtime::quarantine::wire;
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::db::{EventRecord, OutboxChange, PolicyRecord};
use crate::grpc::status;
use crate::store::Store;

pub struct ReplicaService {
    pub store: Arc<Store>,
}

/// The largest Replica message either way: a snapshot carries the whole recipient list
/// (about 30 bytes a pattern: 150,000 recipients are past tonic's 4 MiB default, which
/// would stop replication silently). The same bound as mb-smtpd's Recipients.List and
/// mb-cluster's.
pub const MAX_MESSAGE: usize = 256 << 20;

/// The Replica service as mb-rpcd serves it: behind `guard`, with `MAX_MESSAGE` limits.
pub fn server<G: tonic::service::Interceptor>(
    store: Arc<Store>,
    guard: G,
) -> tonic::service::interceptor::InterceptedService<ReplicaServer<ReplicaService>, G> {
    tonic::service::interceptor::InterceptedService::new(
        ReplicaServer::new(ReplicaService { store })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        guard,
    )
}

fn db_status(e: crate::db::DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

/// The largest DKIM key file shared (a 4096-bit RSA key in PEM is about 3.3 KB).
const MAX_KEY: usize = 64 << 10;

/// Writes the DKIM key when it differs: a temporary file (0600), fsynced, renamed into
/// place; the filter workers notice the new modification time.
async fn write_key(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    if tokio::fs::read_to_string(path).await.ok().as_deref() == Some(pem) {
        return Ok(());
    }
    let (path, pem) = (path.to_path_buf(), pem.to_string());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(".dkim-key.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        tracing::info!(path = %path.display(), "DKIM key taken from the cluster main");
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A policy's content without its local id, for comparing nodes.
fn content(p: &Policy) -> Policy {
    Policy { id: 0, ..p.clone() }
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn export(&self, req: Request<ExportRequest>) -> Result<Response<Snapshot>, Status> {
        // A snapshot carries secret overrides and password hashes: not mb-web's to read.
        if crate::secrets::is_web(&caller(&req)) {
            return Err(Status::permission_denied(
                "the cluster snapshot carries secrets: mb-web's user may not export it",
            ));
        }
        let settings = self
            .store
            .cluster_settings()
            .into_iter()
            .map(|(key, value)| Setting { key, value })
            .collect();
        let policies = self
            .store
            .db
            .list_policies()
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|p| content(&Policy::from(p)))
            .collect();
        let users = self
            .store
            .db
            .user_records()
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|(name, password_hash)| UserRecord {
                name,
                password_hash,
            })
            .collect();
        // Sender aliases (sender binding), without their local creation times.
        let aliases = self
            .store
            .db
            .aliases(None)
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|(username, address, _)| AccountAlias {
                username,
                address,
                created_at_unix: 0,
            })
            .collect();
        // Valid recipients (list mode), without their local creation times.
        let recipients = self
            .store
            .db
            .list_recipients(None)
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|r| mb_proto::v1::RecipientEntry {
                pattern: r.pattern,
                comment: r.comment,
                created_unix: 0,
            })
            .collect();
        let cfg = self.store.effective();
        let dkim_key_pem = if cfg.bool("dkim.sign") {
            let path = cfg.path("dkim.key");
            match tokio::fs::read_to_string(&path).await {
                Ok(pem) if pem.len() <= MAX_KEY => pem,
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "the DKIM key is too large to share with the cluster");
                    String::new()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "cannot read the DKIM key to share with the cluster");
                    String::new()
                }
            }
        } else {
            String::new()
        };
        Ok(Response::new(Snapshot {
            dkim_key_pem,
            version: 0,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
            settings,
            policies,
            users,
            aliases,
            recipients,
        }))
    }

    async fn import(&self, req: Request<Snapshot>) -> Result<Response<ImportResponse>, Status> {
        let who = caller(&req);
        if self.store.cluster_main().is_none() {
            return Err(Status::failed_precondition(
                "this node is not a cluster child (cluster.enabled and cluster.role = child): \
                 it keeps its own configuration",
            ));
        }
        let snap = req.into_inner();
        let settings: Vec<(String, String)> = snap
            .settings
            .into_iter()
            .map(|s| (s.key, s.value))
            .collect();
        let settings_changed = self
            .store
            .import_settings(&settings, &who)
            .await
            .map_err(status)?;
        let db = &self.store.db;
        if !snap.dkim_key_pem.is_empty() {
            let path = self.store.effective().path("dkim.key");
            write_key(&path, &snap.dkim_key_pem)
                .await
                .map_err(|e| {
                    tracing::error!(path = %path.display(), cause = %e, "cannot write the cluster's DKIM key");
                    Status::internal(format!("cannot write the DKIM key {}: {e}", path.display()))
                })?;
        }

        // Policies: equal content stays (local ids differ between nodes), the rest is
        // replaced.
        let wanted: Vec<Policy> = snap.policies.iter().map(content).collect();
        let mut policies_changed = 0;
        let mut kept = Vec::new();
        for p in db.list_policies().await.map_err(db_status)? {
            let same = content(&Policy::from(p.clone()));
            if wanted.contains(&same) {
                kept.push(same);
            } else {
                db.remove_policy(p.id, "").await.map_err(db_status)?;
                policies_changed += 1;
            }
        }
        for p in wanted.iter().filter(|p| !kept.contains(p)) {
            if let Err(e) = mb_runtime::policies::from_wire(p) {
                tracing::warn!(policy = %p.name, cause = %e, "cannot apply a policy from the main");
                continue;
            }
            db.add_policy(&PolicyRecord::from(p.clone()))
                .await
                .map_err(db_status)?;
            policies_changed += 1;
        }

        let wanted: BTreeMap<String, String> = snap
            .users
            .into_iter()
            .map(|u| (u.name, u.password_hash))
            .collect();
        let have: BTreeMap<String, String> = db
            .user_records()
            .await
            .map_err(db_status)?
            .into_iter()
            .collect();
        let at = snap.created_unix;
        let mut users_changed = 0;
        for (name, hash) in &wanted {
            match have.get(name) {
                Some(h) if h == hash => continue,
                Some(_) => db.set_user_hash(name, hash, at).await.map_err(db_status)?,
                None => db.add_user(name, hash, at).await.map_err(db_status)?,
            };
            users_changed += 1;
        }
        for name in have.keys().filter(|n| !wanted.contains_key(*n)) {
            db.remove_user(name).await.map_err(db_status)?;
            users_changed += 1;
        }
        // Aliases: the main's set, exactly.
        let wanted: std::collections::BTreeSet<(String, String)> = snap
            .aliases
            .into_iter()
            .map(|a| (a.username, a.address))
            .collect();
        let have: std::collections::BTreeSet<(String, String)> = db
            .aliases(None)
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|(u, a, _)| (u, a))
            .collect();
        for (user, address) in wanted.difference(&have) {
            db.add_alias(user, address, at).await.map_err(db_status)?;
            users_changed += 1;
        }
        for (user, address) in have.difference(&wanted) {
            db.remove_alias(user, address).await.map_err(db_status)?;
            users_changed += 1;
        }
        // Valid recipients: the main's list, exactly.
        let recipients_changed = crate::recipients::import_from_main(db, &snap.recipients)
            .await
            .map_err(db_status)?;
        if settings_changed + policies_changed + users_changed + recipients_changed > 0 {
            tracing::info!(
                version = snap.version,
                settings = settings_changed,
                policies = policies_changed,
                users = users_changed,
                recipients = recipients_changed,
                by = %who.name,
                "cluster snapshot imported"
            );
        }
        Ok(Response::new(ImportResponse {
            settings_changed,
            policies_changed,
            users_changed,
            recipients_changed,
        }))
    }

    async fn outbox(&self, req: Request<OutboxRequest>) -> Result<Response<OutboxBatch>, Status> {
        let (items, pending) = self
            .store
            .db
            .outbox(req.get_ref().limit)
            .await
            .map_err(db_status)?;
        let items = items.into_iter().map(OutboxItem::from).collect();
        Ok(Response::new(OutboxBatch { items, pending }))
    }

    async fn acknowledge(
        &self,
        req: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        self.store
            .db
            .acknowledge_outbox(&req.get_ref().seqs)
            .await
            .map_err(db_status)?;
        Ok(Response::new(AcknowledgeResponse {}))
    }

    async fn ingest(&self, req: Request<IngestRequest>) -> Result<Response<UploadAck>, Status> {
        if !self.store.effective().is_cluster_main() {
            return Err(Status::failed_precondition(
                "this node is not a cluster main: it takes no other node's events",
            ));
        }
        let r = req.into_inner();
        let db = &self.store.db;
        let mut ack = UploadAck::default();
        // In order: an entry added then removed on the child ends removed here too.
        let mut events = Vec::new();
        for item in r.items {
            if let Some(e) = item.event {
                let mut e = EventRecord::from(e);
                e.node.clone_from(&r.node);
                events.push(e);
                continue;
            }
            if !events.is_empty() {
                ack.events += u32::try_from(events.len()).unwrap_or(u32::MAX);
                db.store_events(&std::mem::take(&mut events), false)
                    .await
                    .map_err(db_status)?;
            }
            if let Some(q) = item.quarantined {
                let mut q = match wire::from_wire(q) {
                    Ok(q) => q,
                    Err(bad) => {
                        tracing::warn!(node = %r.node, id = %bad.id, "ignored a malformed quarantine entry from a child");
                        continue;
                    }
                };
                q.node.clone_from(&r.node);
                db.add_quarantine(&q, false).await.map_err(db_status)?;
                ack.quarantine += 1;
            } else if !item.unquarantined.is_empty() {
                // Only that node's entry: a child cannot remove another node's.
                if db
                    .quarantine_entry(&item.unquarantined)
                    .await
                    .map_err(db_status)?
                    .is_some_and(|q| q.node == r.node)
                {
                    db.remove_quarantine(&item.unquarantined, false)
                        .await
                        .map_err(db_status)?;
                }
                ack.quarantine += 1;
            }
        }
        if !events.is_empty() {
            ack.events += u32::try_from(events.len()).unwrap_or(u32::MAX);
            db.store_events(&events, false).await.map_err(db_status)?;
        }
        Ok(Response::new(ack))
    }
}

impl From<crate::db::OutboxItem> for OutboxItem {
    fn from(item: crate::db::OutboxItem) -> Self {
        let mut out = OutboxItem {
            seq: item.seq,
            ..OutboxItem::default()
        };
        match item.change {
            OutboxChange::Event(e) => out.event = Some(MessageEvent::from(e)),
            OutboxChange::Quarantined(e) => out.quarantined = Some(wire::to_wire(e)),
            OutboxChange::Unquarantined(id) => out.unquarantined = id,
            OutboxChange::Gone => {}
        }
        out
    }
}
