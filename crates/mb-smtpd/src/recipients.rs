//! Recipient verification's shared state (`smtp.recipient_verification`): the valid
//! recipient list read from mb-rpcd (`list`), the callout prober with its caches
//! (`callout`) and the LDAP directory (`ldap`). Sessions ask [`Verifier::check`] at RCPT
//! (session/verify.rs turns the answer into a reply).
//!
//! The list is kept in memory and refreshed from mb-rpcd every few seconds, as the
//! filter workers refresh policies, and cached on disk so that mb-smtpd restarted while
//! mb-rpcd is down still verifies. Until a list was ever loaded (no cache, mb-rpcd
//! down), list mode answers 450 4.1.1 rather than guess.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mb_core::Config;
use mb_core::recipients::{Lookup, Pattern, RecipientList};
use mb_core::route::{Hop, Protocol};
use mb_proto::v1::ListRecipientsRequest;
use mb_proto::v1::recipients_client::RecipientsClient;
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_smtp::client::{Client, ClientError};
use redis::aio::ConnectionManager;

use crate::dns::Dns;

/// How often the list is re-read from mb-rpcd (an unchanged list costs one small query).
pub const REFRESH: Duration = Duration::from_secs(3);

/// Largest list answer read from mb-rpcd.
const MAX_LIST_ANSWER: usize = 256 << 20;

/// Most callout answers kept in memory: refused addresses are cached too, so a
/// dictionary attack would otherwise grow the cache by one entry per guess.
const CALLOUT_CACHE_MAX: usize = 100_000;

/// The Redis key prefix of callout answers shared between processes and nodes.
const REDIS_PREFIX: &str = "mb:callout:";

/// `smtp.recipient_verification`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    List,
    Callout,
    Ldap,
}

impl Mode {
    pub fn from_config(cfg: &Config) -> Mode {
        match cfg.text("smtp.recipient_verification").as_str() {
            "list" => Mode::List,
            "callout" => Mode::Callout,
            "ldap" => Mode::Ldap,
            _ => Mode::None,
        }
    }
}

/// What verification says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted (a known user, or nothing that can be verified: see the warnings).
    Accept,
    /// No such user: 550 5.1.1. The text says who said so, for the log.
    Unknown(String),
    /// The answer cannot be had now: 450 4.1.1. The text says why, for the log.
    TryLater(String),
}

/// Why a callout could not answer (never "no such user": that is a 5xx at RCPT).
#[derive(Debug, thiserror::Error)]
pub enum CalloutError {
    #[error("cannot resolve next hop {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot connect to next hop {hop}: {reason}")]
    Connect { hop: String, reason: String },
    #[error("next hop {hop}: {source}")]
    Session {
        hop: String,
        #[source]
        source: ClientError,
    },
    #[error("next hop {hop} answered RCPT with {reply}")]
    Transient { hop: String, reply: String },
    #[error("next hop {hop} did not answer within {seconds}s")]
    Timeout { hop: String, seconds: u64 },
}

/// The list as loaded, with mb-rpcd's version of it.
struct Loaded {
    version: String,
    list: Arc<RecipientList>,
}

/// The on-disk cache of the list.
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    version: String,
    patterns: Vec<String>,
}

/// Why the list could not be read from mb-rpcd (the last one is kept).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Connect(#[from] mb_runtime::uds::ConnectError),
    #[error("{}", .0.message())]
    Rpc(Box<tonic::Status>),
}

impl From<tonic::Status> for FetchError {
    fn from(s: tonic::Status) -> Self {
        FetchError::Rpc(Box::new(s))
    }
}

/// One callout answer, remembered until `until`.
#[derive(Debug, Clone, Copy)]
struct Cached {
    exists: bool,
    until: Instant,
}

/// Recipient verification's state, one per process.
pub struct Verifier {
    follower: Follower,
    list: RwLock<Option<Loaded>>,
    cache_path: PathBuf,
    callouts: Mutex<HashMap<String, Cached>>,
    /// Callouts made (connections opened to next hops), for the tests and status.
    pub probes: std::sync::atomic::AtomicU64,
    redis: Option<ConnectionManager>,
    dns: Option<Dns>,
    ldap: Mutex<Option<Arc<mb_runtime::ldap::Directory>>>,
    /// What was warned about once (unlisted domains, domains a callout cannot ask).
    warned: Mutex<HashSet<String>>,
}

