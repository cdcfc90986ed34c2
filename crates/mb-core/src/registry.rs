//! Every configuration key the gateway knows: type, default, range, description and who reads it.
//!
//! The key is the TOML path in `mailborder.toml` (`[network.smtp] port = 25` is
//! `network.smtp.port`) and the name `mb-config` takes. Names come from the product
//! documents; new keys follow the same style.

use std::time::Duration;

use crate::value::Kind;

/// When a changed value takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// The owning daemons follow the change feed and use the new value at once.
    Live,
    /// The owning daemons read the value at start only (listeners, paths, pools).
    Restart,
}

/// A check of a parsed value beyond its kind's syntax.
pub type Validator = fn(&crate::Value) -> Result<(), RegistryError>;

/// Why a value passed its kind's syntax but not its key's own check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A blocklist entry without `=`.
    #[error("{entry:?} is not LIST=WEIGHT (for example zen.spamhaus.org=5.0)")]
    NotWeighted { entry: String },
    /// The part before `=` is not a DNS zone.
    #[error("{zone:?} in {entry:?} is not a DNS zone")]
    Zone { zone: String, entry: String },
    /// The part after `=` is not a finite number within ±1000.
    #[error("the weight in {entry:?} is not a number between -1000 and 1000")]
    Weight { entry: String },
    /// A `relay.transport` entry that does not parse.
    #[error(transparent)]
    Transport(#[from] crate::route::RouteError),
    /// `ldap.url` with another scheme than ldap:// or ldaps://.
    #[error("{url:?} is not an ldap:// or ldaps:// URL")]
    LdapUrl { url: String },
    /// An LDAP filter template that is not one parenthesised filter with `%s` in it.
    #[error("{filter:?} is not an LDAP filter with %s where the address goes, such as (mail=%s)")]
    LdapFilter { filter: String },
    /// An Rspamd URL that is neither `http://host[:port][/prefix]` nor `unix:/path`.
    #[error("{url:?} is not http://host:port or unix:/absolute/path/to/socket")]
    RspamdUrl { url: String },
    /// `quarantine.digest.schedule` that is neither `hourly` nor `daily HH:MM`.
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
    /// `web.base_url` that is not an http(s) URL without query or fragment.
    #[error(
        "{url:?} is not an https:// (or http://) URL without ? or #, such as https://mail.example.org"
    )]
    BaseUrl { url: String },
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeyDef {
    pub key: &'static str,
    pub kind: Kind,
    /// The built-in default in canonical text form.
    pub default: &'static str,
    pub description: &'static str,
    pub apply: Apply,
    /// The daemons that read the key.
    pub daemons: &'static [&'static str],
    /// Never logged, masked in listings and stored redacted in the audit trail.
    pub secret: bool,
    /// Stays on each cluster node instead of being synchronised from the main node.
    pub node_local: bool,
    /// Read from the configuration file only: where the sockets and the database are
    /// must be known before the database can be asked (`mb-config set` refuses these).
    pub file_only: bool,
    /// A check beyond the kind's syntax (e.g. the next-hop syntax of relay.transport).
    pub validate: Option<Validator>,
}

pub const SMTPD: &str = "mb-smtpd";
pub const FILTER: &str = "mb-filter";
pub const MILTER: &str = "mb-milter";
pub const RPCD: &str = "mb-rpcd";
pub const CLUSTER: &str = "mb-cluster";
/// mb-web reads only its own keys (and paths.*, log.*, process.*): never database.*.
pub const WEB: &str = "mb-web";
const ALL: &[&str] = &[SMTPD, FILTER, MILTER, RPCD, CLUSTER];

/// The daemons of the suite, in the order tools show them.
pub const DAEMONS: &[&str] = ALL;

const fn k(
    key: &'static str,
    kind: Kind,
    default: &'static str,
    description: &'static str,
) -> KeyDef {
    KeyDef {
        key,
        kind,
        default,
        description,
        apply: Apply::Live,
        daemons: ALL,
        secret: false,
        node_local: false,
        file_only: false,
        validate: None,
    }
}

impl KeyDef {
    const fn by(mut self, daemons: &'static [&'static str]) -> Self {
        self.daemons = daemons;
        self
    }
    const fn restart(mut self) -> Self {
        self.apply = Apply::Restart;
        self
    }
    const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
    const fn file_only(mut self) -> Self {
        self.file_only = true;
        self.local()
    }
    const fn validated(mut self, f: Validator) -> Self {
        self.validate = Some(f);
        self
    }
    /// Node-local keys need a restart too: they are listeners, paths and identities.
    const fn local(mut self) -> Self {
        self.node_local = true;
        self.apply = Apply::Restart;
        self
    }
}

/// `LIST=WEIGHT` entries: a DNS zone and the score a listing adds.
pub fn weighted_lists(items: &[String]) -> Result<Vec<(String, f64)>, RegistryError> {
    items
        .iter()
        .map(|e| {
            let (zone, weight) = e
                .split_once('=')
                .ok_or_else(|| RegistryError::NotWeighted { entry: e.clone() })?;
            let zone = zone.trim().trim_end_matches('.').to_ascii_lowercase();
            let valid = !zone.is_empty()
                && zone.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return Err(RegistryError::Zone {
                    zone,
                    entry: e.clone(),
                });
            }
            let weight: f64 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && w.abs() <= 1000.0)
                .ok_or_else(|| RegistryError::Weight { entry: e.clone() })?;
            Ok((zone, weight))
        })
        .collect()
}

fn valid_weighted_lists(v: &crate::Value) -> Result<(), RegistryError> {
    match v {
        crate::Value::List(items) => weighted_lists(items).map(|_| ()),
        _ => Ok(()),
    }
}

fn valid_transport(v: &crate::Value) -> Result<(), RegistryError> {
    match v {
        crate::Value::List(items) => {
            crate::route::parse_transport(items, 25)?;
            Ok(())
        }
        _ => Ok(()),
    }
}

fn valid_digest_schedule(v: &crate::Value) -> Result<(), RegistryError> {
    match v {
        crate::Value::Text(t) => t
            .parse::<crate::schedule::Schedule>()
            .map(|_| ())
            .map_err(Into::into),
        _ => Ok(()),
    }
}

fn valid_base_url(v: &crate::Value) -> Result<(), RegistryError> {
    match v {
        crate::Value::Text(url)
            if !url.is_empty()
                && (!(url.starts_with("https://") || url.starts_with("http://"))
                    || url.contains(['?', '#', '"', '<', '>', ' ', '\\'])) =>
        {
            Err(RegistryError::BaseUrl { url: url.clone() })
        }
        _ => Ok(()),
    }
}

