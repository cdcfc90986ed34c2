//! A daemon's view of the configuration: its file, overlaid with the overrides stored in
//! mb-rpcd, kept current from the `Config.Watch` feed and cached on disk, so that a
//! daemon started while mb-rpcd is down still runs with the last known configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_core::Config;
use mb_proto::v1::config_client::ConfigClient;
use mb_proto::v1::{ListRequest, Source, WatchRequest};
use tokio::sync::watch;

use crate::lifecycle::Shutdown;

/// Longest wait between attempts to reach mb-rpcd.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why the configuration feed from mb-rpcd broke (the follower retries).
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Connect(#[from] crate::uds::ConnectError),
    /// mb-rpcd answered a call (Watch, List) or the feed with an error.
    #[error("{}", .0.message())]
    Rpc(Box<tonic::Status>),
}

impl From<tonic::Status> for SyncError {
    fn from(s: tonic::Status) -> Self {
        SyncError::Rpc(Box::new(s))
    }
}

/// The overrides as last received, with the generation they belong to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Overrides {
    generation: u64,
    values: BTreeMap<String, String>,
}

struct State {
    file: Config,
    overrides: Overrides,
}

/// Follows mb-rpcd's configuration for one daemon.
#[derive(Clone)]
pub struct Follower {
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<Arc<Config>>>,
    connected: Arc<watch::Sender<bool>>,
}

impl Follower {
    /// Starts following. The first configuration is the file overlaid with the cached
    /// overrides (if any); the background task replaces it once mb-rpcd answers.
    pub fn start(daemon: &str, file: Config, shutdown: Shutdown) -> Follower {
        let cache = cache_path(&file, daemon);
        let overrides = read_cache(&cache).unwrap_or_default();
        let socket = file.socket("mb-rpcd");
        let effective = overlay(&file, &overrides);
        let (tx, _) = watch::channel(Arc::new(effective));
        let (connected, _) = watch::channel(false);
        let follower = Follower {
            state: Arc::new(Mutex::new(State { file, overrides })),
            tx: Arc::new(tx),
            connected: Arc::new(connected),
        };
        let task = follower.clone();
        tokio::spawn(async move { task.run(socket, cache, shutdown).await });
        follower
    }

    /// The effective configuration now.
    pub fn current(&self) -> Arc<Config> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    /// Whether the feed from mb-rpcd is live (false while running on the cache).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Replaces the file layer (after SIGHUP) and republishes.
    pub fn reload_file(&self, file: Config) {
        if let Ok(mut s) = self.state.lock() {
            s.file = file;
        }
        self.publish();
    }

    fn publish(&self) {
        let effective = match self.state.lock() {
            Ok(s) => overlay(&s.file, &s.overrides),
            Err(_) => return,
        };
        self.tx.send_if_modified(|current| {
            if **current == effective {
                false
            } else {
                *current = Arc::new(effective);
                true
            }
        });
    }

    async fn run(self, socket: PathBuf, cache: PathBuf, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(200);
        let mut warned = false;
        loop {
            let result = tokio::select! {
                () = shutdown.requested() => return,
                r = self.sync(&socket, &cache) => r,
            };
            self.connected.send_replace(false);
            match result {
                Ok(()) => {
                    tracing::info!(
                        "mb-rpcd closed the configuration feed; running on the cached configuration"
                    );
                    backoff = Duration::from_millis(200);
                }
                Err(e) if !warned => {
                    tracing::warn!(cause = %e, "mb-rpcd unreachable; running on the cached configuration");
                    warned = true;
                }
                Err(e) => tracing::debug!(cause = %e, "mb-rpcd still unreachable"),
            }
            tokio::select! {
                () = shutdown.requested() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: watch first (so nothing is missed), then list, then re-list on
    /// every change. Returns when the feed ends.
    async fn sync(&self, socket: &Path, cache: &Path) -> Result<(), SyncError> {
        let channel = crate::uds::connect(socket, "mb-rpcd").await?;
        let mut client = ConfigClient::new(channel);
        let mut feed = client.watch(WatchRequest::default()).await?.into_inner();
        self.refresh(&mut client, cache).await?;
        self.connected.send_replace(true);
        tracing::info!("following the configuration of mb-rpcd");
        loop {
            match feed.message().await {
                Ok(Some(change)) if change.reloaded => {}
                Ok(Some(_)) => self.refresh(&mut client, cache).await?,
                Ok(None) => return Ok(()),
                Err(s) => return Err(s.into()),
            }
        }
    }

    async fn refresh(
        &self,
        client: &mut ConfigClient<tonic::transport::Channel>,
        cache: &Path,
    ) -> Result<(), SyncError> {
        let list = client.list(ListRequest::default()).await?.into_inner();
        let overrides = Overrides {
            generation: list.generation,
            values: list
                .values
                .into_iter()
                .filter(|v| v.source == Source::Database as i32)
                .map(|v| (v.key, v.value))
                .collect(),
        };
        let changed = match self.state.lock() {
            Ok(mut s) if s.overrides != overrides => {
                s.overrides = overrides.clone();
                true
            }
            _ => false,
        };
        if changed {
            if let Err(e) = write_cache(cache, &overrides) {
                tracing::warn!(cache = %cache.display(), cause = %e, "cannot cache the configuration");
            }
            self.publish();
        }
        Ok(())
    }
}

fn overlay(file: &Config, overrides: &Overrides) -> Config {
    let mut cfg = file.clone();
    for e in cfg.apply_overrides(
        overrides
            .values
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    ) {
        tracing::warn!(cause = %e, "ignoring an override");
    }
    cfg
}

/// `paths.data_dir/cache/DAEMON.json`.
pub fn cache_path(cfg: &Config, daemon: &str) -> PathBuf {
    cfg.path("paths.data_dir")
        .join("cache")
        .join(format!("{}.json", daemon.replace('@', "-")))
}

fn read_cache(path: &Path) -> Option<Overrides> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let values = v["overrides"]
        .as_object()?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    Some(Overrides {
        generation: v["generation"].as_u64().unwrap_or(0),
        values,
    })
}

/// Atomic and durable: a crash leaves either the old cache or the new one.
fn write_cache(path: &Path, o: &Overrides) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::json!({ "generation": o.generation, "overrides": o.values });
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body.to_string().as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips() {
        let dir = std::env::temp_dir().join(format!("mb-follow-{}", std::process::id()));
        let path = dir.join("cache/mb-smtpd.json");
        let o = Overrides {
            generation: 7,
            values: [("smtp.max_recipients".to_string(), "77".to_string())].into(),
        };
        write_cache(&path, &o).unwrap();
        assert_eq!(read_cache(&path), Some(o.clone()));
        let cfg = overlay(&Config::default(), &o);
        assert_eq!(cfg.int("smtp.max_recipients"), 77);
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(read_cache(&path), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