impl Verifier {
    /// Starts from the disk cache of the list, if there is one.
    pub fn new(
        follower: Follower,
        cache_path: PathBuf,
        redis: Option<ConnectionManager>,
        dns: Option<Dns>,
    ) -> Verifier {
        let list = read_cache(&cache_path).map(|c| Loaded {
            list: Arc::new(RecipientList::new(
                c.patterns.iter().filter_map(|p| Pattern::parse(p).ok()),
            )),
            version: c.version,
        });
        if let Some(l) = &list {
            tracing::info!(count = l.list.len(), cache = %cache_path.display(), "valid recipients loaded from the cache");
        }
        Verifier {
            follower,
            list: RwLock::new(list),
            cache_path,
            callouts: Mutex::new(HashMap::new()),
            probes: std::sync::atomic::AtomicU64::new(0),
            redis,
            dns,
            ldap: Mutex::new(None),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// Patterns in the loaded list, and callouts made so far (for `Control.Status`).
    pub fn counts(&self) -> (u64, u64) {
        let listed = self
            .list
            .read()
            .ok()
            .and_then(|g| g.as_ref().map(|l| l.list.len() as u64))
            .unwrap_or(0);
        (
            listed,
            self.probes.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Whether `key` was not warned about yet (and is now).
    fn first_warning(&self, key: String) -> bool {
        self.warned.lock().is_ok_and(|mut w| w.insert(key))
    }

    /// Verifies one recipient at a served domain. `delimiter` is
    /// `smtp.recipient_delimiter`: `user+tag@` is also tried as `user@`.
    pub async fn check(&self, mode: Mode, address: &str, delimiter: &str) -> Answer {
        match mode {
            Mode::None => Answer::Accept,
            Mode::List => self.check_list(address, delimiter),
            Mode::Callout => self.check_callout(address, delimiter).await,
            Mode::Ldap => self.check_ldap(address, delimiter).await,
        }
    }

    fn check_list(&self, address: &str, delimiter: &str) -> Answer {
        let list = match self.list.read() {
            Ok(g) => g.as_ref().map(|l| l.list.clone()),
            Err(p) => p.into_inner().as_ref().map(|l| l.list.clone()),
        };
        let Some(list) = list else {
            return Answer::TryLater(
                "the valid recipient list was never loaded (mb-rpcd unreachable, no cache)".into(),
            );
        };
        match list.lookup(address, delimiter) {
            Lookup::Known(_) => Answer::Accept,
            Lookup::Unknown => Answer::Unknown("not in the valid recipient list".into()),
            Lookup::Unlisted => {
                let domain = domain_of(address);
                if self.first_warning(format!("list:{domain}")) {
                    tracing::warn!(domain = %domain, "recipient verification is in list mode but domain {domain} has no valid recipients listed: accepting every address of it (mb-recipient add or import)");
                }
                Answer::Accept
            }
        }
    }

    async fn check_ldap(&self, address: &str, delimiter: &str) -> Answer {
        let cfg = self.follower.current();
        let Some(settings) = mb_runtime::ldap::LdapSettings::from_config(&cfg) else {
            tracing::error!(
                "smtp.recipient_verification is ldap but ldap.url is empty: answering 450"
            );
            return Answer::TryLater("ldap.url is not set".into());
        };
        let directory = {
            let Ok(mut d) = self.ldap.lock() else {
                return Answer::TryLater("internal error".into());
            };
            match d.as_ref() {
                Some(dir) if *dir.settings() == settings => dir.clone(),
                _ => {
                    let dir = mb_runtime::ldap::Directory::new(settings);
                    *d = Some(dir.clone());
                    dir
                }
            }
        };
        let mut candidates = vec![address.to_string()];
        candidates.extend(mb_core::recipients::strip_address_extension(
            address, delimiter,
        ));
        for a in &candidates {
            match directory.recipient_exists(a).await {
                Ok(true) => return Answer::Accept,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(cause = %e, "LDAP recipient lookup failed: answering 450");
                    return Answer::TryLater(e.to_string());
                }
            }
        }
        Answer::Unknown("not found in the LDAP directory".into())
    }

    async fn check_callout(&self, address: &str, delimiter: &str) -> Answer {
        // The next hop knows the full address or not; its extension rules are its own,
        // so the address is asked as written. The delimiter only shares the cache entry
        // of `user@` between `user+a@` and `user+b@` when the base is known to exist.
        let key = address.to_lowercase();
        if let Some(exists) = self.cached(&key).await {
            return callout_answer(exists, "cached");
        }
        if let Some(base) = mb_core::recipients::strip_address_extension(&key, delimiter)
            && self.cached(&base).await == Some(true)
        {
            return Answer::Accept;
        }
        let cfg = self.follower.current();
        let timeout = cfg.duration("smtp.callout.timeout");
        let probe = tokio::time::timeout(timeout * 4, self.probe(&cfg, address, timeout));
        let result = match probe.await {
            Ok(r) => r,
            Err(_) => Err(CalloutError::Timeout {
                hop: "next hop".into(),
                seconds: timeout.as_secs() * 4,
            }),
        };
        match result {
            Ok(None) => Answer::Accept,
            Ok(Some((exists, reply))) => {
                let ttl = if exists {
                    cfg.duration("smtp.callout.positive_ttl")
                } else {
                    cfg.duration("smtp.callout.negative_ttl")
                };
                self.remember(&key, exists, ttl).await;
                callout_answer(exists, &reply)
            }
            Err(e) => {
                tracing::warn!(to = %address, cause = %e, "recipient verification callout failed: answering 450");
                Answer::TryLater(e.to_string())
            }
        }
    }

    /// The cached callout answer for `key`: memory, then Redis.
    async fn cached(&self, key: &str) -> Option<bool> {
        let now = Instant::now();
        if let Ok(c) = self.callouts.lock()
            && let Some(hit) = c.get(key)
            && hit.until > now
        {
            return Some(hit.exists);
        }
        let mut conn = self.redis.clone()?;
        let got: Option<(String, i64)> = tokio::time::timeout(Duration::from_secs(1), async {
            redis::pipe()
                .get(format!("{REDIS_PREFIX}{key}"))
                .ttl(format!("{REDIS_PREFIX}{key}"))
                .query_async::<(Option<String>, i64)>(&mut conn)
                .await
                .ok()
                .and_then(|(v, ttl)| v.map(|v| (v, ttl)))
        })
        .await
        .ok()
        .flatten();
        let (value, ttl) = got?;
        let exists = value == "1";
        if ttl > 0 {
            self.remember_locally(key, exists, Duration::from_secs(ttl.unsigned_abs()));
        }
        Some(exists)
    }

    fn remember_locally(&self, key: &str, exists: bool, ttl: Duration) {
        let now = Instant::now();
        if let Ok(mut c) = self.callouts.lock() {
            if c.len() >= CALLOUT_CACHE_MAX {
                c.retain(|_, v| v.until > now);
                if c.len() >= CALLOUT_CACHE_MAX {
                    // Still full of live entries: forget the lot rather than grow.
                    c.clear();
                }
            }
            c.insert(
                key.to_string(),
                Cached {
                    exists,
                    until: now + ttl,
                },
            );
        }
    }

    async fn remember(&self, key: &str, exists: bool, ttl: Duration) {
        self.remember_locally(key, exists, ttl);
        if let Some(mut conn) = self.redis.clone() {
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{REDIS_PREFIX}{key}"))
                .arg(if exists { "1" } else { "0" })
                .arg("EX")
                .arg(ttl.as_secs().max(1));
            let set = cmd.query_async::<()>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), set).await {
                tracing::warn!(cause = %e, "cannot share a callout answer through Redis");
            }
        }
    }

    /// Asks the next hop of `address`. `Ok(None)`: nothing to ask (no usable next hop:
    /// accepted, with a warning once per domain); `Ok(Some((exists, reply)))`: the
    /// next hop's answer to RCPT, 2xx or 5xx.
    async fn probe(
        &self,
        cfg: &Config,
        address: &str,
        timeout: Duration,
    ) -> Result<Option<(bool, String)>, CalloutError> {
        let domain = domain_of(address);
        let transport = mb_core::route::parse_transport(
            &cfg.list("relay.transport"),
            cfg.port("queue.mx_port"),
        )
        .unwrap_or_default();
        let hop = match crate::qmgr::resolve::route(cfg, &transport, address) {
            Ok((hop, _)) => hop,
            Err(e) => {
                if self.first_warning(format!("callout:{domain}")) {
                    tracing::warn!(domain = %domain, cause = %e, "recipient verification callout cannot ask anyone for {domain} (no relay host or transport entry): accepting its recipients");
                }
                return Ok(None);
            }
        };
        let lmtp = hop.protocol == Protocol::Lmtp;
        let shown = hop.to_string();
        let (io, remote): (Box<dyn mb_smtp::conn::Io>, String) = match &hop.hop {
            Hop::Mx { .. } => {
                if self.first_warning(format!("callout:{domain}")) {
                    tracing::warn!(domain = %domain, next_hop = %shown, "recipient verification callout does not ask MX hosts (set a relay host or a transport entry for {domain}): accepting its recipients");
                }
                return Ok(None);
            }
            Hop::Unix(path) => {
                let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| CalloutError::Connect {
                        hop: shown.clone(),
                        reason: "timed out".into(),
                    })?
                    .map_err(|e| CalloutError::Connect {
                        hop: shown.clone(),
                        reason: e.to_string(),
                    })?;
                (Box::new(s), shown.clone())
            }
            Hop::Host { host, port } => {
                let ips = self.addresses(cfg, host).await?;
                let own = crate::qmgr::resolve::own_addresses(cfg);
                let ports = own_ports(cfg);
                let mut last = String::from("no address");
                let mut stream = None;
                for ip in ips {
                    if crate::qmgr::resolve::is_self(ip, &own) && ports.contains(port) {
                        if self.first_warning(format!("callout-self:{domain}")) {
                            tracing::warn!(domain = %domain, next_hop = %shown, "recipient verification callout refuses to ask this gateway itself ({ip} port {port}): accepting recipients of {domain}");
                        }
                        return Ok(None);
                    }
                    let addr = std::net::SocketAddr::new(ip, *port);
                    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
                    {
                        Ok(Ok(s)) => {
                            stream = Some((s, addr.to_string()));
                            break;
                        }
                        Ok(Err(e)) => last = format!("{addr}: {e}"),
                        Err(_) => last = format!("{addr}: timed out"),
                    }
                }
                let Some((s, remote)) = stream else {
                    return Err(CalloutError::Connect {
                        hop: shown,
                        reason: last,
                    });
                };
                (Box::new(s), remote)
            }
        };
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = |source| CalloutError::Session {
            hop: remote.clone(),
            source,
        };
        let mut client = Client::connect(io, timeout, lmtp).await.map_err(session)?;
        client
            .hello(&crate::server::hostname(cfg))
            .await
            .map_err(session)?;
        let reply = client.probe_recipient("", address).await.map_err(session)?;
        client.quit().await;
        tracing::info!(to = %address, next_hop = %remote, reply = %reply.text(), "recipient verification callout");
        if reply.is_positive() {
            Ok(Some((true, reply.text())))
        } else if reply.code >= 500 {
            Ok(Some((false, reply.text())))
        } else {
            Err(CalloutError::Transient {
                hop: remote,
                reply: reply.text(),
            })
        }
    }

