//! Postfix peers: a private Postfix instance in front of or behind the gateway, and
//! `smtp-sink` as a next hop that records what it receives.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::ports::free_port;
use crate::procs::{Proc, is_root, require, wait_until};

/// A private Postfix instance (its own config and queue directories) listening on a
/// loopback port, relaying to `relayhost` (`[127.0.0.1]:PORT`). `main_cf` adds settings.
pub struct Postfix {
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Postfix {
    pub fn start(relayhost: &str, main_cf: &str) -> Result<Postfix> {
        Postfix::start_with(relayhost, main_cf, "")
    }

    /// As `start`, with `master_cf` appended to master.cf (extra services).
    pub fn start_with(relayhost: &str, main_cf: &str, master_cf: &str) -> Result<Postfix> {
        let postfix = require("postfix", "postfix");
        let postconf = require("postconf", "postfix");
        let dir = tempfile::Builder::new().prefix("mb-postfix-").tempdir()?;
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        let etc = d.join("etc");
        fs::create_dir_all(&etc)?;
        fs::create_dir_all(d.join("data"))?;
        fs::create_dir_all(d.join("queue"))?;
        // The data directory belongs to the mail owner (master.lock, caches).
        let owner = nix::unistd::User::from_name("postfix")?
            .context("no postfix user: is the postfix package installed?")?;
        nix::unistd::chown(&d.join("data"), Some(owner.uid), Some(owner.gid))?;
        let port = free_port();
        // Postfix refuses a config directory that the default one does not list.
        let default_main = Path::new("/etc/postfix/main.cf");
        if !default_main.exists() {
            fs::write(default_main, "compatibility_level = 3.6\n")?;
        }
        let listed = Command::new(&postconf)
            .args(["-h", "alternate_config_directories"])
            .output()?;
        let current = String::from_utf8_lossy(&listed.stdout).trim().to_string();
        let mut dirs: Vec<String> = current
            .split([',', ' '])
            .filter(|s| !s.is_empty() && Path::new(s).exists())
            .map(str::to_string)
            .collect();
        dirs.push(etc.display().to_string());
        let status = Command::new(&postconf)
            .arg("-e")
            .arg(format!(
                "alternate_config_directories = {}",
                dirs.join(", ")
            ))
            .status()?;
        if !status.success() {
            bail!("postconf -e alternate_config_directories failed");
        }
        let master = [
            "/etc/postfix/master.cf",
            "/usr/share/postfix/master.cf.dist",
        ]
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no master.cf template in /etc/postfix or /usr/share/postfix")?;
        let master = fs::read_to_string(master)?
            .lines()
            .map(|l| {
                if l.starts_with("smtp      inet") || l.starts_with("smtp inet") {
                    l.replacen("smtp", &port.to_string(), 1)
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(etc.join("master.cf"), format!("{master}\n{master_cf}\n"))?;
        let main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {d}/queue\n\
             data_directory = {d}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             myhostname = postfix.test\n\
             mydestination =\n\
             relay_domains = served.test\n\
             mynetworks = 127.0.0.0/8\n\
             relayhost = {relayhost}\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             maillog_file = {d}/postfix.log\n\
             maillog_file_prefixes = /var, /dev/stdout, {d}\n\
             smtp_tls_security_level = none\n\
             smtpd_tls_security_level = none\n\
             default_process_limit = 100\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             {main_cf}\n",
            d = d.display()
        );
        fs::write(etc.join("main.cf"), main)?;
        // No chroot: a private queue directory has none of the files a chroot needs.
        Command::new(&postconf)
            .arg("-c")
            .arg(&etc)
            .args(["-F", "-e", "*/*/chroot = n"])
            .status()?;
        let pf = Postfix { port, dir };
        let out = Command::new(&postfix)
            .arg("-c")
            .arg(&etc)
            .arg("start")
            .output()?;
        if !out.status.success() {
            bail!(
                "postfix start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                pf.log()
            );
        }
        wait_until("postfix to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .with_context(|| pf.log())?;
        Ok(pf)
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postfix.log")).unwrap_or_default()
    }

    /// Asks the queue manager to retry deferred mail now (`postqueue -f`).
    pub fn flush(&self) {
        let _ = Command::new("postqueue")
            .arg("-c")
            .arg(self.config_dir())
            .arg("-f")
            .status();
    }

    /// Whether the instance's queue is empty (`postqueue -p`).
    pub fn queue_empty(&self) -> bool {
        Command::new("postqueue")
            .arg("-c")
            .arg(self.config_dir())
            .arg("-p")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Mail queue is empty"))
    }

    /// The master process id.
    pub fn master_pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.path().join("queue/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.config_dir())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Postfix's `smtp-sink` on a loopback port, dumping every transaction into its own
/// file (`-d`), so tests can count what arrived.
pub struct SmtpSink {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub server: Proc,
}

impl SmtpSink {
    /// `extra` are more smtp-sink options (e.g. `-e` to turn EHLO off, `-x` ...).
    pub fn start(extra: &[&str]) -> Result<SmtpSink> {
        let program = require("smtp-sink", "postfix");
        let dir = tempfile::Builder::new().prefix("mb-sink-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let port = free_port();
        let mut cmd = Command::new(program);
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        cmd.arg("-d")
            .arg(dir.path().join("m."))
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("1000")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = Proc {
            child: cmd.spawn()?,
            name: "smtp-sink".into(),
        };
        wait_until("smtp-sink to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(SmtpSink { port, dir, server })
    }

    /// Every transaction received so far, as text (smtp-sink's dump format: its
    /// `X-Mail-Args`/`X-Rcpt-Args` records, then the message).
    pub fn messages(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}
