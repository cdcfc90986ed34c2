//! gRPC over Unix sockets: binding a daemon's socket safely, checking each caller's
//! credentials, and connecting to a daemon with errors that say what to do.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid};
use tokio::net::UnixListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// The group whose members may use the daemons' sockets.
pub const GROUP: &str = "mailborder";

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another daemon is already listening on {0}; stop it first (systemctl stop, or cargo xtask down)"
    )]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; move it away")]
    NotASocket(PathBuf),
    #[error("cannot create {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Binds a daemon's socket: creates the run directory, refuses to start over a live
/// socket, removes a stale one, then sets mode 0660 and the `mailborder` group.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    bind_with_group(path, None)
}

/// [`bind`], giving the socket to `group` instead of `mailborder` (mb-web's socket goes
/// to nginx's group, `web.socket_group`, so nginx needs no access to the other
/// daemons' sockets). When the group does not exist or may not be given (the process
/// is not in it), the socket stays the `mailborder` group's and a warning says why.
pub fn bind_with_group(path: &Path, group: Option<&str>) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        // Members of the group must reach the sockets; nobody else needs to.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(io_err)?;
        set_group(dir);
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "removing stale socket");
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // Bind under a temporary name and rename into place once mode and group are set, so
    // that nobody (a client, a test, `mb-status`) ever sees the socket with the umask's
    // mode or root's group.
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let staging = path.with_file_name(format!(".{file_name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(io_err)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| {
            set_group(&staging);
            if let Some(group) = group {
                give_to(&staging, path, group);
            }
            std::fs::rename(&staging, path)
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(io_err(e));
    }
    Ok(listener)
}

/// Gives `path` to the `mailborder` group when it exists and we may.
fn set_group(path: &Path) {
    if let Some(gid) = mailborder_gid()
        && let Err(e) = nix::unistd::chown(path, None, Some(gid))
    {
        tracing::warn!(path = %path.display(), cause = %e, "cannot give the path to group {GROUP}");
    }
}

/// Gives `path` (to be renamed to `shown`) to `group`, or says why it cannot.
fn give_to(path: &Path, shown: &Path, group: &str) {
    match Group::from_name(group) {
        Ok(Some(g)) => {
            if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
                tracing::warn!(
                    socket = %shown.display(), cause = %e,
                    "cannot give the socket to group {group}; it stays {GROUP}'s (run the daemon with {group} among its groups, e.g. SupplementaryGroups={group} in its unit)"
                );
            }
        }
        _ => tracing::warn!(
            socket = %shown.display(),
            "group {group} does not exist; the socket stays {GROUP}'s"
        ),
    }
}

pub fn mailborder_gid() -> Option<Gid> {
    Group::from_name(GROUP).ok().flatten().map(|g| g.gid)
}

/// gRPC metadata naming who a local caller acts for (`web:NAME`, set by mb-web).
pub const ACTOR_HEADER: &str = "x-mb-actor";

/// Who made a request, put into the request's extensions by [`Guard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The peer's uid on a Unix socket; `None` over TCP.
    pub uid: Option<u32>,
    /// A user name for logs and the audit trail (`root`, `alice`, `api-key@192.0.2.1`).
    pub name: String,
}

/// Access control for incoming requests, used as a tonic interceptor.
#[derive(Clone)]
pub enum Guard {
    /// Unix socket: root, the daemon's own uid and members of the `mailborder` group pass.
    Peer { own_uid: u32, group: Option<u32> },
    /// TCP: the API key must be sent as `authorization: Bearer KEY` (when one is required).
    ApiKey {
        key: Option<Arc<str>>,
        daemon: &'static str,
    },
}

impl Guard {
    pub fn peer() -> Guard {
        Guard::Peer {
            own_uid: Uid::effective().as_raw(),
            group: mailborder_gid().map(Gid::as_raw),
        }
    }

