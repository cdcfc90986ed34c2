//! State a daemon builds from a section of live keys (a resolver from `network.dns.*`),
//! rebuilt when a key of that section changes: the section's values are fingerprinted
//! at each change of the followed configuration and compared with the ones in use.

use std::fmt::Display;
use std::sync::{Arc, RwLock};

use mb_core::Config;

use crate::follow::Follower;
use crate::lifecycle::Shutdown;

/// How a `Rebuilt` makes its value from the configuration.
pub type Build<T, E> = fn(&Config) -> Result<T, E>;

/// What a rebuilt value is, for its log lines ("DNS settings changed: deliveries use a
/// new resolver").
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// The keys that matter: those starting with `section` (`network.dns.`).
    pub section: &'static str,
    /// The settings, in words ("DNS settings").
    pub settings: &'static str,
    /// Who uses the value ("deliveries", "the sender checks").
    pub user: &'static str,
    /// The value ("resolver").
    pub value: &'static str,
}

/// The value in use and the fingerprint of the settings it was built from.
pub struct Rebuilt<T> {
    names: Names,
    built: RwLock<(String, Arc<T>)>,
}

impl<T: Send + Sync + 'static> Rebuilt<T> {
    /// `value` was built from `cfg` (at start, where a bad setting is exit 64).
    pub fn new(names: Names, cfg: &Config, value: T) -> Self {
        Rebuilt {
            names,
            built: RwLock::new((fingerprint(cfg, names.section), Arc::new(value))),
        }
    }

    /// The value to use now.
    pub fn current(&self) -> Arc<T> {
        match self.built.read() {
            Ok(b) => b.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// Rebuilds when `cfg`'s section differs from the one in use; settings that cannot
    /// be used keep the running value and say so. Returns whether it rebuilt.
    pub fn update<E: Display>(&self, cfg: &Config, build: Build<T, E>) -> bool {
        let n = self.names;
        let wanted = fingerprint(cfg, n.section);
        if self.built.read().is_ok_and(|b| b.0 == wanted) {
            return false;
        }
        match build(cfg) {
            Ok(value) => {
                if let Ok(mut b) = self.built.write() {
                    *b = (wanted.clone(), Arc::new(value));
                }
                tracing::info!(settings = %wanted, "{} changed: {} use a new {}", n.settings, n.user, n.value);
                true
            }
            Err(e) => {
                tracing::warn!(cause = %e, settings = %wanted, "{} changed but cannot be used; keeping the running {}", n.settings, n.value);
                false
            }
        }
    }

    /// Rebuilds at every change of the section in `follower`'s configuration, until
    /// `shutdown`.
    pub fn follow<E: Display + 'static>(
        self: Arc<Self>,
        follower: &Follower,
        shutdown: Shutdown,
        build: Build<T, E>,
    ) {
        let mut changes = follower.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.requested() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let cfg = changes.borrow_and_update().clone();
                self.update(&cfg, build);
            }
        });
    }
}

/// Every value of the section's keys, as one comparable line (`KEY=VALUE ...`).
fn fingerprint(cfg: &Config, section: &str) -> String {
    mb_core::registry::KEYS
        .iter()
        .filter(|k| k.key.starts_with(section))
        .map(|k| format!("{}={}", k.key, cfg.get(k.key)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(overrides: &[(&str, &str)]) -> Config {
        let mut c = Config::default();
        assert!(c.apply_overrides(overrides.iter().copied()).is_empty());
        c
    }

    /// The built value: the configured servers, refused when they say "bad".
    fn servers(cfg: &Config) -> Result<String, String> {
        let s = cfg.get("network.dns.servers").to_string();
        if s.contains("127.0.0.9") {
            return Err("unusable".into());
        }
        Ok(s)
    }

    #[test]
    fn rebuilds_only_when_a_key_of_its_section_changes() {
        let a = cfg(&[("network.dns.servers", "127.0.0.1:5301")]);
        let names = Names {
            section: "network.dns.",
            settings: "DNS settings",
            user: "tests",
            value: "list",
        };
        let live = Rebuilt::new(names, &a, servers(&a).unwrap());
        let first = live.current();
        // Another section changes: nothing is rebuilt.
        let other = cfg(&[
            ("network.dns.servers", "127.0.0.1:5301"),
            ("smtp.max_recipients", "7"),
        ]);
        assert!(!live.update(&other, servers));
        assert!(Arc::ptr_eq(&first, &live.current()));
        // A key of the section changes: rebuilt.
        assert!(live.update(&cfg(&[("network.dns.servers", "127.0.0.1:5302")]), servers));
        assert_eq!(*live.current(), "127.0.0.1:5302");
        let ttl = cfg(&[
            ("network.dns.servers", "127.0.0.1:5302"),
            ("network.dns.cache.ttl", "1m"),
        ]);
        assert!(live.update(&ttl, servers));
        // Settings that cannot be used keep the running value.
        assert!(!live.update(&cfg(&[("network.dns.servers", "127.0.0.9")]), servers));
        assert_eq!(*live.current(), "127.0.0.1:5302");
    }
}
