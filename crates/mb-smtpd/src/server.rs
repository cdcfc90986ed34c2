//! Listeners: admission (connection limits and rates), TLS set-up, and one task per session.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mb_core::{Config, EnhancedStatus};
use mb_runtime::control::DaemonInfo;
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_smtp::Reply;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::protect::{Mode, Policy, Refusal};
use crate::session::{AuthError, Client, Listener, Session, Settings, TlsMode};
use crate::spool::Spool;

/// Per-IP and global connection counts and per-second rates.
#[derive(Default)]
struct Limits {
    per_ip: HashMap<IpAddr, usize>,
    second: u64,
    global_rate: u32,
    ip_rate: HashMap<IpAddr, u32>,
}

pub struct Server {
    /// Sessions by phase, for `Control.Status`.
    pub phases: Arc<crate::session::Phases>,
    /// Redis, when `redis.url` is set and reachable.
    pub shared: RwLock<Option<crate::shared::Shared>>,
    pub events: Option<mb_runtime::events::EventSink>,
    /// The mb-filter workers, when filtering is enabled.
    pub scanner: Option<Arc<dyn mb_scan::Scanner>>,
    pub protection: Arc<Mutex<crate::protect::Protection>>,
    pub follower: Follower,
    pub spool: Arc<Spool>,
    pub tls: RwLock<Option<TlsAcceptor>>,
    pub info: Arc<DaemonInfo>,
    limits: Mutex<Limits>,
    active: AtomicUsize,
    started: Instant,
}

