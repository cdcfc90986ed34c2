//! Our own daemons (mb-rpcd, mb-smtpd, mb-filter, mb-milter, mb-cluster) started on a
//! temp directory with a config file of the test's choosing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::{Proc, bin, wait_until};

/// A temp directory with a config file and an mb-rpcd using it.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub rpcd: Option<Proc>,
    pub smtpd: Option<Proc>,
    pub filters: Vec<Proc>,
    pub milter: Option<Proc>,
    pub cluster: Option<Proc>,
}

impl Gateway {
    /// A directory and config file; `extra` is appended TOML (may repeat no table twice).
    pub fn new(extra: &str) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("mb-e2e-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().display();
        let config = dir.path().join("mailborder.toml");
        // Daemons started as root by the tests stay root: the temp dirs are root's.
        // mb-web runs only in the tests that start it, so mb-status does not expect it
        // (a quoted key, so a test's own [web] table can follow).
        let text = format!(
            "process.user = \"\"\n\"web.enabled\" = false\n[paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\n{extra}\n"
        );
        fs::write(&config, text).expect("write config");
        Gateway {
            dir,
            config,
            rpcd: None,
            smtpd: None,
            filters: Vec::new(),
            milter: None,
            cluster: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/mb-rpcd.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.path("rpcd.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts mb-rpcd and waits for its socket.
    pub fn start(&mut self) -> Result<()> {
        self.rpcd = Some(self.spawn_daemon("mb-rpcd", &self.log_path())?);
        Ok(())
    }

    /// Starts mb-smtpd (logging to `smtpd.log`) and waits for its socket.
    pub fn start_smtpd(&mut self) -> Result<()> {
        self.smtpd = Some(self.spawn_daemon("mb-smtpd", &self.path("smtpd.log"))?);
        Ok(())
    }

    /// Starts mb-filter worker `n` (logging to `filter-N.log`) and waits for its socket.
    pub fn start_filter(&mut self, n: u32) -> Result<()> {
        let log = self.path(&format!("filter-{n}.log"));
        let proc = self.spawn_daemon_args(
            "mb-filter",
            &format!("mb-filter-{n}"),
            &["--instance", &n.to_string()],
            &log,
        )?;
        self.filters.push(proc);
        Ok(())
    }

    /// Starts mb-milter (logging to `milter.log`) and waits for its socket.
    pub fn start_milter(&mut self) -> Result<()> {
        self.milter = Some(self.spawn_daemon("mb-milter", &self.path("milter.log"))?);
        Ok(())
    }

    /// Starts the mb-cluster daemon (logging to `cluster.log`) and waits for its socket.
    pub fn start_cluster(&mut self) -> Result<()> {
        self.cluster = Some(self.spawn_daemon_args(
            "mb-cluster",
            "mb-cluster",
            &["daemon"],
            &self.path("cluster.log"),
        )?);
        Ok(())
    }

    pub fn cluster_log(&self) -> String {
        fs::read_to_string(self.path("cluster.log")).unwrap_or_default()
    }

    pub fn smtpd_log(&self) -> String {
        fs::read_to_string(self.path("smtpd.log")).unwrap_or_default()
    }

    fn spawn_daemon(&self, name: &str, log_path: &Path) -> Result<Proc> {
        self.spawn_daemon_args(name, name, &[], log_path)
    }

    fn spawn_daemon_args(
        &self,
        name: &str,
        socket_name: &str,
        args: &[&str],
        log_path: &Path,
    ) -> Result<Proc> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let child = Command::new(bin(name))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        let mut proc = Proc {
            child,
            name: name.into(),
        };
        let socket = self.path(&format!("run/{socket_name}.sock"));
        let started = wait_until(&format!("{name} socket"), Duration::from_secs(30), || {
            socket.exists() || matches!(proc.child.try_wait(), Ok(Some(_)))
        });
        let log = || fs::read_to_string(log_path).unwrap_or_default();
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!("{name} exited with {status}:\n{}", log());
        }
        started.with_context(log)?;
        Ok(proc)
    }

    /// Runs `mb-rpcd` to completion (for start-up failures); returns (code, stderr).
    pub fn run_rpcd_expecting_exit(&self) -> (Option<i32>, String) {
        let out = Command::new(bin("mb-rpcd"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run mb-rpcd");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn stop(&mut self) -> Option<i32> {
        self.rpcd
            .take()
            .and_then(|mut p| p.stop(Duration::from_secs(15)))
    }

    /// Runs a tool with `--config` of this gateway.
    pub fn tool(&self, name: &str, args: &[&str]) -> Output {
        Command::new(bin(name))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tool")
    }
}
