//! The `Cluster` service on mb-cluster.sock: what the `mb-cluster` tool and `mb-status`
//! ask the local daemon.

use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::cluster_server::Cluster;
use mb_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, CommandResult, CreateTokenRequest,
    CreateTokenResponse, FollowRequest, FollowResponse, LeaveRequest, LeaveResponse, NodeStatus,
    PromoteRequest, PromoteResponse, RemoveNodeRequest, RemoveNodeResponse, RunOnNodeRequest,
    SyncNowRequest, SyncNowResponse,
};
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::peer::{self, PeerError, PeerService};
use crate::state::{self, NodeRecord, Token, TokenText};
use crate::{Node, pki};

/// Longest a join token may live.
const MAX_TTL: Duration = Duration::from_secs(7 * 86_400);

pub struct Admin {
    pub node: Arc<Node>,
}

impl Admin {
    /// The node's state if it is a child.
    fn child(&self) -> Result<state::State, Status> {
        match self.node.state() {
            Some(st) if st.role == "child" => Ok(st),
            Some(_) => Err(Status::failed_precondition("this node is the main")),
            None => Err(Status::failed_precondition("this node is not in a cluster")),
        }
    }

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
                .map_err(|e| Status::unavailable(e.to_string()))?;
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

    async fn promote(
        &self,
        req: Request<PromoteRequest>,
    ) -> Result<Response<PromoteResponse>, Status> {
        let who = caller(&req).name;
        let st = self.child()?;
        let dir = &self.node.dir;
        let ca_key = dir.read(state::CA_KEY).map_err(|_| {
            Status::failed_precondition(
                "this node never received the cluster's CA key from the main, so it cannot sign for the cluster: set up a new cluster instead",
            )
        })?;
        let ca_pem = dir
            .read(state::CA_CERT)
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        let ca_der = pki::cert_der(&ca_pem).map_err(|e| Status::internal(e.to_string()))?;
        let ca_name = pki::common_name(&ca_der)
            .ok_or_else(|| Status::internal("the CA certificate has no name"))?;
        // The CA key must be the one the certificate was made with.
        pki::sign_node(
            &ca_name,
            &ca_key,
            &st.name,
            &pki::node_key()
                .map_err(|e| Status::internal(e.to_string()))?
                .1,
        )
        .map_err(|e| {
            Status::failed_precondition(format!("the stored CA key does not work: {e}"))
        })?;
        let own_fp = dir
            .read(state::NODE_CERT)
            .ok()
            .and_then(|p| pki::cert_der(&p).ok())
            .map(|d| pki::fingerprint(&d))
            .unwrap_or_default();
        let known = self
            .node
            .remote_nodes
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let now = state::now_unix();
        let mut nodes: Vec<NodeRecord> = known
            .iter()
            .filter(|n| n.name != st.name)
            .map(|n| NodeRecord {
                name: n.name.clone(),
                fingerprint: n.fingerprint.clone(),
                role: "child".into(),
                joined_unix: now,
                // The lost main must not come back as a second main.
                revoked: n.name == st.main_name,
            })
            .collect();
        nodes.push(NodeRecord {
            name: st.name.clone(),
            fingerprint: own_fp,
            role: "main".into(),
            joined_unix: now,
            revoked: false,
        });
        let old_main = st.main_name.clone();
        let version = self.node.update(|s| {
            s.role = "main".into();
            s.ca_name = ca_name;
            s.main_name = s.name.clone();
            s.main_address = String::new();
            // The next export numbers a new version, which every child then takes.
            s.config_digest = String::new();
            s.nodes = nodes;
            s.tokens.clear();
            s.config_version
        })?;
        tracing::warn!(node = %st.name, old_main = %old_main, by = %who, "promoted to cluster main; the old main's certificate is refused from now on");
        Ok(Response::new(PromoteResponse {
            config_version: version,
            revoked_main: old_main,
        }))
    }

    async fn follow(
        &self,
        req: Request<FollowRequest>,
    ) -> Result<Response<FollowResponse>, Status> {
        let who = caller(&req).name;
        self.child()?;
        let r = req.into_inner();
        pki::check_node_name(&r.main_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.node.update(|s| {
            s.main_address.clone_from(&r.address);
            s.main_name.clone_from(&r.main_name);
        })?;
        tracing::info!(main = %r.main_name, address = %r.address, by = %who, "following a new cluster main");
        Ok(Response::new(FollowResponse {}))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let who = caller(&req).name;
        let force = req.get_ref().force;
        let st = self
            .node
            .state()
            .ok_or_else(|| Status::failed_precondition("this node is not in a cluster"))?;
        if st.role == "main" {
            let others: Vec<&str> = st
                .nodes
                .iter()
                .filter(|n| !n.revoked && n.name != st.name)
                .map(|n| n.name.as_str())
                .collect();
            if !others.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "{} still in the cluster: remove them first (mb-cluster remove NODE), or promote one of them",
                    others.join(", ")
                )));
            }
        } else {
            let told = async {
                let id = self.node.dir.identity().map_err(PeerError::Identity)?;
                let mut main =
                    peer::main_client(&st.main_address, &st.main_name, &id, Duration::from_secs(5))
                        .await?;
                main.leave(LeaveRequest { force: false })
                    .await
                    .map_err(PeerError::rpc("the cluster main"))?;
                Ok::<(), PeerError>(())
            }
            .await;
            match told {
                Ok(()) => {}
                Err(e) if force => {
                    tracing::warn!(cause = %e, "leaving without telling the main (--force): remove this node there");
                }
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "cannot tell the main ({}) that this node leaves: {e}; `mb-cluster leave --force` leaves anyway (then `mb-cluster remove {}` on the main)",
                        st.main_address, st.name
                    )));
                }
            }
        }
        // The files move aside rather than vanish: the old identity stays for the record.
        let dir = &self.node.dir.0;
        let aside = dir.with_file_name(format!("cluster.left-{}", state::now_unix()));
        std::fs::rename(dir, &aside)
            .map_err(|e| Status::internal(format!("cannot move {} aside: {e}", dir.display())))?;
        if let Ok(mut s) = self.node.state.lock() {
            *s = None;
        }
        tracing::warn!(node = %st.name, by = %who, kept = %aside.display(), "left the cluster");
        Ok(Response::new(LeaveResponse {}))
    }
}
