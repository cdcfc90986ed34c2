//! What a node keeps on disk under `paths.data_dir/cluster`: its key and certificate, the
//! CA certificate (and, on the main, the CA key), and `state.json` with its role, the
//! snapshot version it runs on and, on the main, the node table and the join tokens.
//! Every file is written to a temporary name, fsynced and renamed into place.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::pki::{self, Identity};

pub const STATE: &str = "state.json";
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    pub fingerprint: String,
    pub role: String,
    pub joined_unix: i64,
    /// Removed nodes stay listed so their certificates stay refused.
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Token {
    pub id: String,
    pub secret_sha256: String,
    pub expires_unix: i64,
    #[serde(default)]
    pub used_by: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub name: String,
    /// "main" or "child".
    pub role: String,
    pub ca_name: String,
    pub ca_fingerprint: String,
    /// The main's node name and address (children).
    #[serde(default)]
    pub main_name: String,
    #[serde(default)]
    pub main_address: String,
    /// The snapshot version: the last one exported (main) or applied (child).
    #[serde(default)]
    pub config_version: u64,
    /// A digest of the last exported snapshot's content (main).
    #[serde(default)]
    pub config_digest: String,
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    #[serde(default)]
    pub tokens: Vec<Token>,
}

/// The cluster directory of a node.
#[derive(Debug, Clone)]
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn of(cfg: &mb_core::Config) -> Dir {
        Dir(cfg.path("paths.data_dir").join("cluster"))
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    pub fn exists(&self) -> bool {
        self.path(STATE).exists()
    }

    pub fn load(&self) -> Result<State> {
        let p = self.path(STATE);
        let text = fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {} (set the node up with `mb-cluster init` or `mb-cluster join`)",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} does not parse", p.display()))
    }

    pub fn save(&self, state: &State) -> Result<()> {
        let text = serde_json::to_string_pretty(state)?;
        self.write(STATE, text.as_bytes(), 0o640)
    }

    pub fn read(&self, file: &str) -> Result<String> {
        let p = self.path(file);
        fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    }

    /// Writes `file` atomically with `mode`.
    pub fn write(&self, file: &str, data: &[u8], mode: u32) -> Result<()> {
        fs::create_dir_all(&self.0)
            .with_context(|| format!("cannot create {}", self.0.display()))?;
        let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o750));
        let target = self.path(file);
        let tmp = self.path(&format!(".{file}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, &target)
            .with_context(|| format!("cannot rename into {}", target.display()))?;
        if let Ok(d) = fs::File::open(&self.0) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn identity(&self) -> Result<Identity> {
        Identity::from_pem(
            &self.read(NODE_CERT)?,
            &self.read(NODE_KEY)?,
            &self.read(CA_CERT)?,
        )
    }

    /// Refuses to set a node up twice.
    pub fn ensure_empty(&self) -> Result<()> {
        if self.exists() {
            bail!(
                "this node is already set up ({}): `mb-cluster leave` first",
                self.path(STATE).display()
            );
        }
        Ok(())
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Sets the main up: the CA, the main's own key and certificate, and a state whose node
/// table lists the main.
pub fn init_main(dir: &Dir, name: &str) -> Result<State> {
    pki::check_node_name(name)?;
    dir.ensure_empty()?;
    let (ca_name, ca_pem, ca_key) = pki::create_ca()?;
    let (key_pem, raw) = pki::node_key()?;
    let cert = pki::sign_node(&ca_name, &ca_key, name, &raw)?;
    dir.write(CA_KEY, ca_key.as_bytes(), 0o600)?;
    dir.write(CA_CERT, ca_pem.as_bytes(), 0o644)?;
    dir.write(NODE_KEY, key_pem.as_bytes(), 0o600)?;
    dir.write(NODE_CERT, cert.as_bytes(), 0o644)?;
    let state = State {
        name: name.to_string(),
        role: "main".into(),
        ca_fingerprint: pki::fingerprint(&pki::cert_der(&ca_pem)?),
        ca_name,
        nodes: vec![NodeRecord {
            name: name.to_string(),
            fingerprint: pki::fingerprint(&pki::cert_der(&cert)?),
            role: "main".into(),
            joined_unix: now_unix(),
            revoked: false,
        }],
        ..State::default()
    };
    dir.save(&state)?;
    Ok(state)
}

/// A join token as the administrator copies it: `mbc1.ID.SECRET.CAFINGERPRINT`.
pub struct TokenText {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

impl TokenText {
    pub fn parse(text: &str) -> Result<TokenText> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        match parts.as_slice() {
            ["mbc1", id, secret, ca] if hex(id, 8) && hex(secret, 32) && hex(ca, 64) => {
                Ok(TokenText {
                    id: (*id).to_string(),
                    secret: (*secret).to_string(),
                    ca_fingerprint: ca.to_ascii_lowercase(),
                })
            }
            _ => bail!(
                "this is not a join token (expected mbc1.ID.SECRET.FINGERPRINT as `mb-cluster token` prints it on the main)"
            ),
        }
    }

    pub fn render(&self) -> String {
        format!("mbc1.{}.{}.{}", self.id, self.secret, self.ca_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_main_with_private_keys_and_refuses_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir(tmp.path().join("cluster"));
        let st = init_main(&dir, "main").unwrap();
        assert_eq!(dir.load().unwrap(), st);
        assert_eq!(st.nodes.len(), 1);
        for (f, mode) in [(CA_KEY, 0o600), (NODE_KEY, 0o600), (CA_CERT, 0o644)] {
            let m = fs::metadata(dir.path(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        dir.identity().unwrap();
        let e = init_main(&dir, "main").unwrap_err().to_string();
        assert!(e.contains("already set up"), "{e}");
    }

    #[test]
    fn tokens_round_trip_and_nonsense_is_refused() {
        let t = TokenText {
            id: "0123abcd".into(),
            secret: "f".repeat(32),
            ca_fingerprint: "a".repeat(64),
        };
        let back = TokenText::parse(&t.render()).unwrap();
        assert_eq!((back.id, back.secret), (t.id, t.secret));
        for bad in [
            "",
            "mbc1.x.y.z",
            "mbc2.0123abcd.ffffffffffffffffffffffffffffffff.aa",
        ] {
            assert!(TokenText::parse(bad).is_err(), "{bad}");
        }
    }
}
