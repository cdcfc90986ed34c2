//! mb-cluster: main and child nodes on `cluster.port` (10050) with mutual TLS 1.3.
//!
//! The main exports the cluster-wide configuration from its mb-rpcd (`Replica.Export`)
//! every few seconds and numbers each distinct content as a new snapshot version.
//! Children hold one `Sync` stream to the main: they report (heartbeat) every
//! `cluster.heartbeat`, and the main answers each report with its version, the node table
//! and, when the child runs an older version, the snapshot, which the child imports into
//! its own mb-rpcd (`Replica.Import`). A child that cannot reach the main keeps running on
//! what its database holds and catches up when the stream is back.

pub mod admin;
pub mod child;
pub mod peer;
pub mod pki;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mb_core::Config;
use mb_proto::v1::cluster_server::ClusterServer;
use mb_proto::v1::{
    CommandResult, NodeCommand, NodeReport, NodeStatus, ReloadResponse, Snapshot, StatusRequest,
    StatusResponse,
};
use mb_runtime::control::{DaemonHooks, DaemonInfo};
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, StartError};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::{self, Shutdown};
use mb_runtime::uds::Guard;
use tokio::sync::{Notify, watch};
use tonic::Status;

use crate::state::{Dir, State};

pub const DAEMON: &str = "mb-cluster";

/// The largest message on the Replica (to mb-rpcd) and ClusterPeer (main to child) links:
/// a snapshot carries the whole recipient list, past tonic's 4 MiB default from about
/// 150,000 recipients, which would stop replication. mb-rpcd's Replica server has the same
/// bound.
pub const MAX_MESSAGE: usize = 256 << 20;

/// A Replica client of mb-rpcd with `MAX_MESSAGE` limits.
pub fn replica_client(
    ch: tonic::transport::Channel,
) -> mb_proto::v1::replica_client::ReplicaClient<tonic::transport::Channel> {
    mb_proto::v1::replica_client::ReplicaClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// How long the node's role may take to stop after SIGTERM: the supervisor gives it
/// 10 s, and the control socket's calls are short.
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);

/// The cluster daemon (`mb-cluster daemon`), as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cluster;

/// What the main last heard from a node.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub report: NodeReport,
    pub address: String,
    pub last_seen: Option<Instant>,
    pub last_seen_unix_ms: i64,
    /// Open Sync streams from the node.
    pub sessions: u32,
    /// Where commands for the node go (its newest stream).
    pub commands: Option<tokio::sync::mpsc::Sender<NodeCommand>>,
}

/// The node's shared runtime state.
pub struct Node {
    pub dir: Dir,
    pub info: Arc<DaemonInfo>,
    pub follower: Follower,
    /// The persisted state; `None` when the node is not set up.
    pub state: Mutex<Option<State>>,
    /// Main: what each node last reported.
    pub seen: Mutex<HashMap<String, Seen>>,
    /// Main: the current snapshot (its version is in `version`).
    pub snapshot: Mutex<Option<Arc<Snapshot>>>,
    pub version: watch::Sender<u64>,
    /// Child: the link to the main ("connected", "disconnected: why") and the node
    /// table the main last sent.
    pub link: Mutex<String>,
    pub remote_nodes: Mutex<Vec<NodeStatus>>,
    /// Asks the exporter (main) or the reporter (child) to run now.
    pub sync_now: Notify,
    /// Main: commands sent to children, waiting for their answers.
    pub pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<CommandResult>>>,
    pub next_command: AtomicU64,
    /// Child: outbox items not uploaded yet, as last counted.
    pub outbox: AtomicU64,
}

impl Node {
    pub fn cfg(&self) -> Arc<Config> {
        self.follower.current()
    }

    pub fn heartbeat(&self) -> Duration {
        self.cfg().duration("cluster.heartbeat")
    }

    pub fn state(&self) -> Option<State> {
        self.state.lock().ok().and_then(|s| s.clone())
    }

    /// Changes the persisted state and writes it out.
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, Status> {
        match self.try_update(|st| Ok::<T, std::convert::Infallible>(f(st)))? {
            Ok(out) => Ok(out),
            Err(never) => match never {},
        }
    }