/// `rspamd.url` and `rspamd.controller_url`: the two forms their clients take (mb-filter's
/// `rspamd::Endpoint`, mb-web's controller proxy), so a URL they cannot use is refused
/// by `mb-config set` rather than found at the next message.
fn valid_rspamd_url(v: &crate::Value) -> Result<(), RegistryError> {
    let crate::Value::Text(url) = v else {
        return Ok(());
    };
    let t = url.trim();
    let ok = if let Some(path) = t.strip_prefix("unix:") {
        path.starts_with('/') && !path.trim_start_matches('/').is_empty()
    } else if let Some(rest) = t.strip_prefix("http://") {
        let authority = rest.split('/').next().unwrap_or_default();
        !authority.is_empty() && !rest.contains(char::is_whitespace) && !authority.contains('@')
    } else {
        false
    };
    if ok {
        Ok(())
    } else {
        Err(RegistryError::RspamdUrl { url: url.clone() })
    }
}

fn valid_ldap_url(v: &crate::Value) -> Result<(), RegistryError> {
    match v {
        crate::Value::Text(url)
            if !url.is_empty()
                && !["ldap://", "ldaps://"].iter().any(|s| {
                    // Bytes, not a str slice: the text may hold any character there.
                    url.len() > s.len()
                        && url.as_bytes()[..s.len()].eq_ignore_ascii_case(s.as_bytes())
                }) =>
        {
            Err(RegistryError::LdapUrl { url: url.clone() })
        }
        _ => Ok(()),
    }
}

fn valid_ldap_filter(v: &crate::Value) -> Result<(), RegistryError> {
    match v {
        crate::Value::Text(f) => {
            let f = f.trim();
            let depth_ok = f.bytes().try_fold(0i32, |d, b| match b {
                b'(' => Some(d + 1),
                b')' if d > 0 => Some(d - 1),
                b')' => None,
                _ => Some(d),
            }) == Some(0);
            if f.starts_with('(') && f.ends_with(')') && f.contains("%s") && depth_ok {
                Ok(())
            } else {
                Err(RegistryError::LdapFilter {
                    filter: f.to_string(),
                })
            }
        }
        _ => Ok(()),
    }
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max }
}
const PORT: Kind = int(1, 65535);
const BOOL: Kind = Kind::Bool;
const TEXT: Kind = Kind::Text { max: 1024 };
const fn secs(min: u64, max: u64) -> Kind {
    Kind::Duration {
        min: Duration::from_secs(min),
        max: Duration::from_secs(max),
    }
}
const DAY: u64 = 86_400;
const SCORE: Kind = Kind::Float {
    min: -1000.0,
    max: 1000.0,
};
const V4: Kind = Kind::IpList { v6: false };
const V6: Kind = Kind::IpList { v6: true };
const UNAVAILABLE: Kind = Kind::Enum(&["tempfail", "accept"]);
const SCANNER_DOWN: Kind = Kind::Enum(&["tempfail", "skip"]);
const ARCHIVE_ACTION: Kind = Kind::Enum(&["score", "quarantine", "reject"]);
const S: &[&str] = &[SMTPD];
const F: &[&str] = &[FILTER];
const SF: &[&str] = &[SMTPD, FILTER];
const SR: &[&str] = &[SMTPD, RPCD];
const SFM: &[&str] = &[SMTPD, FILTER, MILTER];
const M: &[&str] = &[MILTER];
const R: &[&str] = &[RPCD];
const C: &[&str] = &[CLUSTER];
const W: &[&str] = &[WEB];

