//! Where each recipient goes (Postfix's `trivial-rewrite` resolve step): the transport
//! table, then the relay host for the gateway's own domains, then the domain's MX.

use std::net::IpAddr;

use mb_core::Config;
use mb_core::route::{Hop, NextHop, Protocol};

use super::trouble::RouteError;

/// Where a recipient goes: the transport table first (exact domain, then `.parent`
/// entries), then the relay host for the gateway's own domains, then the domain's MX.
/// The bool says whether it is the relay host (whose TLS and AUTH settings apply). A
/// served domain with neither a relay host nor a transport entry has no route: its MX
/// is this gateway, so delivering there would loop.
pub fn route(
    cfg: &Config,
    transport: &[(String, NextHop)],
    address: &str,
) -> Result<(NextHop, bool), RouteError> {
    let domain = domain_of(address);
    if let Some(hop) = transport_entry(transport, &domain) {
        return Ok((hop.clone(), false));
    }
    if is_served(cfg, &domain) {
        return relay_host(cfg)
            .map(|hop| (hop, true))
            .ok_or(RouteError::ServedDomain { domain });
    }
    Ok((
        NextHop {
            protocol: Protocol::Smtp,
            hop: Hop::Mx {
                domain,
                port: cfg.port("queue.mx_port"),
            },
        },
        false,
    ))
}

/// Whether a transport entry routes `address` (an administrator chose its next hop).
pub fn in_transport(transport: &[(String, NextHop)], address: &str) -> bool {
    transport_entry(transport, &domain_of(address)).is_some()
}

/// Whether delivering to `ip` would deliver to this gateway itself: loopback, an
/// unspecified address (which connects to the local host), or one of `own` (the
/// listen addresses and the addresses of the host's interfaces).
pub fn is_self(ip: IpAddr, own: &[IpAddr]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || ip.is_unspecified() || own.contains(&ip)
}

/// This gateway's own addresses: its configured listen addresses and the addresses of
/// the host's interfaces (read each time: interfaces come and go).
pub fn own_addresses(cfg: &Config) -> Vec<IpAddr> {
    let mut own = cfg.ips("network.smtp.listen");
    own.extend(cfg.ips("network.smtp.listen_ipv6"));
    own.push(cfg.ip("network.reinject.listen"));
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                own.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                own.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    own
}

/// The domain of an address, lowercase, without the brackets of an address literal.
fn domain_of(address: &str) -> String {
    let domain = address
        .rsplit_once('@')
        .map_or(String::new(), |(_, d)| d.to_ascii_lowercase());
    domain
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The transport entry for `domain`: an exact entry, else the longest `.parent` one.
fn transport_entry<'a>(transport: &'a [(String, NextHop)], domain: &str) -> Option<&'a NextHop> {
    if let Some((_, hop)) = transport.iter().find(|(d, _)| d == domain) {
        return Some(hop);
    }
    transport
        .iter()
        .filter(|(d, _)| d.starts_with('.') && domain.ends_with(d.as_str()))
        .max_by_key(|(d, _)| d.len())
        .map(|(_, hop)| hop)
}

/// Whether `domain` is one of `smtp.domains` (a `.parent` entry covers its subdomains).
fn is_served(cfg: &Config, domain: &str) -> bool {
    cfg.list("smtp.domains").iter().any(|d| {
        let d = d.to_ascii_lowercase();
        match d.strip_prefix('.') {
            Some(parent) => domain.ends_with(&format!(".{parent}")),
            None => domain == d,
        }
    })
}

/// The configured relay host, if it is set and valid.
fn relay_host(cfg: &Config) -> Option<NextHop> {
    let relay = cfg.text("relay.host");
    if relay.is_empty() {
        return None;
    }
    mb_core::route::relay_next_hop(
        &relay,
        cfg.port("relay.port"),
        cfg.text("relay.protocol") == "lmtp",
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmgr::tests::config;

    #[test]
    fn routing_prefers_transport_then_relay_then_mx() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "[relay]\nhost = \"[10.0.0.1]\"\nport = 2525\ntransport = \"lmtp.example=lmtp:unix:/run/lmtp,.sub.example=smtp:[10.0.0.9]:25\"\n",
        );
        let t = mb_core::route::parse_transport(&cfg.list("relay.transport"), 25).unwrap();
        let r = |a| route(&cfg, &t, a).unwrap();
        assert_eq!(r("a@served.example").0.to_string(), "smtp:[10.0.0.1]:2525");
        assert!(r("a@served.example").1);
        assert_eq!(r("a@LMTP.example").0.to_string(), "lmtp:unix:/run/lmtp");
        assert_eq!(r("a@x.sub.example").0.to_string(), "smtp:[10.0.0.9]:25");
        assert_eq!(r("a@other.example").0.to_string(), "smtp:other.example:25");
        assert!(!r("a@other.example").1);
        // A served domain without a relay host would loop through its own MX.
        let bare = config(dir.path(), "");
        let err = route(&bare, &[], "a@served.example").unwrap_err();
        assert_eq!(
            err,
            RouteError::ServedDomain {
                domain: "served.example".into()
            }
        );
        let text = err.to_string();
        assert!(
            text.starts_with("451 4.3.5") && text.contains("relay.host"),
            "{text}"
        );
    }
}
