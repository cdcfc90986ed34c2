//! A headless Chromium for browser tests: Debian's `chromedriver` (package
//! `chromium-driver`) on a loopback port from the port allocator, and the arguments the
//! WebDriver session gives Chromium (headless, no sandbox as root, a temp profile, the
//! test certificate accepted, no name resolution beyond loopback). The WebDriver client
//! itself (fantoccini) lives in the test crate, which connects to [`Chromedriver::url`].

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{Proc, free_port, require, source_root, wait_until};

/// A chromedriver process and Chromium's temp profile, both gone when dropped.
pub struct Chromedriver {
    pub port: u16,
    proc: Proc,
    profile: tempfile::TempDir,
    log: PathBuf,
}

impl Chromedriver {
    /// Starts chromedriver and waits until it answers. Fails with an install hint when
    /// Chromium or chromedriver is missing.
    pub fn start() -> Result<Chromedriver> {
        let driver = require("chromedriver", "chromium-driver");
        require("chromium", "chromium");
        let profile = tempfile::Builder::new()
            .prefix("mb-chromium-")
            .tempdir()
            .context("temp profile for chromium")?;
        let log = profile.path().join("chromedriver.log");
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn chromedriver")?;
        let mut proc = Proc {
            child,
            name: "chromedriver".into(),
        };
        let up = wait_until("chromedriver's port", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || matches!(proc.child.try_wait(), Ok(Some(_)))
        });
        if up.is_err() || !matches!(proc.child.try_wait(), Ok(None)) {
            anyhow::bail!(
                "chromedriver did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(Chromedriver {
            port,
            proc,
            profile,
            log,
        })
    }

    /// The WebDriver endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Chromium's command-line arguments for `goog:chromeOptions.args`.
    pub fn chrome_args(&self) -> Vec<String> {
        vec![
            "--headless=new".into(),
            // Tests run as root, where Chromium's sandbox cannot start.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-extensions".into(),
            "--disable-background-networking".into(),
            "--disable-sync".into(),
            "--disable-component-update".into(),
            "--window-size=1280,1000".into(),
            format!(
                "--user-data-dir={}",
                self.profile.path().join("profile").display()
            ),
            // mb-web serves a certificate made for the test; only this profile trusts it.
            "--ignore-certificate-errors".into(),
            // Nothing leaves the machine: every name but localhost fails to resolve.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost".into(),
        ]
    }

    /// The path of Chromium's binary, for `goog:chromeOptions.binary`.
    pub fn chromium(&self) -> PathBuf {
        require("chromium", "chromium")
    }

    /// chromedriver's log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }
}

/// Where browser tests save their screenshots: `target/screenshots/` (made if needed).
pub fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| source_root().join("target"), PathBuf::from)
        .join("screenshots");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

impl Drop for Chromedriver {
    /// Ends Chromium too when a test failed before closing its session: every process
    /// whose command line names this profile directory (chromedriver alone would leave
    /// them behind).
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
        let marker = self.profile.path().display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
