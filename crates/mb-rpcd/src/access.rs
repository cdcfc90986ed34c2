//! The `Access` service: banned and trusted client addresses for the protection modes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_proto::v1::access_server::Access;
use mb_proto::v1::{
    AccessEntry, ListAccessRequest, ListAccessResponse, RemoveAccessRequest, RemoveAccessResponse,
};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::db::AccessRecord;
use crate::store::Store;

/// The longest ban or trust: a year.
const MAX_SECONDS: u64 = 365 * 86_400;

pub struct AccessService {
    pub store: Arc<Store>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn kind(k: &str) -> Result<&'static str, Status> {
    match k {
        "ban" => Ok("ban"),
        "trust" => Ok("trust"),
        _ => Err(Status::invalid_argument(format!(
            "kind must be ban or trust, not {k:?}"
        ))),
    }
}

fn ip(s: &str) -> Result<IpAddr, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("{s:?} is not an IP address")))
}

fn db_status(e: crate::db::DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl Access for AccessService {
    async fn list(
        &self,
        req: Request<ListAccessRequest>,
    ) -> Result<Response<ListAccessResponse>, Status> {
        let k = req.into_inner().kind;
        let k = if k.is_empty() { None } else { Some(kind(&k)?) };
        let now = now();
        let entries = self
            .store
            .db
            .list_access(k, now)
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|r| to_wire(r, now))
            .collect();
        Ok(Response::new(ListAccessResponse { entries }))
    }

    async fn add(&self, req: Request<AccessEntry>) -> Result<Response<AccessEntry>, Status> {
        let who = caller(&req).name;
        let mut e = req.into_inner();
        let k = kind(&e.kind)?;
        let addr = ip(&e.ip)?;
        if e.seconds == 0 || e.seconds > MAX_SECONDS {
            return Err(Status::invalid_argument(
                "the duration must be between 1 second and 365 days",
            ));
        }
        e.ip = addr.to_string();
        e.reason.truncate(255);
        if e.added_by.is_empty() {
            e.added_by = who;
        }
        e.created_at_unix = now();
        let until = e.created_at_unix + i64::try_from(e.seconds).unwrap_or(0);
        self.store
            .db
            .put_access(&e.ip, k, until, &e.reason, &e.added_by, e.created_at_unix)
            .await
            .map_err(db_status)?;
        tracing::info!(ip = %e.ip, kind = k, seconds = e.seconds, by = %e.added_by, reason = %e.reason, "access entry added");
        Ok(Response::new(e))
    }

    async fn remove(
        &self,
        req: Request<RemoveAccessRequest>,
    ) -> Result<Response<RemoveAccessResponse>, Status> {
        let who = caller(&req).name;
        let r = req.into_inner();
        let k = kind(&r.kind)?;
        let addr = ip(&r.ip)?.to_string();
        let removed = self
            .store
            .db
            .remove_access(&addr, k)
            .await
            .map_err(db_status)?;
        if removed {
            tracing::info!(ip = %addr, kind = k, by = %who, "access entry removed");
        }
        Ok(Response::new(RemoveAccessResponse { removed }))
    }
}

/// A stored entry as `List` answers it: with the seconds left at `now`.
fn to_wire(r: AccessRecord, now: i64) -> AccessEntry {
    AccessEntry {
        seconds: u64::try_from(r.until - now).unwrap_or(0),
        ip: r.ip,
        kind: r.kind,
        reason: r.reason,
        added_by: r.added_by,
        created_at_unix: r.created_at,
    }
}
