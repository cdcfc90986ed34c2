//! A daemon's view of the configuration: its file, overlaid with the overrides stored in
//! mb-rpcd, kept current from the `Config.Watch` feed and cached on disk, so that a
//! daemon started while mb-rpcd is down still runs with the last known configuration.
//!
//! At start a daemon waits (at most `process.config_wait`) for mb-rpcd's answer before it
//! binds anything ([`Follower::confirm`]): restart-only keys are read once, so a cache
//! that is out of date (or missing, on a fresh install) would otherwise stay in force
//! until the next restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_core::Config;
use mb_core::registry::{self, Apply};
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
    cache: Arc<PathBuf>,
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
            cache: Arc::new(cache.clone()),
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

    /// The generation of mb-rpcd's overrides in use (0 before any was received).
    pub fn generation(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.overrides.generation)
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    /// Whether the feed from mb-rpcd is live (false while running on the cache).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Waits at most `wait` for the first answer from mb-rpcd, so that what `program`
    /// builds from restart-only keys is what the database holds now. Returns whether it
    /// came; when it did not, the daemon goes on with the cached overrides (or the file
    /// alone) and a warning names the restart-only keys it could not confirm.
    pub async fn confirm(&self, program: &str, wait: Duration) -> bool {
        let mut connected = self.connected.subscribe();
        let answered = matches!(
            tokio::time::timeout(wait, connected.wait_for(|c| *c)).await,
            Ok(Ok(_))
        );
        let (generation, cached) = match self.state.lock() {
            Ok(s) => (s.overrides.generation, s.overrides.values.len()),
            Err(_) => (0, 0),
        };
        if answered {
            tracing::info!(generation, "configuration confirmed by mb-rpcd");
            return true;
        }
        let keys = restart_keys(program);
        self.warn_when_answered(program, keys.clone());
        let keys = keys.join(",");
        let from = if generation > 0 || cached > 0 {
            format!(
                "the overrides cached in {} (generation {generation}, {cached} overrides)",
                self.cache.display()
            )
        } else {
            "the configuration file alone (no cached overrides)".to_string()
        };
        tracing::warn!(
            "mb-rpcd did not answer within {} (process.config_wait): starting on {from}; these restart-only keys are not confirmed and stay as they are until a restart: {keys}",
            wait_text(wait)
        );
        false
    }

    /// After a start that mb-rpcd did not confirm: once it answers, names each of `keys`
    /// whose stored value differs from the one the daemon started with, since only a
    /// restart applies it.
    fn warn_when_answered(&self, program: &str, keys: Vec<&'static str>) {
        let started = self.current();
        let mut connected = self.connected.subscribe();
        let follower = self.clone();
        let program = program.to_string();
        tokio::spawn(async move {
            if connected.wait_for(|c| *c).await.is_err() {
                return;
            }
            let now = follower.current();
            let shown = |cfg: &Config, key: &str| {
                let secret = registry::find(key).is_some_and(|d| d.secret);
                if secret {
                    mb_core::config::REDACTED.to_string()
                } else {
                    cfg.get(key).to_string()
                }
            };
            for key in keys.iter().filter(|k| started.get(k) != now.get(k)) {
                tracing::warn!(
                    key,
                    "mb-rpcd answered after the start: {key} = {} is stored, but {program} runs with {} until it is restarted",
                    shown(&now, key),
                    shown(&started, key)
                );
            }
        });
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

/// The keys `program` reads at start only and that an override can change: what a
/// start on a stale cache may get wrong until the next restart.
pub fn restart_keys(program: &str) -> Vec<&'static str> {
    registry::KEYS
        .iter()
        .filter(|k| k.apply == Apply::Restart && !k.file_only && k.daemons.contains(&program))
        .map(|k| k.key)
        .collect()
}

/// `5s`, `1.5s`: a wait as the configuration writes it.
fn wait_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
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

    #[test]
    fn restart_keys_are_the_programs_own() {
        let smtpd = restart_keys("mb-smtpd");
        assert!(smtpd.contains(&"network.smtp.port"), "{smtpd:?}");
        assert!(smtpd.contains(&"queue.concurrency"), "{smtpd:?}");
        assert!(!smtpd.contains(&"filter.port"), "{smtpd:?}");
        assert!(!smtpd.contains(&"smtp.max_recipients"), "live: {smtpd:?}");
        assert!(!smtpd.contains(&"paths.run_dir"), "file only: {smtpd:?}");
        assert!(restart_keys("mb-cluster").contains(&"cluster.port"));
        assert!(restart_keys("mb-milter").contains(&"milter.port"));
        assert!(restart_keys("mb-filter").contains(&"filter.port"));
    }

    /// With no mb-rpcd behind the socket, `confirm` gives up after the wait, not before,
    /// and the daemon keeps the cached overrides.
    #[tokio::test]
    async fn confirm_gives_up_after_the_wait_and_keeps_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let file = Config::from_toml_str(
            &format!("[paths]\nrun_dir = \"{d}/run\"\ndata_dir = \"{d}/data\"\n"),
            "test.toml",
        )
        .unwrap();
        let o = Overrides {
            generation: 3,
            values: [("network.smtp.port".to_string(), "2999".to_string())].into(),
        };
        write_cache(&cache_path(&file, "mb-smtpd"), &o).unwrap();
        let (_trigger, shutdown) = crate::lifecycle::shutdown_pair();
        let f = Follower::start("mb-smtpd", file, shutdown);
        let started = std::time::Instant::now();
        assert!(!f.confirm("mb-smtpd", Duration::from_millis(400)).await);
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(f.current().port("network.smtp.port"), 2999);
    }
}
