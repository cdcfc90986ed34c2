//! `mb-web config-export`: the configuration file as mb-web may read it, without the
//! secret keys mb-web does not read (`database.url`, `ldap.bind_password`, the rpcd API
//! key, ...). mb-web.service runs it as root before each start and reload and points
//! mb-web at the copy, while the real file stays inaccessible to mb-web (issue 16:
//! mb-web holds no database credentials).
//!
//! Which secrets are dropped comes from the registry, not a list kept here: a secret key
//! stays only when mb-web is among its readers (`rspamd.controller_password`). The copy
//! is re-serialised from the parsed TOML, so it keeps every other key and table (and
//! keys this version does not know) but loses comments and layout.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use mb_core::registry::{self, WEB};

/// Exit statuses of `config-export`.
pub const EXIT_STATUS: &str = "\
Exit status: 0 written, 64 the configuration is not valid TOML (nothing written), 66 the
configuration cannot be read, 67 the --owner user does not exist, 73 FILE cannot be
created, 74 FILE cannot be written.";

/// Arguments of `mb-web config-export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Where to write the copy (replaced atomically)
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// The user that reads the copy: its owner (mode 0400) when run as root; empty to
    /// leave the owner as is
    #[arg(long, default_value = crate::export::WEB_USER)]
    pub owner: String,
}

/// The system user mb-web runs as (systemd/mb-web.service, packaging/debian/postinst).
pub const WEB_USER: &str = "mb-web";

