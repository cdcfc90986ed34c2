//! The child's side: one Sync stream to the main, a report every `cluster.heartbeat`
//! (and at once after a snapshot is applied or when asked), snapshots imported into the
//! local mb-rpcd. When the main is unreachable the node keeps running on what its
//! database holds and retries with a growing pause, never longer than the heartbeat.

use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::replica_client::ReplicaClient;
use mb_proto::v1::{MainUpdate, Snapshot};
use mb_runtime::lifecycle::Shutdown;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Node;
use crate::peer;

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
        Err(e) => return e,
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
    let mut tick = tokio::time::interval(node.heartbeat());
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.requested() => return "stopping".into(),
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
                Ok(Some(update)) => {
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

async fn import(node: &Node, snap: Snapshot) -> Result<(), String> {
    let ch = mb_runtime::uds::connect(&node.cfg().socket("mb-rpcd"), "mb-rpcd")
        .await
        .map_err(|e| e.to_string())?;
    ReplicaClient::new(ch)
        .import(snap)
        .await
        .map_err(|e| mb_runtime::uds::describe_status("mb-rpcd", &e))?;
    Ok(())
}