    fn check(&self, req: &Request<()>) -> Result<Caller, Status> {
        match self {
            Guard::Peer { own_uid, group } => {
                let cred = req
                    .extensions()
                    .get::<tonic::transport::server::UdsConnectInfo>()
                    .and_then(|i| i.peer_cred)
                    .ok_or_else(|| Status::permission_denied("peer credentials unavailable"))?;
                let (uid, gid) = (cred.uid(), cred.gid());
                if peer_allowed(*own_uid, (uid, gid, cred.pid()), group.as_slice()) {
                    // mb-web acts for its logged-in principals: the audit trail names
                    // them (`web:alice`), not mb-web's own user. Any peer allowed here
                    // could make the change itself, so the claim grants nothing.
                    let name = req
                        .metadata()
                        .get(ACTOR_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .filter(|a| {
                            a.starts_with("web:")
                                && a.len() <= 200
                                && a.bytes().all(|b| b.is_ascii_graphic())
                        })
                        .map_or_else(|| user_name(uid), str::to_string);
                    Ok(Caller {
                        uid: Some(uid),
                        name,
                    })
                } else {
                    tracing::warn!(uid, gid, pid = cred.pid(), "refused a caller on the socket");
                    Err(Status::permission_denied(format!(
                        "uid {uid} may not use this socket: run as root or as a member of the {GROUP} group"
                    )))
                }
            }
            Guard::ApiKey { key, daemon } => {
                let client = req
                    .remote_addr()
                    .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
                let Some(key) = key else {
                    return Ok(Caller {
                        uid: None,
                        name: format!("tcp@{client}"),
                    });
                };
                let sent = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if constant_time_eq(sent.as_bytes(), key.as_bytes()) {
                    Ok(Caller {
                        uid: None,
                        name: format!("api-key@{client}"),
                    })
                } else {
                    // One stable line per failure: etc/fail2ban/filter.d/mailborder-auth.conf matches it.
                    let reason = if sent.is_empty() {
                        "no api key"
                    } else {
                        "wrong api key"
                    };
                    tracing::warn!(
                        "authentication failed client={client} user=api-key service={daemon} reason=\"{reason}\""
                    );
                    Err(Status::unauthenticated(
                        "a valid API key is required (authorization: Bearer KEY)",
                    ))
                }
            }
        }
    }
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.check(&req)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller of a request that passed a [`Guard`].
pub fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or(Caller {
        uid: None,
        name: "unknown".into(),
    })
}

/// Whether a peer on one of our Unix sockets (`uid`, `gid`, `pid` from its credentials)
/// may use it: root, the daemon's own user (`own_uid`), or a member of one of `groups`
/// by its primary group or a supplementary one.
pub fn peer_allowed(
    own_uid: u32,
    (uid, gid, pid): (u32, u32, Option<i32>),
    groups: &[u32],
) -> bool {
    uid == 0
        || uid == own_uid
        || groups
            .iter()
            .any(|g| gid == *g || pid.is_some_and(|pid| has_group(pid, *g)))
}

/// Whether process `pid` has `gid` among its supplementary groups (SO_PEERCRED only
/// gives the primary group).
fn has_group(pid: i32, gid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|status| status_has_group(&status, gid))
}

/// Whether a `/proc/PID/status` text lists `gid` on its `Groups:` line.
fn status_has_group(status: &str, gid: u32) -> bool {
    status_groups(status).any(|g| g == gid)
}

/// The supplementary groups on a `/proc/PID/status` text's `Groups:` line.
fn status_groups(status: &str) -> impl Iterator<Item = u32> + '_ {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .into_iter()
        .flat_map(str::split_whitespace)
        .filter_map(|g| g.parse().ok())
}

pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid{uid}"), |u| u.name)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a tool could not reach a daemon, worded for the administrator.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{daemon} is not running (no socket at {}); start it with `systemctl start {daemon}` (or `cargo xtask up` in a source checkout)", .socket.display())]
    NotRunning { daemon: String, socket: PathBuf },
    #[error("{daemon} is not running (stale socket {}); start it with `systemctl start {daemon}` (or `cargo xtask up` in a source checkout)", .socket.display())]
    Stale { daemon: String, socket: PathBuf },
    #[error("permission denied on {}: run as root or as a member of the {GROUP} group", .socket.display())]
    Denied { socket: PathBuf },
    #[error("cannot connect to {daemon} at {}: {cause}", .socket.display())]
    Other {
        daemon: String,
        socket: PathBuf,
        cause: String,
    },
}

