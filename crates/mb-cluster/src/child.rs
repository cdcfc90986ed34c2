//! The child's side: one Sync stream to the main, a report every `cluster.heartbeat`
//! (and at once after a snapshot is applied or when asked), snapshots imported into the
//! local mb-rpcd. When the main is unreachable the node keeps running on what its
//! database holds and retries with a growing pause, never longer than the heartbeat.

use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::cluster_peer_client::ClusterPeerClient;
use mb_proto::v1::quarantine_client::QuarantineClient;
use mb_proto::v1::{
    AcknowledgeRequest, CommandResult, MainUpdate, NodeCommand, OutboxRequest, QuarantineId,
    Snapshot, UploadBatch,
};
use mb_runtime::lifecycle::Shutdown;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::Node;
use crate::{peer, state};

/// Why a snapshot could not be imported or an upload did not go through.
#[derive(Debug, thiserror::Error)]
enum ChildError {
    #[error(transparent)]
    Connect(#[from] mb_runtime::uds::ConnectError),
    /// A daemon (`mb-rpcd`, `the cluster main`) answered a call with an error.
    #[error("{}", mb_runtime::uds::describe_status(.daemon, .status))]
    Rpc {
        daemon: &'static str,
        status: Box<tonic::Status>,
    },
}

/// A gRPC error from `daemon`, worded as `describe_status` words it.
fn rpc(daemon: &'static str) -> impl FnOnce(tonic::Status) -> ChildError {
    move |status| ChildError::Rpc {
        daemon,
        status: Box::new(status),
    }
}

fn set_link(node: &Node, text: String) {
    if let Ok(mut l) = node.link.lock() {
        *l = text;
    }
}

/// Runs the child until `stop`.
pub async fn run(node: Arc<Node>, stop: Shutdown) {
    let mut pause = Duration::from_millis(200);
    loop {
        let reason = tokio::select! {
            () = stop.requested() => return,
            r = session(&node, &stop) => r,
        };
        if stop.is_requested() {
            return;
        }
        let st = node.state().unwrap_or_default();
        tracing::warn!(main = %st.main_address, cause = %reason, "no link to the cluster main; running on configuration version {}", st.config_version);
        set_link(&node, format!("disconnected: {reason}"));
        pause = (pause * 2).min(node.heartbeat());
        tokio::select! {
            () = stop.requested() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One connection to the main; returns why it ended.
async fn session(node: &Arc<Node>, stop: &Shutdown) -> String {
    let Some(st) = node.state() else {
        return "this node is not set up".into();
    };
    let id = match node.dir.identity() {
        Ok(id) => id,
        Err(e) => return format!("cannot load this node's certificate: {e:#}"),
    };
    let address = {
        let configured = node.cfg().text("cluster.main");
        if configured.is_empty() {
            st.main_address.clone()
        } else {
            configured
        }
    };
    // A cut link is noticed within about two heartbeats (2 s to 10 s).
    let patience = (node.heartbeat() * 2).clamp(Duration::from_secs(2), Duration::from_secs(10));
    let mut client = match peer::main_client(&address, &st.main_name, &id, patience).await {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let (tx, rx) = mpsc::channel(4);
    if tx.send(node.own_report().await).await.is_err() {
        return "internal channel closed".into();
    }
    let mut updates = match client.sync(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => return mb_runtime::uds::describe_status("the cluster main", &e),
    };
    tracing::info!(main = %address, "connected to the cluster main");
    set_link(node, "connected".into());
    let mut uploader = AbortOnDrop(tokio::spawn(upload_loop(node.clone(), client.clone())));
    let (results_tx, mut results) = mpsc::channel::<CommandResult>(16);
    let mut tick = tokio::time::interval(node.heartbeat());
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.requested() => return "stopping".into(),
            Some(result) = results.recv() => {
                let mut report = node.own_report().await;
                report.results.push(result);
                if tx.send(report).await.is_err() {
                    return "the stream closed".into();
                }
            }
            _ = &mut uploader.0 => return "the upload task ended".into(),
            _ = tick.tick() => {
                if tx.send(node.own_report().await).await.is_err() {
                    return "the stream closed".into();
                }
            }
            () = node.sync_now.notified() => {
                if tx.send(node.own_report().await).await.is_err() {
                    return "the stream closed".into();
                }
            }
            msg = updates.message() => match msg {
                Ok(Some(mut update)) => {
                    for cmd in std::mem::take(&mut update.commands) {
                        let (node, results_tx) = (node.clone(), results_tx.clone());
                        tokio::spawn(async move {
                            let _ = results_tx.send(execute(&node, cmd).await).await;
                        });
                    }
                    if apply(node, update).await && tx.send(node.own_report().await).await.is_err() {
                        return "the stream closed".into();
                    }
                }
                Ok(None) => return "the main closed the stream".into(),
                Err(e) => return mb_runtime::uds::describe_status("the cluster main", &e),
            }
        }
    }
}

/// Takes in what the main sent; true when a snapshot was applied.
async fn apply(node: &Node, update: MainUpdate) -> bool {
    if let Ok(mut n) = node.remote_nodes.lock() {
        *n = update.nodes;
    }
    // Kept for `mb-cluster promote`.
    if !update.ca_key_pem.is_empty()
        && node.dir.read(state::CA_KEY).ok().as_deref() != Some(update.ca_key_pem.as_str())
        && let Err(e) = node
            .dir
            .write(state::CA_KEY, update.ca_key_pem.as_bytes(), 0o600)
    {
        tracing::warn!(cause = %format!("{e:#}"), "cannot keep the cluster CA key");
    }
    let Some(snap) = update.snapshot else {
        return false;
    };
    let current = node.state().map_or(0, |s| s.config_version);
    if snap.version == current {
        return false;
    }
    let version = snap.version;
    match import(node, snap).await {
        Ok(()) => {
            if let Err(e) = node.update(|st| st.config_version = version) {
                tracing::error!(cause = %e.message(), "cannot record the applied version");
            }
            tracing::info!(version, "applied the cluster configuration");
            true
        }
        Err(e) => {
            tracing::error!(version, cause = %e, "cannot apply the cluster configuration; keeping version {current}");
            false
        }
    }
}

async fn import(node: &Node, snap: Snapshot) -> Result<(), ChildError> {
    let ch = mb_runtime::uds::connect(&node.cfg().socket("mb-rpcd"), "mb-rpcd").await?;
    crate::replica_client(ch)
        .import(snap)
        .await
        .map_err(rpc("mb-rpcd"))?;
    Ok(())
}

/// Items per upload.
const UPLOAD_BATCH: u32 = 500;

/// A task that is aborted when this is dropped (the session ended).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the outbox to the main, oldest first, and forgets each batch only once the
/// main has stored it: nothing is lost across a disconnect, and a batch sent again is
/// stored once (events by id, quarantine entries by id).
async fn upload_loop(node: Arc<Node>, mut main: ClusterPeerClient<Channel>) {
    let mut warned = false;
    loop {
        let pause = match upload_once(&node, &mut main).await {
            Ok(0) => Duration::from_secs(1),
            Ok(_) => Duration::ZERO,
            Err(e) => {
                if !warned {
                    tracing::warn!(cause = %e, "cannot upload events to the cluster main; they wait in the outbox");
                    warned = true;
                }
                Duration::from_secs(2)
            }
        };
        if pause > Duration::ZERO {
            tokio::time::sleep(pause).await;
        } else {
            warned = false;
        }
    }
}

/// One batch; returns how many items went.
async fn upload_once(
    node: &Node,
    main: &mut ClusterPeerClient<Channel>,
) -> Result<usize, ChildError> {
    let ch = mb_runtime::uds::connect(&node.cfg().socket("mb-rpcd"), "mb-rpcd").await?;
    let mut rpcd = crate::replica_client(ch);
    let batch = rpcd
        .outbox(OutboxRequest {
            limit: UPLOAD_BATCH,
        })
        .await
        .map_err(rpc("mb-rpcd"))?
        .into_inner();
    node.outbox
        .store(batch.pending, std::sync::atomic::Ordering::Relaxed);
    if batch.items.is_empty() {
        return Ok(0);
    }
    let seqs: Vec<u64> = batch.items.iter().map(|i| i.seq).collect();
    main.upload(UploadBatch { items: batch.items })
        .await
        .map_err(rpc("the cluster main"))?;
    rpcd.acknowledge(AcknowledgeRequest { seqs: seqs.clone() })
        .await
        .map_err(rpc("mb-rpcd"))?;
    node.outbox.store(
        batch.pending.saturating_sub(seqs.len() as u64),
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(seqs.len())
}

/// Carries out a command from the main against the local mb-rpcd.
async fn execute(node: &Node, cmd: NodeCommand) -> CommandResult {
    let mut result = CommandResult {
        id: cmd.id,
        ..Default::default()
    };
    let fail = |mut r: CommandResult, status: &tonic::Status| {
        r.code = status.code() as i32;
        r.error = status.message().to_string();
        r
    };
    let ch = match mb_runtime::uds::connect(&node.cfg().socket("mb-rpcd"), "mb-rpcd").await {
        Ok(ch) => ch,
        Err(e) => return fail(result, &tonic::Status::unavailable(e.to_string())),
    };
    let mut q = QuarantineClient::new(ch);
    let id = QuarantineId {
        id: cmd.quarantine_id.clone(),
        raw: false,
    };
    let outcome = match cmd.action.as_str() {
        "quarantine.release" => q.release(id).await.map(|r| {
            let r = r.into_inner();
            result.reply = r.reply;
            result.recipients = r.recipients;
        }),
        "quarantine.delete" => q.delete(id).await.map(|_| ()),
        other => Err(tonic::Status::unimplemented(format!(
            "this node does not know the command {other:?} (is it older than the main?)"
        ))),
    };
    tracing::info!(action = %cmd.action, id = %cmd.quarantine_id, ok = outcome.is_ok(), "ran a command from the cluster main");
    match outcome {
        Ok(()) => result,
        Err(e) => fail(result, &e),
    }
}
