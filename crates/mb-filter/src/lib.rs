//! mb-filter: the scanning engine. Each worker (`--instance N`, systemd `mb-filter@N`)
//! serves `Filter.Scan` and `Control` on `mb-filter-N.sock`; mb-smtpd spreads its scans
//! over the live workers.

pub mod archive;
pub mod attachments;
pub mod auth;
pub mod budget;
#[cfg(test)]
mod cases;
pub mod cfilter;
pub mod clamav;
pub mod dkim;
pub mod dns;
pub mod engine;
pub mod rspamd;
pub mod spf;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mb_core::EnhancedStatus;
use mb_core::verdict::{Action, Direction, ScanRequest, Verdict};
use mb_proto::v1::filter_server::{Filter, FilterServer};
use mb_proto::v1::quarantine_client::QuarantineClient;
use mb_proto::v1::{
    MessageEvent, ReloadResponse, ScanChunk, ScanVerdict, StatusRequest, StatusResponse,
};
use mb_runtime::control::DaemonHooks;
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, StartError};
use mb_runtime::events::EventSink;
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::uds::Guard;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

pub const DAEMON: &str = "mb-filter";

/// How long scans in flight may finish after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// One scanning worker, as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy)]
pub struct Worker {
    /// Its number: it serves `mb-filter-N.sock` (systemd `mb-filter@N`).
    pub instance: u32,
}

/// What a worker opens before it drops privileges.
pub struct Listeners {
    auth: auth::Auth,
    /// The content filter port (`filter.listen:filter.port`), shared by every worker.
    content_filter: tokio::net::TcpListener,
}

#[derive(Default)]
pub struct Stats {
    pub in_flight: AtomicU64,
    pub scanned: AtomicU64,
    pub accepted: AtomicU64,
    pub tagged: AtomicU64,
    pub rejected: AtomicU64,
    pub tempfailed: AtomicU64,
    pub quarantined: AtomicU64,
}

pub struct FilterService {
    pub follower: Follower,
    /// Sender authentication, rebuilt when `network.dns.*` changes; `None` in unit tests.
    pub auth: Option<Arc<dns::LiveAuth>>,
    pub slots: Arc<Semaphore>,
    /// Bytes of messages held by the scans in flight (`filter.max_inflight_bytes`).
    pub inflight: Arc<budget::Budget>,
    pub stats: Arc<Stats>,
    /// The message log (mb-rpcd); `None` in unit tests.
    pub events: Option<EventSink>,
    pub policies: Arc<mb_runtime::policies::PolicySet>,
    pub signer: dkim::Signer,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The Subject, Message-ID and From domain of a message, from its header section only.
fn header_facts(raw: &[u8]) -> (String, String, String) {
    mail_parser::MessageParser::default()
        .parse_headers(raw)
        .map(|m| {
            let from = m
                .from()
                .and_then(|f| f.first())
                .and_then(|a| a.address())
                .and_then(|a| a.rsplit_once('@'))
                .map(|(_, d)| d.to_string())
                .unwrap_or_default();
            (
                m.subject().unwrap_or_default().to_string(),
                m.message_id().unwrap_or_default().to_string(),
                from,
            )
        })
        .unwrap_or_default()
}

/// A quarantine id for a message without a usable queue id (content filter, milter).
fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{micros:013X}F{:X}{:X}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Stores a message the verdict quarantines (with the verdict's headers, as it would have
/// been delivered), durably, before the verdict is returned; indexes it through mb-rpcd.
/// If it cannot be stored the message is tempfailed: the sender keeps it.
async fn quarantine(
    cfg: &mb_core::Config,
    req: &ScanRequest,
    message: &[u8],
    subject: &str,
    mut v: Verdict,
) -> Verdict {
    use mb_runtime::quarantine as files;
    let id = if files::valid_id(&req.queue_id) {
        req.queue_id.clone()
    } else {
        new_id()
    };
    let at = now_ms();
    let stored = mb_core::message::with_headers(message, &v.add_headers, &v.remove_headers);
    let entry = mb_core::quarantine::Entry {
        id: id.clone(),
        node: cfg.node_name(),
        at_unix_ms: at,
        queue_id: req.queue_id.clone(),
        client_ip: client_ip(req),
        sender: req.sender.clone(),
        recipients: req.recipients.clone(),
        subject: subject.to_string(),
        reason: v.refusal.text.clone(),
        score: v.score,
        symbols: v.symbols.iter().map(|s| s.name.clone()).collect(),
        size: stored.len() as u64,
        path: files::relative_path(at, &id),
    };
    let root = files::root(cfg);
    let min = cfg.size("queue.min_free_space");
    if let Some(free) = disk_guard(cfg).low(min) {
        tracing::error!(id = %id, free, min, "quarantine write refused: the spool's filesystem is below queue.min_free_space; tempfailing the message");
        return not_stored();
    }
    let e = entry.clone();
    let saved = tokio::task::spawn_blocking(move || files::store(&root, &e, &stored)).await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::error!(id = %id, cause = %err, "cannot store a message in the quarantine; tempfailing it");
            return not_stored();
        }
        Err(err) => {
            tracing::error!(id = %id, cause = %err, "quarantine task failed; tempfailing the message");
            return not_stored();
        }
    }
    tracing::info!(id = %id, path = %entry.path, reason = %entry.reason, "message quarantined");
    // The index entry is best effort: the files are the truth, and mb-rpcd indexes what
    // it missed at its next retention pass.
    let socket = cfg.socket("mb-rpcd");
    tokio::spawn(async move {
        let added = async {
            let channel = mb_runtime::uds::connect(&socket, "mb-rpcd")
                .await
                .map_err(|e| e.to_string())?;
            QuarantineClient::new(channel)
                .add(files::wire::to_wire(entry))
                .await
                .map_err(|e| e.message().to_string())
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(10), added)
            .await
            .unwrap_or_else(|_| Err("no answer in 10s".into()))
        {
            tracing::warn!(cause = %e, "cannot index a quarantined message now; mb-rpcd will find it on disk");
        }
    });
    v.quarantine_id = id;
    v
}