    async fn addresses(
        &self,
        cfg: &Config,
        host: &str,
    ) -> Result<Vec<std::net::IpAddr>, CalloutError> {
        if let Ok(ip) = host.parse() {
            return Ok(vec![ip]);
        }
        let Some(dns) = &self.dns else {
            return Err(CalloutError::Resolve {
                host: host.into(),
                reason: "no resolver".into(),
            });
        };
        dns.addresses(host, cfg.bool("network.ipv6.enabled"))
            .await
            .map_err(|f| CalloutError::Resolve {
                host: host.into(),
                reason: format!("{f:?}"),
            })
    }

    /// Re-reads the list from mb-rpcd every `REFRESH` while list mode is on, until
    /// shutdown; keeps the last list while mb-rpcd cannot be reached.
    pub fn spawn_refresh(self: &Arc<Self>, shutdown: Shutdown) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                let cfg = this.follower.current();
                if Mode::from_config(&cfg) == Mode::List {
                    match this.refresh(&cfg.socket("mb-rpcd")).await {
                        Ok(()) => warned = false,
                        Err(e) if !warned => {
                            warned = true;
                            tracing::warn!(cause = %e, "cannot read the valid recipients from mb-rpcd; keeping the last known list");
                        }
                        Err(_) => {}
                    }
                }
                tokio::select! {
                    () = shutdown.requested() => break,
                    () = tokio::time::sleep(REFRESH) => {}
                }
            }
        });
    }

    async fn refresh(&self, socket: &Path) -> Result<(), FetchError> {
        let version = self
            .list
            .read()
            .ok()
            .and_then(|g| g.as_ref().map(|l| l.version.clone()))
            .unwrap_or_default();
        let channel = mb_runtime::uds::connect(socket, "mb-rpcd").await?;
        let r = RecipientsClient::new(channel)
            .max_decoding_message_size(MAX_LIST_ANSWER)
            .list(ListRecipientsRequest {
                domain: String::new(),
                if_not_version: version,
            })
            .await?
            .into_inner();
        if r.unchanged {
            return Ok(());
        }
        let patterns: Vec<String> = r.entries.into_iter().map(|e| e.pattern).collect();
        let list = RecipientList::new(patterns.iter().filter_map(|p| Pattern::parse(p).ok()));
        tracing::info!(count = list.len(), version = %r.version, "valid recipients loaded");
        write_cache(
            &self.cache_path,
            &CacheFile {
                version: r.version.clone(),
                patterns,
            },
        );
        if let Ok(mut g) = self.list.write() {
            *g = Some(Loaded {
                version: r.version,
                list: Arc::new(list),
            });
        }
        Ok(())
    }
}

