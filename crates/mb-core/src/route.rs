//! Next hops as the administrator writes them, in Postfix's transport syntax:
//! `smtp:[host]:port` (that host, no MX lookup), `smtp:host:port` (the MX hosts of
//! `host`), `lmtp:[host]:port`, `lmtp:unix:/path`. Used by `relay.transport`
//! (`DOMAIN=NEXTHOP` entries) and, for the relay host, by `relay.host`.

use std::path::PathBuf;

/// Protocol spoken to a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// Where a next hop is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Hop {
    /// The MX hosts of a domain (A/AAAA when it has none), on `port`.
    Mx { domain: String, port: u16 },
    /// One host (name or IP literal), no MX lookup.
    Host { host: String, port: u16 },
    /// A Unix socket (LMTP only).
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NextHop {
    pub protocol: Protocol,
    pub hop: Hop,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.protocol {
            Protocol::Smtp => "smtp",
            Protocol::Lmtp => "lmtp",
        };
        match &self.hop {
            Hop::Mx { domain, port } => write!(f, "{p}:{domain}:{port}"),
            Hop::Host { host, port } => write!(f, "{p}:[{host}]:{port}"),
            Hop::Unix(path) => write!(f, "{p}:unix:{}", path.display()),
        }
    }
}

/// Why a next hop, a `relay.transport` entry or the relay host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A next hop that is not in the transport syntax.
    #[error(
        "{text:?} is not a next hop ({fault}); write smtp:[host]:port, smtp:domain, lmtp:[host]:port or lmtp:unix:/path"
    )]
    NextHop { text: String, fault: HopFault },
    /// A `relay.transport` entry without `=`.
    #[error(
        "relay.transport entry {entry:?} is not DOMAIN=NEXTHOP (for example example.org=smtp:[10.0.0.5]:25)"
    )]
    NotTransportEntry { entry: String },
    /// A `relay.transport` entry whose domain is not one.
    #[error("relay.transport entry {entry:?}: {domain:?} is not a domain")]
    TransportDomain { entry: String, domain: String },
    /// A `relay.transport` entry whose next hop does not parse.
    #[error(
        "relay.transport entry {entry:?}: {text:?} is not a next hop ({fault}); write smtp:[host]:port, smtp:domain, lmtp:[host]:port or lmtp:unix:/path"
    )]
    TransportNextHop {
        entry: String,
        text: String,
        fault: HopFault,
    },
    /// `relay.host = "unix:..."` without LMTP or without an absolute path.
    #[error(
        "relay.host {host:?}: a Unix socket needs relay.protocol = \"lmtp\" and an absolute path"
    )]
    RelayUnix { host: String },
    /// `relay.host` is neither a host name, an IP address nor `unix:/path`.
    #[error("relay.host {host:?} is not a host name, IP address or unix:/path")]
    RelayHost { host: String },
}

/// What is wrong with a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopFault {
    NoProtocol,
    UnknownProtocol,
    /// `unix:` with smtp, or with a relative path.
    UnixSocket,
    UnclosedBracket,
    BadPort,
    BadHost,
}

impl std::fmt::Display for HopFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HopFault::NoProtocol => "no protocol",
            HopFault::UnknownProtocol => "the protocol must be smtp or lmtp",
            HopFault::UnixSocket => "a Unix socket needs lmtp and an absolute path",
            HopFault::UnclosedBracket => "unclosed [",
            HopFault::BadPort => "bad port",
            HopFault::BadHost => "bad host name",
        })
    }
}

fn valid_host(h: &str) -> bool {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Parses `smtp:[host]:port`, `smtp:host`, `lmtp:unix:/path`, ... A missing port is
/// `default_port` for SMTP and 24 for LMTP.
pub fn parse_next_hop(text: &str, default_port: u16) -> Result<NextHop, RouteError> {
    let bad = |fault| RouteError::NextHop {
        text: text.to_string(),
        fault,
    };
    let (proto, rest) = text
        .split_once(':')
        .ok_or_else(|| bad(HopFault::NoProtocol))?;
    let protocol = match proto {
        "smtp" => Protocol::Smtp,
        "lmtp" => Protocol::Lmtp,
        _ => return Err(bad(HopFault::UnknownProtocol)),
    };
    if let Some(path) = rest.strip_prefix("unix:") {
        if protocol != Protocol::Lmtp || !path.starts_with('/') {
            return Err(bad(HopFault::UnixSocket));
        }
        return Ok(NextHop {
            protocol,
            hop: Hop::Unix(PathBuf::from(path)),
        });
    }
    let default_port = if protocol == Protocol::Lmtp {
        24
    } else {
        default_port
    };
    let (host, bracketed, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| bad(HopFault::UnclosedBracket))?;
        let port = match after {
            "" => default_port,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(HopFault::BadPort))?,
        };
        (host, true, port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                false,
                p.parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad(HopFault::BadPort))?,
            ),
            None => (rest, false, default_port),
        }
    };
    if !valid_host(host) {
        return Err(bad(HopFault::BadHost));
    }
    let hop = if bracketed || protocol == Protocol::Lmtp || host.parse::<std::net::IpAddr>().is_ok()
    {
        Hop::Host {
            host: host.to_string(),
            port,
        }
    } else {
        Hop::Mx {
            domain: host.to_ascii_lowercase(),
            port,
        }
    };
    Ok(NextHop { protocol, hop })
}

