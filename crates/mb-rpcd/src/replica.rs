//! The `Replica` service: what a cluster shares. The main's mb-cluster exports the
//! cluster-wide settings, policies and accounts; a child's mb-cluster imports the main's
//! snapshot, which is the only way those change on a child.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_proto::v1::replica_server::Replica;
use mb_proto::v1::{ExportRequest, ImportResponse, Policy, Setting, Snapshot, UserRecord};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::grpc::status;
use crate::store::Store;

pub struct ReplicaService {
    pub store: Arc<Store>,
}

fn db_status(e: crate::db::DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

/// A policy's content without its local id, for comparing nodes.
fn content(p: &Policy) -> Policy {
    Policy { id: 0, ..p.clone() }
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn export(&self, _req: Request<ExportRequest>) -> Result<Response<Snapshot>, Status> {
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
            .iter()
            .map(content)
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
        Ok(Response::new(Snapshot {
            version: 0,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
            settings,
            policies,
            users,
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

        // Policies: equal content stays (local ids differ between nodes), the rest is
        // replaced.
        let wanted: Vec<Policy> = snap.policies.iter().map(content).collect();
        let mut policies_changed = 0;
        let mut kept = Vec::new();
        for p in db.list_policies().await.map_err(db_status)? {
            if wanted.contains(&content(&p)) {
                kept.push(content(&p));
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
            db.add_policy(p).await.map_err(db_status)?;
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
        if settings_changed + policies_changed + users_changed > 0 {
            tracing::info!(
                version = snap.version,
                settings = settings_changed,
                policies = policies_changed,
                users = users_changed,
                by = %who.name,
                "cluster snapshot imported"
            );
        }
        Ok(Response::new(ImportResponse {
            settings_changed,
            policies_changed,
            users_changed,
        }))
    }
}
