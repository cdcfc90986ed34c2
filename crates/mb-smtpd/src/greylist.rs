//! Greylisting's store and its exemptions, as the sessions use them at RCPT
//! (`session/greylist.rs`): the triplets live in Redis when `redis.url` is set (keys
//! under `mb:grey:` that expire by themselves, see `mb_core::greylist`), otherwise in
//! mb-rpcd's database (`Greylist.Check`). Both decide with `mb_core::greylist`.
//! Policies (read from mb-rpcd like the milter's) and a resolver for SPF let an
//! allow-listed sender through; the SPF check runs only when an allow policy would match
//! the sender, so ordinary mail costs no DNS lookup here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_core::greylist::{
    self, Client, Decision, Entry, StoredClient, StoredTriplet, Timing, Triplet,
};
use mb_core::policy;
use mb_runtime::policies::PolicySet;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Longest wait for the store: past it the recipient passes (greylisting must never
/// cost mail, and a session must not hang on a slow store).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the store could not answer; the recipient then passes, with a warning.
#[derive(Debug, thiserror::Error)]
pub enum GreylistError {
    #[error("mb-rpcd is unreachable: {0}")]
    Unreachable(String),
    #[error("mb-rpcd answered Greylist.Check with an error: {0}")]
    Rpc(String),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("a stored greylist entry cannot be read: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("no answer from the greylist store within {}s", STORE_TIMEOUT.as_secs())]
    Timeout,
}

/// Unix seconds, from the system clock or a test's.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
    })
}

/// How long after a failed Redis connection the next attempt is made; meanwhile the
/// triplets go to mb-rpcd.
pub const REDIS_RETRY: Duration = Duration::from_secs(30);

/// mb-rpcd's `Greylist` service, over one channel kept for every RCPT (opened again
/// after a failure).
pub struct Rpcd {
    socket: PathBuf,
    channel: tokio::sync::Mutex<Option<tonic::transport::Channel>>,
}

impl Rpcd {
    pub fn new(socket: PathBuf) -> Rpcd {
        Rpcd {
            socket,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    async fn check(&self, t: &Triplet) -> Result<Decision, GreylistError> {
        let channel = {
            let mut cached = self.channel.lock().await;
            match cached.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = mb_runtime::uds::connect(&self.socket, "mb-rpcd")
                        .await
                        .map_err(|e| GreylistError::Unreachable(e.to_string()))?;
                    *cached = Some(c.clone());
                    c
                }
            }
        };
        let answer = mb_proto::v1::greylist_client::GreylistClient::new(channel)
            .check(mb_proto::v1::GreylistCheckRequest {
                network: t.network.clone(),
                sender: t.sender.clone(),
                recipient: t.recipient.clone(),
            })
            .await;
        let r = match answer {
            Ok(r) => r.into_inner(),
            Err(s) => {
                // The daemon may have restarted: the next check opens a new channel.
                *self.channel.lock().await = None;
                return Err(GreylistError::Rpc(s.message().to_string()));
            }
        };
        use mb_proto::v1::GreylistDecision as D;
        Ok(match r.decision() {
            D::Defer => Decision::Defer {
                retry_in: r.retry_in.max(1),
            },
            D::Whitelisted => Decision::Whitelisted,
            D::Pass | D::Unspecified => Decision::Pass,
        })
    }
}

/// Redis, connected on first use and again after a failure (at most every
/// [`REDIS_RETRY`]), so that a Redis that was down when mb-smtpd started is used
/// once it is up, without a restart.
pub struct LazyRedis {
    url: String,
    conn: std::sync::RwLock<Option<ConnectionManager>>,
    /// When the next connection attempt may start (None: one is running).
    next_try: Mutex<Option<std::time::Instant>>,
}

impl LazyRedis {
    pub fn new(url: String) -> Arc<LazyRedis> {
        Arc::new(LazyRedis {
            url,
            conn: std::sync::RwLock::new(None),
            next_try: Mutex::new(Some(std::time::Instant::now())),
        })
    }

