//! A private PostgreSQL cluster, the SQL store peer.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::procs::{require, run_ok};

/// A private PostgreSQL cluster in a temp dir on a loopback port, with database `mb`
/// owned by user `mb` (password `mb-secret-pw`).
pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pg_ctl: PathBuf,
    data: PathBuf,
    as_postgres: bool,
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
        let bindir = fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).find(|p| p.join("initdb").exists()))
            .unwrap_or_else(|| {
                panic!("PostgreSQL is missing: install it with `apt-get install -y postgresql` (`cargo xtask test` does this when run as root)")
            });
        let dir = tempfile::Builder::new().prefix("mb-postgres-").tempdir()?;
        let data = dir.path().join("data");
        // initdb refuses to run as root: run the server as the postgres user then.
        let as_postgres = nix::unistd::Uid::effective().is_root();
        if as_postgres {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))?;
        }
        let pw = dir.path().join("pw");
        fs::write(&pw, "mb-secret-pw\n")?;
        fs::set_permissions(&pw, fs::Permissions::from_mode(0o644))?;
        let cmd = |program: &Path| {
            if as_postgres {
                let mut c = Command::new(require("runuser", "util-linux"));
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        run_ok(
            cmd(&bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "mb",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pw.display())),
        )?;
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        );
        let log = dir.path().join("postgres.log");
        run_ok(
            cmd(&bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &opts, "-l"])
                .arg(&log)
                .args(["-w", "-t", "60", "start"]),
        )
        .with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
        let pg = Postgres {
            pg_ctl: bindir.join("pg_ctl"),
            data,
            as_postgres,
            dir,
            port,
        };
        run_ok(
            Command::new(bindir.join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "mb", "mb"])
                .env("PGPASSWORD", "mb-secret-pw"),
        )?;
        Ok(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://mb:mb-secret-pw@127.0.0.1:{}/mb", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            c
        } else {
            Command::new(&self.pg_ctl)
        };
        let _ = c
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
