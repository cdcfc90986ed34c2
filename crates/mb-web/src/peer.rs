//! Who is on the other end of a connection, put into every request's extensions before
//! any route runs: the Unix socket's peer credentials (SO_PEERCRED) or the TCP client's
//! address. Authentication (`crate::auth`) trusts a local administrator from it, and the
//! rate limiter keys on it.

use std::net::{IpAddr, SocketAddr};

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::problem::Problem;

/// The peer of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on `mb-web.sock` (nginx in front, a tool, a test), by its credentials.
    Local {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        /// The client nginx says it forwards (`X-Real-IP`, else the last
        /// `X-Forwarded-For`); only the rate limiter uses it, never authentication.
        forwarded: Option<IpAddr>,
    },
    /// A client of the HTTPS (or HTTP) listener.
    Remote { addr: SocketAddr, tls: bool },
}

impl Peer {
    /// Root or mb-web's own user on the socket: the machine's administrator, who could
    /// read every file mb-web reads anyway.
    pub fn is_local_admin(&self) -> bool {
        match self {
            Peer::Local { uid, .. } => *uid == 0 || *uid == nix::unistd::Uid::effective().as_raw(),
            Peer::Remote { .. } => false,
        }
    }

    /// The address requests are counted against for rate limiting; `None` for a local
    /// process that forwards nobody (tools on the socket are not limited).
    pub fn client_ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Local { forwarded, .. } => *forwarded,
            Peer::Remote { addr, .. } => Some(canonical(addr.ip())),
        }
    }

    /// How log lines name the client (`client=IP`, or the local user).
    pub fn describe(&self) -> String {
        match self {
            Peer::Local {
                forwarded: Some(ip),
                ..
            } => ip.to_string(),
            Peer::Local { uid, .. } => format!("local:{}", mb_runtime::uds::user_name(*uid)),
            Peer::Remote { addr, .. } => canonical(addr.ip()).to_string(),
        }
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 client they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Middleware for the Unix socket: turns tonic's connection info into a [`Peer`]. A
/// request without credentials (never expected on a Unix socket) is refused.
pub async fn from_socket(mut req: Request, next: Next) -> Response {
    if req.extensions().get::<Peer>().is_none() {
        let cred = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        let Some(cred) = cred else {
            return Problem::forbidden("peer credentials unavailable on the socket")
                .into_response();
        };
        let forwarded = forwarded_for(req.headers());
        req.extensions_mut().insert(Peer::Local {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            forwarded,
        });
    }
    next.run(req).await
}

/// The client address a proxy in front forwards.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-real-ip")
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| {
            header("x-forwarded-for")
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse().ok())
        })
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_take_the_proxys_word() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h), None);
        h.insert(
            "x-forwarded-for",
            "198.51.100.7, 192.0.2.9".parse().unwrap(),
        );
        assert_eq!(forwarded_for(&h), Some("192.0.2.9".parse().unwrap()));
        h.insert("x-real-ip", "::ffff:203.0.113.5".parse().unwrap());
        assert_eq!(forwarded_for(&h), Some("203.0.113.5".parse().unwrap()));
    }

    #[test]
    fn only_root_or_our_own_user_is_a_local_admin() {
        let me = nix::unistd::Uid::effective().as_raw();
        let local = |uid| Peer::Local {
            uid,
            gid: 0,
            pid: None,
            forwarded: None,
        };
        assert!(local(0).is_local_admin());
        assert!(local(me).is_local_admin());
        assert!(!local(65534).is_local_admin() || me == 65534);
        let remote = Peer::Remote {
            addr: "127.0.0.1:5000".parse().unwrap(),
            tls: true,
        };
        assert!(!remote.is_local_admin());
        assert_eq!(local(me).client_ip(), None);
    }
}
