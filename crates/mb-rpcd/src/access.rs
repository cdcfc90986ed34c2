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

/// An address or a network (`192.0.2.0/24`, `2001:db8::/64`) in the form it is stored
/// in: an address alone, a network by its first address (`192.0.2.9/24` is
/// `192.0.2.0/24`), so that one entry has one spelling.
fn ip(s: &str) -> Result<String, Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "{s:?} is not an IP address or network (192.0.2.1, 192.0.2.0/24, 2001:db8::/64)"
        ))
    };
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(addr.to_string());
    }
    let net: ipnet::IpNet = s.parse().map_err(|_| bad())?;
    // Wider than a /8 or a /16 would shut out a good part of the internet at once.
    let min = if net.addr().is_ipv4() { 8 } else { 16 };
    if net.prefix_len() < min {
        return Err(Status::invalid_argument(format!(
            "{s}: a network must be /{min} or narrower"
        )));
    }
    if net.prefix_len() == net.max_prefix_len() {
        return Ok(net.addr().to_string());
    }
    Ok(net.trunc().to_string())
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
        e.ip = addr;
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
        let addr = ip(&r.ip)?;
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

#[cfg(test)]
mod tests {
    use super::ip;

    #[test]
    fn addresses_and_networks_have_one_spelling() {
        for (input, stored) in [
            ("192.0.2.7", Some("192.0.2.7")),
            ("192.0.2.7/32", Some("192.0.2.7")),
            ("192.0.2.7/24", Some("192.0.2.0/24")),
            ("2001:DB8::1", Some("2001:db8::1")),
            ("2001:db8:0:0:1::/64", Some("2001:db8::/64")),
            ("2001:db8::/128", Some("2001:db8::")),
            ("10.0.0.0/7", None),
            ("2001::/15", None),
            ("192.0.2.0/33", None),
            ("example.com", None),
        ] {
            assert_eq!(ip(input).ok().as_deref(), stored, "{input}");
        }
    }
}