/// The verdict when a quarantined message cannot be stored: the sender keeps it.
/// Free space of the spool's filesystem (which holds the quarantine), read at most once a
/// second by all scans of this worker. `paths.spool_dir` is read at start only.
fn disk_guard(cfg: &mb_core::Config) -> &'static mb_runtime::diskfree::DiskGuard {
    static GUARD: std::sync::OnceLock<mb_runtime::diskfree::DiskGuard> = std::sync::OnceLock::new();
    GUARD.get_or_init(|| mb_runtime::diskfree::DiskGuard::new(&cfg.path("paths.spool_dir")))
}

fn not_stored() -> Verdict {
    Verdict::refuse(
        Action::Tempfail,
        451,
        EnhancedStatus::SYSTEM_TEMPORARY,
        "Error: cannot store the message, try again later",
    )
}

/// The client address as the message log and the quarantine index write it (empty when
/// unknown).
fn client_ip(req: &ScanRequest) -> String {
    req.client_ip.map(|ip| ip.to_string()).unwrap_or_default()
}

/// Counts a scan in flight for as long as it lives.
struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FilterService {
    /// The verdict for one message, whichever way it came (gRPC `Scan` or the content
    /// filter): the engine under `filter.scan_timeout`, then quarantine, DKIM signing,
    /// counters and the message log.
    pub async fn process(
        &self,
        cfg: &mb_core::Config,
        request: &ScanRequest,
        message: &[u8],
    ) -> Verdict {
        let deadline = cfg.duration("filter.scan_timeout");
        let auth = self.auth.as_ref().map(|a| a.current());
        let mut verdict = match tokio::time::timeout(
            deadline,
            engine::scan(
                cfg,
                request,
                message,
                auth.as_deref(),
                &self.policies.current(),
            ),
        )
        .await
        {
            Ok(v) => v,
            Err(_) => Verdict::refuse(
                Action::Tempfail,
                451,
                EnhancedStatus::POLICY_TEMPFAIL,
                "Scan took too long, try again later",
            ),
        };
        let (subject, message_id, from_domain) = header_facts(message);
        // Outbound mail from our domains leaves signed (RFC 6376).
        if verdict.action.delivers()
            && request.direction == Direction::Outbound
            && cfg.bool("dkim.sign")
        {
            // An RSA signature and a look at the key file: off the async workers.
            let signed = cpu_bound(|| self.signer.sign(cfg, request, &from_domain, message));
            match signed {
                Ok(Some(value)) => verdict
                    .add_headers
                    .insert(0, ("DKIM-Signature".into(), value)),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(id = %request.queue_id, cause = %e, "message sent unsigned");
                    verdict.symbols.push(mb_core::verdict::Symbol {
                        name: "DKIM_SIGN_FAILED".into(),
                        score: 0.0,
                        detail: e.to_string(),
                    });
                }
            }
        }
        if verdict.action == Action::Quarantine {
            verdict = quarantine(cfg, request, message, &subject, verdict).await;
        }
        self.stats.scanned.fetch_add(1, Ordering::Relaxed);
        let counter = match verdict.action {
            Action::Accept => &self.stats.accepted,
            Action::Tag => &self.stats.tagged,
            Action::Tempfail => &self.stats.tempfailed,
            Action::Quarantine => &self.stats.quarantined,
            Action::Reject | Action::Discard => &self.stats.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            id = %request.queue_id,
            from = %request.sender,
            action = %verdict.action,
            score = verdict.score,
            symbols = %verdict.symbols.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
            "scanned"
        );
        if let Some(sink) = &self.events {
            sink.send(MessageEvent {
                node: cfg.node_name(),
                daemon: DAEMON.into(),
                queue_id: if verdict.quarantine_id.is_empty() {
                    request.queue_id.clone()
                } else {
                    verdict.quarantine_id.clone()
                },
                message_id,
                client_ip: client_ip(request),
                client_name: request.client_name.clone(),
                helo: request.helo.clone(),
                sender: request.sender.clone(),
                recipients: request.recipients.clone(),
                size: message.len() as u64,
                stage: "scanned".into(),
                verdict: verdict.action.as_str().into(),
                score: verdict.score,
                symbols: verdict
                    .symbols
                    .iter()
                    .map(|s| format!("{}({:.1})", s.name, s.score))
                    .collect(),
                detail: verdict.refusal.text.clone(),
                subject,
                direction: request.direction.as_str().into(),
                ..Default::default()
            });
        }
        verdict
    }
}

