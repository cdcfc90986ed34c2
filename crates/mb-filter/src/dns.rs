//! The sender checks' resolver kept in step with `network.dns.*`: those keys are live, so
//! a worker rebuilds its `Auth` (SPF, DKIM, DMARC, ARC and the blocklists all resolve
//! through it) when one of them changes, instead of querying the servers it started
//! with until a restart.

use std::sync::Arc;

use mb_core::Config;
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::rebuild::{Names, Rebuilt};

use crate::auth::Auth;

/// The current `Auth` and the DNS settings it was built from.
pub type LiveAuth = Rebuilt<Auth>;

/// `auth` was built from `cfg` (at start, where a bad setting is exit 64).
pub fn live(cfg: &Config, auth: Auth) -> LiveAuth {
    let names = Names {
        section: "network.dns.",
        settings: "DNS settings",
        user: "the sender checks",
        value: "resolver",
    };
    Rebuilt::new(names, cfg, auth)
}

/// Follows `follower` until `shutdown`, rebuilding on every change of `network.dns.*`.
pub fn follow(auth: Arc<LiveAuth>, follower: &Follower, shutdown: Shutdown) {
    auth.follow(follower, shutdown, Auth::from_config);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_dns_server_gives_new_sender_checks() {
        let cfg = |servers: &str| {
            let mut c = Config::default();
            assert!(
                c.apply_overrides([("network.dns.servers", servers)])
                    .is_empty()
            );
            c
        };
        let a = cfg("127.0.0.1:5301");
        let live = live(&a, Auth::from_config(&a).unwrap());
        let first = live.current();
        assert!(!live.update(&a, Auth::from_config));
        assert!(live.update(&cfg("127.0.0.1:5302"), Auth::from_config));
        assert!(!Arc::ptr_eq(&first, &live.current()));
    }
}