/// Releases a connection's slot when the session ends.
struct Slot<'a> {
    server: &'a Server,
    ip: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut l) = self.server.limits.lock()
            && let Some(n) = l.per_ip.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                l.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Server {
    pub fn new(
        follower: Follower,
        spool: Arc<Spool>,
        tls: Option<TlsAcceptor>,
        info: Arc<DaemonInfo>,
    ) -> Server {
        Server {
            phases: Arc::default(),
            shared: RwLock::new(None),
            events: None,
            scanner: None,
            protection: Arc::default(),
            follower,
            spool,
            tls: RwLock::new(tls),
            info,
            limits: Mutex::new(Limits::default()),
            active: AtomicUsize::new(0),
            started: Instant::now(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Decides whether a new connection may start; `Err` is the 421 to send.
    fn admit(&self, cfg: &Config, ip: IpAddr, listener: Listener) -> Result<Slot<'_>, Reply> {
        if listener == Listener::Reinject && !ip.is_loopback() {
            return Err(Reply::new(
                554,
                EnhancedStatus::POLICY_REJECT,
                "Reinjection is for local clients only",
            ));
        }
        let exempt = listener == Listener::Reinject
            || cfg.nets("smtp.mynetworks").iter().any(|n| n.contains(&ip))
            || cfg
                .nets("network.protection.trusted_networks")
                .iter()
                .any(|n| n.contains(&ip));
        let mut l = self
            .limits
            .lock()
            .map_err(|_| Reply::new(421, EnhancedStatus::SYSTEM_TEMPORARY, "Internal error"))?;
        let now = self.started.elapsed().as_secs();
        if l.second != now {
            l.second = now;
            l.global_rate = 0;
            l.ip_rate.clear();
        }
        let max_total =
            usize::try_from(cfg.int("network.smtp.max_connections")).unwrap_or(usize::MAX);
        if self.active.load(Ordering::SeqCst) >= max_total {
            return Err(busy("Error: too many connections, try again later".into()));
        }
        l.global_rate += 1;
        if i64::from(l.global_rate) > cfg.int("network.smtp.connection_rate") {
            return Err(busy(
                "Error: too many connections per second, try again later".into(),
            ));
        }
        if !exempt {
            let per_ip = l.per_ip.get(&ip).copied().unwrap_or(0);
            if i64::try_from(per_ip).unwrap_or(i64::MAX) >= cfg.int("network.smtp.max_per_source") {
                return Err(busy(format!("Error: too many connections from {ip}")));
            }
            let rate = l.ip_rate.entry(ip).or_default();
            *rate += 1;
            if i64::from(*rate) > cfg.int("network.smtp.rate_per_source") {
                return Err(busy(format!(
                    "Error: too many connections per second from {ip}"
                )));
            }
        }
        *l.per_ip.entry(ip).or_default() += 1;
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(Slot { server: self, ip })
    }

    fn settings(&self, cfg: &Config, listener: Listener) -> Settings {
        let tls_mode = match cfg.text("network.smtp.tls.inbound").as_str() {
            "none" => TlsMode::None,
            "mandatory" if listener != Listener::Reinject => TlsMode::Mandatory,
            _ => TlsMode::Enabled,
        };
        let submission = matches!(listener, Listener::Submission | Listener::Smtps);
        Settings {
            hostname: hostname(cfg),
            domains: cfg.list("smtp.domains"),
            mynetworks: cfg.nets("smtp.mynetworks"),
            max_size: cfg.size("smtp.message_size_limit"),
            max_recipients: usize::try_from(cfg.int("smtp.max_recipients")).unwrap_or(100),
            max_errors: u32::try_from(cfg.int("smtp.max_errors")).unwrap_or(10),
            timeout: cfg.duration("network.smtp.timeout"),
            data_deadline: cfg.duration("smtp.data_deadline"),
            tls_mode,
            tls: self.tls.read().ok().and_then(|t| t.clone()),
            require_auth: submission && cfg.bool("network.submission.require_auth"),
            require_tls: listener == Listener::Submission
                && cfg.bool("network.submission.require_tls"),
            helo_required: cfg.bool("smtp.helo_required"),
            vrfy: cfg.bool("smtp.vrfy_enabled"),
            events: self.events.clone(),
            phases: Some(self.phases.clone()),
            // Reinjected mail (quarantine releases, content-filter returns) was scanned.
            scanner: if cfg.bool("filter.enabled") && listener != Listener::Reinject {
                self.scanner.clone()
            } else {
                None
            },
            accept_unscanned: cfg.text("filter.unavailable_action") == "accept",
            auth: submission.then(|| {
                Arc::new(RpcdAuth {
                    socket: cfg.socket("mb-rpcd"),
                    protection: self.protection.clone(),
                }) as Arc<dyn crate::session::Authenticator>
            }),
        }
    }

    /// Accepts connections until shutdown, then waits for the sessions to end.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, kind: Listener, shutdown: Shutdown) {
        let mut sessions = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.requested() => break,
                a = listener.accept() => a,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            let shutdown = shutdown.clone();
            sessions.spawn(async move { server.session(stream, peer, kind, shutdown).await });
        }
        while sessions.join_next().await.is_some() {}
    }

    async fn session(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        kind: Listener,
        shutdown: Shutdown,
    ) {
        let _ = stream.set_nodelay(true);
        let ip = normalize(peer.ip());
        let cfg = self.follower.current();
        self.info.counters.add("connections", 1);
        let slot = match self.admit(&cfg, ip, kind) {
            Ok(slot) => slot,
            Err(reply) => {
                self.info.counters.add("connections_refused", 1);
                tracing::info!(client = %ip, listener = kind.name(), "connection refused: {reply}");
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    stream.write_all(reply.to_wire().as_bytes()),
                )
                .await;
                return;
            }
        };
        let policy = policy(&cfg);
        let shared = self.shared.read().ok().and_then(|s| s.clone());
        let (mut verdict, exempt) = match self.protection.lock() {
            Ok(mut p) => (
                p.admit(&policy, ip, kind, shared.is_none()),
                p.exempt(&policy, ip, kind),
            ),
            Err(_) => (Ok(()), true),
        };
        // With Redis, the rate is counted there, together with every other process.
        if let (Ok(()), Some(shared), false) = (&verdict, shared, exempt) {
            match shared.admit(&policy, ip).await {
                Ok(None) => {}
                Ok(Some(refusal)) => {
                    if let Ok(mut p) = self.protection.lock() {
                        p.banned_by_shared(&policy, ip);
                    }
                    verdict = Err(refusal);
                }
                Err(e) => {
                    self.info.counters.add("redis_errors", 1);
                    tracing::warn!(cause = %e, "Redis unreachable; counting this connection locally");
                    if let Ok(mut p) = self.protection.lock() {
                        verdict = p.admit(&policy, ip, kind, true);
                    }
                }
            }
        }
        if let Err(refusal) = verdict {
            drop(slot);
            self.info.counters.add("connections_refused", 1);
            let name = hostname(&cfg);
            let reply = match refusal {
                Refusal::Untrusted => format!(
                    "554 5.7.1 {name} {} is only open to trusted networks",
                    kind.name()
                ),
                Refusal::NewBan => {
                    self.info.counters.add("bans", 1);
                    let period = mb_core::value::format_duration(
                        cfg.duration("network.protection.autoban.period"),
                    );
                    tracing::warn!(client = %ip, "banned for {period}: too many connections");
                    format!("421 4.7.0 {name} Error: {ip} is banned, try again later")
                }
                Refusal::Banned => {
                    format!("421 4.7.0 {name} Error: {ip} is banned, try again later")
                }
            };
            tracing::info!(client = %ip, listener = kind.name(), "connection refused: {reply}");
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                stream.write_all(format!("{reply}\r\n").as_bytes()),
            )
            .await;
            return;
        }
        let settings = self.settings(&cfg, kind);
        let client = Client {
            ip,
            port: peer.port(),
        };
        tracing::debug!(client = %ip, listener = kind.name(), "connect");
        let io: Box<dyn mb_smtp::conn::Io> = if kind == Listener::Smtps {
            let Some(acceptor) = settings.tls.clone() else {
                return;
            };
            match tokio::time::timeout(settings.timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Box::new(tls),
                _ => {
                    tracing::info!(client = %ip, "TLS handshake failed on the SMTPS port");
                    return;
                }
            }
        } else {
            Box::new(stream)
        };
        let mut session = Session::new(io, &settings, &self.spool, client, kind);
        if kind == Listener::Smtps {
            session = session.with_tls("TLS (implicit)".into());
        }
        let summary = session.run(shutdown).await;
        drop(slot);
        let c = &self.info.counters;
        c.add("messages_accepted", summary.accepted.len() as u64);
        c.add("bytes_accepted", summary.bytes);
        c.add("relay_denied", u64::from(summary.relay_denied));
        c.add("session_errors", u64::from(summary.errors));
        c.add("auth_failed", u64::from(summary.auth_failed));
        if summary.tls {
            c.add("tls_sessions", 1);
        }
        // Sessions that ended on a refusal, by reason.
        let reason = match summary.end {
            "smuggling attempt" | "bare LF" => Some("ended_smuggling"),
            "early talker" => Some("ended_early_talker"),
            "improper pipelining" => Some("ended_pipelining"),
            "too many errors" => Some("ended_errors"),
            "too many auth failures" => Some("ended_auth_failures"),
            "timeout" | "timeout in DATA" | "DATA deadline" => Some("ended_timeout"),
            _ => None,
        };
        if let Some(r) = reason {
            c.add(r, 1);
        }
        tracing::info!(
            "disconnect from unknown[{ip}] {} client={ip} end=\"{}\"",
            summary.counts(),
            if summary.end.is_empty() {
                "quit"
            } else {
                summary.end
            }
        );
    }
}

