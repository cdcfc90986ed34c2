//! The main's side: the TLS 1.3 listener on `cluster.bind:cluster.port`, the
//! `ClusterPeer` service (Join and the children's Sync streams) and the exporter that
//! turns mb-rpcd's cluster-wide configuration into numbered snapshots. Also the client
//! connector every node uses to reach another one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mb_proto::v1::cluster_peer_client::ClusterPeerClient;
use mb_proto::v1::cluster_peer_server::{ClusterPeer, ClusterPeerServer};
use mb_proto::v1::{
    CommandResult, ExportRequest, IngestRequest, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, MainUpdate, NodeCommand, NodeReport, NodeStatus, Snapshot, UploadAck,
    UploadBatch,
};
use mb_runtime::lifecycle::Shutdown;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::pki::{self, Identity};
use crate::state::{self, NodeRecord};
use crate::{Node, Seen};

/// How often the main looks for configuration changes.
const EXPORT_EVERY: Duration = Duration::from_secs(2);
/// Longest a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Longest the main waits for a child to carry out a command (a release reinjects).
const COMMAND_DEADLINE: Duration = Duration::from_secs(90);

/// Why a node could not reach another one, serve its listener or export a snapshot.
/// The messages name the underlying error, so it is not repeated as a `source`.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{name:?} is not a node name: {cause}")]
    NodeName {
        name: String,
        cause: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("{address:?} is not host:port: {cause}")]
    Address {
        address: String,
        cause: tonic::transport::Error,
    },
    /// The connection, the TLS handshake or the HTTP/2 transport failed (with its causes).
    #[error("{}", describe(.0))]
    Transport(tonic::transport::Error),
    #[error("cannot load this node's certificate: {0:#}")]
    Identity(anyhow::Error),
    /// This node's certificate and key make no TLS settings.
    #[error("TLS settings: {0}")]
    Tls(anyhow::Error),
    #[error("cannot listen on {addr} (cluster.bind/cluster.port): {cause}")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] mb_runtime::uds::ConnectError),
    /// A daemon (`mb-rpcd`, `the cluster main`) answered a call with an error.
    #[error("{}", mb_runtime::uds::describe_status(.daemon, .status))]
    Rpc {
        daemon: &'static str,
        status: Box<Status>,
    },
    /// The new version could not be recorded in the node's state.
    #[error("{}", .0.message())]
    Record(Box<Status>),
    #[error("this node is not set up")]
    NotSetUp,
}

impl PeerError {
    /// A gRPC error from `daemon`, worded as `describe_status` words it.
    pub fn rpc(daemon: &'static str) -> impl FnOnce(Status) -> PeerError {
        move |status| PeerError::Rpc {
            daemon,
            status: Box::new(status),
        }
    }
}

/// Opens a gRPC channel to another node at `address` (host:port): TLS 1.3 with `tls`,
/// the peer's certificate naming `server_name`. `patience` bounds the connection and
/// handshake, and is how long a silent peer (a cut link) takes to be noticed: HTTP/2
/// pings go every `patience` and must be answered within it.
pub async fn connect(
    address: &str,
    server_name: &str,
    tls: rustls::ClientConfig,
    patience: Duration,
) -> Result<Channel, PeerError> {
    let name =
        rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|cause| {
            PeerError::NodeName {
                name: server_name.to_string(),
                cause,
            }
        })?;
    let connector = TlsConnector::from(Arc::new(tls));
    let target = address.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|cause| PeerError::Address {
            address: address.to_string(),
            cause,
        })?
        .connect_timeout(patience)
        .http2_keep_alive_interval(patience)
        .keep_alive_timeout(patience)
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = tokio::time::timeout(patience, connector.connect(name, tcp))
                    .await
                    .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(PeerError::Transport)
}