fn callout_answer(exists: bool, reply: &str) -> Answer {
    if exists {
        Answer::Accept
    } else {
        Answer::Unknown(format!("the next hop refused it ({reply})"))
    }
}

/// The ports this gateway's own SMTP listeners use: a next hop on one of these at one of
/// our addresses is this gateway.
fn own_ports(cfg: &Config) -> Vec<u16> {
    vec![
        cfg.port("network.smtp.port"),
        cfg.port("network.submission.port"),
        cfg.port("network.smtps.port"),
        cfg.port("network.reinject.port"),
    ]
}

fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map_or(String::new(), |(_, d)| d.to_lowercase())
}

fn read_cache(path: &Path) -> Option<CacheFile> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_cache(path: &Path, c: &CacheFile) {
    let Ok(text) = serde_json::to_string(c) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!(path = %path.display(), "cannot cache the valid recipients on disk");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(dir: &Path, extra: &str) -> (Verifier, mb_runtime::lifecycle::ShutdownTrigger) {
        let text = format!(
            "[paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\n\
             [smtp]\nhostname = \"gw.test\"\ndomains = \"served.example,mx.example\"\n{extra}",
            d = dir.display()
        );
        let cfg = Config::from_toml_str(&text, "test").unwrap();
        let (trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", cfg, shutdown);
        (
            Verifier::new(follower, dir.join("recipients.json"), None, None),
            trigger,
        )
    }

    #[tokio::test]
    async fn list_mode_answers_from_the_cached_list_and_450_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let (v, _t) = verifier(dir.path(), "");
        assert!(matches!(
            v.check(Mode::List, "bob@served.example", "+").await,
            Answer::TryLater(_)
        ));
        write_cache(
            &dir.path().join("recipients.json"),
            &CacheFile {
                version: "2:2".into(),
                patterns: vec!["bob@served.example".into(), "sales-*@served.example".into()],
            },
        );
        let (v, _t) = verifier(dir.path(), "");
        let check = |a: &'static str| v.check(Mode::List, a, "+");
        assert_eq!(check("Bob+news@served.example").await, Answer::Accept);
        assert_eq!(check("sales-eu@served.example").await, Answer::Accept);
        assert!(matches!(
            check("carol@served.example").await,
            Answer::Unknown(_)
        ));
        // A domain without entries is accepted (and warned about once).
        assert_eq!(check("carol@mx.example").await, Answer::Accept);
        assert!(!v.first_warning("list:mx.example".into()));
        assert_eq!(
            v.check(Mode::None, "carol@served.example", "+").await,
            Answer::Accept
        );
    }

    #[tokio::test]
    async fn callouts_never_ask_mx_routed_domains_and_the_cache_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        // served.example has neither relay host nor transport entry: its MX is us.
        let (v, _t) = verifier(dir.path(), "");
        assert_eq!(
            v.check(Mode::Callout, "bob@served.example", "+").await,
            Answer::Accept
        );
        assert_eq!(v.probes.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Remembered answers, both ways, and an extension sharing its base's answer.
        v.remember("known@served.example", true, Duration::from_secs(60))
            .await;
        v.remember("gone@served.example", false, Duration::from_secs(60))
            .await;
        assert_eq!(
            v.check(Mode::Callout, "known+tag@served.example", "+")
                .await,
            Answer::Accept
        );
        assert!(matches!(
            v.check(Mode::Callout, "Gone@served.example", "+").await,
            Answer::Unknown(_)
        ));
        // A dictionary attack cannot grow the cache past its bound.
        for i in 0..CALLOUT_CACHE_MAX + 10 {
            v.remember_locally(
                &format!("guess{i}@served.example"),
                false,
                Duration::from_secs(60),
            );
        }
        assert!(v.callouts.lock().unwrap().len() <= CALLOUT_CACHE_MAX);
    }
}