    /// The connection if there is one; otherwise, when an attempt is due, connects now
    /// (at most 3 s, once per [`REDIS_RETRY`]; concurrent callers do not wait for it)
    /// and answers None when that fails (the caller uses mb-rpcd meanwhile).
    pub async fn get(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.conn.read().ok().and_then(|c| c.clone()) {
            return Some(c);
        }
        let due = {
            let Ok(mut next) = self.next_try.lock() else {
                return None;
            };
            match *next {
                Some(at) if at <= std::time::Instant::now() => {
                    *next = None;
                    true
                }
                _ => false,
            }
        };
        if !due {
            return None;
        }
        match redis_connect(&self.url).await {
            Ok(c) => {
                tracing::info!(redis = %mb_core::config::redact_url(&self.url), "greylisting in Redis");
                if let Ok(mut conn) = self.conn.write() {
                    *conn = Some(c.clone());
                }
                Some(c)
            }
            Err(e) => {
                tracing::warn!(redis = %mb_core::config::redact_url(&self.url), cause = %e, retry_in = REDIS_RETRY.as_secs(), "Redis unreachable; greylisting in mb-rpcd's database meanwhile");
                if let Ok(mut next) = self.next_try.lock() {
                    *next = Some(std::time::Instant::now() + REDIS_RETRY);
                }
                None
            }
        }
    }

    fn connected(conn: ConnectionManager, url: &str) -> Arc<LazyRedis> {
        Arc::new(LazyRedis {
            url: url.to_string(),
            conn: std::sync::RwLock::new(Some(conn)),
            next_try: Mutex::new(None),
        })
    }
}

/// Where the triplets are kept.
pub enum Store {
    /// mb-rpcd's database, through its socket.
    Rpcd(Rpcd),
    /// Redis, and mb-rpcd while Redis is not connected.
    Redis(Arc<LazyRedis>, Option<Rpcd>),
    /// In this process only (tests of the session).
    Memory {
        clock: Clock,
        triplets: Mutex<HashMap<Triplet, Entry>>,
        clients: Mutex<HashMap<String, Client>>,
    },
}

impl Store {
    pub fn memory(clock: Clock) -> Store {
        Store::Memory {
            clock,
            triplets: Mutex::default(),
            clients: Mutex::default(),
        }
    }

    /// Connects to Redis now (short timeouts, as the shared rate counters do).
    pub async fn redis(url: &str) -> Result<Store, GreylistError> {
        let conn = redis_connect(url).await?;
        Ok(Store::Redis(LazyRedis::connected(conn, url), None))
    }

    /// Decides for `t` and records the attempt.
    pub async fn check(&self, timing: &Timing, t: &Triplet) -> Result<Decision, GreylistError> {
        match tokio::time::timeout(STORE_TIMEOUT, self.check_now(timing, t)).await {
            Ok(r) => r,
            Err(_) => Err(GreylistError::Timeout),
        }
    }

    async fn check_now(&self, timing: &Timing, t: &Triplet) -> Result<Decision, GreylistError> {
        match self {
            Store::Rpcd(rpcd) => rpcd.check(t).await,
            Store::Redis(redis, fallback) => match (redis.get().await, fallback) {
                (Some(conn), _) => redis_check(conn, timing, t).await,
                (None, Some(rpcd)) => rpcd.check(t).await,
                (None, None) => Err(GreylistError::Unreachable(
                    "Redis is not connected yet".into(),
                )),
            },
            Store::Memory {
                clock,
                triplets,
                clients,
            } => {
                let now = clock();
                let (Ok(mut triplets), Ok(mut clients)) = (triplets.lock(), clients.lock()) else {
                    return Ok(Decision::Pass);
                };
                let client = clients.get(&t.network).copied();
                if let Some(c) = client
                    && c.whitelisted(timing, now)
                {
                    clients.insert(
                        t.network.clone(),
                        Client {
                            last_seen: now,
                            ..c
                        },
                    );
                    return Ok(Decision::Whitelisted);
                }
                let checked = greylist::check(timing, triplets.get(t).copied(), now);
                triplets.insert(t.clone(), checked.entry);
                if checked.newly_passed {
                    clients.insert(
                        t.network.clone(),
                        greylist::client_passed(timing, client, now),
                    );
                }
                Ok(checked.decision)
            }
        }
    }
}