/// A transport error with its causes, for logs and `mb-cluster status`.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Runs the main until `stop`: the exporter and the TLS listener.
pub async fn run_main(node: Arc<Node>, stop: Shutdown) {
    let cfg = node.cfg();
    let addr = SocketAddr::new(cfg.ip("cluster.bind"), cfg.port("cluster.port"));
    let exporter = tokio::spawn(export_loop(node.clone(), stop.clone()));
    let served = serve(node.clone(), addr, stop.clone()).await;
    if let Err(e) = served {
        tracing::error!(cause = %e, "the cluster listener failed");
    }
    let _ = exporter.await;
}

async fn serve(node: Arc<Node>, addr: SocketAddr, stop: Shutdown) -> Result<(), PeerError> {
    let id = node.dir.identity().map_err(PeerError::Identity)?;
    let acceptor = TlsAcceptor::from(Arc::new(pki::server_config(&id).map_err(PeerError::Tls)?));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|cause| PeerError::Listen { addr, cause })?;
    tracing::info!(listen = %addr, "cluster listener ready (TLS 1.3, mutual certificates)");
    node.info.add_listener(format!("cluster tls:{addr}"));
    // Handshakes run on their own tasks so a slow or hostile client holds up nobody.
    let (tx, rx) = mpsc::channel(64);
    let accept = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = stop.requested() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(cause = %e, "cluster accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(client = %peer.ip(), cause = %e, "cluster TLS handshake refused")
                        }
                        Err(_) => {
                            tracing::warn!(client = %peer.ip(), "cluster TLS handshake timed out")
                        }
                    }
                });
            }
        })
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            ClusterPeerServer::new(PeerService { node })
                .max_decoding_message_size(crate::MAX_MESSAGE)
                .max_encoding_message_size(crate::MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), {
            let stop = stop.clone();
            async move { stop.requested().await }
        })
        .await;
    accept.abort();
    result.map_err(PeerError::Transport)
}

/// Exports the configuration every few seconds (or when asked) and publishes a new
/// version when its content changed.
async fn export_loop(node: Arc<Node>, stop: Shutdown) {
    let mut warned = false;
    loop {
        match export(&node).await {
            Ok(_) => warned = false,
            Err(e) if !warned => {
                tracing::warn!(cause = %e, "cannot export the configuration from mb-rpcd; children keep the last snapshot");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = stop.requested() => return,
            () = tokio::time::sleep(EXPORT_EVERY) => {}
            () = node.sync_now.notified() => {}
        }
    }
}

/// One export: reads mb-rpcd, compares with the last snapshot's digest, numbers a new
/// version when it differs.
pub async fn export(node: &Node) -> Result<u64, PeerError> {
    let cfg = node.cfg();
    let ch = mb_runtime::uds::connect(&cfg.socket("mb-rpcd"), "mb-rpcd").await?;
    let mut snap = crate::replica_client(ch)
        .export(ExportRequest {})
        .await
        .map_err(PeerError::rpc("mb-rpcd"))?
        .into_inner();
    let digest = {
        let mut content = snap.clone();
        content.created_unix = 0;
        pki::sha256_hex(&content.encode_to_vec())
    };
    let (version, changed) = {
        let current = node.state().map(|s| (s.config_version, s.config_digest));
        match current {
            Some((v, d)) if d == digest => (v, false),
            Some(_) => {
                let v = node
                    .update(|st| {
                        st.config_version += 1;
                        st.config_digest = digest.clone();
                        st.config_version
                    })
                    .map_err(|e| PeerError::Record(Box::new(e)))?;
                (v, true)
            }
            None => return Err(PeerError::NotSetUp),
        }
    };
    let have = node
        .snapshot
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.version));
    if changed || have != Some(version) {
        snap.version = version;
        if changed {
            tracing::info!(
                version,
                settings = snap.settings.len(),
                policies = snap.policies.len(),
                users = snap.users.len(),
                "new cluster configuration snapshot"
            );
        }
        if let Ok(mut s) = node.snapshot.lock() {
            *s = Some(Arc::new(snap));
        }
        node.version.send_replace(version);
    }
    Ok(version)
}