    /// Changes the persisted state when `f` succeeds: written to disk first, then kept
    /// in memory (a refused join costs no disk write, a failed write changes nothing).
    pub fn try_update<T, E>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, E>,
    ) -> Result<Result<T, E>, Status> {
        let mut guard = self
            .state
            .lock()
            .map_err(|_| Status::internal("state lock poisoned"))?;
        let st = guard
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("this node is not set up"))?;
        let mut draft = st.clone();
        let out = f(&mut draft);
        if out.is_ok() {
            // A small file, but fsynced: off the async workers (the daemon's runtime is
            // multi-threaded).
            tokio::task::block_in_place(|| self.dir.save(&draft)).map_err(|e| {
                tracing::error!(cause = %e, "cannot save the cluster state");
                Status::internal(format!("cannot save the cluster state: {e}"))
            })?;
            *st = draft;
        }
        Ok(out)
    }

    /// This node's own figures, as it reports them.
    pub async fn own_report(&self) -> NodeReport {
        let st = self.state().unwrap_or_default();
        NodeReport {
            name: st.name,
            config_version: st.config_version,
            uptime_secs: host_uptime(),
            load: load_average(),
            queue_depth: queue_depth(&self.cfg()).await,
            software_version: env!("CARGO_PKG_VERSION").into(),
            results: Vec::new(),
            outbox: self.outbox.load(Ordering::Relaxed),
        }
    }
}

/// Seconds since the host booted.
fn host_uptime() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split('.').next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// The one-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
        .unwrap_or(0.0)
}

/// Messages in mb-smtpd's queue (0 when it does not answer).
async fn queue_depth(cfg: &Config) -> u64 {
    match mb_runtime::uds::connect(&cfg.socket("mb-smtpd"), "mb-smtpd").await {
        Ok(ch) => {
            let mut c = mb_proto::v1::control_client::ControlClient::new(ch);
            match tokio::time::timeout(Duration::from_secs(1), c.status(StatusRequest::default()))
                .await
            {
                Ok(Ok(r)) => ["queue_incoming", "queue_deferred", "queue_hold"]
                    .iter()
                    .filter_map(|k| r.get_ref().counters.get(*k))
                    .sum(),
                _ => 0,
            }
        }
        Err(_) => 0,
    }
}

/// `Control.Status` (role, version, nodes) and reload.
pub struct Hooks {
    node: Arc<Node>,
    config: Option<PathBuf>,
}

#[tonic::async_trait]
impl DaemonHooks for Hooks {
    async fn status(&self, _req: &StatusRequest, resp: &mut StatusResponse) {
        let st = self.node.state();
        let cfg = self.node.cfg();
        resp.detail = match &st {
            _ if !cfg.bool("cluster.enabled") => "cluster disabled".into(),
            None => "not set up: run mb-cluster init (main) or mb-cluster join (child)".into(),
            Some(s) if s.role == "main" => format!("main {} version {}", s.name, s.config_version),
            Some(s) => format!(
                "child {} of {} version {}: {}",
                s.name,
                s.main_name,
                s.config_version,
                self.node.link.lock().map(|l| l.clone()).unwrap_or_default()
            ),
        };
        if let Some(s) = st {
            resp.counters
                .insert("config_version".into(), s.config_version);
            resp.counters.insert(
                "nodes".into(),
                s.nodes.iter().filter(|n| !n.revoked).count() as u64,
            );
        }
    }

    async fn reload(&self) -> Result<ReloadResponse, Status> {
        mb_runtime::reread(&self.node.follower, self.config.as_deref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(ReloadResponse {
            reloaded: true,
            ..Default::default()
        })
    }
}

/// The keys that decide what the node does; a change restarts the node's tasks.
fn role_keys(cfg: &Config) -> Vec<String> {
    [
        "cluster.enabled",
        "cluster.role",
        "cluster.bind",
        "cluster.port",
        "cluster.main",
        "cluster.node_name",
    ]
    .iter()
    .map(|k| cfg.get(k).to_string())
    .collect()
}

impl Daemon for Cluster {
    type Source = Follower;
    /// Nothing: the cluster port is bound by the node's role (`peer::run_main`), which
    /// restarts whenever the settings that decide it change.
    type Listeners = ();
    type Hooks = Hooks;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;
    const CUT_SHORT: Option<&'static str> =
        Some("the cluster role was still stopping at the drain deadline");

