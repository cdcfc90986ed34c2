//! mb-cluster: the cluster daemon (`mb-cluster daemon`, as mb-cluster.service runs it) and
//! the tool that sets nodes up and shows them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_cluster::state::{self, Dir, TokenText};
use mb_cluster::{peer, pki};
use mb_proto::v1::cluster_client::ClusterClient;
use mb_proto::v1::config_client::ConfigClient;
use mb_proto::v1::{
    ClusterStatusRequest, CreateTokenRequest, FollowRequest, JoinRequest, LeaveRequest,
    PromoteRequest, RemoveNodeRequest, SetRequest, SyncNowRequest,
};
use mb_runtime::cli::{self, Failure};
use serde_json::json;

const AFTER_HELP: &str = "\
Set up a cluster:
  on the main:     mb-cluster init --name mx1
                   mb-cluster token                  (prints a single-use join token)
  on each child:   mb-cluster join mx1.example.org:10050 --token mbc1.... --name mx2
Then `mb-cluster status` on any node lists every node. Cluster-wide settings (policies,
users, thresholds, domains, relay, ...) are edited on the main with the usual tools and
reach every child within seconds; node-local keys (listen addresses, ports, paths,
cluster.*) stay on each node. Open cluster.port (10050/tcp) to the cluster's addresses
only.

Exit status: 0 success, 1 refused (bad token, not the main, no such node), 2 usage error,
69 a daemon or the main could not be reached, 77 permission denied.";

/// Main and child gateway nodes: set up, join, list, remove.
#[derive(Parser)]
#[command(name = "mb-cluster", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print data as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cluster daemon (what mb-cluster.service starts)
    Daemon {
        /// Log line format (overrides log.format)
        #[arg(long, value_parser = ["text", "json"])]
        log_format: Option<String>,
    },
    /// Make this node the main of a new cluster (creates the cluster's CA)
    Init {
        /// This node's name (default: cluster.node_name, else the host name)
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a single-use join token for a new child (main only)
    Token {
        /// How long the token stays valid (at most 7d)
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Join the cluster whose main is at MAIN (host:port) with a token from the main
    Join {
        main: String,
        #[arg(long)]
        token: String,
        /// This node's name (default: cluster.node_name, else the host name)
        #[arg(long)]
        name: Option<String>,
    },
    /// Every node: role, state, configuration version, load, queue, last heartbeat
    Status,
    /// Remove a node from the cluster and revoke its certificate (main only)
    Remove { node: String },
    /// Export the configuration now (main) or report to the main now (child)
    Sync,
    /// Make this child the main when the main is lost (then `mb-cluster follow` on the
    /// other children)
    Promote,
    /// Point this child at another main, after a promotion
    Follow {
        /// The new main's cluster address (host:port)
        main: String,
        /// The new main's node name
        #[arg(long = "main-name")]
        main_name: String,
    },
    /// Take this node out of the cluster (a main only when it is alone)
    Leave {
        /// Leave even when the main cannot be told (then remove the node on the main)
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    if let Command::Daemon { log_format } = args.command {
        let flags = mb_runtime::daemon::Flags {
            config: args.config,
            log_format,
        };
        return mb_runtime::daemon::main(mb_cluster::Cluster, flags);
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cli::run("mb-cluster", run(args))
}

fn grpc(daemon: &str) -> impl Fn(tonic::Status) -> Failure + '_ {
    move |e| cli::grpc(daemon, &e)
}

/// The node name: the flag, else cluster.node_name, else the host's short name.
fn node_name(flag: Option<String>, cfg: &mb_core::Config) -> Result<String, Failure> {
    let name = flag
        .or_else(|| Some(cfg.text("cluster.node_name")).filter(|n| !n.is_empty()))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .map(|h| h.split('.').next().unwrap_or_default().to_ascii_lowercase())
        })
        .unwrap_or_default();
    pki::check_node_name(&name).map_err(|e| Failure(2, e.context("choose one with --name")))?;
    Ok(name)
}

/// Stores the node's cluster keys through mb-rpcd, in an order where each step is a
/// valid configuration.
async fn set_keys(cfg: &mb_core::Config, keys: &[(&str, String)]) -> Result<(), Failure> {
    let mut client = ConfigClient::new(cli::rpcd(cfg).await.map_err(|f| {
        Failure(
            f.0,
            f.1.context(
                "the cluster files are written, but the settings are not: start mb-rpcd and run this again, or set them in mailborder.toml",
            ),
        )
    })?);
    for (key, value) in keys {
        client
            .set(SetRequest {
                key: (*key).to_string(),
                value: value.clone(),
            })
            .await
            .map_err(grpc("mb-rpcd"))?;
    }
    Ok(())
}