/// All keys, sorted by name within each section.
pub static KEYS: &[KeyDef] = &[
    // Paths (node-local, read at start by every daemon).
    k("paths.run_dir", Kind::Path, "/var/run/mailborder", "Directory of the daemons' gRPC sockets").file_only(),
    k("paths.spool_dir", Kind::Path, "/var/spool/mailborder", "Mail spool: the queue (segments/, bodies/) and the quarantine").file_only(),
    k("paths.data_dir", Kind::Path, "/var/lib/mailborder", "State: the SQLite database, the cached configuration, keys").file_only(),
    k("paths.log_dir", Kind::Path, "/var/log/mailborder", "Directory of the daemons' log files (DAEMON.log) when log.files is true").file_only(),
    // Logging.
    k("log.level", Kind::Enum(&["error", "warn", "info", "debug", "trace"]), "info", "Least severe level written to the log"),
    k("log.retention_days", int(0, 3650), "30", "Days the message log (mb-log) keeps events, those uploaded by cluster children included; 0 keeps them forever. Pruned at start and every 5 minutes").by(R),
    k("stats.retention_days", int(0, 3650), "400", "Days mb-rpcd keeps the hourly statistics rollups (mb-stats, /api/v1/stats); 0 keeps them forever. Pruned at start and every 5 minutes").by(R),
    k("log.format", Kind::Enum(&["text", "json"]), "text", "Log line format: text for people and fail2ban, json for collectors"),
    k("log.files", BOOL, "false", "Also append each daemon's log lines to paths.log_dir/DAEMON.log, reopened on SIGHUP for logrotate; stderr (the journal) gets them either way").file_only(),
    // Process identity.
    k("process.user", Kind::Text { max: 32 }, "mailborder", "User a daemon started as root switches to after binding its ports; empty to stay root").file_only(),
    k("process.config_wait", secs(0, 300), "5s", "How long a daemon waits at start for mb-rpcd's current overrides before it binds anything; then it starts on its cached overrides (or the file) and warns which restart-only keys it could not confirm").by(&[SMTPD, FILTER, MILTER, CLUSTER]).file_only(),
    // Database and Redis.
    k("database.url", TEXT, "", "Database URL: empty for SQLite under paths.data_dir, or sqlite://, mysql:// (MariaDB), postgres://").by(R).secret().file_only(),
    k("database.max_connections", int(1, 1000), "10", "Connections in mb-rpcd's database pool").by(R).file_only(),
    k("redis.url", TEXT, "", "Redis URL for shared rate-limit and ban state (redis://host:port/db); empty to keep state in memory").secret().restart(),
    // SMTP listeners (mb-smtpd).
    k("network.smtp.listen", V4, "0.0.0.0", "IPv4 addresses mb-smtpd listens on for SMTP").by(S).local(),
    k("network.smtp.listen_ipv6", V6, "::", "IPv6 addresses mb-smtpd listens on when network.ipv6.enabled is true").by(S).local(),
    k("network.smtp.port", PORT, "25", "SMTP port for mail from the internet").by(S).local(),
    k("network.smtp.max_connections", int(1, 100_000), "100", "Concurrent connections on the SMTP port (25); submission, SMTPS and reinjection have pools of their own").by(S),
    k("network.smtp.max_per_source", int(1, 100_000), "10", "Concurrent connections from one client (an IPv4 address or an IPv6 network of network.smtp.ipv6_prefix bits)").by(S),
    k("network.smtp.connection_rate", int(1, 1_000_000), "20", "New connections admitted per second on each of the SMTP, submission and SMTPS listeners (refused connections do not count; reinjection is not limited)").by(S),
    k("network.smtp.rate_per_source", int(1, 1_000_000), "2", "New connections per second from one client (an IPv4 address or an IPv6 network of network.smtp.ipv6_prefix bits)").by(S),
    k("network.smtp.ipv6_prefix", int(32, 128), "64", "Length of the IPv6 network counted as one client by the per-client limits, rates and bans").by(S),
    k("network.smtp.tls_handshake_timeout", secs(1, 600), "10s", "Time allowed for a TLS handshake (SMTPS and STARTTLS)").by(S),
    k("network.smtp.session_lifetime", secs(10, 7 * DAY), "1h", "Longest SMTP session: an older one gets 421 4.4.2 at its next command, or at once when idle").by(S),
    k("network.smtp.timeout", secs(1, 3600), "5m", "Idle time allowed between SMTP commands and while receiving DATA").by(S),
    k("network.smtp.tls.inbound", Kind::Enum(&["none", "enabled", "mandatory"]), "enabled", "STARTTLS for senders: not offered, offered, or required").by(S),
    k("network.smtp.tls.outbound", Kind::Enum(&["none", "opportunistic", "mandatory"]), "opportunistic", "TLS when delivering to other servers: never, when offered, or required").by(S),
    k("network.smtp.tls.cert", Kind::Path, "/etc/mailborder/ssl/mailborder.crt", "PEM certificate chain for SMTP TLS").by(S),
    k("network.smtp.tls.key", Kind::Path, "/etc/mailborder/ssl/mailborder.key", "PEM private key for SMTP TLS").by(S),
    k("network.submission.enabled", BOOL, "false", "Listen for authenticated submission").by(S).local(),
    k("network.submission.port", PORT, "587", "Submission port").by(S).local(),
    k("network.submission.require_auth", BOOL, "true", "Refuse mail on the submission port without AUTH").by(S),
    k("network.submission.require_tls", BOOL, "true", "Refuse MAIL on the submission port before STARTTLS").by(S),
    k("network.submission.max_connections", int(1, 100_000), "100", "Concurrent connections on the submission port").by(S),
    k("network.smtps.enabled", BOOL, "false", "Listen for SMTP over implicit TLS").by(S).local(),
    k("network.smtps.port", PORT, "465", "SMTPS (implicit TLS) port").by(S).local(),
    k("network.smtps.max_connections", int(1, 100_000), "100", "Concurrent connections on the SMTPS port").by(S),
    k("network.reinject.listen", Kind::Ip, "127.0.0.1", "Address of the unfiltered reinjection listener (local clients only)").by(S).local(),
    k("network.reinject.port", PORT, "10025", "Port of the unfiltered reinjection listener").by(S).local(),
    k("network.reinject.max_connections", int(1, 100_000), "100", "Concurrent connections on the reinjection listener (never limited by port 25's load)").by(S),
    // TLS in general.
    k("network.tls.min_version", Kind::Enum(&["1.2", "1.3"]), "1.2", "Oldest TLS version accepted or offered: live for SMTP (STARTTLS, SMTPS, delivery), at its next start for mb-web's HTTPS; mb-rpcd's TCP listener offers TLS 1.2 and 1.3 and mb-cluster TLS 1.3 only, whatever this says"),
    k("network.tls.versions", Kind::EnumList(&["1.2", "1.3"]), "1.2,1.3", "TLS versions offered for SMTP (STARTTLS, SMTPS, delivery; live); mb-web's HTTPS follows network.tls.min_version only; mb-rpcd's TCP listener offers TLS 1.2 and 1.3 and mb-cluster TLS 1.3 only, whatever this says"),
    k("network.tls.ciphers", TEXT, "", "OpenSSL-style cipher list to restrict TLS 1.2 suites to for SMTP (live); empty for the built-in strong set; mb-web's HTTPS, mb-rpcd's TCP listener and mb-cluster keep the built-in set"),
    k("network.tls.prefer_server_ciphers", BOOL, "true", "Choose the cipher by the server's order of preference"),
    k("network.ipv6.enabled", BOOL, "false", "Listen on IPv6 addresses too").local(),
    // DNS.
    k("network.dns.servers", Kind::DnsServers, "system", "Resolvers: system (from /etc/resolv.conf) or a list of IP, IP:port"),
    k("network.dns.cache.enabled", BOOL, "true", "Cache DNS answers in each daemon"),
    k("network.dns.cache.ttl", secs(1, DAY), "5m", "Longest time a cached DNS answer is kept"),
    k("network.dns.dnssec", BOOL, "false", "Validate DNSSEC signatures up to the root trust anchor; an answer that fails validation counts as a DNS failure (SPF temperror, delivery deferred)"),
    // mb-rpcd's optional TCP listener.
    k("network.rpcd.tcp.enabled", BOOL, "false", "Serve the mb-rpcd API on TCP as well as on its Unix socket").by(R).local(),
    k("network.rpcd.tcp.bind", Kind::Ip, "127.0.0.1", "Address of the mb-rpcd TCP listener; beyond loopback TLS and an API key are required").by(R).local(),
    k("network.rpcd.tcp.port", PORT, "9000", "Port of the mb-rpcd TCP listener").by(R).local(),
    k("network.rpcd.tcp.require_auth", BOOL, "true", "Require the API key on the TCP listener (always required beyond loopback)").by(R).restart(),
    k("network.rpcd.tcp.api_key", TEXT, "", "API key TCP clients send as \"authorization: Bearer KEY\"; at least 16 characters").by(R).restart().secret(),
    k("network.rpcd.tcp.tls.cert", Kind::Path, "", "PEM certificate chain for the TCP listener; empty for plaintext (loopback only)").by(R).local(),
    k("network.rpcd.tcp.tls.key", Kind::Path, "", "PEM private key for the TCP listener").by(R).local(),
    // Web interface.
    k("network.https.enabled", BOOL, "true", "Serve HTTPS (mb-web); its Unix socket mb-web.sock, for an nginx in front, is served either way").by(W).local(),
    k("network.https.listen", V4, "0.0.0.0", "IPv4 addresses of the HTTPS interface").by(W).local(),
    k("network.https.listen_ipv6", V6, "::", "IPv6 addresses of the HTTPS interface when network.ipv6.enabled is true").by(W).local(),
    k("network.https.port", PORT, "443", "HTTPS port").by(W).local(),
    k("network.https.tls.cert", Kind::Path, "", "PEM certificate chain for HTTPS, re-read on SIGHUP; empty for a self-signed certificate (with a warning)").by(W).local(),
    k("network.https.tls.key", Kind::Path, "", "PEM private key for HTTPS, re-read on SIGHUP").by(W).local(),
    k("network.https.max_connections", int(1, 100_000), "512", "Concurrent HTTPS and HTTP connections; beyond, new ones are closed at once").by(W).local(),
    k("network.https.timeout", secs(1, 300), "10s", "Time allowed for a TLS handshake and for each request's headers (slow clients are cut off)").by(W).local(),
    k("network.https.rate_limit", int(1, 1_000_000), "60", "HTTPS requests per minute from one client IP").by(W),
    k("network.https.rate_burst", int(0, 1_000_000), "10", "Requests allowed above the HTTPS rate in a burst").by(W),
    k("network.http.enabled", BOOL, "false", "Listen for plain HTTP").by(W).local(),
    k("network.http.port", PORT, "80", "HTTP port").by(W).local(),
    k("network.http.redirect_to_https", BOOL, "true", "Answer every HTTP request with a redirect to HTTPS; false serves the web interface over plain HTTP (behind a TLS proxy)").by(W).local(),
    // Protection modes.
    k("network.protection.mode", Kind::Enum(&["autoban", "protected", "private", "public"]), "autoban", "How mail ports are guarded: rate-limit and ban, trusted-only submission, trusted-only, or open").by(S),
    k("network.protection.autoban.rate", Kind::Rate, "10/minute", "Rate above which a client is banned: its submission and SMTPS connections, and its port-25 connections refused by the per-client limits (port-25 connections within them never count)").by(S),
    k("network.protection.autoban.period", secs(1, 365 * DAY), "1h", "How long a banned IP stays banned").by(S),
    k("network.protection.trusted_networks", Kind::CidrList, "127.0.0.0/8,::1/128", "Networks never banned, and the only ones allowed in protected/private mode").by(S),
    // SMTP behaviour.
    k("smtp.enabled", BOOL, "true", "Run mb-smtpd (standalone mode); false when Postfix stays in front").by(S).restart(),
    k("smtp.hostname", Kind::Text { max: 253 }, "", "Name in the greeting, EHLO and Received headers; empty for the system host name").by(S),
    k("smtp.domains", Kind::List, "", "Domains the gateway accepts mail for (never relays for others)").by(SF),
    k("smtp.mynetworks", Kind::CidrList, "127.0.0.0/8,::1/128", "Clients allowed to relay to any domain without AUTH").by(SF),
    k("smtp.message_size_limit", Kind::Size { min: 1024, max: 1 << 32 }, "50M", "Largest message accepted (SIZE)").by(SFM),
    k("smtp.max_recipients", int(1, 100_000), "100", "Recipients allowed in one message").by(S),
    k("smtp.recipient_delimiter", Kind::Text { max: 4 }, "+", "Separators of address extensions (user+tag@domain; each character is one, as in Postfix); recipient verification and policy address patterns try user@domain when user+tag@domain does not match; empty for none").by(&[SMTPD, FILTER, MILTER, RPCD]),
    k("smtp.recipient_verification", Kind::Enum(&["none", "list", "callout", "ldap"]), "none", "Check each recipient at a served domain at RCPT: none; list (the valid recipients kept with mb-recipient; a domain with no entry at all accepts every address, with a warning, so enabling list mode before importing bounces nobody); callout (ask the domain's relay host or transport next hop with RCPT TO, cached; never the gateway itself nor an MX-routed domain, which are accepted with a warning); ldap (the ldap.* directory). Unknown users get 550 5.1.1 and count as session errors; 450 4.1.1 when the answer cannot be had").by(S),
    k("smtp.callout.timeout", secs(1, 600), "30s", "Longest wait for each reply of a recipient verification callout (and for its connection); a whole callout is capped at 10s, after which the client gets 450").by(S),
    k("smtp.callout.positive_ttl", secs(60, 365 * DAY), "1w", "How long a recipient the next hop accepted is remembered by callout verification").by(S),
    k("smtp.callout.negative_ttl", secs(60, 365 * DAY), "3h", "How long a recipient the next hop refused as unknown (5.1.1, 5.1.6, 5.1.10 or a bare 550) is remembered by callout verification; other 5xx refusals are not remembered and answer 450").by(S),
    k("smtp.helo_required", BOOL, "true", "Refuse MAIL before HELO/EHLO").by(S),
    k("smtp.vrfy_enabled", BOOL, "false", "Answer VRFY truthfully instead of 252").by(S),
    k("smtp.max_errors", int(1, 1000), "10", "Errors in one session before 421 and disconnect").by(S),
    k("smtp.data_deadline", secs(10, 86_400), "30m", "Longest time a client may take to send one message (DATA or BDAT), however steadily").by(S),
    k("smtp.data_rate_limit", Kind::Size { min: 0, max: 1 << 34 }, "1M", "Most bytes per second read of one message, once past smtp.data_rate_allowance, from a client that is not authenticated and not in smtp.mynetworks or network.protection.trusted_networks (reinjection is never paced); the socket is simply not read meanwhile, so TCP holds the sender back, and the pauses count neither against smtp.data_deadline nor network.smtp.timeout; 0: no limit. Postfix has no such cap; it exists because the spool's commits share the filesystem's journal: a few senders streaming huge messages as fast as the network allows make every other message's fsync wait behind their write-back (cargo xtask bench --attack on a 2-core machine: five clients sending 20 MB messages among the other attackers cut small-message throughput to 0.15 of normal without a cap, 0.66 to 0.77 at 2M, 0.63 to 0.97 at 1M, the spread being the machine's other load). At 1M a 50 MB message takes 50 s").by(S),
    k("smtp.data_rate_allowance", Kind::Size { min: 0, max: 1 << 32 }, "1M", "Bytes of each message read at full speed before smtp.data_rate_limit applies: ordinary mail is never paced").by(S),
    // Authenticated clients (SMTP AUTH): sender binding and per-account limits.
    k("smtp.auth.sender_binding", BOOL, "true", "An authenticated client may use as MAIL FROM only its login (when an address, user+tag@ included), the null sender, or an address granted with mb-user alias add; others get 553 5.7.1").by(S),
    k("smtp.auth.messages_per_hour", int(0, 10_000_000), "500", "Messages one SMTP AUTH account may send per clock hour (counted at MAIL, shared through Redis when redis.url is set); then 450 4.7.1. 0: no limit").by(S),
    k("smtp.auth.recipients_per_hour", int(0, 10_000_000), "2000", "Recipients one SMTP AUTH account may send to per clock hour (counted at RCPT, shared through Redis when redis.url is set); then 450 4.7.1. 0: no limit").by(S),
    // Relay host (inbound delivery).
    k("relay.host", Kind::Text { max: 253 }, "", "Internal mail server that receives accepted inbound mail").by(S),
    k("relay.port", PORT, "25", "Port of the relay host").by(S),
    k("relay.protocol", Kind::Enum(&["smtp", "lmtp"]), "smtp", "Protocol spoken to the relay host").by(S),
    k("relay.tls", Kind::Enum(&["none", "starttls", "tls"]), "starttls", "TLS to the relay host: none, STARTTLS (required), or implicit TLS").by(S),
    k("relay.tls.verify", BOOL, "true", "Verify the relay host's certificate").by(S),
    k("relay.auth.username", Kind::Text { max: 256 }, "", "User name for AUTH at the relay host; empty for none").by(S),
    k("relay.auth.password", Kind::Text { max: 256 }, "", "Password for AUTH at the relay host").by(S).secret(),
    k("relay.tls.ca_file", Kind::Path, "/etc/ssl/certs/ca-certificates.crt", "PEM file of the certificate authorities trusted for the relay host when relay.tls.verify is true").by(S),
    k("relay.transport", Kind::List, "", "Per-domain next hops overriding relay host and MX: DOMAIN=NEXTHOP entries such as example.org=smtp:[10.0.0.5]:25 or example.net=lmtp:unix:/run/dovecot/lmtp (.example.org for subdomains)").by(S).validated(valid_transport),
    // Queue.
    k("queue.retry_min", secs(1, DAY), "5m", "First retry delay after a temporary failure").by(S),
    k("queue.retry_max", secs(1, 7 * DAY), "1h", "Longest delay between retries").by(S),
    k("queue.delay_warning", secs(0, 30 * DAY), "4h", "Age at which the sender is told the message is delayed; 0 for never").by(S),
    k("queue.lifetime", secs(60, 30 * DAY), "5d", "Age at which an undeliverable message is bounced").by(S),
    k("queue.delivery_enabled", BOOL, "true", "Deliver queued mail; false keeps accepted mail queued (maintenance, as Postfix's defer_transports) until set back to true").by(S),
    k("queue.concurrency", int(1, 10_000), "100", "Deliveries in progress at once, in total").by(S).restart(),
    k("queue.destination_concurrency", int(1, 1000), "20", "Deliveries in progress at once to one destination (domain or relay host)").by(S),
    k("queue.recipient_limit", int(1, 1000), "50", "Recipients sent in one transaction").by(S),
    k("queue.connect_timeout", secs(1, 600), "30s", "Time allowed to connect to a next hop and read its greeting").by(S),
    k("queue.min_free_space", Kind::Size { min: 0, max: 1 << 50 }, "1G", "Free space the spool's filesystem must keep: below it MAIL and RCPT get 452 4.3.1 and quarantine writes are refused (0 turns the check off)").by(SF),
    k("queue.mx_port", PORT, "25", "Port used for MX delivery (as Postfix's smtp_tcp_port); change only for testing").by(S),
    // Spam.
    k("spam.subject_tag", TEXT, "[SPAM]", "Prefix written before the Subject when Rspamd's action is rewrite subject and Rspamd proposes no Subject of its own").by(F),
    k("spam.threshold.tag", SCORE, "4.0", "Score at which X-Spam headers are added").by(F),
    k("spam.threshold.quarantine", SCORE, "6.0", "Score at which a message is quarantined").by(F),
    k("spam.threshold.reject", SCORE, "20.0", "Score at which a message is rejected").by(F),
    k("spam.rbl.ip", Kind::List, "", "DNS blocklists for the client IP with the score each listing adds: LIST=WEIGHT entries such as zen.spamhaus.org=5.0").by(F).validated(valid_weighted_lists),
    k("spam.rbl.domain", Kind::List, "", "DNS blocklists for the sender's domain (MAIL FROM and From) with their scores: LIST=WEIGHT entries such as dbl.spamhaus.org=4.0").by(F).validated(valid_weighted_lists),
    k("dmarc.enforce", BOOL, "true", "Apply the sender domain's DMARC policy (reject/quarantine)").by(F),
    k("attachments.blocked_extensions", Kind::List, "exe,scr,com,pif,bat,cmd,vbs,vbe,js,jse,wsf,wsh,msi,msp,hta,cpl,jar,ps1,lnk,reg,iso,img", "File extensions refused in attachments (also inside archives and as double extensions)").by(F),
    k("attachments.blocked_types", Kind::List, "application/x-msdownload,application/x-msdos-program,application/x-ms-installer,application/x-ms-shortcut,application/hta,application/x-sh,application/x-bat", "MIME types refused in attachments (as declared by the sender)").by(F),
    k("attachments.max_size", Kind::Size { min: 0, max: 1 << 32 }, "0", "Largest single attachment (decoded); 0 for no limit beyond smtp.message_size_limit").by(F),
    k("attachments.archive_depth", int(1, 16), "3", "Levels of archives opened (the attachment is level 1, an archive in it level 2); a deeper archive counts as unscannable (attachments.unscannable_action)").by(F),
    k("attachments.archive_max_size", Kind::Size { min: 1024, max: 1 << 32 }, "100M", "Most bytes decompressed from the archives of one attachment, all levels together; past it the rest counts as unscannable").by(F),
    k("attachments.archive_max_ratio", int(1, 100_000), "100", "Most bytes decompressed per byte of an attachment (any attachment may expand to 1 MiB); past it expansion stops and ARCHIVE_BOMB scores 10.0").by(F),
    k("attachments.encrypted_action", ARCHIVE_ACTION, "score", "What to do with an archive holding encrypted members: score ENCRYPTED_ARCHIVE (2.0), quarantine, or reject (554 5.7.1)").by(F),
    k("attachments.unscannable_action", ARCHIVE_ACTION, "score", "What to do with an archive that cannot be looked into (RAR, 7z with encrypted names, CAB, ISO, damaged, nested deeper than attachments.archive_depth, larger than attachments.archive_max_size): score ARCHIVE_UNSCANNABLE (2.0), quarantine, or reject (554 5.7.1)").by(F),
    // Filter workers and the content filter.
    k("filter.enabled", BOOL, "true", "Run mb-filter workers").by(F).restart(),
    k("filter.workers", int(1, 64), "2", "Number of mb-filter@N workers that mb-status expects").by(F).restart(),
    k("filter.max_concurrent", int(1, 10_000), "32", "Messages one worker scans at once").by(F),
    k("filter.scan_timeout", secs(1, 3600), "1m", "Longest time one scan may take").by(SFM),
    k("filter.max_inflight_bytes", Kind::Size { min: 1 << 20, max: 1 << 40 }, "512M", "Most bytes of messages one worker holds at once, counted from each scan's declared size; a scan past it is refused (mb-smtpd tries another worker, then answers 451 4.7.1). A message larger than the whole budget is still scanned when nothing else is in flight, or on its next try after a refusal (one such message at a time)").by(F),
    k("filter.listen", Kind::Ip, "127.0.0.1", "Address of the content-filter listener").by(F).local(),
    k("filter.port", PORT, "10031", "Port of the content-filter listener (Postfix content_filter)").by(F).local(),
    k("filter.next_hop", Kind::Text { max: 260 }, "127.0.0.1:10025", "Where the content filter reinjects clean mail and quarantine releases go (host:port, an unfiltered listener such as mb-smtpd's or Postfix's 10025)").by(&[FILTER, RPCD]),
    k("filter.unavailable_action", UNAVAILABLE, "tempfail", "What mb-smtpd does when no filter worker answers").by(S),
    // Milter.
    k("milter.enabled", BOOL, "false", "Run mb-milter (Postfix milter mode)").by(M).restart(),
    k("milter.listen", Kind::Ip, "127.0.0.1", "Address of the milter listener").by(M).local(),
    k("milter.port", PORT, "10032", "Port of the milter listener (smtpd_milters = inet:127.0.0.1:10032)").by(M).local(),
    k("milter.socket", Kind::Path, "", "Unix socket mb-milter also listens on (smtpd_milters = unix:PATH; a chrooted smtpd, Debian's default, finds it under /var/spool/postfix, e.g. /var/spool/postfix/mailborder/milter.sock): only root, mb-milter's user and members of milter.socket_group or mailborder may connect (peer credentials); mode 0660, for milter.socket_group; empty for TCP only").by(M).local(),
    k("milter.socket_group", Kind::Text { max: 32 }, "postfix", "Group given milter.socket (and a directory created for it), whose members may connect besides root and mb-milter's user: Postfix's smtpd runs in group postfix; mb-milter must have the group (SupplementaryGroups=postfix, with ReadWritePaths= for the socket's directory, in a drop-in for mb-milter.service); empty for mailborder").by(M).local(),
    k("milter.unavailable_action", UNAVAILABLE, "tempfail", "What mb-milter answers when no filter worker answers").by(M),
    k("milter.allowed_clients", Kind::CidrList, "127.0.0.0/8,::1/128", "MTAs allowed to connect to the milter port; others are refused with a log line").by(M),
    // An hour, not minutes: Postfix sends the header and body events only once cleanup has
    // the whole message, so the milter connection is silent while a slow client uploads
    // DATA (50 MB on a slow link takes longer than 5 minutes), and gaps between commands
    // reach Postfix's smtpd_timeout (300 s). A shorter default tempfails honest mail.
    k("milter.timeout", secs(1, 86_400), "1h", "How long a milter connection may stay silent before it is dropped; keep it well above the longest DATA upload plus Postfix's smtpd_timeout, since Postfix says nothing to the milter while the client sends the message").by(M),
    // Scanners.
    k("clamav.enabled", BOOL, "false", "Scan messages with ClamAV (clamd)").by(F),
    k("clamav.address", TEXT, "127.0.0.1:3310", "clamd address: host:port or the path of its Unix socket").by(F),
    k("clamav.timeout", secs(1, 3600), "30s", "Longest time a ClamAV scan may take").by(F),
    k("clamav.max_size", Kind::Size { min: 1024, max: 1 << 32 }, "25M", "Most bytes of a message streamed to clamd; keep it at or below clamd's StreamMaxLength (25M by default)").by(F),
    k("clamav.oversize_action", Kind::Enum(&["scan-head", "tempfail", "reject", "accept"]), "scan-head", "What to do with a message larger than clamav.max_size or clamd's limit: scan its first clamav.max_size bytes (symbol CLAMAV_PARTIAL), tempfail, reject (552 5.3.4), or pass it unscanned (symbol CLAMAV_UNSCANNED)").by(F),
    k("clamav.unavailable_action", SCANNER_DOWN, "tempfail", "What to do with a message when clamd cannot be reached").by(F),
    k("clamav.virus_action", Kind::Enum(&["reject", "quarantine"]), "reject", "What to do with an infected message: refuse it in the session, or accept and quarantine it").by(F),
    k("rspamd.enabled", BOOL, "false", "Ask Rspamd for a spam score").by(F),
    k("rspamd.url", TEXT, "http://127.0.0.1:11333", "Rspamd normal worker URL (POST /checkv2): http://host:port or unix:/path/to/socket; connections are kept alive between messages").by(F).validated(valid_rspamd_url),
    k("rspamd.timeout", secs(1, 3600), "30s", "Longest time an Rspamd check may take").by(F),
    k("rspamd.unavailable_action", SCANNER_DOWN, "skip", "What to do with a message when Rspamd cannot be reached").by(F),
    k("rspamd.controller_url", TEXT, "http://127.0.0.1:11334", "Rspamd controller (its web interface and API) that mb-web proxies under /rspamd/ for administrators: http://host:port or unix:/path/to/socket").by(W).validated(valid_rspamd_url),
    k("rspamd.controller_password", Kind::Text { max: 256 }, "", "Password of the Rspamd controller; mb-web adds it to each proxied request (Rspamd's Password header), so browsers never see it").by(W).secret(),
    // DKIM signing.
    k("dkim.sign", BOOL, "false", "DKIM-sign outbound mail").by(F),
    k("dkim.selector", Kind::Text { max: 63 }, "mailborder", "DKIM selector (the DNS name is SELECTOR._domainkey.DOMAIN)").by(F),
    k("dkim.key", Kind::Path, "/etc/mailborder/dkim/private.key", "PEM private key used for DKIM signing").by(F),
    k("dkim.verify_max_signatures", int(1, 50), "5", "Most DKIM signatures verified in one message (those aligned with From first); more adds DKIM_TOO_MANY").by(F),
    // Greylisting.
    k("greylist.enabled", BOOL, "false", "Greylist mail from the internet at RCPT: a new (client network, sender, recipient) triplet gets 451 4.7.1 until it is retried after greylist.delay").by(&[SMTPD, RPCD]),
    k("greylist.delay", secs(0, DAY), "5m", "How long a new triplet is deferred before a retry passes").by(&[SMTPD, RPCD]),
    k("greylist.retry_window", secs(1, 30 * DAY), "4h", "How long after its first attempt a triplet's retry still counts; a later one starts over").by(&[SMTPD, RPCD]),
    k("greylist.auto_whitelist", int(0, 1_000_000), "5", "Triplets a client network must pass before it is no longer greylisted; 0 never whitelists").by(&[SMTPD, RPCD]),
    k("greylist.lifetime", secs(60, 3650 * DAY), "5w", "How long a passed triplet and an auto-whitelisted client are remembered after their last use (postgrey's max-age)").by(&[SMTPD, RPCD]),
    // Every RCPT from a made-up sender is a new triplet kept for greylist.retry_window:
    // without a bound an attacker fills the shared database.
    k("greylist.max_pending_per_network", int(0, 100_000_000), "1000", "Most pending (not yet passed) triplets one client network may have in the database store (without redis.url); a new triplet beyond it is deferred without being stored, with a log line. 0: no limit").by(&[RPCD]),
    k("greylist.max_triplets", int(0, 1_000_000_000), "1000000", "Most triplets the database store (without redis.url) holds; a new triplet beyond it is deferred without being stored, with a log line. 0: no limit").by(&[RPCD]),
    // Quarantine.
    k("quarantine.retention_days", int(1, 3650), "30", "Days a quarantined message is kept").by(&[FILTER, RPCD]),
    k("quarantine.max_size_mb", int(1, 10_000_000), "10240", "Largest total size of the quarantine in MiB").by(&[FILTER, RPCD]),
    k("quarantine.max_messages", int(0, 100_000_000), "0", "Most messages kept in quarantine; 0 for no limit").by(&[FILTER, RPCD]),
    k("quarantine.digest.enabled", BOOL, "false", "Send each recipient a digest of the mail quarantined for it since its last one, on quarantine.digest.schedule (mb-quarantine digest --now sends at once whatever this says)").by(R),
    k("quarantine.digest.schedule", Kind::Text { max: 32 }, "daily 08:00", "When digests go out: hourly, or daily HH:MM in the host's local time; a time missed while mb-rpcd was down is caught up once at its start").by(R).validated(valid_digest_schedule),
    k("quarantine.digest.domains", Kind::List, "", "Recipient domains that get digests; empty for every domain of smtp.domains").by(R),
    k("quarantine.digest.link_lifetime", secs(3600, 30 * DAY), "1w", "How long the release and portal links of a digest work; each works once").by(R),
    // LDAP / Active Directory (recipient verification; the users' portal logins later).
    k("ldap.url", TEXT, "", "Directory server as ldap://HOST:PORT or ldaps://HOST:PORT; empty turns LDAP off (smtp.recipient_verification = ldap then has nothing to ask, and the users' portal takes SMTP accounts only)").by(SR).validated(valid_ldap_url),
    k("ldap.bind_dn", TEXT, "", "DN of the service account lookups bind as, such as cn=mailborder,ou=services,dc=example,dc=com (AD also takes user@domain)").by(SR),
    k("ldap.bind_password", Kind::Text { max: 256 }, "", "Password of ldap.bind_dn (mb-rpcd checks portal logins against the directory, so mb-web never holds it)").by(SR).secret(),
    k("ldap.base", TEXT, "", "Base DN of the subtree searched for recipients and logins, such as dc=example,dc=com").by(SR),
    k("ldap.recipient_filter", TEXT, "(|(mail=%s)(proxyAddresses=smtp:%s))", "LDAP filter that finds a recipient; %s is the address (RFC 4515-escaped). The default finds mail and Active Directory's proxyAddresses; OpenLDAP sites often use (|(mail=%s)(mailAlternateAddress=%s))").by(S).validated(valid_ldap_filter),
    k("ldap.login_filter", TEXT, "(|(uid=%s)(mail=%s)(sAMAccountName=%s))", "LDAP filter that finds a portal user by what they typed as login (%s, RFC 4515-escaped); the entry's DN is then bound with their password. A login that is an SMTP account (mb-user) is checked against that account and never the directory").by(R).validated(valid_ldap_filter),
    k("ldap.address_attributes", Kind::List, "mail,mailAlternateAddress,proxyAddresses", "Attributes of a portal user's directory entry whose values are the addresses it sees quarantined mail for (smtp:/SMTP: prefixes stripped, other proxyAddresses types skipped); read again from the directory at most every ldap.cache_ttl during a session").by(R),
    k("ldap.tls.ca_file", Kind::Path, "", "PEM file of the certificate authorities trusted for an ldaps:// server (an AD's enterprise CA); empty for the system's trust store").by(SR),
    k("ldap.cache_ttl", secs(0, DAY), "5m", "How long an LDAP answer (recipient found or not found, a portal user's addresses) is reused; 0 asks the directory every time. Errors are never cached").by(SR),
    k("ldap.timeout", secs(1, 300), "10s", "Time allowed to connect and bind to the directory, and for each search; a recipient lookup that runs out gets 450 4.1.1, a portal login a \"try again\" page").by(SR),
    // Web accounts (mb-web's logins, kept and checked by mb-rpcd).
    k("web.base_url", TEXT, "", "The web interface's address as users reach it, for links in quarantine digests (https://mail.example.org); empty for https://smtp.hostname with network.https.port").by(R).validated(valid_base_url),
    k("web.enabled", BOOL, "true", "Whether this node runs mb-web (mailborder.target starts it): mb-status expects its socket and reports it down when it does not answer").by(W).local(),
    k("web.socket_group", Kind::Text { max: 32 }, "www-data", "Group given mb-web.sock (mode 0660) for the nginx in front, instead of mailborder's: that group speaks HTTP there and logs in like any client, and cannot reach the other daemons' sockets; mb-web must have the group (SupplementaryGroups= in mb-web.service), else the socket stays mailborder's with a warning; empty for mailborder").by(W).local(),
    k("web.session_lifetime", secs(60, 30 * DAY), "8h", "How long a web login session lasts from the login, however active; a changed value applies to new sessions").by(R),
    k("web.lockout.failures", int(1, 1000), "5", "Failed web logins to one account within web.lockout.window that lock it for web.lockout.window; each failure is logged as \"web login failed client=IP\" for fail2ban").by(R),
    k("web.lockout.window", secs(60, DAY), "15m", "Window in which web.lockout.failures failed logins lock a web account, and how long the lock lasts").by(R),
    k("web.totp_required", Kind::EnumList(&["admin", "domain-admin", "user"]), "admin", "Web roles that must log in with a TOTP code as well as the password; an account of such a role without a secret is asked to enrol one at its first login").by(R),
    // Cluster.
    k("cluster.enabled", BOOL, "false", "Take part in a cluster of gateway nodes").by(C).local(),
    k("cluster.role", Kind::Enum(&["main", "child"]), "main", "This node's role: main (edits configuration) or child (follows it)").by(C).local(),
    k("cluster.node_name", Kind::Text { max: 253 }, "", "This node's name in the cluster; empty for the host name").by(C).local(),
    k("cluster.bind", Kind::Ip, "0.0.0.0", "Address of the cluster listener").by(C).local(),
    k("cluster.port", PORT, "10050", "Port of the cluster listener (mutual TLS)").by(C).local(),
    k("cluster.main", Kind::Text { max: 260 }, "", "The main node as host:port (children only)").by(C).local(),
    k("cluster.heartbeat", secs(1, 3600), "10s", "Interval between heartbeats").by(C),
];

