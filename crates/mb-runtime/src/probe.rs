//! Finding and asking the daemons of this node, for mb-status and mb-rpcd's aggregate status.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mb_core::Config;
use mb_proto::v1::control_client::ControlClient;
use mb_proto::v1::{ComponentStatus, DaemonStatus, StatusRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A daemon this node should (or may) run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The name tools show: `mb-rpcd`, `mb-filter@2`.
    pub name: String,
    pub socket: PathBuf,
    /// Whether the configuration asks for it; a disabled daemon that runs is still shown.
    pub enabled: bool,
}

/// The socket file name of a daemon shown as `name` (`mb-filter@2` uses `mb-filter-2.sock`).
pub fn socket_name(name: &str) -> String {
    format!("{}.sock", name.replace('@', "-"))
}

/// The daemons the configuration enables, plus any other daemon socket found in the run
/// directory (a worker beyond `filter.workers`, a daemon enabled by hand).
pub fn expected_daemons(cfg: &Config) -> Vec<Expected> {
    let run = cfg.path("paths.run_dir");
    let mut out = Vec::new();
    let mut push = |name: String, enabled: bool| {
        let socket = run.join(socket_name(&name));
        out.push(Expected {
            name,
            socket,
            enabled,
        });
    };
    push("mb-rpcd".into(), true);
    push("mb-smtpd".into(), cfg.bool("smtp.enabled"));
    let workers = if cfg.bool("filter.enabled") {
        cfg.int("filter.workers")
    } else {
        0
    };
    for i in 1..=workers {
        push(format!("mb-filter@{i}"), true);
    }
    push("mb-milter".into(), cfg.bool("milter.enabled"));
    push("mb-cluster".into(), cfg.bool("cluster.enabled"));
    push("mb-web".into(), cfg.bool("web.enabled"));
    let known: Vec<PathBuf> = out.iter().map(|e| e.socket.clone()).collect();
    for extra in discover(&run) {
        if !known.contains(&extra.socket) {
            out.push(extra);
        }
    }
    out.retain(|e| e.enabled || e.socket.exists());
    out
}