#[tonic::async_trait]
impl Filter for FilterService {
    async fn scan(
        &self,
        req: Request<Streaming<ScanChunk>>,
    ) -> Result<Response<ScanVerdict>, Status> {
        let cfg = self.follower.current();
        let _slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.stats);
        // Memory is bounded twice: nothing larger than the message size limit (plus
        // headroom for the headers mb-smtpd adds) is accepted, and the messages in
        // flight together stay under `filter.max_inflight_bytes` (see `budget`).
        let limit = usize::try_from(cfg.size("smtp.message_size_limit"))
            .unwrap_or(usize::MAX)
            .saturating_add(1 << 20);
        let max_inflight = cfg.size("filter.max_inflight_bytes");
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("an empty scan request"))??;
        let envelope = first
            .envelope
            .ok_or_else(|| Status::invalid_argument("the first chunk has no envelope"))?;
        let declared = envelope.size;
        if declared > limit as u64 {
            return Err(too_large(limit));
        }
        // The declared size is reserved before anything is buffered; a stream that
        // declares nothing (size 0) reserves what arrives, chunk by chunk.
        let mut reservation = self
            .inflight
            .reserve(declared, max_inflight)
            .map_err(|e| busy(&e))?;
        // One buffer of the declared size: no doubling reallocations, no second copy.
        let mut message = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
        let mut data = first.data;
        loop {
            if message.len() + data.len() > limit {
                return Err(too_large(limit));
            }
            if declared != 0 && (message.len() + data.len()) as u64 > declared {
                return Err(Status::data_loss(format!(
                    "the message was announced as {declared} bytes and more arrived"
                )));
            }
            if declared == 0 {
                reservation
                    .grow(data.len() as u64, max_inflight)
                    .map_err(|e| busy(&e))?;
            }
            message.extend_from_slice(&data);
            match stream.next().await {
                Some(chunk) => data = chunk?.data,
                None => break,
            }
        }
        if declared != 0 && declared != message.len() as u64 {
            return Err(Status::data_loss(format!(
                "the message was announced as {} bytes and {} arrived",
                declared,
                message.len()
            )));
        }
        let request = mb_scan::wire::request_from_wire(&envelope);
        let verdict = self.process(&cfg, &request, &message).await;
        drop(message);
        drop(reservation);
        Ok(Response::new(mb_scan::wire::verdict_to_wire(&verdict)))
    }
}

