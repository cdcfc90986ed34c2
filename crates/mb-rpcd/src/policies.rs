//! The `Policies` service: policies kept in the database, read by the filter workers,
//! managed and explained with `mb-policy`. The one conversion between the gRPC `Policy`
//! and the stored `db::PolicyRecord` lives here (the `Replica` service uses it too).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_core::policy;
use mb_proto::v1::policies_server::Policies;
use mb_proto::v1::{
    DeletePolicyResponse, ListPoliciesRequest, ListPoliciesResponse, Policy, PolicyRef,
    ReplacePolicyRequest, TestPolicyRequest, TestPolicyResponse,
};
use mb_runtime::policies::from_wire;
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::db::{Db, DbError, PolicyRecord};
use crate::store::Store;

pub struct PoliciesService {
    pub store: Arc<Store>,
}

fn db_status(e: DbError) -> Status {
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
        p.created_at_unix = now();
        validate(&p).map_err(|e| Status::invalid_argument(e.to_string()))?;
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

    async fn replace(
        &self,
        req: Request<ReplacePolicyRequest>,
    ) -> Result<Response<Policy>, Status> {
        let who = caller(&req).name.clone();
        self.store
            .refuse_on_child("policies are cluster-wide")
            .map_err(crate::grpc::status)?;
        let ReplacePolicyRequest { old, new } = req.into_inner();
        let old = old.unwrap_or_default();
        let mut p =
            new.ok_or_else(|| Status::invalid_argument("a replacement needs the new policy"))?;
        p.created_at_unix = now();
        match self
            .store
            .db
            .replace_policy(old.id, &old.name, PolicyRecord::from(p))
            .await
            .map_err(db_status)?
        {
            Replaced::Done(stored) => {
                let stored = Policy::from(*stored);
                tracing::info!(old_id = old.id, old_name = %old.name, name = %stored.name, id = stored.id, action = %stored.action, object = %stored.object, pattern = %stored.pattern, by = %who, "policy replaced");
                Ok(Response::new(stored))
            }
            Replaced::Invalid(why) => Err(Status::invalid_argument(why)),
            Replaced::NotFound => Err(Status::not_found(format!(
                "no policy {} (mb-policy list shows them)",
                if old.id != 0 {
                    old.id.to_string()
                } else {
                    format!("{:?}", old.name)
                }
            ))),
            Replaced::NameTaken(name) => Err(Status::already_exists(format!(
                "another policy is named {name:?} (pick another name, or remove that one first)"
            ))),
        }
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

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// The check Add and Replace make before storing: the policy must parse as the filter
/// workers will parse it.
fn validate(p: &Policy) -> Result<(), mb_core::policy::PolicyError> {
    from_wire(p).map(|_| ())
}

/// What a replacement did.
#[derive(Debug, PartialEq)]
pub enum Replaced {
    /// Stored under the old id; the row as it now is.
    Done(Box<PolicyRecord>),
    /// The new policy does not parse (why); nothing changed.
    Invalid(String),
    /// No policy by that id or name; nothing changed.
    NotFound,
    /// Another policy has the new name; nothing changed.
    NameTaken(String),
}

impl Db {
    /// Replaces the policy `id` (or named `name` when `id` is 0) by `new`, keeping its id,
    /// in one transaction: a crash or a lost connection leaves either the old policy or
    /// the new one, never neither. `new` is checked as Add checks it first. Like
    /// `add_policy` and `remove_policy` it writes no audit line and queues nothing for a
    /// cluster main: policies are changed on the main only, and children pull them by
    /// content (replica.rs), which an update in place changes as a delete and add would.
    pub async fn replace_policy(
        &self,
        id: i64,
        name: &str,
        new: PolicyRecord,
    ) -> Result<Replaced, DbError> {
        if let Err(why) = validate(&Policy::from(new.clone())) {
            return Ok(Replaced::Invalid(why.to_string()));
        }
        let mut tx = self.write_tx().await?;
        let old = if id != 0 {
            sqlx::query(self.sql("SELECT id FROM policies WHERE id = ?"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        } else {
            sqlx::query(self.sql("SELECT id FROM policies WHERE name = ?"))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
        };
        let Some(old) = old else {
            return Ok(Replaced::NotFound);
        };
        let old_id: i64 = sqlx::Row::try_get(&old, 0)?;
        let taken = sqlx::query(self.sql("SELECT 1 FROM policies WHERE name = ? AND id <> ?"))
            .bind(&new.name)
            .bind(old_id)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if taken {
            return Ok(Replaced::NameTaken(new.name));
        }
        sqlx::query(self.sql(
            "UPDATE policies SET name = ?, priority = ?, object = ?, pattern = ?, direction = ?, action = ?, \
             tag = ?, quarantine = ?, reject = ?, comment = ?, created_at = ?, unauthenticated = ?, recipient = ? \
             WHERE id = ?",
        ))
        .bind(&new.name)
        .bind(i64::from(new.priority))
        .bind(&new.object)
        .bind(&new.pattern)
        .bind(&new.direction)
        .bind(&new.action)
        .bind(new.tag)
        .bind(new.quarantine)
        .bind(new.reject)
        .bind(&new.comment)
        .bind(new.created_at)
        .bind(i64::from(new.unauthenticated))
        .bind(&new.recipient)
        .bind(old_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Replaced::Done(Box::new(PolicyRecord { id: old_id, ..new })))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, pattern: &str) -> PolicyRecord {
        PolicyRecord {
            name: name.into(),
            priority: 50,
            object: "address".into(),
            pattern: pattern.into(),
            direction: "from".into(),
            action: "allow".into(),
            comment: "first".into(),
            created_at: 1,
            unauthenticated: true,
            ..Default::default()
        }
    }

    /// A replacement keeps the id and changes every field; a refused one (a bad pattern,
    /// a taken name, no such policy) leaves every row as it was.
    async fn replace_keeps_the_id(url: &str) {
        let db = Db::open(url, 2).await.expect("the database opens");
        assert!(db.add_policy(&record("a", "*@a.test")).await.unwrap());
        assert!(db.add_policy(&record("b", "*@b.test")).await.unwrap());
        let before = db.list_policies().await.unwrap();
        let a = before.iter().find(|p| p.name == "a").unwrap().clone();

        let bad = PolicyRecord {
            object: "network".into(),
            pattern: "not-a-network/99".into(),
            ..record("a2", "")
        };
        assert!(
            matches!(
                db.replace_policy(a.id, "", bad).await.unwrap(),
                Replaced::Invalid(_)
            ),
            "{url}"
        );
        assert_eq!(db.list_policies().await.unwrap(), before, "{url}");
        assert_eq!(
            db.replace_policy(a.id, "", record("b", "*@c.test"))
                .await
                .unwrap(),
            Replaced::NameTaken("b".into()),
            "{url}"
        );
        assert_eq!(db.list_policies().await.unwrap(), before, "{url}");
        assert_eq!(
            db.replace_policy(0, "nobody", record("z", "*@z.test"))
                .await
                .unwrap(),
            Replaced::NotFound,
            "{url}"
        );
        assert_eq!(db.list_policies().await.unwrap(), before, "{url}");

        let new = PolicyRecord {
            name: "a-renamed".into(),
            priority: 7,
            object: "domain".into(),
            pattern: "*.d.test".into(),
            direction: "from-or-to".into(),
            action: "score".into(),
            tag: Some(2.5),
            quarantine: Some(6.0),
            reject: Some(12.0),
            comment: "second".into(),
            created_at: 9,
            unauthenticated: false,
            recipient: "u@d.test".into(),
            id: 0,
        };
        let Replaced::Done(stored) = db.replace_policy(0, "a", new.clone()).await.unwrap() else {
            panic!("{url}: the replacement is refused");
        };
        assert_eq!(
            *stored,
            PolicyRecord {
                id: a.id,
                ..new.clone()
            },
            "{url}"
        );
        let after = db.list_policies().await.unwrap();
        assert_eq!(after.len(), 2, "{url}");
        assert_eq!(
            after.iter().find(|p| p.id == a.id),
            Some(&PolicyRecord { id: a.id, ..new }),
            "{url}"
        );
        assert!(after.iter().all(|p| p.name != "a"), "{url}");
        // Its own name again is not a taken name.
        let again = record("a-renamed", "*@e.test");
        assert!(
            matches!(
                db.replace_policy(a.id, "", again).await.unwrap(),
                Replaced::Done(r) if r.id == a.id
            ),
            "{url}"
        );
    }

    #[tokio::test]
    async fn replace_keeps_the_id_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("mb-policies-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        replace_keeps_the_id(&format!("sqlite://{}/mb.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn replace_keeps_the_id_on_mariadb() {
        let db =
            mb_testkit::MariaDb::start().expect("MariaDB starts (apt-get install mariadb-server)");
        replace_keeps_the_id(&db.url()).await;
    }

    #[tokio::test]
    async fn replace_keeps_the_id_on_postgresql() {
        let db =
            mb_testkit::Postgres::start().expect("PostgreSQL starts (apt-get install postgresql)");
        replace_keeps_the_id(&db.url()).await;
    }
}
