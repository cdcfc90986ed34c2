//! The `Policies` service: policies kept in the database, read by the filter workers,
//! managed and explained with `mb-policy`. The one conversion between the gRPC `Policy`
//! and the stored `db::PolicyRecord` lives here (the `Replica` service uses it too).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_core::policy;
use mb_proto::v1::policies_server::Policies;
use mb_proto::v1::{
    DeletePolicyResponse, ListPoliciesRequest, ListPoliciesResponse, Policy, PolicyRef,
    TestPolicyRequest, TestPolicyResponse,
};
use mb_runtime::policies::from_wire;
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::db::PolicyRecord;
use crate::store::Store;

pub struct PoliciesService {
    pub store: Arc<Store>,
}

fn db_status(e: crate::db::DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl Policies for PoliciesService {
    async fn add(&self, req: Request<Policy>) -> Result<Response<Policy>, Status> {
        let who = caller(&req).name.clone();
        self.store
            .refuse_on_child("policies are cluster-wide")
            .map_err(crate::grpc::status)?;
        let mut p = req.into_inner();
        p.id = 0;
        p.created_at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        from_wire(&p).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self
            .store
            .db
            .add_policy(&PolicyRecord::from(p.clone()))
            .await
            .map_err(db_status)?
        {
            return Err(Status::already_exists(format!(
                "a policy named {:?} exists (mb-policy del {0} first, or pick another name)",
                p.name
            )));
        }
        let stored = self
            .store
            .db
            .list_policies()
            .await
            .map_err(db_status)?
            .into_iter()
            .find(|x| x.name == p.name)
            .map(Policy::from)
            .ok_or_else(|| Status::internal("the new policy vanished"))?;
        tracing::info!(name = %stored.name, id = stored.id, action = %stored.action, object = %stored.object, pattern = %stored.pattern, by = %who, "policy added");
        Ok(Response::new(stored))
    }

    async fn list(
        &self,
        _req: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let policies = self
            .store
            .db
            .list_policies()
            .await
            .map_err(db_status)?
            .into_iter()
            .map(Policy::from)
            .collect();
        Ok(Response::new(ListPoliciesResponse { policies }))
    }

    async fn delete(
        &self,
        req: Request<PolicyRef>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let who = caller(&req).name.clone();
        self.store
            .refuse_on_child("policies are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        if !self
            .store
            .db
            .remove_policy(r.id, &r.name)
            .await
            .map_err(db_status)?
        {
            return Err(Status::not_found(format!(
                "no policy {} (mb-policy list shows them)",
                if r.id != 0 {
                    r.id.to_string()
                } else {
                    format!("{:?}", r.name)
                }
            )));
        }
        tracing::info!(id = r.id, name = %r.name, by = %who, "policy removed");
        Ok(Response::new(DeletePolicyResponse {}))
    }

    async fn test(
        &self,
        req: Request<TestPolicyRequest>,
    ) -> Result<Response<TestPolicyResponse>, Status> {
        let t = req.into_inner();
        let client_ip = if t.client_ip.is_empty() {
            None
        } else {
            Some(t.client_ip.parse().map_err(|_| {
                Status::invalid_argument(format!("{:?} is not an IP address", t.client_ip))
            })?)
        };
        let stored: Vec<Policy> = self
            .store
            .db
            .list_policies()
            .await
            .map_err(db_status)?
            .into_iter()
            .map(Policy::from)
            .collect();
        let core: Vec<policy::Policy> = stored.iter().filter_map(|p| from_wire(p).ok()).collect();
        let delimiter = self.store.effective().text("smtp.recipient_delimiter");
        let (best, explanation) = policy::decide(
            &core,
            &policy::Subject {
                sender: &t.sender,
                recipients: &t.recipients,
                client_ip,
                delimiter: &delimiter,
            },
        );
        let policy = best.and_then(|b| stored.iter().find(|p| p.id == b.id).cloned());
        Ok(Response::new(TestPolicyResponse {
            matched: policy.is_some(),
            policy,
            explanation,
        }))
    }
}

impl From<Policy> for PolicyRecord {
    fn from(p: Policy) -> Self {
        PolicyRecord {
            id: p.id,
            name: p.name,
            priority: p.priority,
            object: p.object,
            pattern: p.pattern,
            direction: p.direction,
            action: p.action,
            tag: p.tag,
            quarantine: p.quarantine,
            reject: p.reject,
            comment: p.comment,
            created_at: p.created_at_unix,
            unauthenticated: p.unauthenticated,
            recipient: p.recipient,
        }
    }
}

impl From<PolicyRecord> for Policy {
    fn from(p: PolicyRecord) -> Self {
        Policy {
            id: p.id,
            name: p.name,
            priority: p.priority,
            object: p.object,
            pattern: p.pattern,
            direction: p.direction,
            action: p.action,
            tag: p.tag,
            quarantine: p.quarantine,
            reject: p.reject,
            comment: p.comment,
            created_at_unix: p.created_at,
            unauthenticated: p.unauthenticated,
            recipient: p.recipient,
        }
    }
}