/// A message larger than `smtp.message_size_limit` allows: no worker takes it, so the
/// client does not try another (`OutOfRange` is not a worker failure to mb_scan).
fn too_large(limit: usize) -> Status {
    Status::out_of_range(format!("message larger than {limit} bytes"))
}

/// The worker is full: `ResourceExhausted`, which mb_scan takes as "try another worker,
/// and tempfail with 451 4.7.1 if all are full".
fn busy(e: &budget::Refused) -> Status {
    tracing::warn!(cause = %e, "scan refused: filter.max_inflight_bytes reached");
    Status::resource_exhausted(e.to_string())
}

/// `Control.Status` (scans, verdicts, the scanners it reaches) and reload.
pub struct Hooks {
    stats: Arc<Stats>,
    content_filter: Arc<cfilter::Counters>,
    follower: Follower,
    config: Option<PathBuf>,
}

#[tonic::async_trait]
impl DaemonHooks for Hooks {
    async fn status(&self, _req: &StatusRequest, resp: &mut StatusResponse) {
        let s = &self.stats;
        for (name, v) in [
            ("in_flight", &s.in_flight),
            ("scanned", &s.scanned),
            ("accepted", &s.accepted),
            ("tagged", &s.tagged),
            ("rejected", &s.rejected),
            ("tempfailed", &s.tempfailed),
            ("quarantined", &s.quarantined),
        ] {
            resp.counters.insert(name.into(), v.load(Ordering::Relaxed));
        }
        let c = &self.content_filter;
        for (name, v) in [
            ("content_filter_connections", &c.connections),
            ("content_filter_messages", &c.messages),
            ("content_filter_reinjected", &c.reinjected),
        ] {
            resp.counters.insert(name.into(), v.load(Ordering::Relaxed));
        }
        let cfg = self.follower.current();
        // The scanners this worker depends on, as it reaches them.
        let timeout = Duration::from_secs(2);
        for (name, enabled, address) in [
            (
                "clamav",
                cfg.bool("clamav.enabled"),
                cfg.text("clamav.address"),
            ),
            ("rspamd", cfg.bool("rspamd.enabled"), cfg.text("rspamd.url")),
        ] {
            let started = std::time::Instant::now();
            let (state, detail) = if !enabled {
                ("disabled", String::new())
            } else {
                // Why the scanner is down, in its own words; `None` when it answered.
                let down = if name == "clamav" {
                    clamav::ping(&address, timeout)
                        .await
                        .err()
                        .map(|e| e.to_string())
                } else {
                    rspamd::ping(&address, timeout)
                        .await
                        .err()
                        .map(|e| e.to_string())
                };
                match down {
                    None => ("ok", String::new()),
                    Some(e) => (
                        "down",
                        format!(
                            "{e}; messages follow {name}.unavailable_action ({})",
                            cfg.text(&format!("{name}.unavailable_action"))
                        ),
                    ),
                }
            };
            resp.components.push(mb_proto::v1::ComponentStatus {
                name: name.into(),
                state: state.into(),
                address,
                detail,
                latency_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(0),
            });
        }
        let mut detail = String::from("scanning: policies, attachments, headers, SPF/DKIM/DMARC");
        if cfg.bool("clamav.enabled") {
            detail.push_str(", ClamAV");
        }
        if cfg.bool("rspamd.enabled") {
            detail.push_str(", Rspamd");
        }
        resp.detail = detail;
    }

