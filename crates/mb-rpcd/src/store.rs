//! The configuration store: the file configuration, the database overrides on top of it,
//! and the change feed that watchers follow.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_core::config::{self, REDACTED};
use mb_core::{Apply, Config, KeyDef, KeyError, Source};
use mb_proto::v1;
use mb_runtime::uds::Caller;
use tokio::sync::{Mutex, broadcast};

use crate::db::{Change, Db, DbError};

/// Why a store operation failed; mapped to a gRPC status in one place (`grpc.rs`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    File(String),
    /// A cluster-wide setting edited on a child node.
    #[error("{0}")]
    Child(String),
}

/// The result of a set or unset.
pub struct Outcome {
    pub previous: v1::Value,
    pub value: v1::Value,
    pub generation: u64,
    pub changed: bool,
    pub warnings: Vec<String>,
}

pub struct Store {
    pub db: Db,
    config_path: Option<PathBuf>,
    file: RwLock<Config>,
    overrides: RwLock<BTreeMap<String, String>>,
    effective: RwLock<Config>,
    generation: std::sync::atomic::AtomicU64,
    /// Serialises writers so the database, the memory copy and the feed agree.
    write: Mutex<()>,
    changes: broadcast::Sender<v1::ConfigChange>,
}

impl Store {
    /// Builds the store from the file configuration and the overrides in the database.
    /// Overrides that no longer parse are logged and ignored.
    pub async fn open(
        db: Db,
        file: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Store, DbError> {
        let stored = db.overrides().await?;
        let generation = db.generation().await?;
        let overrides: BTreeMap<String, String> =
            stored.into_iter().map(|o| (o.key, o.value)).collect();
        let mut effective = file.clone();
        for e in effective.apply_overrides(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            tracing::warn!(cause = %e, "ignoring a stored override");
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(Store {
            db,
            config_path,
            file: RwLock::new(file),
            overrides: RwLock::new(overrides),
            effective: RwLock::new(effective),
            generation: generation.into(),
            write: Mutex::new(()),
            changes,
        })
    }

    pub fn effective(&self) -> Config {
        self.effective.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<v1::ConfigChange> {
        self.changes.subscribe()
    }

    /// The effective value of a key as sent to a caller; secrets only to local callers
    /// other than mb-web's user, which gets only those it reads (`secrets.rs`).
    pub fn value(&self, def: &'static KeyDef, cfg: &Config, caller: &Caller) -> v1::Value {
        let entry = cfg.entry(def.key);
        let text = entry.map(|e| e.value.to_string()).unwrap_or_default();
        v1::Value {
            key: def.key.to_string(),
            value: if !crate::secrets::reveals(def, caller) && !text.is_empty() {
                REDACTED.into()
            } else {
                text
            },
            source: entry.map_or(v1::Source::Unspecified, |e| source(e.source)) as i32,
            info: Some(key_info(def)),
        }
    }

    pub fn get(&self, key: &str, caller: &Caller) -> Result<v1::Value, StoreError> {
        let def = config::lookup(key)?;
        Ok(self.value(def, &self.effective(), caller))
    }

    pub fn list(&self, prefix: &str, caller: &Caller) -> Result<Vec<v1::Value>, StoreError> {
        let cfg = self.effective();
        let prefix = prefix.trim_end_matches('.');
        let values: Vec<v1::Value> = cfg
            .entries()
            .filter(|(def, _)| {
                prefix.is_empty()
                    || def.key == prefix
                    || def
                        .key
                        .strip_prefix(prefix)
                        .is_some_and(|r| r.starts_with('.'))
            })
            .map(|(def, _)| self.value(def, &cfg, caller))
            .collect();
        if values.is_empty() {
            return Err(KeyError::Unknown {
                key: prefix.to_string(),
                suggestion: mb_core::registry::nearest(prefix),
            }
            .into());
        }
        Ok(values)
    }

    pub async fn set(&self, key: &str, text: &str, caller: &Caller) -> Result<Outcome, StoreError> {
        let (def, value) = config::parse_key_value(key, text)?;
        if !def.node_local {
            self.refuse_on_child(&format!("{key} is a cluster-wide setting"))?;
        }
        let canonical = value.to_string();
        self.change(def, Some(canonical), caller).await
    }

    pub async fn unset(&self, key: &str, caller: &Caller) -> Result<Outcome, StoreError> {
        let def = config::lookup(key)?;
        if !def.node_local {
            self.refuse_on_child(&format!("{key} is a cluster-wide setting"))?;
        }
        self.change(def, None, caller).await
    }

    /// The main's address when this node is a cluster child: its cluster-wide settings,
    /// policies and accounts come from the main and are not edited here.
    pub fn cluster_main(&self) -> Option<String> {
        let cfg = self.effective.read().ok()?;
        (cfg.bool("cluster.enabled") && cfg.text("cluster.role") == "child")
            .then(|| cfg.text("cluster.main"))
    }

    /// Refuses a local edit of cluster-wide state on a child, naming the main.
    pub fn refuse_on_child(&self, what: &str) -> Result<(), StoreError> {
        match self.cluster_main() {
            Some(main) => Err(StoreError::Child(format!(
                "{what}, and this node is a cluster child: make the change on the main node ({main}); \
                 it reaches every node within seconds. Node-local keys (listen addresses, ports, \
                 cluster membership) can be set here."
            ))),
            None => Ok(()),
        }
    }

    /// The database overrides of cluster-wide keys (what the main exports).
    pub fn cluster_settings(&self) -> Vec<(String, String)> {
        let Ok(o) = self.overrides.read() else {
            return Vec::new();
        };
        o.iter()
            .filter(|(k, _)| config::lookup(k).is_ok_and(|d| !d.node_local && !d.file_only))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Makes the overrides of cluster-wide keys equal to `settings` (a child importing a
    /// snapshot): each difference goes through the normal change path, so the audit trail
    /// and the change feed show it. Keys this version does not know are skipped with a
    /// warning. Returns how many keys changed.
    pub async fn import_settings(
        &self,
        settings: &[(String, String)],
        caller: &Caller,
    ) -> Result<u32, StoreError> {
        let wanted: BTreeMap<&str, &str> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let current: BTreeMap<String, String> = self.cluster_settings().into_iter().collect();
        let mut changed = 0;
        for (key, value) in &wanted {
            if current.get(*key).map(String::as_str) == Some(*value) {
                continue;
            }
            let parsed = config::parse_key_value(key, value);
            match parsed {
                Ok((def, v)) if !def.node_local && !def.file_only => {
                    self.change(def, Some(v.to_string()), caller).await?;
                    changed += 1;
                }
                Ok(_) => tracing::warn!(key, "the main sent a node-local key; ignored"),
                Err(e) => tracing::warn!(key, cause = %e, "cannot apply a setting from the main"),
            }
        }
        for key in current.keys() {
            if !wanted.contains_key(key.as_str()) {
                let def = config::lookup(key)?;
                self.change(def, None, caller).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn change(
        &self,
        def: &'static KeyDef,
        new: Option<String>,
        caller: &Caller,
    ) -> Result<Outcome, StoreError> {
        if def.file_only {
            return Err(KeyError::FileOnly {
                key: def.key.into(),
            }
            .into());
        }
        let _guard = self.write.lock().await;
        let before = self.effective();
        let old_override = self
            .overrides
            .read()
            .ok()
            .and_then(|o| o.get(def.key).cloned());
        let redact = |v: Option<&str>| {
            v.map(|v| {
                if def.secret {
                    REDACTED.to_string()
                } else {
                    v.to_string()
                }
            })
        };
        let at = now();
        let (generation, existed) = self
            .db
            .apply(&Change {
                key: def.key,
                value: new.as_deref(),
                audit_old: redact(old_override.as_deref()).as_deref(),
                audit_new: redact(new.as_deref()).as_deref(),
                uid: caller.uid,
                user: &caller.name,
                at,
            })
            .await?;
        let mut after = before.clone();
        match &new {
            Some(text) => {
                let (_, v) = config::parse_key_value(def.key, text)?;
                after.set_override(def, v);
                if let Ok(mut o) = self.overrides.write() {
                    o.insert(def.key.to_string(), text.clone());
                }
            }
            None => {
                after.clear_override(def);
                if let Ok(mut o) = self.overrides.write() {
                    o.remove(def.key);
                }
            }
        }
        if let Ok(mut e) = self.effective.write() {
            *e = after.clone();
        }
        self.generation
            .store(generation, std::sync::atomic::Ordering::SeqCst);
        let old_problems = before.check();
        let warnings: Vec<String> = after
            .check()
            .into_iter()
            .filter(|p| !old_problems.contains(p))
            .collect();
        let previous = self.value(def, &before, caller);
        let value = self.value(def, &after, caller);
        let changed = previous.value != value.value || previous.source != value.source;
        let shown = |v: &str| {
            if def.secret {
                REDACTED.to_string()
            } else {
                v.to_string()
            }
        };
        tracing::info!(
            key = def.key,
            old = %shown(&previous.value),
            new = %shown(&value.value),
            user = %caller.name,
            generation,
            "configuration {}",
            if new.is_some() { "set" } else { "unset" }
        );
        let _ = self.changes.send(v1::ConfigChange {
            generation,
            key: def.key.to_string(),
            old_value: before.get(def.key).to_string(),
            new_value: after.get(def.key).to_string(),
            source: value.source,
            changed_by_uid: caller.uid.unwrap_or(u32::MAX),
            changed_at_unix: at,
            restart_required: def.apply == Apply::Restart,
            unset: new.is_none(),
            reloaded: false,
        });
        Ok(Outcome {
            previous,
            value,
            generation,
            changed: changed || (new.is_none() && existed),
            warnings,
        })
    }

    /// Re-reads the overrides and the generation from the database after something other
    /// than `change` wrote them (a restore by mb-backup), and tells the watchers, who
    /// then read the new overrides. Returns the generation.
    pub async fn refresh(&self) -> Result<u64, DbError> {
        let _guard = self.write.lock().await;
        let overrides: BTreeMap<String, String> = self
            .db
            .overrides()
            .await?
            .into_iter()
            .map(|o| (o.key, o.value))
            .collect();
        let generation = self.db.generation().await?;
        let mut effective = self.file.read().map(|f| f.clone()).unwrap_or_default();
        for e in effective.apply_overrides(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            tracing::warn!(cause = %e, "ignoring a stored override");
        }
        if let Ok(mut o) = self.overrides.write() {
            *o = overrides;
        }
        if let Ok(mut e) = self.effective.write() {
            *e = effective;
        }
        self.generation
            .store(generation, std::sync::atomic::Ordering::SeqCst);
        let _ = self.changes.send(v1::ConfigChange {
            generation,
            changed_at_unix: now(),
            ..Default::default()
        });
        Ok(generation)
    }

    /// Re-reads the configuration file. On error the running configuration is kept.
    /// Returns the keys whose value changed but only apply after a restart of `daemon`.
    pub async fn reload(&self, daemon: &str) -> Result<Vec<String>, StoreError> {
        let _guard = self.write.lock().await;
        let file = mb_runtime::load_config(self.config_path.as_deref())
            .map_err(|e| StoreError::File(e.to_string()))?;
        let mut after = file.clone();
        if let Ok(o) = self.overrides.read() {
            after.apply_overrides(o.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let before = self.effective();
        let restart: Vec<String> = after
            .entries()
            .filter(|(def, e)| {
                def.apply == Apply::Restart
                    && def.daemons.contains(&daemon)
                    && before.get(def.key) != &e.value
            })
            .map(|(def, _)| def.key.to_string())
            .collect();
        if let Ok(mut f) = self.file.write() {
            *f = file;
        }
        if let Ok(mut e) = self.effective.write() {
            *e = after;
        }
        let _ = self.changes.send(v1::ConfigChange {
            generation: self.generation(),
            reloaded: true,
            changed_at_unix: now(),
            ..Default::default()
        });
        tracing::info!(
            restart_required = restart.len(),
            "configuration file reloaded"
        );
        Ok(restart)
    }
}

pub fn source(s: Source) -> v1::Source {
    match s {
        Source::Default => v1::Source::Default,
        Source::File => v1::Source::File,
        Source::Database => v1::Source::Database,
    }
}

pub fn key_info(def: &KeyDef) -> v1::KeyInfo {
    v1::KeyInfo {
        key: def.key.to_string(),
        r#type: def.kind.name().to_string(),
        default_value: def.default.to_string(),
        description: def.description.to_string(),
        range: def.kind.range(),
        apply: match def.apply {
            Apply::Live => v1::Apply::Live,
            Apply::Restart => v1::Apply::Restart,
        } as i32,
        daemons: def.daemons.iter().map(|d| (*d).to_string()).collect(),
        secret: def.secret,
        node_local: def.node_local,
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}
