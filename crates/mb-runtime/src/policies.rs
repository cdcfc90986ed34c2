//! Policies as the filter workers hold them: read from mb-rpcd's `Policies.List` every few
//! seconds, kept in memory, and cached on disk so a worker started while mb-rpcd is down
//! applies the last known set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mb_core::policy::{self, Action, Direction, Object, PolicyError};
use mb_proto::v1::policies_client::PoliciesClient;
use mb_proto::v1::{ListPoliciesRequest, Policy};

use crate::lifecycle::Shutdown;

/// How often the workers re-read the policies.
pub const REFRESH: Duration = Duration::from_secs(3);

/// The wire form as the domain type, checked.
pub fn from_wire(p: &Policy) -> Result<policy::Policy, PolicyError> {
    let out = policy::Policy {
        id: p.id,
        name: p.name.clone(),
        priority: p.priority,
        object: Object::parse(&p.object)?,
        pattern: p.pattern.clone(),
        direction: Direction::parse(&p.direction)?,
        action: Action::parse(&p.action)?,
        tag: p.tag,
        quarantine: p.quarantine,
        reject: p.reject,
        unauthenticated: p.unauthenticated,
        recipient: p.recipient.trim().to_ascii_lowercase(),
    };
    out.validate()?;
    Ok(out)
}

/// Why the policies could not be read from mb-rpcd (the last known set is kept).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Connect(#[from] crate::uds::ConnectError),
    /// mb-rpcd answered `Policies.List` with an error.
    #[error("{}", .0.message())]
    Rpc(Box<tonic::Status>),
}

impl From<tonic::Status> for FetchError {
    fn from(s: tonic::Status) -> Self {
        FetchError::Rpc(Box::new(s))
    }
}

pub struct PolicySet {
    current: RwLock<Arc<Vec<policy::Policy>>>,
    cache: PathBuf,
}

impl PolicySet {
    /// Starts from the disk cache (empty when there is none).
    pub fn load(cache: PathBuf) -> Arc<PolicySet> {
        let cached: Vec<policy::Policy> = std::fs::read_to_string(&cache)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Arc::new(PolicySet {
            current: RwLock::new(Arc::new(cached)),
            cache,
        })
    }

    /// A fixed set (tests).
    pub fn fixed(policies: Vec<policy::Policy>) -> Arc<PolicySet> {
        Arc::new(PolicySet {
            current: RwLock::new(Arc::new(policies)),
            cache: PathBuf::new(),
        })
    }

    pub fn current(&self) -> Arc<Vec<policy::Policy>> {
        self.current
            .read()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }

    fn replace(&self, next: Vec<policy::Policy>) -> bool {
        if *self.current() == next {
            return false;
        }
        if !self.cache.as_os_str().is_empty() {
            write_cache(&self.cache, &next);
        }
        if let Ok(mut g) = self.current.write() {
            *g = Arc::new(next);
        }
        true
    }

    /// Re-reads the policies from mb-rpcd every `REFRESH` until shutdown; keeps the last
    /// set while mb-rpcd cannot be reached.
    pub fn spawn_refresh(self: &Arc<Self>, rpcd_socket: PathBuf, shutdown: Shutdown) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match fetch(&rpcd_socket).await {
                    Ok(list) => {
                        warned = false;
                        let n = list.len();
                        if this.replace(list) {
                            tracing::info!(count = n, "policies loaded");
                        }
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(cause = %e, "cannot read policies from mb-rpcd; keeping the last known set");
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    () = shutdown.requested() => break,
                    () = tokio::time::sleep(REFRESH) => {}
                }
            }
        });
    }
}

async fn fetch(socket: &Path) -> Result<Vec<policy::Policy>, FetchError> {
    let channel = crate::uds::connect(socket, "mb-rpcd").await?;
    let list = PoliciesClient::new(channel)
        .list(ListPoliciesRequest {})
        .await?
        .into_inner()
        .policies;
    Ok(list
        .iter()
        .filter_map(|p| match from_wire(p) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(name = %p.name, cause = %e, "ignoring a malformed policy");
                None
            }
        })
        .collect())
}

fn write_cache(path: &Path, policies: &[policy::Policy]) {
    let Ok(text) = serde_json::to_string(policies) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!(path = %path.display(), "cannot cache the policies on disk");
    }
}