fn discover(run: &Path) -> Vec<Expected> {
    let Ok(dir) = std::fs::read_dir(run) else {
        return Vec::new();
    };
    let mut found: Vec<Expected> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let stem = file.strip_suffix(".sock")?;
            let name = match stem.strip_prefix("mb-filter-") {
                Some(n) if n.parse::<u32>().is_ok() => format!("mb-filter@{n}"),
                _ if stem.starts_with("mb-") => stem.to_string(),
                _ => return None,
            };
            Some(Expected {
                name,
                socket: e.path(),
                enabled: false,
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Asks one daemon for its status; never fails, the error goes into the answer.
pub async fn probe(e: &Expected, timeout: Duration) -> DaemonStatus {
    let mut out = DaemonStatus {
        name: e.name.clone(),
        socket: e.socket.display().to_string(),
        ..Default::default()
    };
    let work = async {
        let channel = crate::uds::connect(&e.socket, &e.name)
            .await
            .map_err(|e| e.to_string())?;
        ControlClient::new(channel)
            .status(StatusRequest {
                include_daemons: false,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| crate::uds::describe_status(&e.name, &s))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(status)) => {
            out.reachable = true;
            out.status = Some(status);
        }
        Ok(Err(err)) => out.error = err,
        Err(_) => out.error = format!("{} did not answer within {}s", e.name, timeout.as_secs()),
    }
    out
}

/// Probes every expected daemon at once.
pub async fn probe_all(cfg: &Config, timeout: Duration) -> Vec<DaemonStatus> {
    let expected = expected_daemons(cfg);
    let mut set = tokio::task::JoinSet::new();
    for (i, e) in expected.into_iter().enumerate() {
        set.spawn(async move { (i, probe(&e, timeout).await) });
    }
    let mut out: Vec<(usize, DaemonStatus)> = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, s)| s).collect()
}

/// PING against `redis.url` (redis://[user:password@]host[:port][/db], or unix:///path).
pub async fn redis_ping(url: &str, timeout: Duration) -> ComponentStatus {
    let mut out = ComponentStatus {
        name: "redis".into(),
        address: mb_core::config::redact_url(url),
        ..Default::default()
    };
    if url.is_empty() {
        out.state = "disabled".into();
        out.detail = "redis.url is not set".into();
        return out;
    }
    let start = Instant::now();
    match tokio::time::timeout(timeout, redis_ping_inner(url)).await {
        Ok(Ok(())) => {
            out.state = "ok".into();
            out.latency_micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
        Ok(Err(e)) => {
            out.state = "down".into();
            out.detail = e.to_string();
        }
        Err(_) => {
            out.state = "down".into();
            out.detail = format!("no answer within {}s", timeout.as_secs());
        }
    }
    out
}

/// Why a Redis PING failed (the detail `redis_ping` reports).
#[derive(Debug, thiserror::Error)]
enum PingError {
    #[error("redis.url has no scheme")]
    NoScheme,
    #[error("unsupported scheme {0:?} (use redis:// or unix://)")]
    Scheme(String),
    #[error("{0}")]
    Connect(std::io::Error),
    /// Writing the command or reading the answer failed.
    #[error("{0}")]
    Io(std::io::Error),
    #[error("connection closed")]
    Closed,
    /// Redis answered with an error line (`-NOAUTH ...`).
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer")]
    Unexpected,
}

async fn redis_ping_inner(url: &str) -> Result<(), PingError> {
    let (scheme, rest) = url.split_once("://").ok_or(PingError::NoScheme)?;
    let mut password = None;
    let mut stream: Box<dyn Io> = match scheme {
        "unix" | "redis+unix" => Box::new(
            tokio::net::UnixStream::connect(rest.split('?').next().unwrap_or(rest))
                .await
                .map_err(PingError::Connect)?,
        ),
        "redis" => {
            let (auth, host) = match rest.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, rest),
            };
            if let Some(auth) = auth {
                password = Some(auth.split_once(':').map_or(auth, |(_, p)| p).to_string());
            }
            let host = host.split('/').next().unwrap_or(host);
            let addr = if host
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !host.ends_with(']')
            {
                host.to_string()
            } else {
                format!("{host}:6379")
            };
            Box::new(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(PingError::Connect)?,
            )
        }
        other => return Err(PingError::Scheme(other.to_string())),
    };
    let mut cmd = Vec::new();
    if let Some(p) = password.filter(|p| !p.is_empty()) {
        cmd.extend_from_slice(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len()).as_bytes());
    }
    cmd.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    stream.write_all(&cmd).await.map_err(PingError::Io)?;
    let mut buf = vec![0u8; 512];
    let mut got = Vec::new();
    while !got.ends_with(b"+PONG\r\n") {
        let n = stream.read(&mut buf).await.map_err(PingError::Io)?;
        if n == 0 {
            return Err(PingError::Closed);
        }
        got.extend_from_slice(&buf[..n]);
        if got.starts_with(b"-") {
            let line = String::from_utf8_lossy(&got);
            return Err(PingError::Refused(line.trim().to_string()));
        }
        if got.len() > 4096 {
            return Err(PingError::Unexpected);
        }
    }
    Ok(())
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_follows_config() {
        let mut cfg = Config::from_toml_str(
            "paths.run_dir = \"/nonexistent/run\"\nfilter.workers = 3\n",
            "t",
        )
        .unwrap();
        let names: Vec<String> = expected_daemons(&cfg).into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "mb-rpcd",
                "mb-smtpd",
                "mb-filter@1",
                "mb-filter@2",
                "mb-filter@3",
                "mb-web"
            ]
        );
        cfg.apply_overrides([
            ("smtp.enabled", "false"),
            ("filter.enabled", "false"),
            ("milter.enabled", "true"),
            ("web.enabled", "false"),
        ]);
        let e = expected_daemons(&cfg);
        assert_eq!(
            e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["mb-rpcd", "mb-milter"]
        );
        assert_eq!(e[1].socket, Path::new("/nonexistent/run/mb-milter.sock"));
        assert_eq!(socket_name("mb-filter@2"), "mb-filter-2.sock");
    }

    #[tokio::test]
    async fn redis_down_is_reported() {
        let s = redis_ping("redis://127.0.0.1:1", Duration::from_secs(2)).await;
        assert_eq!(s.state, "down");
        let s = redis_ping("", Duration::from_secs(1)).await;
        assert_eq!(s.state, "disabled");
        let s = redis_ping("http://x", Duration::from_secs(1)).await;
        assert!(s.detail.contains("unsupported scheme"), "{}", s.detail);
    }
}
