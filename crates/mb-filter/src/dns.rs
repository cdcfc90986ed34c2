//! The sender checks' resolver kept in step with `network.dns.*`: those keys are live, so
//! a worker rebuilds its `Auth` (SPF, DKIM, DMARC, ARC and the blocklists all resolve
//! through it) when one of them changes, instead of querying the servers it started
//! with until a restart.

use std::sync::{Arc, RwLock};

use mb_core::Config;
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;

use crate::auth::Auth;

/// The current `Auth` and the DNS settings it was built from.
pub struct LiveAuth {
    built: RwLock<(String, Arc<Auth>)>,
}

impl LiveAuth {
    /// `auth` was built from `cfg` (at start, where a bad setting is exit 64).
    pub fn new(cfg: &Config, auth: Auth) -> LiveAuth {
        LiveAuth {
            built: RwLock::new((settings(cfg), Arc::new(auth))),
        }
    }

    /// The checks to run a message through now.
    pub fn current(&self) -> Arc<Auth> {
        match self.built.read() {
            Ok(b) => b.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// Rebuilds the resolver when `cfg`'s DNS settings differ from the ones in use; a
    /// setting that cannot be used (an unreadable /etc/resolv.conf) keeps the running
    /// resolver and says so. Returns whether it rebuilt.
    pub fn update(&self, cfg: &Config) -> bool {
        let wanted = settings(cfg);
        if self.built.read().is_ok_and(|b| b.0 == wanted) {
            return false;
        }
        match Auth::from_config(cfg) {
            Ok(auth) => {
                if let Ok(mut b) = self.built.write() {
                    *b = (wanted.clone(), Arc::new(auth));
                }
                tracing::info!(dns = %wanted, "DNS settings changed: the sender checks use a new resolver");
                true
            }
            Err(e) => {
                tracing::warn!(cause = %e, dns = %wanted, "DNS settings changed but cannot be used; keeping the running resolver");
                false
            }
        }
    }

    /// Follows `follower` until `shutdown`, rebuilding on every change of `network.dns.*`.
    pub fn follow(self: Arc<Self>, follower: &Follower, shutdown: Shutdown) {
        let mut changes = follower.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.requested() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let cfg = changes.borrow_and_update().clone();
                self.update(&cfg);
            }
        });
    }
}

/// Every `network.dns.*` value, as one comparable line (`KEY=VALUE ...`).
fn settings(cfg: &Config) -> String {
    mb_core::registry::KEYS
        .iter()
        .filter(|k| k.key.starts_with("network.dns."))
        .map(|k| format!("{}={}", k.key, cfg.get(k.key)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(servers: &str) -> Config {
        let mut c = Config::default();
        assert!(
            c.apply_overrides([("network.dns.servers", servers)])
                .is_empty()
        );
        c
    }

    #[tokio::test]
    async fn rebuilds_only_when_a_dns_key_changes() {
        let a = cfg("127.0.0.1:5301");
        let live = LiveAuth::new(&a, Auth::from_config(&a).unwrap());
        let first = live.current();
        let mut same = a.clone();
        assert!(
            same.apply_overrides([("smtp.max_recipients", "7")])
                .is_empty()
        );
        assert!(!live.update(&same));
        assert!(Arc::ptr_eq(&first, &live.current()));
        assert!(live.update(&cfg("127.0.0.1:5302")));
        assert!(!Arc::ptr_eq(&first, &live.current()));
        let mut ttl = cfg("127.0.0.1:5302");
        assert!(
            ttl.apply_overrides([("network.dns.cache.ttl", "1m")])
                .is_empty()
        );
        assert!(live.update(&ttl));
    }
}
