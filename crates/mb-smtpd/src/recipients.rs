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

/// Most callout answers of each kind kept in memory: refused addresses are cached too,
/// so a dictionary attack would otherwise grow the cache by one entry per guess. The
/// two kinds have their own bounds so that guesses never push out known users.
const CALLOUT_CACHE_MAX: usize = 100_000;

/// The longest a whole callout may take (waiting for a slot, connecting, TLS, every
/// command): past it the client gets 450 "try again later" at once, as Postfix answers
/// "verification in progress", instead of keeping its session waiting.
const CALLOUT_BUDGET: Duration = Duration::from_secs(10);

/// How long a next hop that did not answer is remembered as down: meanwhile its
/// recipients get 450 at once instead of one more timeout each.
const HOP_DOWN_TTL: Duration = Duration::from_secs(30);

/// Most callouts in progress at once in this process.
const MAX_CALLOUTS: usize = 20;

/// Most distinct things warned about once: the keys come from client input (the
/// domains of recipients), so the set is bounded.
const WARNED_MAX: usize = 1024;

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
    #[error("next hop {hop} did not answer recently: not asked again for a while")]
    HopDown { hop: String },
    #[error("TLS with next hop {hop}: {reason}")]
    Tls { hop: String, reason: String },
    #[error(
        "next hop {hop} is the relay host with relay.auth.username set, but the session is not encrypted (set relay.tls)"
    )]
    AuthWithoutTls { hop: String },
    #[error("next hop {hop} refused RCPT for another reason than an unknown user: {reply}")]
    Refused { hop: String, reply: String },
    #[error("too many callouts in progress")]
    Busy,
}

impl CalloutError {
    /// Whether the next hop did not answer at all (remembered as down for a while).
    fn hop_unreachable(&self) -> Option<&str> {
        match self {
            CalloutError::Connect { hop, .. } | CalloutError::Timeout { hop, .. } => Some(hop),
            CalloutError::Session {
                hop,
                source: ClientError::Timeout | ClientError::Io(_),
            } => Some(hop),
            _ => None,
        }
    }
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
    #[error("building the list failed: {0}")]
    Build(String),
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

/// Remembered callout answers, the refused ones apart from the accepted ones.
#[derive(Default)]
struct Answers {
    known: HashMap<String, Cached>,
    unknown: HashMap<String, Cached>,
}

impl Answers {
    fn get(&self, key: &str) -> Option<&Cached> {
        self.known.get(key).or_else(|| self.unknown.get(key))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.len() + self.unknown.len()
    }
}

/// Recipient verification's state, one per process.
pub struct Verifier {
    follower: Follower,
    list: RwLock<Option<Loaded>>,
    cache_path: PathBuf,
    callouts: Mutex<Answers>,
    /// Callouts in progress by address: a second session asking the same address waits
    /// for the first one's answer instead of opening its own connection.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Answer>>>>,
    /// Limits callouts in progress (`MAX_CALLOUTS`).
    slots: tokio::sync::Semaphore,
    /// Next hops that did not answer, until when they are not asked.
    down: Mutex<HashMap<String, Instant>>,
    /// TLS client configurations, as the queue manager builds them.
    tls: crate::qmgr::tls::Connectors,
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
            callouts: Mutex::new(Answers::default()),
            in_flight: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(MAX_CALLOUTS),
            down: Mutex::new(HashMap::new()),
            tls: crate::qmgr::tls::Connectors::default(),
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

    /// Whether `key` was not warned about yet (and is now). Once `WARNED_MAX` keys were
    /// warned about, nothing new is (the keys are recipient domains a client chose).
    fn first_warning(&self, key: String) -> bool {
        self.warned.lock().is_ok_and(|mut w| {
            if w.len() >= WARNED_MAX && !w.contains(&key) {
                return false;
            }
            w.insert(key)
        })
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
        // Single flight: sessions asking the same address share one callout.
        let cell = match self.in_flight.lock() {
            Ok(mut m) => m.entry(key.clone()).or_default().clone(),
            Err(_) => return Answer::TryLater("internal error".into()),
        };
        let answer = cell
            .get_or_init(|| self.callout(address, &key))
            .await
            .clone();
        if let Ok(mut m) = self.in_flight.lock()
            && m.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            m.remove(&key);
        }
        answer
    }