async fn local(cfg: &mb_core::Config) -> Result<ClusterClient<tonic::transport::Channel>, Failure> {
    let ch = mb_runtime::uds::connect(&cfg.socket("mb-cluster"), "mb-cluster")
        .await
        .map_err(|e| {
            let f = Failure::from(e);
            Failure(
                f.0,
                f.1.context("is mb-cluster running? (systemctl start mb-cluster)"),
            )
        })?;
    Ok(ClusterClient::new(ch))
}

fn hand_over(cfg: &mb_core::Config, dir: &Dir) -> Result<(), Failure> {
    mb_runtime::hand_to(&cfg.text("process.user"), &dir.0).map_err(|e| Failure(1, anyhow!(e)))
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-cluster", args.config.as_deref());
    let dir = Dir::of(&cfg);
    match args.command {
        Command::Daemon { .. } => unreachable!("handled in main"),
        Command::Init { name } => {
            let name = node_name(name, &cfg)?;
            let st = state::init_main(&dir, &name).map_err(Failure::refused)?;
            hand_over(&cfg, &dir)?;
            set_keys(
                &cfg,
                &[
                    ("cluster.node_name", name.clone()),
                    ("cluster.role", "main".into()),
                    ("cluster.enabled", "true".into()),
                ],
            )
            .await?;
            if args.json {
                println!(
                    "{}",
                    json!({"name": name, "role": "main", "ca_fingerprint": st.ca_fingerprint})
                );
            } else {
                println!(
                    "{name} is now the main of a new cluster (CA fingerprint {}).",
                    st.ca_fingerprint
                );
                println!(
                    "Listening on {}:{} once mb-cluster runs (systemctl enable --now mb-cluster).",
                    cfg.text("cluster.bind"),
                    cfg.text("cluster.port")
                );
                println!(
                    "Next: `mb-cluster token`, then `mb-cluster join THIS-HOST:{} --token TOKEN` on each child.",
                    cfg.text("cluster.port")
                );
            }
        }
        Command::Token { ttl } => {
            let ttl = mb_core::value::parse_duration(&ttl)
                .map_err(|e| Failure(2, anyhow!("--ttl {ttl}: {e}")))?;
            let r = local(&cfg)
                .await?
                .create_token(CreateTokenRequest {
                    ttl_secs: ttl.as_secs().max(1),
                })
                .await
                .map_err(grpc("mb-cluster"))?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"token": r.token, "expires_unix": r.expires_unix})
                );
            } else {
                println!("{}", r.token);
                eprintln!(
                    "mb-cluster: valid once, for {}; on the child: mb-cluster join MAIN-ADDRESS:{} --token {}",
                    cli::age(ttl.as_secs()),
                    cfg.text("cluster.port"),
                    r.token
                );
            }
        }
        Command::Join { main, token, name } => {
            let name = node_name(name, &cfg)?;
            let token = TokenText::parse(&token).map_err(|e| Failure(2, e))?;
            dir.ensure_empty().map_err(Failure::refused)?;
            let (key_pem, raw) = pki::node_key().map_err(Failure::refused)?;
            let tls = pki::join_config(&token.ca_fingerprint).map_err(Failure::refused)?;
            // The main's name is not known yet: the pinned CA authenticates it.
            let channel = peer::connect(
                &main,
                "cluster-main.invalid",
                tls,
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(|e| Failure(69, anyhow!("cannot reach the main at {main}: {e}")))?;
            let joined = mb_proto::v1::cluster_peer_client::ClusterPeerClient::new(channel)
                .join(JoinRequest {
                    token: format!("{}.{}", token.id, token.secret),
                    name: name.clone(),
                    public_key: raw,
                })
                .await
                .map_err(grpc("the cluster main"))?
                .into_inner();
            let ca_der = pki::cert_der(&joined.ca_pem).map_err(Failure::refused)?;
            if pki::fingerprint(&ca_der) != token.ca_fingerprint {
                return Err(Failure::refused(anyhow!(
                    "the main sent a CA other than the one the token names: refusing it"
                )));
            }
            dir.write(state::NODE_KEY, key_pem.as_bytes(), 0o600)
                .and_then(|()| {
                    dir.write(state::NODE_CERT, joined.certificate_pem.as_bytes(), 0o644)
                })
                .and_then(|()| dir.write(state::CA_CERT, joined.ca_pem.as_bytes(), 0o644))
                .and_then(|()| {
                    dir.save(&state::State {
                        name: name.clone(),
                        role: "child".into(),
                        ca_name: String::new(),
                        ca_fingerprint: token.ca_fingerprint.clone(),
                        main_name: joined.main_name.clone(),
                        main_address: main.clone(),
                        ..Default::default()
                    })
                })
                .map_err(Failure::refused)?;
            hand_over(&cfg, &dir)?;
            set_keys(
                &cfg,
                &[
                    ("cluster.node_name", name.clone()),
                    ("cluster.main", main.clone()),
                    ("cluster.role", "child".into()),
                    ("cluster.enabled", "true".into()),
                ],
            )
            .await?;
            if args.json {
                println!(
                    "{}",
                    json!({"name": name, "role": "child", "main": joined.main_name, "main_address": main})
                );
            } else {
                println!(
                    "{name} joined the cluster of {} ({main}); its configuration now comes from there.",
                    joined.main_name
                );
                println!(
                    "Start mb-cluster if it is not running: systemctl enable --now mb-cluster"
                );
            }
        }
        Command::Status => {
            let r = local(&cfg)
                .await?
                .status(ClusterStatusRequest {})
                .await
                .map_err(grpc("mb-cluster"))?
                .into_inner();
            if args.json {
                let nodes: Vec<_> = r.nodes.iter().map(cli::node_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "enabled": r.enabled, "role": r.role, "name": r.name, "main": r.main,
                        "config_version": r.config_version, "state": r.state, "nodes": nodes,
                    }))
                    .unwrap_or_default()
                );
            } else {
                if r.role.is_empty() {
                    println!("cluster: {}", r.state);
                } else {
                    println!(
                        "cluster: {} {} (main {}), configuration version {}: {}",
                        r.role, r.name, r.main, r.config_version, r.state
                    );
                }
                if !r.nodes.is_empty() {
                    print!("{}", cli::node_table(&r.nodes, state::now_unix() * 1000));
                }
            }
        }
        Command::Remove { node } => {
            local(&cfg)
                .await?
                .remove_node(RemoveNodeRequest { name: node.clone() })
                .await
                .map_err(grpc("mb-cluster"))?;
            mb_runtime::cli::changed(
                args.json,
                &json!({ "removed": node }),
                format_args!("{node} removed; its certificate is refused from now on"),
            );
        }
        Command::Promote => {
            let r = local(&cfg)
                .await?
                .promote(PromoteRequest {})
                .await
                .map_err(grpc("mb-cluster"))?
                .into_inner();
            set_keys(
                &cfg,
                &[
                    ("cluster.role", "main".into()),
                    ("cluster.main", String::new()),
                ],
            )
            .await?;
            if args.json {
                println!(
                    "{}",
                    json!({"role": "main", "config_version": r.config_version, "revoked_main": r.revoked_main})
                );
            } else {
                println!(
                    "this node is now the cluster main (configuration version {}); {} is refused from now on.",
                    r.config_version, r.revoked_main
                );
                println!(
                    "On each other child: mb-cluster follow THIS-HOST:{} --main-name {}",
                    cfg.text("cluster.port"),
                    node_name(None, &cfg).unwrap_or_default()
                );
            }
        }
        Command::Follow { main, main_name } => {
            local(&cfg)
                .await?
                .follow(FollowRequest {
                    address: main.clone(),
                    main_name: main_name.clone(),
                })
                .await
                .map_err(grpc("mb-cluster"))?;
            set_keys(&cfg, &[("cluster.main", main.clone())]).await?;
            mb_runtime::cli::changed(
                args.json,
                &json!({ "main": main, "main_name": main_name }),
                format_args!("following {main_name} at {main}"),
            );
        }
        Command::Leave { force } => {
            local(&cfg)
                .await?
                .leave(LeaveRequest { force })
                .await
                .map_err(grpc("mb-cluster"))?;
            set_keys(&cfg, &[("cluster.enabled", "false".into())]).await?;
            mb_runtime::cli::changed(
                args.json,
                &json!({ "left": true }),
                format_args!("this node left the cluster; its configuration is its own again"),
            );
        }
        Command::Sync => {
            let r = local(&cfg)
                .await?
                .sync_now(SyncNowRequest {})
                .await
                .map_err(grpc("mb-cluster"))?
                .into_inner();
            if args.json {
                println!("{}", json!({"config_version": r.config_version}));
            } else {
                println!("configuration version {}", r.config_version);
            }
        }
    }
    Ok(())
}
