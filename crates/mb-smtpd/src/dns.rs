//! DNS for delivery: MX hosts of a domain (RFC 5321 §5.1: by preference, the domain's
//! own address when it has no MX, RFC 7505 null MX) and the addresses of a host, through
//! hickory with the `network.dns.*` servers and cache. Those keys are live: the resolver
//! is rebuilt when one changes ([`Live::follow`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use mb_core::Config;

/// Why a lookup gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// The answer is final (no such domain, null MX): the recipients bounce.
    Permanent(String),
    /// Time out, server failure: try later.
    Transient(String),
}

pub enum Dns {
    Real(Arc<Live>),
    /// Fixed answers, for tests: MX records by domain, addresses by host.
    Fixed {
        mx: HashMap<String, Vec<(u16, String)>>,
        hosts: HashMap<String, Vec<IpAddr>>,
    },
}

/// Why no resolver could be made (a configuration error: exit 64).
#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    #[error("cannot read /etc/resolv.conf: {0}")]
    SystemConfig(String),
    #[error("cannot start the DNS resolver: {0}")]
    Start(String),
}

/// The resolver in use and the `network.dns.*` settings it was built from.
pub type Live = mb_runtime::rebuild::Rebuilt<TokioResolver>;

/// Rebuilds the delivery resolver on every change of `network.dns.*` from `follower`,
/// until `shutdown`.
pub fn follow(
    live: Arc<Live>,
    follower: &mb_runtime::follow::Follower,
    shutdown: mb_runtime::lifecycle::Shutdown,
) {
    live.follow(follower, shutdown, resolver);
}

fn resolver(cfg: &Config) -> Result<TokioResolver, DnsSetupError> {
    let (servers, opts) = mb_runtime::resolver_settings(cfg);
    let builder = match servers {
        Some(config) => TokioResolver::builder_with_config(
            config,
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        ),
        None => TokioResolver::builder_tokio()
            .map_err(|e| DnsSetupError::SystemConfig(e.to_string()))?,
    };
    builder
        .with_options(opts)
        .build()
        .map_err(|e| DnsSetupError::Start(e.to_string()))
}

impl Dns {
    /// A resolver for the configured servers (`system` reads /etc/resolv.conf).
    pub fn from_config(cfg: &Config) -> Result<Dns, DnsSetupError> {
        let names = mb_runtime::rebuild::Names {
            section: "network.dns.",
            settings: "DNS settings",
            user: "deliveries",
            value: "resolver",
        };
        Ok(Dns::Real(Arc::new(Live::new(names, cfg, resolver(cfg)?))))
    }

    /// The handle that keeps a real resolver current (`None` for fixed answers).
    pub fn live(&self) -> Option<Arc<Live>> {
        match self {
            Dns::Real(l) => Some(l.clone()),
            Dns::Fixed { .. } => None,
        }
    }

    /// The mail exchangers of `domain`, best first, as host names. A domain without MX
    /// records is its own mail exchanger (RFC 5321 §5.1).
    pub async fn mx(&self, domain: &str) -> Result<Vec<String>, DnsFailure> {
        let records: Vec<(u16, String)> = match self {
            Dns::Fixed { mx, .. } => match mx.get(domain) {
                Some(list) => list.clone(),
                None => Vec::new(),
            },
            Dns::Real(live) => match live.current().mx_lookup(format!("{domain}.")).await {
                Ok(l) => l
                    .answers()
                    .iter()
                    .filter_map(|rec| match &rec.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect(),
                Err(e) if e.is_nx_domain() => {
                    return Err(DnsFailure::Permanent(format!(
                        "550 5.1.2 domain {domain} does not exist (DNS NXDOMAIN)"
                    )));
                }
                Err(e) if e.is_no_records_found() => Vec::new(),
                Err(e) => return Err(transient(domain, "MX", &e)),
            },
        };
        // RFC 7505: a single MX of "." says the domain accepts no mail.
        if records.len() == 1 && (records[0].1 == "." || records[0].1.is_empty()) {
            return Err(DnsFailure::Permanent(format!(
                "556 5.1.10 domain {domain} accepts no mail (null MX)"
            )));
        }
        if records.is_empty() {
            return Ok(vec![domain.to_string()]);
        }
        let mut records: Vec<(u16, String)> = records
            .into_iter()
            .filter(|(_, h)| h != "." && !h.is_empty())
            .map(|(p, h)| (p, h.trim_end_matches('.').to_ascii_lowercase()))
            .collect();
        // Stable: equal preferences keep the order the server gave (servers rotate them).
        records.sort_by_key(|(p, _)| *p);
        let mut hosts: Vec<String> = Vec::new();
        for (_, h) in records {
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        Ok(hosts)
    }

    /// The addresses of a host (A, then AAAA when `v6`). An IP literal is itself.
    pub async fn addresses(&self, host: &str, v6: bool) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        match self {
            Dns::Fixed { hosts, .. } => hosts
                .get(host)
                .cloned()
                .ok_or_else(|| DnsFailure::Permanent(format!("550 5.1.2 host {host} not found"))),
            Dns::Real(live) => {
                let r = live.current();
                let name = format!("{host}.");
                let mut out = Vec::new();
                let mut failure = None;
                match r.ipv4_lookup(name.clone()).await {
                    Ok(l) => out.extend(l.answers().iter().filter_map(|rec| match &rec.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        _ => None,
                    })),
                    Err(e) if e.is_nx_domain() => {
                        return Err(DnsFailure::Permanent(format!(
                            "550 5.1.2 host {host} does not exist (DNS NXDOMAIN)"
                        )));
                    }
                    Err(e) if e.is_no_records_found() => {}
                    Err(e) => failure = Some(transient(host, "A", &e)),
                }
                if v6 {
                    match r.ipv6_lookup(name).await {
                        Ok(l) => out.extend(l.answers().iter().filter_map(|rec| match &rec.data {
                            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                            _ => None,
                        })),
                        Err(e) if e.is_no_records_found() => {}
                        Err(e) => failure = failure.or(Some(transient(host, "AAAA", &e))),
                    }
                }
                if out.is_empty() {
                    return Err(failure.unwrap_or_else(|| {
                        DnsFailure::Permanent(format!("550 5.1.2 host {host} has no address"))
                    }));
                }
                Ok(out)
            }
        }
    }
}

fn transient(name: &str, kind: &str, e: &NetError) -> DnsFailure {
    DnsFailure::Transient(format!("451 4.4.3 DNS {kind} lookup of {name} failed: {e}"))
}