/// Connects to a daemon's socket. The first connection is made eagerly so that a
/// missing or refused daemon is reported at once, in words.
pub async fn connect(socket: &Path, daemon: &str) -> Result<Channel, ConnectError> {
    let other = |cause: String| ConnectError::Other {
        daemon: daemon.to_string(),
        socket: socket.to_path_buf(),
        cause,
    };
    match tokio::net::UnixStream::connect(socket).await {
        Ok(_) => {}
        Err(e) => {
            return Err(match e.kind() {
                io::ErrorKind::NotFound => ConnectError::NotRunning {
                    daemon: daemon.to_string(),
                    socket: socket.to_path_buf(),
                },
                io::ErrorKind::ConnectionRefused => ConnectError::Stale {
                    daemon: daemon.to_string(),
                    socket: socket.to_path_buf(),
                },
                io::ErrorKind::PermissionDenied => ConnectError::Denied {
                    socket: socket.to_path_buf(),
                },
                _ => other(e.to_string()),
            });
        }
    }
    let uri = format!("unix://{}", socket.display());
    Endpoint::from_shared(uri)
        .map_err(|e| other(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| other(format!("{e}")))
}

/// Says a gRPC error in words for a tool's user.
pub fn describe_status(daemon: &str, status: &Status) -> String {
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            status.message().to_string()
        }
        tonic::Code::Unavailable => format!("{daemon} is unavailable: {}", status.message()),
        tonic::Code::Unimplemented => {
            format!("{daemon} does not implement this call (version mismatch?)")
        }
        _ => status.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_pass_as_root_as_ourselves_or_by_a_group_primary_or_supplementary() {
        let status = "Name:\tnginx\nUid:\t33\t33\t33\t33\nGid:\t33\t33\t33\t33\n\
                      FDSize:\t64\nGroups:\t33 4242 \nNStgid:\t77\n";
        assert!(status_has_group(status, 4242));
        assert!(status_has_group(status, 33));
        assert!(!status_has_group(status, 424), "a prefix is no match");
        assert!(!status_has_group(status, 42));
        assert!(!status_has_group("Name:\tx\nGroups:\t\n", 0));
        assert!(!status_has_group("Name:\tx\n", 0), "no Groups line");

        let (own, mb) = (998, 4242);
        assert!(peer_allowed(own, (0, 0, None), &[mb]), "root");
        assert!(peer_allowed(own, (own, 65534, None), &[mb]), "our own uid");
        assert!(peer_allowed(own, (33, mb, None), &[1, mb]), "primary group");
        assert!(!peer_allowed(own, (33, 33, None), &[mb]), "a stranger");
        assert!(!peer_allowed(own, (33, 33, None), &[]), "no group allowed");
        // Our own process: its supplementary groups, as /proc lists them, let it in; a
        // group it is not in, or a process that has gone, does not.
        let me = i32::try_from(std::process::id()).expect("pid");
        let mine = std::fs::read_to_string("/proc/self/status").expect("status");
        let groups: Vec<u32> = status_groups(&mine).collect();
        for g in &groups {
            assert!(peer_allowed(own, (33, 33, Some(me)), &[*g]), "group {g}");
        }
        let outside = (1..u32::MAX)
            .find(|g| !groups.contains(g) && *g != 33)
            .expect("gid");
        assert!(!peer_allowed(own, (33, 33, Some(me)), &[outside]));
        assert!(
            !peer_allowed(own, (33, 33, Some(i32::MAX)), &[outside]),
            "no such process"
        );
        // As root (CI), our own process may have no supplementary group: a child is
        // given some (setpriv, util-linux) and judged by its /proc entry.
        if nix::unistd::geteuid().is_root() {
            let mut child = std::process::Command::new("setpriv")
                .args(["--groups", "4242,4243", "--", "sleep", "10"])
                .spawn()
                .expect("setpriv (util-linux) runs sleep");
            let pid = i32::try_from(child.id()).expect("pid");
            let path = format!("/proc/{pid}/status");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !std::fs::read_to_string(&path).is_ok_and(|s| s.contains("Name:\tsleep")) {
                assert!(std::time::Instant::now() < deadline, "sleep did not start");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let judged = (
                peer_allowed(own, (33, 33, Some(pid)), &[4243]),
                peer_allowed(own, (33, 33, Some(pid)), &[4244]),
            );
            let _ = child.kill();
            let _ = child.wait();
            assert_eq!(judged, (true, false), "supplementary 4243 in, 4244 out");
        }
    }

    #[test]
    fn keys_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[tokio::test]
    async fn binding_refuses_live_sockets_and_replaces_stale_ones() {
        let dir = tempfile_dir();
        let path = dir.join("run/mb-test.sock");
        let live = bind(&path).expect("first bind");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(live);
        // The file is left behind, nobody listens: it is stale and gets replaced.
        assert!(path.exists());
        let _again = bind(&path).expect("rebind over a stale socket");
        std::fs::write(dir.join("plain"), b"x").unwrap();
        assert!(matches!(
            bind(&dir.join("plain")),
            Err(SocketError::NotASocket(_))
        ));
        let err = connect(&dir.join("none.sock"), "mb-test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("systemctl start mb-test"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mb-uds-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
