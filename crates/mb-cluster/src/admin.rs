//! The `Cluster` service on mb-cluster.sock: what the `mb-cluster` tool and `mb-status`
//! ask the local daemon.

use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::cluster_server::Cluster;
use mb_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, CommandResult, CreateTokenRequest,
    CreateTokenResponse, NodeStatus, RemoveNodeRequest, RemoveNodeResponse, RunOnNodeRequest,
    SyncNowRequest, SyncNowResponse,
};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::peer::{self, PeerService};
use crate::state::{self, Token, TokenText};
use crate::{Node, pki};

/// Longest a join token may live.
const MAX_TTL: Duration = Duration::from_secs(7 * 86_400);

pub struct Admin {
    pub node: Arc<Node>,
}

impl Admin {
    /// The node's state if it is the running main.
    fn main(&self) -> Result<state::State, Status> {
        let cfg = self.node.cfg();
        match self.node.state() {
            Some(st) if st.role == "main" && cfg.bool("cluster.enabled") => Ok(st),
            Some(st) if st.role == "main" => Err(Status::failed_precondition(
                "cluster.enabled is off on this node: `mb-config set cluster.enabled true`",
            )),
            Some(st) => Err(Status::failed_precondition(format!(
                "this node is a child; run this on the main ({})",
                st.main_address
            ))),
            None => Err(Status::failed_precondition(
                "this node is not in a cluster: `mb-cluster init` makes it the main",
            )),
        }
    }
}

#[tonic::async_trait]
impl Cluster for Admin {
    async fn status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let cfg = self.node.cfg();
        let enabled = cfg.bool("cluster.enabled");
        let Some(st) = self.node.state() else {
            return Ok(Response::new(ClusterStatusResponse {
                enabled,
                state: "not set up (mb-cluster init on the main, mb-cluster join on a child)"
                    .into(),
                ..Default::default()
            }));
        };
        let (state, nodes) = if !enabled {
            ("disabled (cluster.enabled is off)".to_string(), Vec::new())
        } else if st.role == "main" {
            let mut nodes = PeerService::nodes(&self.node);
            let own = self.node.own_report().await;
            if let Some(me) = nodes.iter_mut().find(|n| n.name == st.name) {
                me.uptime_secs = own.uptime_secs;
                me.load = own.load;
                me.queue_depth = own.queue_depth;
                me.software_version = own.software_version;
            }
            ("serving".to_string(), nodes)
        } else {
            let link = self.node.link.lock().map(|l| l.clone()).unwrap_or_default();
            let mut nodes: Vec<NodeStatus> = self
                .node
                .remote_nodes
                .lock()
                .map(|n| n.clone())
                .unwrap_or_default();
            // What the main last said is stale when the link is down; our own line is not.
            let own = self.node.own_report().await;
            if let Some(me) = nodes.iter_mut().find(|n| n.name == st.name) {
                me.config_version = own.config_version;
                me.load = own.load;
                me.queue_depth = own.queue_depth;
                me.state = "online".into();
            }
            (link, nodes)
        };
        Ok(Response::new(ClusterStatusResponse {
            enabled,
            role: st.role.clone(),
            name: st.name.clone(),
            main: if st.role == "main" {
                st.name.clone()
            } else {
                format!("{} ({})", st.main_name, st.main_address)
            },
            config_version: st.config_version,
            state,
            nodes,
        }))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = caller(&req).name;
        let st = self.main()?;
        let ttl = match req.get_ref().ttl_secs {
            0 => Duration::from_secs(3600),
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TTL {
            return Err(Status::invalid_argument(
                "a join token may live 7 days at most",
            ));
        }
        let internal = |e: anyhow::Error| Status::internal(e.to_string());
        let text = TokenText {
            id: pki::random_hex(4).map_err(internal)?,
            secret: pki::random_hex(16).map_err(internal)?,
            ca_fingerprint: st.ca_fingerprint.clone(),
        };
        let expires = state::now_unix() + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        self.node.update(|st| {
            let now = state::now_unix();
            // Spent and expired tokens are of no more use.
            st.tokens
                .retain(|t| t.used_by.is_none() && t.expires_unix > now);
            st.tokens.push(Token {
                id: text.id.clone(),
                secret_sha256: pki::sha256_hex(text.secret.as_bytes()),
                expires_unix: expires,
                used_by: None,
            });
        })?;
        tracing::info!(token = %text.id, by = %who, expires_unix = expires, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token: text.render(),
            expires_unix: expires,
        }))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let who = caller(&req).name;
        let st = self.main()?;
        let name = req.into_inner().name;
        if name == st.name {
            return Err(Status::failed_precondition(
                "the main cannot remove itself (promote another node first)",
            ));
        }
        let found = self.node.update(|st| {
            let mut found = false;
            for n in st.nodes.iter_mut().filter(|n| n.name == name && !n.revoked) {
                n.revoked = true;
                found = true;
            }
            found
        })?;
        if !found {
            return Err(Status::not_found(format!(
                "no node {name} (mb-cluster status lists them)"
            )));
        }
        if let Ok(mut seen) = self.node.seen.lock() {
            seen.remove(&name);
        }
        tracing::info!(node = %name, by = %who, "node removed; its certificate is revoked");
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn sync_now(
        &self,
        _req: Request<SyncNowRequest>,
    ) -> Result<Response<SyncNowResponse>, Status> {
        let st = self
            .node
            .state()
            .ok_or_else(|| Status::failed_precondition("this node is not in a cluster"))?;
        if st.role == "main" {
            self.main()?;
            let v = peer::export(&self.node)
                .await
                .map_err(Status::unavailable)?;
            return Ok(Response::new(SyncNowResponse { config_version: v }));
        }
        self.node.sync_now.notify_one();
        Ok(Response::new(SyncNowResponse {
            config_version: st.config_version,
        }))
    }

    async fn run_on_node(
        &self,
        req: Request<RunOnNodeRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        self.main()?;
        let r = req.into_inner();
        let command = r
            .command
            .ok_or_else(|| Status::invalid_argument("no command"))?;
        Ok(Response::new(
            peer::run_on_node(&self.node, &r.node, command).await?,
        ))
    }
}
