//! mb-milter: a milter server (Sendmail/Postfix protocol version 6) on
//! `milter.listen:milter.port` (127.0.0.1:10032) for sites that keep Postfix
//! (`smtpd_milters = inet:127.0.0.1:10032`), and on the Unix socket `milter.socket` when
//! one is set (`smtpd_milters = unix:PATH`), where users and groups decide who may
//! connect instead of addresses. Each message is reassembled from the milter
//! callbacks and scanned by an mb-filter worker (least loaded, with failover); the
//! verdict comes back as milter replies: headers added and removed, 550/451 replies,
//! quarantine (Postfix's hold queue) or discard. Policy blocks answer at MAIL/RCPT.

pub mod proto;
pub mod session;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mb_core::Config;
use mb_proto::v1::{ReloadResponse, StatusRequest, StatusResponse};
use mb_runtime::control::DaemonHooks;
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, StartError};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::policies::PolicySet;
use mb_scan::{Scanner, Workers};
use tokio::net::{TcpListener, UnixListener};
use tonic::Status;

pub const DAEMON: &str = "mb-milter";

/// How long milter sessions may finish their message after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// The milter server, as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Milter;

#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub messages: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub tempfailed: AtomicU64,
    pub quarantined: AtomicU64,
    pub discarded: AtomicU64,
    pub unscanned: AtomicU64,
    pub malformed: AtomicU64,
    /// Connections refused (not in `milter.allowed_clients`) or cut off (a session
    /// bound in `session::Limits` passed, or silent past `milter.timeout`).
    pub refused: AtomicU64,
    /// Total time spent waiting for verdicts.
    pub latency_micros: AtomicU64,
}

/// What every connection uses.
pub struct Shared {
    pub follower: Follower,
    pub policies: Arc<PolicySet>,
    pub scanner: Box<dyn Scanner>,
    pub stats: Stats,
    /// How often a PROGRESS packet tells the MTA a long scan is still running (so its
    /// milter timeouts do not fire first).
    pub progress_every: Duration,
}

/// `Control.Status` (sessions, verdicts, scan latency) and reload.
pub struct Hooks {
    shared: Arc<Shared>,
    config: Option<PathBuf>,
}

#[tonic::async_trait]
impl DaemonHooks for Hooks {
    async fn status(&self, _req: &StatusRequest, resp: &mut StatusResponse) {
        let s = &self.shared.stats;
        for (name, v) in [
            ("connections", &s.connections),
            ("active", &s.active),
            ("messages", &s.messages),
            ("accepted", &s.accepted),
            ("rejected", &s.rejected),
            ("tempfailed", &s.tempfailed),
            ("quarantined", &s.quarantined),
            ("discarded", &s.discarded),
            ("unscanned", &s.unscanned),
            ("malformed", &s.malformed),
            ("refused", &s.refused),
        ] {
            resp.counters.insert(name.into(), v.load(Ordering::Relaxed));
        }
        let n = s.messages.load(Ordering::Relaxed).max(1);
        resp.counters.insert(
            "scan_latency_avg_micros".into(),
            s.latency_micros.load(Ordering::Relaxed) / n,
        );
    }

    async fn reload(&self) -> Result<ReloadResponse, Status> {
        mb_runtime::reread(&self.shared.follower, self.config.as_deref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(ReloadResponse {
            reloaded: true,
            ..Default::default()
        })
    }
}

impl Daemon for Milter {
    type Source = Follower;
    /// The milter port (`milter.listen:milter.port`) and the socket `milter.socket`.
    type Listeners = Listeners;
    type Hooks = Hooks;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;
    const CUT_SHORT: Option<&'static str> =
        Some("milter sessions were still open at the drain deadline");

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

    async fn bind(&self, cfg: &Config) -> Result<Listeners, StartError> {
        let addr = std::net::SocketAddr::new(cfg.ip("milter.listen"), cfg.port("milter.port"));
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|cause| StartError::Listen {
                addr,
                what: Some("milter.listen/milter.port"),
                cause,
            })?;
        let path = cfg.path("milter.socket");
        let unix = if path.as_os_str().is_empty() {
            None
        } else {
            Some(bind_socket(&path, &cfg.text("milter.socket_group"))?)
        };
        Ok(Listeners { tcp, unix })
    }

    fn writable(&self, _cfg: &Config) -> Option<Vec<PathBuf>> {
        Some(Vec::new())
    }