pub struct PeerService {
    pub node: Arc<Node>,
}

impl PeerService {
    /// The node a request comes from, by its certificate; refuses unknown and revoked
    /// certificates.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("a node certificate is required (join the cluster first)")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a node certificate is required"))?;
        let fp = pki::fingerprint(leaf);
        let st = self
            .node
            .state()
            .ok_or_else(|| Status::unavailable("this node is not set up"))?;
        match st.nodes.iter().find(|n| n.fingerprint == fp) {
            Some(n) if !n.revoked => Ok(n.name.clone()),
            Some(n) => {
                tracing::warn!(node = %n.name, client = %client(req), "refused a removed node");
                Err(Status::permission_denied(format!(
                    "node {} was removed from the cluster: its certificate is revoked",
                    n.name
                )))
            }
            None => Err(Status::permission_denied(
                "this certificate belongs to no node of the cluster",
            )),
        }
    }

    /// The node table as `mb-cluster status` shows it.
    pub fn nodes(node: &Node) -> Vec<NodeStatus> {
        let Some(st) = node.state() else {
            return Vec::new();
        };
        let seen = node.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let stale = node.heartbeat() * 3;
        st.nodes
            .iter()
            .filter(|n| !n.revoked)
            .map(|n| {
                let s = seen.get(&n.name);
                let online = n.name == st.name
                    || s.is_some_and(|s| {
                        s.sessions > 0 && s.last_seen.is_some_and(|t| t.elapsed() < stale)
                    });
                let state = if online {
                    "online"
                } else if s.is_some() {
                    "offline"
                } else {
                    "never seen"
                };
                let mut r = s.map(|s| s.report.clone()).unwrap_or_default();
                let mut address = s.map(|s| s.address.clone()).unwrap_or_default();
                let mut last_seen_unix_ms = s.map_or(0, |s| s.last_seen_unix_ms);
                if n.name == st.name {
                    // The main itself: its figures are filled in by whoever asks.
                    r.config_version = st.config_version;
                    let cfg = node.cfg();
                    address = format!("{}:{}", cfg.text("cluster.bind"), cfg.text("cluster.port"));
                    last_seen_unix_ms = now_ms();
                }
                NodeStatus {
                    name: n.name.clone(),
                    address,
                    role: n.role.clone(),
                    state: state.into(),
                    config_version: r.config_version,
                    uptime_secs: r.uptime_secs,
                    load: r.load,
                    queue_depth: r.queue_depth,
                    last_seen_unix_ms,
                    fingerprint: n.fingerprint.clone(),
                    software_version: r.software_version,
                }
            })
            .collect()
    }

    fn update_for(&self, reported: u64) -> MainUpdate {
        let version = *self.node.version.borrow();
        let snapshot = if reported == version {
            None
        } else {
            self.node
                .snapshot
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(|s| Snapshot::clone(s)))
        };
        let ca_key_pem = if snapshot.is_some() {
            // Read when a snapshot goes out (rarely): off the async workers.
            tokio::task::block_in_place(|| self.node.dir.read(state::CA_KEY)).unwrap_or_default()
        } else {
            String::new()
        };
        MainUpdate {
            config_version: version,
            snapshot,
            nodes: Self::nodes(&self.node),
            commands: Vec::new(),
            ca_key_pem,
        }
    }
}

fn client<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "unknown".into(), |a| a.ip().to_string())
}

fn now_ms() -> i64 {
    state::now_unix() * 1000
}