    async fn reload(&self) -> Result<ReloadResponse, Status> {
        mb_runtime::reread(&self.follower, self.config.as_deref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(ReloadResponse {
            reloaded: true,
            ..Default::default()
        })
    }
}

/// Runs CPU-heavy or blocking work (expanding archives, an RSA signature) so that it does
/// not hold an async worker: under the daemon's multi-threaded runtime the worker hands
/// its other tasks over first (`block_in_place`); on a current-thread runtime (unit
/// tests) there is no other worker, and it runs in place.
pub(crate) fn cpu_bound<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// The name in Authentication-Results: `smtp.hostname`, or the system's host name.
pub fn hostname(cfg: &mb_core::Config) -> String {
    let name = cfg.text("smtp.hostname");
    if !name.is_empty() {
        return name;
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

impl Daemon for Worker {
    type Source = Follower;
    type Listeners = Listeners;
    type Hooks = Hooks;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;
    const CUT_SHORT: Option<&'static str> = Some("scans were still running at the drain deadline");

    fn identity(&self) -> Identity {
        Identity {
            program: DAEMON,
            name: format!("{DAEMON}@{}", self.instance),
            socket: format!("{DAEMON}-{}", self.instance),
        }
    }

    async fn configure(
        &self,
        file: mb_core::Config,
        _config: Option<&Path>,
        shutdown: &Shutdown,
    ) -> Result<Follower, StartError> {
        Ok(Follower::start(DAEMON, file, shutdown.clone()))
    }

    async fn bind(&self, cfg: &mb_core::Config) -> Result<Listeners, StartError> {
        let auth = auth::Auth::from_config(cfg).map_err(StartError::config)?;
        let addr = content_filter_addr(cfg);
        let content_filter = cfilter::bind(addr).map_err(|cause| StartError::Listen {
            addr,
            what: Some("the content filter, filter.listen/filter.port"),
            cause,
        })?;
        Ok(Listeners {
            auth,
            content_filter,
        })
    }

    fn writable(&self, cfg: &mb_core::Config) -> Option<Vec<PathBuf>> {
        Some(vec![mb_runtime::quarantine::root(cfg)])
    }

    async fn start(
        self,
        listeners: Listeners,
        ctx: &Context<Follower>,
    ) -> Result<Serving<Hooks>, StartError> {
        let name = &ctx.identity.name;
        let cfg = &ctx.cfg;
        let shutdown = &ctx.shutdown;
        let stats = Arc::new(Stats::default());
        let permits = usize::try_from(cfg.int("filter.max_concurrent")).unwrap_or(32);
        let policies = mb_runtime::policies::PolicySet::load(
            cfg.path("paths.data_dir")
                .join("cache")
                .join(format!("policies-{}.json", self.instance)),
        );
        policies.spawn_refresh(cfg.socket("mb-rpcd"), shutdown.clone());
        ctx.info
            .add_listener(format!("content filter smtp:{}", content_filter_addr(cfg)));
        let content_counters = Arc::new(cfilter::Counters::default());
        let hooks = Arc::new(Hooks {
            stats: stats.clone(),
            content_filter: content_counters.clone(),
            follower: ctx.source.clone(),
            config: ctx.config.clone(),
        });
        let auth = Arc::new(dns::live(cfg, listeners.auth));
        dns::follow(auth.clone(), &ctx.source, shutdown.clone());
        let service = Arc::new(FilterService {
            auth: Some(auth),
            follower: ctx.source.clone(),
            slots: Arc::new(Semaphore::new(permits)),
            inflight: Arc::default(),
            stats,
            policies,
            signer: dkim::Signer::default(),
            events: Some(EventSink::start(
                name,
                cfg.socket("mb-rpcd"),
                shutdown.clone(),
            )),
        });
        let content_filter = tokio::spawn(cfilter::serve(
            listeners.content_filter,
            service.clone(),
            content_counters.clone(),
            shutdown.clone(),
        ));
        let services = tonic::service::Routes::new(InterceptedService::new(
            FilterServer::from_arc(service),
            Guard::peer(),
        ));
        tracing::info!(socket = %ctx.socket.display(), "{name} started");
        // In-flight scans finish (the servers stop accepting, then drain) before exit.
        let work = async move {
            let _ = content_filter.await;
            // Content-filter sessions in progress finish their message (or time out).
            while content_counters.active.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        };
        Ok(Serving::new(hooks, work).with_services(services))
    }
}

/// Where the content filter listens: `filter.listen:filter.port`.
fn content_filter_addr(cfg: &mb_core::Config) -> std::net::SocketAddr {
    std::net::SocketAddr::new(cfg.ip("filter.listen"), cfg.port("filter.port"))
}