/// Connects to Redis (short timeouts, as the shared rate counters do).
async fn redis_connect(url: &str) -> Result<ConnectionManager, GreylistError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    tokio::time::timeout(
        Duration::from_secs(3),
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| GreylistError::Timeout)?
    .map_err(GreylistError::from)
}

/// Seconds until `at`, at least 1 (a key's TTL).
fn ttl(at: i64, now: i64) -> u64 {
    u64::try_from(at.saturating_sub(now)).unwrap_or(0).max(1)
}

/// The check against Redis: read, decide, write back with the entry's own expiry. Two
/// sessions retrying one triplet at the same instant may both count its first pass,
/// which only brings the client's auto-whitelisting one pass closer.
async fn redis_check(
    mut conn: ConnectionManager,
    timing: &Timing,
    t: &Triplet,
) -> Result<Decision, GreylistError> {
    let now = (system_clock())();
    let ckey = greylist::redis_client_key(&t.network);
    let client: Option<String> = conn.get(&ckey).await?;
    let client: Option<Client> = client
        .map(|s| serde_json::from_str::<StoredClient>(&s))
        .transpose()?
        .map(|c| c.client);
    let store_client = |c: Client| StoredClient {
        network: t.network.clone(),
        client: c,
    };
    if let Some(c) = client
        && c.whitelisted(timing, now)
    {
        let touched = Client {
            last_seen: now,
            ..c
        };
        let _: () = conn
            .set_ex(
                &ckey,
                serde_json::to_string(&store_client(touched))?,
                ttl(touched.expires_at(timing), now),
            )
            .await?;
        return Ok(Decision::Whitelisted);
    }
    let tkey = t.redis_key();
    let stored: Option<String> = conn.get(&tkey).await?;
    let stored: Option<Entry> = stored
        .map(|s| serde_json::from_str::<StoredTriplet>(&s))
        .transpose()?
        .map(|s| s.entry);
    let checked = greylist::check(timing, stored, now);
    let value = StoredTriplet {
        network: t.network.clone(),
        sender: t.sender.clone(),
        recipient: t.recipient.clone(),
        entry: checked.entry,
    };
    let _: () = conn
        .set_ex(
            &tkey,
            serde_json::to_string(&value)?,
            ttl(checked.entry.expires_at(timing), now),
        )
        .await?;
    if checked.newly_passed {
        let c = greylist::client_passed(timing, client, now);
        let _: () = conn
            .set_ex(
                &ckey,
                serde_json::to_string(&store_client(c))?,
                ttl(c.expires_at(timing), now),
            )
            .await?;
    }
    Ok(checked.decision)
}

/// What greylisting holds for the whole process.
pub struct Greylist {
    pub store: Store,
    /// The policies, for allow-listed senders (none: no policy exempts anyone).
    pub policies: Option<Arc<PolicySet>>,
    /// For SPF at RCPT (none: an allow that needs an authenticated sender never exempts).
    pub resolver: Option<Arc<crate::dns::Live>>,
}

/// A session's greylisting settings (present when `greylist.enabled`).
#[derive(Clone)]
pub struct Settings {
    pub timing: Timing,
    pub ipv6_prefix: u8,
    /// `smtp.recipient_delimiter`, for policies matched on `user+tag@`.
    pub delimiter: String,
    pub greylist: Arc<Greylist>,
}

/// Longest SPF evaluation for an exemption at RCPT: the client waits on the command,
/// and an evaluation that has not finished by then does not exempt (the RCPT is then
/// greylisted, which costs a retry, not mail).
pub const SPF_DEADLINE: Duration = Duration::from_secs(5);

/// Why a policy exempts a sender from greylisting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exempt {
    /// An allow that applies without authentication (client network, recipient, or an
    /// `unauthenticated` sender allow).
    Allowed(String),
    /// A sender allow, and the sender's SPF passed for its domain.
    SpfPass(String),
}