#[tonic::async_trait]
impl ClusterPeer for PeerService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let from = client(&req);
        let r = req.into_inner();
        pki::check_node_name(&r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let refused = |why: &str| {
            tracing::warn!(client = %from, node = %r.name, "cluster join refused: {why}");
            Status::failed_precondition(format!("join refused: {why}"))
        };
        let (id, secret) = r
            .token
            .split_once('.')
            .ok_or_else(|| refused("malformed token"))?;
        let ca_key = self
            .node
            .dir
            .read(state::CA_KEY)
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        let ca_pem = self
            .node
            .dir
            .read(state::CA_CERT)
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        let secret_hash = pki::sha256_hex(secret.as_bytes());
        let now = state::now_unix();
        // Check and spend the token, and add the node, under one lock.
        let outcome = self.node.try_update(|st| {
            let main = st.name.clone();
            let Some(t) = st.tokens.iter_mut().find(|t| t.id == id) else {
                return Err("unknown token");
            };
            if t.secret_sha256 != secret_hash {
                return Err("wrong token secret");
            }
            if t.used_by.is_some() {
                return Err("this token was used already (tokens work once: make a new one with `mb-cluster token`)");
            }
            if t.expires_unix < now {
                return Err("this token expired (make a new one with `mb-cluster token`)");
            }
            if st.nodes.iter().any(|n| n.name == r.name && !n.revoked) {
                return Err("a node of that name is in the cluster (remove it on the main first, or join under another --name)");
            }
            let cert = pki::sign_node(&st.ca_name, &ca_key, &r.name, &r.public_key)
                .map_err(|_| "the public key is not a P-256 key")?;
            let fp = pki::cert_der(&cert)
                .map(|d| pki::fingerprint(&d))
                .map_err(|_| "signing failed")?;
            t.used_by = Some(r.name.clone());
            st.nodes.retain(|n| n.name != r.name || n.revoked);
            st.nodes.push(NodeRecord {
                name: r.name.clone(),
                fingerprint: fp,
                role: "child".into(),
                joined_unix: now,
                revoked: false,
            });
            Ok((cert, main))
        })?;
        let (cert, main) = outcome.map_err(refused)?;
        tracing::info!(client = %from, node = %r.name, "node joined the cluster");
        Ok(Response::new(JoinResponse {
            certificate_pem: cert,
            ca_pem,
            main_name: main,
        }))
    }

    async fn upload(&self, req: Request<UploadBatch>) -> Result<Response<UploadAck>, Status> {
        let name = self.caller(&req)?;
        let items = req.into_inner().items;
        let cfg = self.node.cfg();
        let ch = mb_runtime::uds::connect(&cfg.socket("mb-rpcd"), "mb-rpcd")
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let ack = crate::replica_client(ch)
            .ingest(IngestRequest { node: name, items })
            .await?
            .into_inner();
        Ok(Response::new(ack))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let name = self.caller(&req)?;
        let from = client(&req);
        self.node.update(|st| {
            for n in st.nodes.iter_mut().filter(|n| n.name == name) {
                n.revoked = true;
            }
        })?;
        if let Ok(mut seen) = self.node.seen.lock() {
            seen.remove(&name);
        }
        tracing::info!(node = %name, client = %from, "node left the cluster; its certificate is revoked");
        Ok(Response::new(LeaveResponse {}))
    }

    type SyncStream = ReceiverStream<Result<MainUpdate, Status>>;

    async fn sync(
        &self,
        req: Request<Streaming<NodeReport>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let name = self.caller(&req)?;
        let address = req
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let mut reports = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let node = self.node.clone();
        let service = PeerService { node: node.clone() };
        tracing::info!(node = %name, address = %address, "child connected");
        tokio::spawn(async move {
            let mut versions = node.version.subscribe();
            let mut reported = None;
            let touch = |f: &mut dyn FnMut(&mut Seen)| {
                if let Ok(mut seen) = node.seen.lock() {
                    f(seen.entry(name.clone()).or_default());
                }
            };
            let (command_tx, mut commands) = mpsc::channel::<NodeCommand>(16);
            touch(&mut |s| {
                s.sessions += 1;
                s.address = address.clone();
                s.commands = Some(command_tx.clone());
            });
            loop {
                tokio::select! {
                    Some(cmd) = commands.recv() => {
                        let update = MainUpdate {
                            config_version: *node.version.borrow(),
                            snapshot: None,
                            nodes: PeerService::nodes(&node),
                            commands: vec![cmd],
                            ca_key_pem: String::new(),
                        };
                        if tx.send(Ok(update)).await.is_err() {
                            break;
                        }
                    }
                    msg = reports.message() => match msg {
                        Ok(Some(report)) => {
                            // A node removed while connected is cut off at its next report.
                            let revoked = node.state().is_none_or(|st| {
                                !st.nodes.iter().any(|n| n.name == name && !n.revoked)
                            });
                            if revoked {
                                let _ = tx.send(Err(Status::permission_denied("this node was removed from the cluster"))).await;
                                break;
                            }
                            reported = Some(report.config_version);
                            if let Ok(mut pending) = node.pending.lock() {
                                for r in &report.results {
                                    if let Some(waiter) = pending.remove(&r.id) {
                                        let _ = waiter.send(r.clone());
                                    }
                                }
                            }
                            touch(&mut |s| {
                                s.report = report.clone();
                                s.last_seen = Some(Instant::now());
                                s.last_seen_unix_ms = now_ms();
                            });
                            if tx.send(Ok(service.update_for(report.config_version))).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(node = %name, cause = %e, "child stream ended");
                            break;
                        }
                    },
                    r = versions.changed() => {
                        if r.is_err() {
                            break;
                        }
                        // Push a new snapshot at once rather than at the next heartbeat.
                        if let Some(v) = reported
                            && tx.send(Ok(service.update_for(v))).await.is_err()
                        {
                            break;
                        }
                    }
                }
            }
            touch(&mut |s| {
                s.sessions = s.sessions.saturating_sub(1);
                if s.commands
                    .as_ref()
                    .is_some_and(|c| c.same_channel(&command_tx))
                {
                    s.commands = None;
                }
            });
            tracing::info!(node = %name, "child disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends `command` to child `name` through its Sync stream and waits for the answer.
pub async fn run_on_node(
    node: &Node,
    name: &str,
    mut command: NodeCommand,
) -> Result<CommandResult, Status> {
    let sender = node
        .seen
        .lock()
        .ok()
        .and_then(|s| s.get(name).and_then(|s| s.commands.clone()))
        .ok_or_else(|| {
            Status::unavailable(format!(
                "node {name} is not connected to this main now; try again when `mb-cluster status` shows it online"
            ))
        })?;
    command.id = node
        .next_command
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = command.id;
    let (done, answer) = tokio::sync::oneshot::channel();
    if let Ok(mut p) = node.pending.lock() {
        p.insert(id, done);
    }
    let forget = || {
        if let Ok(mut p) = node.pending.lock() {
            p.remove(&id);
        }
    };
    if sender.send(command).await.is_err() {
        forget();
        return Err(Status::unavailable(format!("node {name} disconnected")));
    }
    match tokio::time::timeout(COMMAND_DEADLINE, answer).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err(Status::unavailable(format!("node {name} disconnected"))),
        Err(_) => {
            forget();
            Err(Status::deadline_exceeded(format!(
                "node {name} did not answer within {}s",
                COMMAND_DEADLINE.as_secs()
            )))
        }
    }
}

/// A client of the main's ClusterPeer service with this node's certificate.
pub async fn main_client(
    address: &str,
    main_name: &str,
    id: &Identity,
    patience: Duration,
) -> Result<ClusterPeerClient<Channel>, PeerError> {
    let tls = pki::client_config(id).map_err(PeerError::Tls)?;
    Ok(
        ClusterPeerClient::new(connect(address, main_name, tls, patience).await?)
            .max_decoding_message_size(crate::MAX_MESSAGE)
            .max_encoding_message_size(crate::MAX_MESSAGE),
    )
}