    async fn start(
        self,
        listeners: Listeners,
        ctx: &Context<Follower>,
    ) -> Result<Serving<Hooks>, StartError> {
        let cfg = &ctx.cfg;
        let listen = std::net::SocketAddr::new(cfg.ip("milter.listen"), cfg.port("milter.port"));
        let policies = PolicySet::load(
            cfg.path("paths.data_dir")
                .join("cache/policies-milter.json"),
        );
        policies.spawn_refresh(cfg.socket("mb-rpcd"), ctx.shutdown.clone());
        let workers = usize::try_from(cfg.int("filter.workers")).unwrap_or(1);
        let shared = Arc::new(Shared {
            follower: ctx.source.clone(),
            policies,
            scanner: Box::new({
                let follower = ctx.source.clone();
                Workers::new(
                    cfg.path("paths.run_dir"),
                    workers,
                    cfg.duration("filter.scan_timeout"),
                )
                .live_timeout(move || follower.current().duration("filter.scan_timeout"))
            }),
            stats: Stats::default(),
            progress_every: Duration::from_secs(30),
        });
        ctx.info.add_listener(format!("milter inet:{listen}"));
        if let Some((_, path, _)) = &listeners.unix {
            ctx.info
                .add_listener(format!("milter unix:{}", path.display()));
        }
        let hooks = Arc::new(Hooks {
            shared: shared.clone(),
            config: ctx.config.clone(),
        });
        let acceptor = tokio::spawn(accept(listeners.tcp, shared.clone(), ctx.shutdown.clone()));
        let local = listeners.unix.map(|(listener, _, groups)| {
            tokio::spawn(accept_local(
                listener,
                groups,
                shared.clone(),
                ctx.shutdown.clone(),
            ))
        });
        let work = async move {
            let _ = acceptor.await;
            if let Some(local) = local {
                let _ = local.await;
            }
            // Sessions in progress finish their message (or time out).
            while shared.stats.active.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        };
        tracing::info!(listen = %listen, socket = %ctx.socket.display(), "mb-milter started");
        Ok(Serving::new(hooks, work))
    }
}

/// Accepts milter connections until shutdown; each session runs on its own task.
async fn accept(listener: TcpListener, shared: Arc<Shared>, shutdown: Shutdown) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.requested() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "milter accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Only the MTAs named in `milter.allowed_clients` (read live) may talk to us:
        // anyone else could have messages scanned, or hold memory, on our account.
        let peer_ip = peer.ip().to_canonical();
        let allowed = shared
            .follower
            .current()
            .nets("milter.allowed_clients")
            .iter()
            .any(|n| n.contains(&peer_ip));
        if !allowed {
            tracing::warn!(client = %peer_ip, "milter connection refused: client not in milter.allowed_clients");
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        serve(stream, peer_ip.to_string(), &shared);
    }
}

/// Runs one connection's session on a task of its own.
fn serve<S: session::Conn + Send + 'static>(mut stream: S, peer: String, shared: &Arc<Shared>) {
    let shared = shared.clone();
    tokio::spawn(async move {
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        shared.stats.active.fetch_add(1, Ordering::Relaxed);
        session::run(&mut stream, shared.clone(), &peer).await;
        shared.stats.active.fetch_sub(1, Ordering::Relaxed);
    });
}

/// What mb-milter binds before it runs.
pub struct Listeners {
    tcp: TcpListener,
    /// `milter.socket`, its path, and the groups whose members may connect.
    unix: Option<(UnixListener, PathBuf, Vec<u32>)>,
}

/// Binds `milter.socket` (mode 0660) for `group` (`milter.socket_group`; the daemons'
/// group when empty). A directory that has to be created for it gets mode 0750 and the
/// same group, so that the MTA can reach the socket inside it (Postfix's chroot,
/// `/var/spool/postfix`, is where a chrooted smtpd looks for it).
fn bind_socket(path: &Path, group: &str) -> Result<(UnixListener, PathBuf, Vec<u32>), StartError> {
    let named = (!group.is_empty())
        .then(|| nix::unistd::Group::from_name(group).ok().flatten())
        .flatten();
    if !group.is_empty() && named.is_none() {
        return Err(StartError::config(format!(
            "milter.socket_group: group {group} does not exist (the MTA's group, such as postfix; empty for {})",
            mb_runtime::uds::GROUP
        )));
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        use std::os::unix::fs::PermissionsExt;
        let made = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)));
        if let Err(cause) = made {
            return Err(StartError::cant_create(format!(
                "milter.socket: cannot create {}: {cause}",
                dir.display()
            )));
        }
        if let Some(g) = &named
            && let Err(e) = nix::unistd::chown(dir, None, Some(g.gid))
        {
            tracing::warn!(dir = %dir.display(), cause = %e, "cannot give the milter socket's directory to group {group}; the MTA may not reach the socket");
        }
    }
    let listener = mb_runtime::uds::bind_with_group(path, named.as_ref().map(|_| group))?;
    let mut groups: Vec<u32> = named.iter().map(|g| g.gid.as_raw()).collect();
    groups.extend(mb_runtime::uds::mailborder_gid().map(nix::unistd::Gid::as_raw));
    Ok((listener, path.to_path_buf(), groups))
}

/// Accepts connections on `milter.socket` until shutdown: from root, mb-milter's own
/// user, and members of `groups` (by primary or supplementary group); others are
/// refused with a log line, as TCP clients outside `milter.allowed_clients` are.
async fn accept_local(
    listener: UnixListener,
    groups: Vec<u32>,
    shared: Arc<Shared>,
    shutdown: Shutdown,
) {
    let own_uid = nix::unistd::Uid::effective().as_raw();
    loop {
        let stream = tokio::select! {
            () = shutdown.requested() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(cause = %e, "milter accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let cred = stream.peer_cred().ok();
        let allowed = cred.is_some_and(|c| {
            mb_runtime::uds::peer_allowed(own_uid, (c.uid(), c.gid(), c.pid()), &groups)
        });
        let Some(cred) = cred.filter(|_| allowed) else {
            tracing::warn!(
                uid = cred.map(|c| c.uid()),
                pid = cred.and_then(|c| c.pid()),
                "milter connection refused on milter.socket: not root, mb-milter's user or a member of milter.socket_group"
            );
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        serve(stream, format!("uid {}", cred.uid()), &shared);
    }
}