/// Passwords are checked by mb-rpcd (`Users.Verify`), which holds the hashes.
struct RpcdAuth {
    socket: std::path::PathBuf,
    protection: Arc<Mutex<crate::protect::Protection>>,
}

impl crate::session::Authenticator for RpcdAuth {
    fn verify<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
        client: IpAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, AuthError>> + Send + 'a>>
    {
        Box::pin(async move {
            let channel = mb_runtime::uds::connect(&self.socket, "mb-rpcd")
                .await
                .map_err(|e| AuthError::Unreachable(e.to_string()))?;
            let r = mb_proto::v1::users_client::UsersClient::new(channel)
                .verify(mb_proto::v1::VerifyRequest {
                    username: user.to_string(),
                    password: password.to_string(),
                    client_ip: client.to_string(),
                })
                .await
                .map_err(|s| AuthError::Check(s.message().to_string()))?;
            let ok = r.into_inner().ok;
            if ok && let Ok(mut p) = self.protection.lock() {
                p.authenticated(client);
            }
            Ok(ok)
        })
    }
}

/// The protection policy of the configuration.
fn policy(cfg: &Config) -> Policy {
    let rate = cfg.rate("network.protection.autoban.rate");
    Policy {
        mode: Mode::parse(&cfg.text("network.protection.mode")),
        rate: rate.map_or(10, |r| r.count),
        window: rate.map_or(Duration::from_secs(60), |r| r.per),
        ban_for: cfg.duration("network.protection.autoban.period"),
        trusted_networks: cfg.nets("network.protection.trusted_networks"),
    }
}