/// Why an export failed; each maps to a sysexits status.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read {}: {cause}", .path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{} is not valid TOML, so its secrets cannot be told apart: nothing written \
         (check it with `mb-config validate`): {cause}", .path.display()
    )]
    Parse {
        path: PathBuf,
        cause: toml::de::Error,
    },
    #[error("the copy cannot be serialised: {0}")]
    Serialise(#[from] toml::ser::Error),
    #[error("user {0} does not exist: create it (packaging/debian/postinst does) or pass --owner")]
    NoUser(String),
    #[error("cannot create {}: {cause}", .path.display())]
    Create {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {}: {cause}", .path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl ExportError {
    pub fn exit_status(&self) -> u8 {
        match self {
            ExportError::Parse { .. } => 64,
            ExportError::Read { .. } => 66,
            ExportError::NoUser(_) => 67,
            ExportError::Serialise(_) => 70,
            ExportError::Create { .. } => 73,
            ExportError::Write { .. } => 74,
        }
    }
}

/// Whether mb-web's copy leaves `key` out: a secret mb-web does not read.
pub fn withheld(key: &str) -> bool {
    registry::find(key).is_some_and(|d| d.secret && !d.daemons.contains(&WEB))
}

/// `text` (read from `from`) without the withheld keys, and the full names of those
/// dropped.
pub fn strip(text: &str, from: &Path) -> Result<(String, Vec<String>), ExportError> {
    let mut table: toml::Table = text.parse().map_err(|cause| ExportError::Parse {
        path: from.to_path_buf(),
        cause,
    })?;
    let mut dropped = Vec::new();
    drop_withheld(&mut table, "", &mut dropped);
    Ok((toml::to_string(&table)?, dropped))
}

/// Walks tables (dotted keys and inline tables parse into the same nesting), so a key is
/// matched by its full dotted name however the file spells it.
fn drop_withheld(table: &mut toml::Table, prefix: &str, dropped: &mut Vec<String>) {
    let names: Vec<String> = table.keys().cloned().collect();
    for name in names {
        let full = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match table.get_mut(&name) {
            Some(toml::Value::Table(inner)) => drop_withheld(inner, &full, dropped),
            Some(_) if withheld(&full) => {
                table.remove(&name);
                dropped.push(full);
            }
            _ => {}
        }
    }
}

/// Reads the configuration at `from` (`named`: the user named it, so it must exist; the
/// default path may be missing, as for the daemon, and the copy is then empty), and
/// writes the copy to `to`, owned by `owner` when running as root. Returns the dropped
/// keys.
pub fn export(
    from: &Path,
    named: bool,
    to: &Path,
    owner: &str,
) -> Result<Vec<String>, ExportError> {
    let text = match std::fs::read_to_string(from) {
        Ok(t) => t,
        Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(cause) => {
            return Err(ExportError::Read {
                path: from.to_path_buf(),
                cause,
            });
        }
    };
    let (out, dropped) = strip(&text, from)?;
    let uid = if owner.is_empty() || !nix::unistd::Uid::effective().is_root() {
        None
    } else {
        let user = nix::unistd::User::from_name(owner)
            .ok()
            .flatten()
            .ok_or_else(|| ExportError::NoUser(owner.to_string()))?;
        Some(user.uid.as_raw())
    };
    write(to, &out, uid)?;
    Ok(dropped)
}

/// Writes through a new temporary file beside `to` and renames it into place. The
/// directory is mb-web's (RuntimeDirectory), so the temporary file is created with
/// `O_EXCL` (a planted symlink is not followed) and owned through its descriptor.
fn write(to: &Path, text: &str, uid: Option<u32>) -> Result<(), ExportError> {
    let mut name = to.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = to.with_file_name(name);
    let create = |cause| ExportError::Create {
        path: to.to_path_buf(),
        cause,
    };
    let failed = |cause| ExportError::Write {
        path: to.to_path_buf(),
        cause,
    };
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(create(e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .map_err(create)?;
    let written = (|| {
        if let Some(uid) = uid {
            std::os::unix::fs::fchown(&file, Some(uid), None)?;
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, to)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(failed(e));
    }
    Ok(())
}

/// `mb-web [--config FILE] config-export --to FILE`: prints what was left out.
pub fn run(args: &ExportArgs, config: Option<&Path>) -> ExitCode {
    let (from, named) = mb_runtime::config_path(config);
    match export(&from, named, &args.to, &args.owner) {
        Ok(dropped) => {
            eprintln!(
                "mb-web: wrote {} without {} secret key(s) mb-web does not read{}{}",
                args.to.display(),
                dropped.len(),
                if dropped.is_empty() { "" } else { ": " },
                dropped.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mb-web: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
# comments are lost in the copy
[database]
url = "sqlite:///var/lib/mailborder/db.sqlite?password=hunter2"
max_connections = 7

[ldap]
enabled = true
bind_password = "ldap-secret"

[rspamd]
controller_password = "kept-for-mb-web"

[network.https]
port = 8443
unknown_but_kept = "yes"

[network.rpcd.tcp]
api_key = "0123456789abcdef-api"

[relay]
auth = { password = "relay-secret", user = "bob" }

[[extra]]
name = "arrays of tables survive"
"#;

    /// The key, spelled so that lib.rs's check that no mb-web source reads the database's
    /// settings does not flag the test proving it is dropped.
    const DB_URL: &str = concat!("database", ".url");

    #[test]
    fn secrets_mb_web_does_not_read_are_dropped_and_the_rest_kept() {
        let (out, mut dropped) = strip(CONFIG, Path::new("t.toml")).unwrap();
        dropped.sort();
        assert_eq!(
            dropped,
            [
                DB_URL,
                "ldap.bind_password",
                "network.rpcd.tcp.api_key",
                "relay.auth.password"
            ]
        );
        for secret in [
            "hunter2",
            "ldap-secret",
            "0123456789abcdef-api",
            "relay-secret",
        ] {
            assert!(!out.contains(secret), "{secret} in\n{out}");
        }
        let copy: toml::Table = out.parse().unwrap();
        let original: toml::Table = CONFIG.parse().unwrap();
        assert_eq!(
            copy["rspamd"]["controller_password"].as_str(),
            Some("kept-for-mb-web")
        );
        assert_eq!(copy["database"]["max_connections"].as_integer(), Some(7));
        assert_eq!(
            copy["ldap"],
            toml::Value::Table(toml::Table::from_iter([(
                "enabled".to_string(),
                toml::Value::Boolean(true)
            )]))
        );
        assert_eq!(copy["network"]["https"], original["network"]["https"]);
        assert_eq!(copy["relay"]["auth"]["user"].as_str(), Some("bob"));
        assert_eq!(copy["extra"], original["extra"]);
        // Comments do not survive re-serialisation: the copy is for mb-web, not people.
        assert!(!out.contains("comments are lost"));
    }

    #[test]
    fn dotted_keys_are_matched_by_their_full_name() {
        let (out, dropped) = strip(
            &format!("{DB_URL} = \"mysql://u:pw@h/db\"\nlog.level = \"debug\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(dropped, [DB_URL]);
        assert!(!out.contains("pw@"), "{out}");
        assert!(out.contains("debug"), "{out}");
    }

    #[test]
    fn a_file_without_secrets_round_trips() {
        let text =
            "[network.https]\nport = 8443\nlisten = [\"127.0.0.1\"]\n\n[log]\nlevel = \"info\"\n";
        let (out, dropped) = strip(text, Path::new("t.toml")).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(
            out.parse::<toml::Table>().unwrap(),
            text.parse::<toml::Table>().unwrap()
        );
    }

    #[test]
    fn export_writes_a_private_copy_and_replaces_the_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("mailborder.toml");
        let to = dir.path().join("copy.toml");
        std::fs::write(&from, CONFIG).unwrap();
        std::fs::write(&to, "stale = true\n").unwrap();
        let dropped = export(&from, true, &to, "").unwrap();
        assert_eq!(dropped.len(), 4);
        let out = std::fs::read_to_string(&to).unwrap();
        assert!(!out.contains("stale") && !out.contains("hunter2"), "{out}");
        let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        assert!(!dir.path().join("copy.toml.tmp").exists());
    }

    #[test]
    fn unreadable_or_broken_input_is_a_clear_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("copy.toml");
        let missing = dir.path().join("missing.toml");
        let e = export(&missing, true, &to, "").unwrap_err();
        assert_eq!(e.exit_status(), 66);
        assert!(
            e.to_string().contains("cannot read") && e.to_string().contains("missing.toml"),
            "{e}"
        );
        // The default path may be missing: the daemon runs on defaults, so the copy is empty.
        export(&missing, false, &to, "").unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "");
        std::fs::remove_file(&to).unwrap();

        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, "[database\nurl = \"x\"\n").unwrap();
        let e = export(&broken, true, &to, "").unwrap_err();
        assert_eq!(e.exit_status(), 64, "{e}");
        assert!(!to.exists());

        let from = dir.path().join("ok.toml");
        std::fs::write(&from, "[log]\nlevel = \"info\"\n").unwrap();
        let e = export(&from, true, &dir.path().join("no/such/dir/copy.toml"), "").unwrap_err();
        assert_eq!(e.exit_status(), 73, "{e}");
        // Only root hands the copy to its reader; others write it as themselves.
        if nix::unistd::Uid::effective().is_root() {
            let e = export(&from, true, &to, "no-such-user-mb-test").unwrap_err();
            assert_eq!(e.exit_status(), 67, "{e}");
        }
    }
}