/// Keys that earlier versions accepted and this one dropped, with what to do instead: a
/// file that still sets one starts with a warning ([`crate::Config::notices`]), not an
/// error, so an upgrade does not stop a gateway over a setting that did nothing.
pub static REMOVED: &[(&str, &str)] = &[(
    "network.tls.dhparam",
    "removed: the TLS stack (rustls) uses ECDHE key exchange only and has no use for DH parameters; delete the line",
)];

/// Looks up a key by its exact name.
pub fn find(key: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.key == key)
}

/// The valid key nearest to a mistyped one, for "did you mean" hints.
pub fn nearest(key: &str) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    KEYS.iter()
        .map(|k| (edit_distance(&key, k.key), k.key))
        .min()
        .filter(|(d, _)| *d <= key.len().max(4) / 2)
        .map(|(_, k)| k)
}

/// Whether some key lives below `prefix` (so `prefix` names a TOML table).
pub fn is_section(prefix: &str) -> bool {
    KEYS.iter().any(|k| {
        k.key.len() > prefix.len()
            && k.key.starts_with(prefix)
            && k.key.as_bytes()[prefix.len()] == b'.'
    })
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn weighted_lists_parse_and_refuse_nonsense() {
        let ok = weighted_lists(&["zen.example = 5".into(), "Dbl.Example.=-1.5".into()]).unwrap();
        assert_eq!(
            ok,
            [("zen.example".into(), 5.0), ("dbl.example".into(), -1.5)]
        );
        for bad in [
            "zen.example",
            "=1",
            "a..b=1",
            "zen.example=x",
            "zen.example=inf",
            "z=1e9",
        ] {
            assert!(
                weighted_lists(&[bad.to_string()]).is_err(),
                "{bad} accepted"
            );
        }
        assert_eq!(
            weighted_lists(&["zen.example".into()])
                .unwrap_err()
                .to_string(),
            "\"zen.example\" is not LIST=WEIGHT (for example zen.spamhaus.org=5.0)"
        );
        assert_eq!(
            weighted_lists(&["a..b=1".into()]).unwrap_err(),
            RegistryError::Zone {
                zone: "a..b".into(),
                entry: "a..b=1".into()
            }
        );
    }

    use super::*;
    use crate::value::Value;

    #[test]
    fn defaults_parse_and_are_canonical() {
        for k in KEYS {
            let v = Value::parse(&k.kind, k.default)
                .unwrap_or_else(|e| panic!("default of {}: {e}", k.key));
            assert_eq!(
                v.to_string(),
                k.default,
                "default of {} is not canonical",
                k.key
            );
            assert!(
                !k.description.is_empty() && !k.description.ends_with('.'),
                "{}",
                k.key
            );
        }
    }

    #[test]
    fn rspamd_urls_are_http_or_an_absolute_socket() {
        let check = |t: &str| valid_rspamd_url(&crate::Value::Text(t.into())).is_ok();
        for good in [
            "http://127.0.0.1:11333",
            "http://rspamd.local/api/",
            "http://[::1]:11334",
            "unix:/run/rspamd/normal.sock",
            "unix:///run/rspamd/normal.sock",
        ] {
            assert!(check(good), "{good}");
        }
        for bad in [
            "",
            "https://x:1",
            "127.0.0.1:11333",
            "http://",
            "http:///api",
            "http://user@host:1",
            "http://a b:1",
            "unix:normal.sock",
            "unix:/",
            "unix:\u{e9}",
        ] {
            assert!(!check(bad), "{bad}");
        }
    }

    #[test]
    fn ldap_urls_are_checked_on_any_text() {
        // Found by the config_value fuzz target: a multi-byte character across the
        // length of "ldap://" used to panic on a str slice.
        let check = |t: &str| valid_ldap_url(&crate::Value::Text(t.into())).is_ok();
        assert!(!check("0Ysw\u{526}\u{365}5"));
        assert!(!check("ldap:/\u{e9}x"));
        assert!(check("LDAPS://dc.example.test:636"));
        assert!(check("ldap://127.0.0.1:389"));
        assert!(check(""));
        assert!(!check("ldap://"));
        assert!(!check("http://dc.example.test"));
    }

    #[test]
    fn keys_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for k in KEYS {
            assert!(seen.insert(k.key), "{} twice", k.key);
            assert!(
                k.key.split('.').all(|p| !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')),
                "{}",
                k.key
            );
        }
    }

    #[test]
    fn documented_keys_exist() {
        // Keys named in the product documents and the blueprint.
        for key in [
            "network.smtp.listen",
            "network.smtp.listen_ipv6",
            "network.submission.require_tls",
            "network.dns.cache.ttl",
            "network.rpcd.tcp.api_key",
            "network.https.rate_burst",
            "network.http.redirect_to_https",
            "network.protection.autoban.rate",
            "relay.tls.verify",
            "spam.threshold.reject",
            "cluster.port",
            "paths.log_dir",
        ] {
            assert!(find(key).is_some(), "{key}");
        }
        // Named in the documents, but meaningless to rustls: dropped, a file keeping it
        // is warned.
        assert!(find("network.tls.dhparam").is_none());
        assert!(REMOVED.iter().any(|(k, _)| *k == "network.tls.dhparam"));
        assert!(REMOVED.iter().all(|(k, _)| find(k).is_none()));
    }

    #[test]
    fn validators_refuse_in_the_parsers_words() {
        let e = crate::config::parse_key_value("relay.transport", "example.org").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value for relay.transport (list): relay.transport entry \"example.org\" is not DOMAIN=NEXTHOP (for example example.org=smtp:[10.0.0.5]:25)"
        );
        let e = crate::config::parse_key_value("spam.rbl.ip", "zen.example=x").unwrap_err();
        assert!(
            e.to_string().ends_with(
                "the weight in \"zen.example=x\" is not a number between -1000 and 1000"
            ),
            "{e}"
        );
    }

    #[test]
    fn suggestions() {
        assert_eq!(nearest("network.smtp.prot"), Some("network.smtp.port"));
        assert_eq!(nearest("spam.threshold.taq"), Some("spam.threshold.tag"));
        assert_eq!(
            nearest("network.dns.cache.tll"),
            Some("network.dns.cache.ttl")
        );
        assert_eq!(nearest("completely.unrelated.thing.here"), None);
    }

    #[test]
    fn sections() {
        assert!(is_section("relay.tls"));
        assert!(is_section("network"));
        assert!(!is_section("relay.port"));
        assert!(!is_section("relay.t"));
    }
}