/// Every few seconds: stores this process's bans and trusts in mb-rpcd, and re-reads the
/// list (so `mb-ban` changes and other processes' decisions take effect here).
pub async fn sync_access(server: Arc<Server>, shutdown: Shutdown) {
    use mb_proto::v1::access_client::AccessClient;
    use mb_proto::v1::{AccessEntry, ListAccessRequest};
    loop {
        let socket = server.follower.current().socket("mb-rpcd");
        if let Ok(channel) = mb_runtime::uds::connect(&socket, "mb-rpcd").await {
            let mut client = AccessClient::new(channel);
            let pending: Vec<_> = server
                .protection
                .lock()
                .map(|p| p.pending.clone())
                .unwrap_or_default();
            let mut stored = 0;
            for d in &pending {
                let entry = AccessEntry {
                    ip: d.ip.to_string(),
                    kind: if d.trust { "trust" } else { "ban" }.into(),
                    seconds: d.for_secs,
                    reason: d.reason.clone(),
                    added_by: "mb-smtpd".into(),
                    ..Default::default()
                };
                if client.add(entry).await.is_err() {
                    break;
                }
                stored += 1;
            }
            if let Ok(mut p) = server.protection.lock() {
                let n = stored.min(p.pending.len());
                p.pending.drain(..n);
            }
            if let Ok(list) = client.list(ListAccessRequest::default()).await {
                let entries: Vec<(IpAddr, bool, u64)> = list
                    .into_inner()
                    .entries
                    .iter()
                    .filter_map(|e| Some((e.ip.parse().ok()?, e.kind == "trust", e.seconds)))
                    .collect();
                let window = policy(&server.follower.current()).window;
                if let Ok(mut p) = server.protection.lock() {
                    p.load(&entries, window);
                }
            }
        }
        tokio::select! {
            () = shutdown.requested() => return,
            () = tokio::time::sleep(ACCESS_SYNC) => {}
        }
    }
}

/// How often bans and trusts are exchanged with mb-rpcd.
const ACCESS_SYNC: Duration = Duration::from_secs(3);

/// IPv4-mapped IPv6 addresses are IPv4 clients.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `smtp.hostname`, or the system's host name.
pub fn hostname(cfg: &Config) -> String {
    let h = cfg.text("smtp.hostname");
    if !h.is_empty() {
        return h;
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Why the TLS settings cannot be used (a bad file at start is exit 64; on reload the
/// running settings are kept).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "network.tls.ciphers {0:?} names no TLS 1.2 suite this server implements \
         (ECDHE-ECDSA/RSA with AES128-GCM-SHA256, AES256-GCM-SHA384 or CHACHA20-POLY1305)"
    )]
    NoCipher(String),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("cannot {doing} {}: {cause}", path.display())]
    File {
        doing: &'static str,
        path: std::path::PathBuf,
        cause: String,
    },
    #[error("no certificate in {}", .0.display())]
    NoCertificate(std::path::PathBuf),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    fn file(
        doing: &'static str,
        path: &std::path::Path,
        cause: impl std::fmt::Display,
    ) -> TlsError {
        TlsError::File {
            doing,
            path: path.to_path_buf(),
            cause: cause.to_string(),
        }
    }
}