/// Parses the `relay.transport` list: `DOMAIN=NEXTHOP` entries; `.example.org` matches
/// the subdomains of example.org.
pub fn parse_transport(
    entries: &[String],
    mx_port: u16,
) -> Result<Vec<(String, NextHop)>, RouteError> {
    entries
        .iter()
        .map(|e| {
            let (domain, hop) = e
                .split_once('=')
                .ok_or_else(|| RouteError::NotTransportEntry { entry: e.clone() })?;
            let domain = domain.trim().to_ascii_lowercase();
            if !valid_host(domain.trim_start_matches('.')) {
                return Err(RouteError::TransportDomain {
                    entry: e.clone(),
                    domain,
                });
            }
            let hop = parse_next_hop(hop.trim(), mx_port).map_err(|why| match why {
                RouteError::NextHop { text, fault } => RouteError::TransportNextHop {
                    entry: e.clone(),
                    text,
                    fault,
                },
                other => other,
            })?;
            Ok((domain, hop))
        })
        .collect()
}

/// The relay host as `relay.host`/`relay.port`/`relay.protocol` describe it: a name or
/// IP (in brackets or not: the relay host is never looked up by MX), or `unix:/path`
/// for LMTP.
pub fn relay_next_hop(host: &str, port: u16, lmtp: bool) -> Result<NextHop, RouteError> {
    let protocol = if lmtp { Protocol::Lmtp } else { Protocol::Smtp };
    if let Some(path) = host.strip_prefix("unix:") {
        if !lmtp || !path.starts_with('/') {
            return Err(RouteError::RelayUnix {
                host: host.to_string(),
            });
        }
        return Ok(NextHop {
            protocol,
            hop: Hop::Unix(PathBuf::from(path)),
        });
    }
    let name = host.trim_start_matches('[').trim_end_matches(']');
    if !valid_host(name) {
        return Err(RouteError::RelayHost {
            host: host.to_string(),
        });
    }
    Ok(NextHop {
        protocol,
        hop: Hop::Host {
            host: name.to_string(),
            port,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_parse_like_postfix_transport_entries() {
        let h = |t| parse_next_hop(t, 25);
        assert_eq!(
            h("smtp:[10.0.0.5]:2525").unwrap().hop,
            Hop::Host {
                host: "10.0.0.5".into(),
                port: 2525
            }
        );
        assert_eq!(
            h("smtp:mx.Example.org").unwrap().hop,
            Hop::Mx {
                domain: "mx.example.org".into(),
                port: 25
            }
        );
        assert_eq!(
            h("lmtp:unix:/run/dovecot/lmtp").unwrap().hop,
            Hop::Unix("/run/dovecot/lmtp".into())
        );
        assert_eq!(
            h("lmtp:[127.0.0.1]").unwrap().hop,
            Hop::Host {
                host: "127.0.0.1".into(),
                port: 24
            }
        );
        assert_eq!(h("smtp:[::1]:25").unwrap().to_string(), "smtp:[::1]:25");
        for bad in [
            "",
            "smtp",
            "uucp:host",
            "smtp:unix:/x",
            "lmtp:unix:rel",
            "smtp:[h:1",
            "smtp:h:0",
            "smtp:h:x",
            "smtp:bad_host",
            "smtp:a..b",
        ] {
            assert!(h(bad).is_err(), "{bad} accepted");
        }
        let t = parse_transport(
            &[
                "Example.org = smtp:[10.0.0.5]:25".into(),
                ".sub.example=lmtp:unix:/s".into(),
            ],
            25,
        )
        .unwrap();
        assert_eq!(t[0].0, "example.org");
        assert_eq!(t[1].0, ".sub.example");
        assert!(
            parse_transport(&["example.org".into()], 25)
                .unwrap_err()
                .to_string()
                .contains("DOMAIN=NEXTHOP")
        );
        assert_eq!(
            parse_transport(&["example.org=smtp:h:0".into()], 25)
                .unwrap_err()
                .to_string(),
            "relay.transport entry \"example.org=smtp:h:0\": \"smtp:h:0\" is not a next hop (bad port); write smtp:[host]:port, smtp:domain, lmtp:[host]:port or lmtp:unix:/path"
        );
        assert_eq!(
            h("uucp:host").unwrap_err(),
            RouteError::NextHop {
                text: "uucp:host".into(),
                fault: HopFault::UnknownProtocol
            }
        );
        assert!(matches!(
            relay_next_hop("unix:/x", 24, false),
            Err(RouteError::RelayUnix { .. })
        ));
        assert_eq!(
            relay_next_hop("[mail.internal]", 25, false)
                .unwrap()
                .to_string(),
            "smtp:[mail.internal]:25"
        );
    }
}
