//! A private MariaDB server, the SQL store peer.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::procs::{Proc, require, run_ok, wait_until};

/// A private MariaDB server in a temp dir on a loopback port, with database `mb` and user
/// `mb` (password `mb-secret-pw`).
pub struct MariaDb {
    pub dir: tempfile::TempDir,
    pub port: u16,
    _server: Proc,
}

impl MariaDb {
    pub fn start() -> Result<MariaDb> {
        let install = require("mariadb-install-db", "mariadb-server");
        let server = require("mariadbd", "mariadb-server");
        let client = require("mariadb", "mariadb-client");
        let dir = tempfile::Builder::new().prefix("mb-mariadb-").tempdir()?;
        let data = dir.path().join("data");
        let sock = dir.path().join("mysqld.sock");
        // `--no-defaults` (it must come first) keeps the bootstrap away from /etc/mysql, whose
        // pid file and socket concurrent test servers would otherwise share. A bootstrap that
        // still fails (seen once under load) is tried once more on an empty directory.
        let bootstrap = || {
            run_ok(
                Command::new(&install)
                    .arg("--no-defaults")
                    .arg(format!("--datadir={}", data.display()))
                    .args([
                        "--user=root",
                        "--auth-root-authentication-method=socket",
                        "--skip-test-db",
                    ]),
            )
        };
        if let Err(first) = bootstrap() {
            eprintln!("mariadb-install-db failed, trying once more: {first:#}");
            let _ = fs::remove_dir_all(&data);
            bootstrap().context("mariadb-install-db failed twice")?;
        }
        let port = free_port();
        let log = fs::File::create(dir.path().join("mariadb.log"))?;
        let child = Command::new(server)
            .args([
                "--no-defaults",
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--port={port}"))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mariadb.pid").display()
            ))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let proc = Proc {
            child,
            name: "mariadbd".into(),
        };
        let sql = |q: &str| {
            Command::new(&client)
                .arg(format!("--socket={}", sock.display()))
                .args(["-u", "root", "-e", q])
                .output()
        };
        wait_until(
            "MariaDB to accept connections",
            Duration::from_secs(60),
            || sql("SELECT 1").is_ok_and(|o| o.status.success()),
        )
        .with_context(|| fs::read_to_string(dir.path().join("mariadb.log")).unwrap_or_default())?;
        run_ok(Command::new(&client).arg(format!("--socket={}", sock.display())).args([
            "-u",
            "root",
            "-e",
            "CREATE DATABASE mb; CREATE USER 'mb'@'127.0.0.1' IDENTIFIED BY 'mb-secret-pw'; GRANT ALL ON mb.* TO 'mb'@'127.0.0.1';",
        ]))?;
        Ok(MariaDb {
            dir,
            port,
            _server: proc,
        })
    }

    pub fn url(&self) -> String {
        format!("mysql://mb:mb-secret-pw@127.0.0.1:{}/mb", self.port)
    }
}