impl Greylist {
    /// The store (Redis when `redis.url` is set, connected at the first RCPT and, while
    /// it is not, mb-rpcd), the policies (refreshed from mb-rpcd, cached on disk) and the
    /// delivery resolver for SPF. Nothing connects here: with greylisting disabled, no
    /// RCPT asks and no connection is made.
    pub async fn start(
        cfg: &mb_core::Config,
        resolver: Option<Arc<crate::dns::Live>>,
        shutdown: mb_runtime::lifecycle::Shutdown,
    ) -> Greylist {
        let url = cfg.text("redis.url");
        let rpcd = Rpcd::new(cfg.socket("mb-rpcd"));
        let store = if url.is_empty() {
            Store::Rpcd(rpcd)
        } else {
            Store::Redis(LazyRedis::new(url), Some(rpcd))
        };
        let policies =
            PolicySet::load(cfg.path("paths.data_dir").join("cache/policies-smtpd.json"));
        policies.spawn_refresh(cfg.socket("mb-rpcd"), shutdown);
        Greylist {
            store,
            policies: Some(policies),
            resolver,
        }
    }

    /// Whether a policy lets this sender past greylisting. SPF is evaluated only when a
    /// sender allow would win if the sender were authenticated, at most once per
    /// transaction: its result depends on the client, HELO and sender only, so `spf_memo`
    /// (the transaction's) keeps it for the next RCPT.
    #[allow(clippy::too_many_arguments)]
    pub async fn exempt(
        &self,
        client: IpAddr,
        helo: &str,
        hostname: &str,
        sender: &str,
        recipient: &str,
        delimiter: &str,
        spf_memo: &mut Option<bool>,
    ) -> Option<Exempt> {
        let policies = self.policies.as_ref()?.current();
        if policies.is_empty() {
            return None;
        }
        let recipients = [recipient.to_string()];
        let subject = policy::Subject {
            sender,
            recipients: &recipients,
            client_ip: Some(client),
            delimiter,
        };
        if let Some(p) = policy::outcome(&policies, &subject, false).allowed() {
            return Some(Exempt::Allowed(p.name.clone()));
        }
        let p = policy::outcome(&policies, &subject, true).allowed()?;
        let (_, domain) = sender.rsplit_once('@')?;
        if let Some(passed) = *spf_memo {
            return passed.then(|| Exempt::SpfPass(p.name.clone()));
        }
        let resolver = self.resolver.as_ref()?.current();
        let spf = mb_spf::verify_within(
            &resolver,
            &mb_spf::Request {
                ip: client,
                helo,
                sender,
                receiver: hostname,
            },
            SPF_DEADLINE,
        )
        .await;
        let passed = spf.result() == mb_spf::SpfResult::Pass
            && spf
                .domain()
                .trim_end_matches('.')
                .eq_ignore_ascii_case(domain.trim_end_matches('.'));
        *spf_memo = Some(passed);
        passed.then(|| Exempt::SpfPass(p.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    #[tokio::test]
    async fn the_memory_store_follows_the_clock() {
        let now = Arc::new(AtomicI64::new(1_000));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::SeqCst))
        };
        let store = Store::memory(clock);
        let timing = Timing {
            delay: 300,
            retry_window: 3600,
            lifetime: 86_400,
            auto_whitelist: 1,
        };
        let t = Triplet::new("192.0.2.1".parse().expect("ip"), 64, "a@x.test", "b@y.test");
        let check = || store.check(&timing, &t);
        assert_eq!(
            check().await.expect("a check"),
            Decision::Defer { retry_in: 300 }
        );
        now.store(1_299, Ordering::SeqCst);
        assert_eq!(
            check().await.expect("a check"),
            Decision::Defer { retry_in: 1 }
        );
        now.store(1_300, Ordering::SeqCst);
        assert_eq!(check().await.expect("a check"), Decision::Pass);
        let other = Triplet::new("192.0.2.9".parse().expect("ip"), 64, "c@x.test", "d@y.test");
        assert_eq!(
            store.check(&timing, &other).await.expect("a check"),
            Decision::Whitelisted
        );
    }
}