    /// One callout for `address` within `CALLOUT_BUDGET`; remembers its answer.
    async fn callout(&self, address: &str, key: &str) -> Answer {
        let deadline = tokio::time::Instant::now() + CALLOUT_BUDGET;
        let cfg = self.follower.current();
        let step = cfg.duration("smtp.callout.timeout").min(CALLOUT_BUDGET);
        let result = match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            Ok(Ok(_permit)) => self.probe(&cfg, address, step, deadline).await,
            _ => Err(CalloutError::Busy),
        };
        match result {
            Ok(None) => Answer::Accept,
            Ok(Some((exists, reply))) => {
                let ttl = if exists {
                    cfg.duration("smtp.callout.positive_ttl")
                } else {
                    cfg.duration("smtp.callout.negative_ttl")
                };
                self.remember(key, exists, ttl).await;
                callout_answer(exists, &reply)
            }
            Err(e) => {
                if let Some(hop) = e.hop_unreachable()
                    && let Ok(mut d) = self.down.lock()
                {
                    let now = Instant::now();
                    // The map holds configured next hops only; pruning keeps it so.
                    d.retain(|_, until| *until > now);
                    d.insert(hop.to_string(), now + HOP_DOWN_TTL);
                }
                tracing::warn!(to = %address, cause = %e, "recipient verification callout failed: answering 450");
                Answer::TryLater(e.to_string())
            }
        }
    }

    /// Whether `hop` did not answer a callout within the last `HOP_DOWN_TTL`.
    fn hop_down(&self, hop: &str) -> bool {
        let now = Instant::now();
        self.down
            .lock()
            .is_ok_and(|d| d.get(hop).is_some_and(|until| *until > now))
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
            let c = &mut *c;
            let (map, other) = if exists {
                (&mut c.known, &mut c.unknown)
            } else {
                (&mut c.unknown, &mut c.known)
            };
            other.remove(key);
            if map.len() >= CALLOUT_CACHE_MAX {
                map.retain(|_, v| v.until > now);
                if map.len() >= CALLOUT_CACHE_MAX {
                    // Still full of live entries of this kind: forget them rather than
                    // grow. Refused guesses never push out known users this way.
                    map.clear();
                }
            }
            map.insert(
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

    /// Asks the next hop of `address`, each step within `step` and the whole by
    /// `deadline`. `Ok(None)`: nothing to ask (no usable next hop: accepted, with a
    /// warning once per domain); `Ok(Some((exists, reply)))`: the next hop's answer to
    /// RCPT, 2xx or a 5xx that says the user is unknown.
    async fn probe(
        &self,
        cfg: &Config,
        address: &str,
        step: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(bool, String)>, CalloutError> {
        let domain = domain_of(address);
        let transport = mb_core::route::parse_transport(
            &cfg.list("relay.transport"),
            cfg.port("queue.mx_port"),
        )
        .unwrap_or_default();
        let (hop, relay) = match crate::qmgr::resolve::route(cfg, &transport, address) {
            Ok(r) => r,
            Err(e) => {
                if self.first_warning(format!("callout:{domain}")) {
                    tracing::warn!(domain = %domain, cause = %e, "recipient verification callout cannot ask anyone for {domain} (no relay host or transport entry): accepting its recipients");
                }
                return Ok(None);
            }
        };
        let shown = hop.to_string();
        if let Hop::Mx { .. } = &hop.hop {
            if self.first_warning(format!("callout:{domain}")) {
                tracing::warn!(domain = %domain, next_hop = %shown, "recipient verification callout does not ask MX hosts (set a relay host or a transport entry for {domain}): accepting its recipients");
            }
            return Ok(None);
        }
        if self.hop_down(&shown) {
            return Err(CalloutError::HopDown { hop: shown });
        }
        let budget_spent = || CalloutError::Timeout {
            hop: shown.clone(),
            seconds: CALLOUT_BUDGET.as_secs(),
        };
        match tokio::time::timeout_at(deadline, self.ask(cfg, address, &hop, relay, step)).await {
            // A step's own timeout that ran out with the budget is the budget's: the step
            // is capped at the budget, and on a loaded machine both timers are due at the
            // same wake-up, where the step's is seen first.
            Ok(Err(CalloutError::Session {
                source: ClientError::Timeout,
                ..
            })) if tokio::time::Instant::now() >= deadline => Err(budget_spent()),
            Ok(r) => r,
            Err(_) => Err(budget_spent()),
        }
    }

    /// Connects to `hop` as the queue manager would deliver to it (implicit TLS or
    /// STARTTLS per `relay.tls` or `network.smtp.tls.outbound`, relay AUTH) and asks
    /// for `address`.
    async fn ask(
        &self,
        cfg: &Config,
        address: &str,
        hop: &mb_core::route::NextHop,
        relay: bool,
        step: Duration,
    ) -> Result<Option<(bool, String)>, CalloutError> {
        let domain = domain_of(address);
        let lmtp = hop.protocol == Protocol::Lmtp;
        // Errors name the configured next hop: that is what the down cache remembers.
        let shown = hop.to_string();
        let (io, name, remote): (Box<dyn mb_smtp::conn::Io>, String, String) = match &hop.hop {
            Hop::Mx { .. } => return Ok(None),
            Hop::Unix(path) => {
                let s = tokio::time::timeout(step, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| CalloutError::Connect {
                        hop: shown.clone(),
                        reason: "timed out".into(),
                    })?
                    .map_err(|e| CalloutError::Connect {
                        hop: shown.clone(),
                        reason: e.to_string(),
                    })?;
                (Box::new(s), "localhost".into(), shown.clone())
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
                    match tokio::time::timeout(step, tokio::net::TcpStream::connect(addr)).await {
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
                (Box::new(s), host.clone(), remote)
            }
        };
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tls_error = |reason: String| CalloutError::Tls {
            hop: shown.clone(),
            reason,
        };
        let relay_tls = if relay {
            cfg.text("relay.tls")
        } else {
            String::new()
        };
        let verify = relay && cfg.bool("relay.tls.verify");
        let server = crate::qmgr::tls::server_name(&name);
        let mut io = io;
        let mut encrypted = false;
        if relay_tls == "tls" {
            let connector = self
                .tls
                .get(cfg, verify)
                .map_err(|e| tls_error(e.to_string()))?;
            let stream = tokio::time::timeout(step, connector.connect(server.clone(), io))
                .await
                .map_err(|_| CalloutError::Timeout {
                    hop: shown.clone(),
                    seconds: step.as_secs(),
                })?
                .map_err(|e| tls_error(format!("handshake: {e}")))?;
            io = Box::new(stream);
            encrypted = true;
        }
        let session = |source| CalloutError::Session {
            hop: shown.clone(),
            source,
        };
        let hostname = crate::server::hostname(cfg);
        let mut client = Client::connect(io, step, lmtp).await.map_err(session)?;
        client.hello(&hostname).await.map_err(session)?;
        if !encrypted {
            // The same policy as delivery to this hop: the relay host by relay.tls,
            // other hops by network.smtp.tls.outbound. A failed opportunistic handshake
            // is not retried in plaintext here: the callout answers 450 instead.
            let (wanted, required) = if relay {
                (relay_tls == "starttls", relay_tls == "starttls")
            } else {
                match cfg.text("network.smtp.tls.outbound").as_str() {
                    "mandatory" => (true, true),
                    "opportunistic" => (true, false),
                    _ => (false, false),
                }
            };
            if wanted && client.caps.starttls {
                let connector = self
                    .tls
                    .get(cfg, verify)
                    .map_err(|e| tls_error(e.to_string()))?;
                client
                    .starttls(&connector, server, &hostname)
                    .await
                    .map_err(|e| tls_error(e.to_string()))?;
                encrypted = true;
            } else if required {
                return Err(tls_error("STARTTLS is required but not offered".into()));
            }
        }
        let user = if relay {
            cfg.text("relay.auth.username")
        } else {
            String::new()
        };
        if !user.is_empty() {
            if !encrypted {
                return Err(CalloutError::AuthWithoutTls { hop: shown });
            }
            client
                .auth_plain(&user, &cfg.text("relay.auth.password"))
                .await
                .map_err(session)?;
        }
        let reply = client.probe_recipient("", address).await.map_err(session)?;
        // The answer is known: QUIT's reply is not waited for, so a next hop that hangs
        // on QUIT cannot turn it into a timeout.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.quit()).await;
        });
        tracing::info!(to = %address, next_hop = %remote, reply = %reply.text(), "recipient verification callout");
        if reply.is_positive() {
            Ok(Some((true, reply.text())))
        } else if reply.code >= 500 && says_unknown_user(&reply) {
            Ok(Some((false, reply.text())))
        } else if reply.code >= 500 {
            Err(CalloutError::Refused {
                hop: remote,
                reply: reply.text(),
            })
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
        // Building a large list and writing its cache are blocking work: off the
        // runtime threads that serve sessions.
        let cache_path = self.cache_path.clone();
        let version = r.version.clone();
        let entries = r.entries;
        let list = tokio::task::spawn_blocking(move || {
            let patterns: Vec<String> = entries.into_iter().map(|e| e.pattern).collect();
            let list = RecipientList::new(patterns.iter().filter_map(|p| Pattern::parse(p).ok()));
            write_cache(&cache_path, &CacheFile { version, patterns });
            list
        })
        .await
        .map_err(|e| FetchError::Build(e.to_string()))?;
        tracing::info!(count = list.len(), version = %r.version, "valid recipients loaded");
        if let Ok(mut g) = self.list.write() {
            *g = Some(Loaded {
                version: r.version,
                list: Arc::new(list),
            });
        }
        Ok(())
    }
}

/// Whether a 5xx RCPT reply says that the user does not exist: enhanced status 5.1.1,
/// 5.1.6 or 5.1.10, or none at all (a bare 550 from an old server). Other refusals (a
/// full mailbox, a policy) say nothing about the address and are not remembered.
fn says_unknown_user(reply: &mb_smtp::client::Response) -> bool {
    match reply.status() {
        Some(s) => matches!(s.to_string().as_str(), "5.1.1" | "5.1.6" | "5.1.10"),
        None => reply.code == 550,
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
        assert!(v.callouts.lock().unwrap().unknown.len() <= CALLOUT_CACHE_MAX);
        // The guesses never pushed out a known user.
        assert!(
            v.callouts
                .lock()
                .unwrap()
                .known
                .contains_key("known@served.example")
        );
        assert!(v.callouts.lock().unwrap().len() <= 2 * CALLOUT_CACHE_MAX);
        // A domain routed by a transport entry to MX hosts is not asked either.
        let (v, _t) = verifier(
            dir.path(),
            "[relay]\ntransport = \"mxroute.example=smtp:mx.mxroute.example\"\n",
        );
        assert_eq!(
            v.check(Mode::Callout, "bob@mxroute.example", "+").await,
            Answer::Accept
        );
        assert_eq!(v.probes.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(!v.first_warning("callout:mxroute.example".into()));
    }

    #[test]
    fn only_unknown_user_refusals_count_as_unknown() {
        for (code, line, unknown) in [
            (
                550,
                "5.1.1 <a@b>: Recipient address rejected: User unknown",
                true,
            ),
            (550, "5.1.6 moved", true),
            (550, "5.1.10 null MX", true),
            (550, "no such user", true),
            (552, "5.2.2 mailbox full", false),
            (550, "5.7.1 policy", false),
            (554, "5.7.1 relay denied", false),
            (553, "5.6.7 address needs SMTPUTF8", false),
            (554, "no", false),
        ] {
            let reply = mb_smtp::client::Response {
                code,
                lines: vec![line.to_string()],
            };
            assert_eq!(says_unknown_user(&reply), unknown, "{code} {line}");
        }
    }

    #[test]
    fn warnings_keyed_by_client_input_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (v, _t) = verifier(dir.path(), "");
        for i in 0..WARNED_MAX + 100 {
            v.first_warning(format!("list:sub{i}.served.example"));
        }
        assert_eq!(v.warned.lock().unwrap().len(), WARNED_MAX);
        assert!(!v.first_warning("list:another.served.example".into()));
    }

    /// What the scripted next hop does.
    #[derive(Clone, Copy, Default)]
    struct Script {
        smtputf8: bool,
        /// Never answer the greeting.
        mute: bool,
        /// Never answer QUIT.
        hang_on_quit: bool,
        /// Wait this long before each RCPT reply.
        rcpt_delay_ms: u64,
    }

    /// A scripted next hop on 127.0.0.1: RCPT for `nobody*` gets 550 5.1.1, `quota*`
    /// 552 5.2.2, `policy*` 550 5.7.1, anything else 250. Returns its port, its
    /// connection count and the MAIL and RCPT lines it saw.
    async fn next_hop(
        script: Script,
    ) -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<String>>>,
    ) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (count.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = tokio::io::BufReader::new(r);
                    if script.mute {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    let _ = w.write_all(b"220 hop.test ESMTP\r\n").await;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if !matches!(r.read_line(&mut line).await, Ok(n) if n > 0) {
                            return;
                        }
                        let upper = line.to_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") {
                            if script.smtputf8 {
                                b"250-hop.test\r\n250 SMTPUTF8\r\n"
                            } else {
                                b"250-hop.test\r\n250 8BITMIME\r\n"
                            }
                        } else if upper.starts_with("MAIL") {
                            s.lock().unwrap().push(line.trim_end().to_string());
                            b"250 2.1.0 Ok\r\n"
                        } else if upper.starts_with("RCPT") {
                            s.lock().unwrap().push(line.trim_end().to_string());
                            tokio::time::sleep(Duration::from_millis(script.rcpt_delay_ms)).await;
                            let addr = line.to_lowercase();
                            if addr.contains("<nobody") {
                                b"550 5.1.1 User unknown\r\n"
                            } else if addr.contains("<quota") {
                                b"552 5.2.2 Mailbox full\r\n"
                            } else if addr.contains("<policy") {
                                b"550 5.7.1 Not today\r\n"
                            } else {
                                b"250 2.1.5 Ok\r\n"
                            }
                        } else if upper.starts_with("QUIT") {
                            if script.hang_on_quit {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            b"250 2.0.0 Ok\r\n"
                        };
                        if w.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, count, seen)
    }

    fn routed(
        dir: &Path,
        port: u16,
        extra: &str,
    ) -> (Verifier, mb_runtime::lifecycle::ShutdownTrigger) {
        verifier(
            dir,
            &format!(
                "recipient_verification = \"callout\"\n\"callout.timeout\" = \"2s\"\n\
                 [relay]\ntransport = \"served.example=smtp:[127.0.0.1]:{port}\"\n{extra}"
            ),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callouts_remember_only_unknown_users_and_never_wait_for_quit() {
        let dir = tempfile::tempdir().unwrap();
        let (port, connections, _) = next_hop(Script {
            hang_on_quit: true,
            ..Script::default()
        })
        .await;
        let (v, _t) = routed(dir.path(), port, "");
        let conns = || connections.load(std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(
            v.check(Mode::Callout, "alice@served.example", "+").await,
            Answer::Accept
        );
        // QUIT hangs, and the answer came anyway, well within one step timeout.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(
            v.check(Mode::Callout, "nobody@served.example", "+").await,
            Answer::Unknown(_)
        ));
        assert_eq!(conns(), 2);
        assert!(matches!(
            v.check(Mode::Callout, "nobody@served.example", "+").await,
            Answer::Unknown(_)
        ));
        assert_eq!(conns(), 2, "unknown users are remembered");
        // A full mailbox or a policy refusal says nothing about the address: 450, and
        // asked again next time.
        for rcpt in ["quota@served.example", "policy@served.example"] {
            for n in 0..2 {
                let before = conns();
                let a = v.check(Mode::Callout, rcpt, "+").await;
                assert!(
                    matches!(&a, Answer::TryLater(why) if why.contains("5.")),
                    "{rcpt}: {a:?}"
                );
                assert_eq!(conns(), before + 1, "{rcpt} asked again ({n})");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_ascii_addresses_are_asked_with_smtputf8_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (port, _, seen) = next_hop(Script::default()).await;
        let (v, _t) = routed(dir.path(), port, "");
        let a = v.check(Mode::Callout, "nobody.ö@served.example", "+").await;
        assert!(
            matches!(&a, Answer::TryLater(why) if why.contains("SMTPUTF8")),
            "{a:?}"
        );
        assert!(seen.lock().unwrap().is_empty(), "nothing asked");

        let (port, _, seen) = next_hop(Script {
            smtputf8: true,
            ..Script::default()
        })
        .await;
        let (v, _t) = routed(dir.path(), port, "");
        assert!(matches!(
            v.check(Mode::Callout, "nobody.ö@served.example", "+").await,
            Answer::Unknown(_)
        ));
        assert_eq!(
            v.check(Mode::Callout, "ascii@served.example", "+").await,
            Answer::Accept
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "MAIL FROM:<> SMTPUTF8",
                "RCPT TO:<nobody.ö@served.example>",
                "MAIL FROM:<>",
                "RCPT TO:<ascii@served.example>"
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_sessions_share_one_callout_and_a_dead_hop_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let (port, connections, _) = next_hop(Script {
            rcpt_delay_ms: 300,
            ..Script::default()
        })
        .await;
        let (v, _t) = routed(dir.path(), port, "");
        let v = Arc::new(v);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let v = v.clone();
            tasks.push(tokio::spawn(async move {
                v.check(Mode::Callout, "carol@served.example", "+").await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Answer::Accept);
        }
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(v.in_flight.lock().unwrap().is_empty());

        // A next hop that never greets: one timeout, then 450 at once without a new
        // connection while it is remembered as down.
        let (port, connections, _) = next_hop(Script {
            mute: true,
            ..Script::default()
        })
        .await;
        let (v, _t) = routed(dir.path(), port, "");
        let started = Instant::now();
        assert!(matches!(
            v.check(Mode::Callout, "dave@served.example", "+").await,
            Answer::TryLater(_)
        ));
        assert!(started.elapsed() >= Duration::from_secs(2));
        let started = Instant::now();
        let a = v.check(Mode::Callout, "erin@served.example", "+").await;
        assert!(
            matches!(&a, Answer::TryLater(why) if why.contains("did not answer recently")),
            "{a:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_whole_callout_takes_at_most_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        // Each reply within the 30s step timeout, but RCPT's after 20s.
        let (port, _, _) = next_hop(Script {
            rcpt_delay_ms: 20_000,
            ..Script::default()
        })
        .await;
        let (v, _t) = verifier(
            dir.path(),
            &format!(
                "recipient_verification = \"callout\"\n\"callout.timeout\" = \"30s\"\n\
                 [relay]\ntransport = \"served.example=smtp:[127.0.0.1]:{port}\"\n"
            ),
        );
        let started = Instant::now();
        let a = v.check(Mode::Callout, "slow@served.example", "+").await;
        let took = started.elapsed();
        assert!(
            matches!(&a, Answer::TryLater(why) if why.contains("within 10s")),
            "{a:?}"
        );
        // Bounded by the budget, not by the next hop's 20 s: the margin is wide because a
        // fully loaded test run delays the timer's wake-up by seconds.
        assert!(
            took >= CALLOUT_BUDGET && took < CALLOUT_BUDGET + Duration::from_secs(7),
            "{took:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callouts_to_the_relay_host_follow_its_tls_and_auth_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (port, connections, seen) = next_hop(Script::default()).await;
        let relay = |tls: &str, user: &str| {
            format!(
                "[relay]\nhost = \"[127.0.0.1]\"\nport = {port}\ntls = \"{tls}\"\n\
                 \"tls.verify\" = false\n\"auth.username\" = \"{user}\"\n\"auth.password\" = \"pw\"\n"
            )
        };
        let check = async |extra: String| {
            let (v, _t) = verifier(dir.path(), &extra);
            v.check(Mode::Callout, "frank@served.example", "+").await
        };
        // STARTTLS required but not offered: never asked in clear.
        let a = check(relay("starttls", "")).await;
        assert!(
            matches!(&a, Answer::TryLater(why) if why.contains("STARTTLS")),
            "{a:?}"
        );
        // AUTH configured but no TLS: never sent in clear.
        let a = check(relay("none", "gw")).await;
        assert!(
            matches!(&a, Answer::TryLater(why) if why.contains("not encrypted")),
            "{a:?}"
        );
        // Implicit TLS: the handshake with this plaintext server fails at once
        // instead of hanging until a timeout.
        let started = Instant::now();
        let a = check(relay("tls", "")).await;
        assert!(
            matches!(&a, Answer::TryLater(why) if why.contains("TLS")),
            "{a:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            seen.lock().unwrap().is_empty(),
            "no address crossed in clear"
        );
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);
        // No TLS, no AUTH configured: asked.
        assert_eq!(check(relay("none", "")).await, Answer::Accept);
    }
}