    fn identity(&self) -> Identity {
        Identity::single(DAEMON)
    }

    async fn configure(
        &self,
        file: Config,
        _config: Option<&Path>,
        shutdown: &Shutdown,
    ) -> Result<Follower, StartError> {
        Ok(Follower::start(DAEMON, file, shutdown.clone()))
    }

    async fn bind(&self, _cfg: &Config) -> Result<(), StartError> {
        Ok(())
    }

    fn writable(&self, cfg: &Config) -> Option<Vec<PathBuf>> {
        Some(vec![Dir::of(cfg).0])
    }

    async fn start(self, (): (), ctx: &Context<Follower>) -> Result<Serving<Hooks>, StartError> {
        let node = Arc::new(Node {
            dir: Dir::of(&ctx.cfg),
            info: ctx.info.clone(),
            follower: ctx.source.clone(),
            state: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            snapshot: Mutex::new(None),
            version: watch::channel(0).0,
            link: Mutex::new("not started".into()),
            remote_nodes: Mutex::new(Vec::new()),
            sync_now: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            next_command: AtomicU64::new(1),
            outbox: AtomicU64::new(0),
        });
        let hooks = Arc::new(Hooks {
            node: node.clone(),
            config: ctx.config.clone(),
        });
        let admin =
            ClusterServer::with_interceptor(admin::Admin { node: node.clone() }, Guard::peer());
        let supervisor = tokio::spawn(supervise(node, ctx.shutdown.clone()));
        tracing::info!(socket = %ctx.socket.display(), "mb-cluster ready");
        let work = async move {
            let _ = supervisor.await;
            Ok(())
        };
        Ok(Serving::new(hooks, work).with_services(tonic::service::Routes::new(admin)))
    }
}

/// Runs the node's role until shutdown, restarting it whenever a `cluster.*` key that
/// decides the role changes (an `mb-cluster init` or `join` takes effect that way).
async fn supervise(node: Arc<Node>, shutdown: Shutdown) {
    let mut changes = node.follower.subscribe();
    loop {
        let cfg = node.cfg();
        let keys = role_keys(&cfg);
        let (trigger, stop) = lifecycle::shutdown_pair();
        let task = if cfg.bool("cluster.enabled") {
            match node.dir.load() {
                Ok(st) => {
                    let expected = cfg.text("cluster.role");
                    if st.role != expected {
                        tracing::error!(
                            state = %st.role,
                            config = %expected,
                            "cluster.role does not match this node's cluster state; not starting (fix cluster.role, or `mb-cluster leave` and set the node up again)"
                        );
                        None
                    } else {
                        if let Ok(mut s) = node.state.lock() {
                            *s = Some(st.clone());
                        }
                        let _ = node.version.send(st.config_version);
                        Some(if st.role == "main" {
                            tokio::spawn(peer::run_main(node.clone(), stop))
                        } else {
                            tokio::spawn(child::run(node.clone(), stop))
                        })
                    }
                }
                Err(e) => {
                    tracing::warn!(cause = %format!("{e:#}"), "cluster.enabled is set but this node is not set up");
                    None
                }
            }
        } else {
            if let Ok(mut s) = node.state.lock() {
                *s = node.dir.load().ok();
            }
            None
        };
        // Wait for a change of the role keys, or the end.
        loop {
            tokio::select! {
                () = shutdown.requested() => {
                    trigger.trigger();
                    if let Some(t) = task {
                        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
                    }
                    return;
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if role_keys(&node.cfg()) != keys {
                        break;
                    }
                }
            }
        }
        tracing::info!("cluster settings changed: restarting the node's cluster role");
        trigger.trigger();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        if let Ok(mut seen) = node.seen.lock() {
            seen.clear();
        }
    }
}