/// The 421 that refuses a connection over a limit.
fn busy(text: String) -> Reply {
    Reply::new(421, EnhancedStatus::new(4, 7, 0), text)
}

/// The TLS suites allowed by `network.tls.ciphers`, an OpenSSL-style list that restricts
/// TLS 1.2 (TLS 1.3 suites are always offered, as with OpenSSL). Names the TLS stack does
/// not implement (CBC, DHE) are skipped; a list that leaves no TLS 1.2 suite is an error.
pub fn cipher_suites(list: &str) -> Result<Vec<rustls::SupportedCipherSuite>, TlsError> {
    use rustls::CipherSuite as C;
    let all = rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES;
    if list.trim().is_empty() {
        return Ok(all.to_vec());
    }
    let wanted: Vec<C> = list
        .split([':', ',', ' '])
        .filter_map(|name| match name.trim() {
            "ECDHE-ECDSA-AES128-GCM-SHA256" => Some(C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            "ECDHE-ECDSA-AES256-GCM-SHA384" => Some(C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
            "ECDHE-ECDSA-CHACHA20-POLY1305" => {
                Some(C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
            }
            "ECDHE-RSA-AES128-GCM-SHA256" => Some(C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
            "ECDHE-RSA-AES256-GCM-SHA384" => Some(C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
            "ECDHE-RSA-CHACHA20-POLY1305" => Some(C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return Err(TlsError::NoCipher(list.to_string()));
    }
    Ok(all
        .iter()
        .filter(|s| s.tls13().is_some() || wanted.contains(&s.suite()))
        .copied()
        .collect())
}

/// The TLS versions `network.tls.versions` and `network.tls.min_version` allow.
pub fn tls_versions(cfg: &Config) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let min = cfg.text("network.tls.min_version");
    let offered = cfg.list("network.tls.versions");
    let mut v = Vec::new();
    if offered.iter().any(|x| x == "1.3") {
        v.push(&rustls::version::TLS13);
    }
    if min == "1.2" && offered.iter().any(|x| x == "1.2") {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// The TLS acceptor from `network.smtp.tls.{cert,key}`; when neither file exists, a
/// self-signed certificate is generated under `paths.data_dir/tls/` (with a warning).
pub fn tls_acceptor(cfg: &Config) -> Result<Option<TlsAcceptor>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if cfg.text("network.smtp.tls.inbound") == "none" && !cfg.bool("network.smtps.enabled") {
        return Ok(None);
    }
    let (mut cert, mut key) = (
        cfg.path("network.smtp.tls.cert"),
        cfg.path("network.smtp.tls.key"),
    );
    if !cert.exists() && !key.exists() {
        let dir = cfg.path("paths.data_dir").join("tls");
        let (c, k) = (dir.join("selfsigned.crt"), dir.join("selfsigned.key"));
        if !c.exists() || !k.exists() {
            let name = hostname(cfg);
            let generated = rcgen::generate_simple_self_signed(vec![name.clone()])
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            std::fs::create_dir_all(&dir).map_err(|e| TlsError::file("create", &dir, e))?;
            std::fs::write(&c, generated.cert.pem()).map_err(|e| TlsError::file("write", &c, e))?;
            std::fs::write(&k, generated.signing_key.serialize_pem())
                .map_err(|e| TlsError::file("write", &k, e))?;
        }
        tracing::warn!(
            cert = %c.display(),
            "network.smtp.tls.cert does not exist: using a self-signed certificate; install a real one"
        );
        (cert, key) = (c, k);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| TlsError::file("read", &cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::file("parse the certificates in", &cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert));
    }
    let key =
        PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError::file("read the key", &key, e))?;
    let versions = tls_versions(cfg);
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = cipher_suites(&cfg.text("network.tls.ciphers"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.ignore_client_order = cfg.bool("network.tls.prefer_server_ciphers");
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}
