//! A private Dovecot, the LMTP delivery peer.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::procs::{Proc, require, wait_until};

/// A private Dovecot serving LMTP on a loopback port and on `DIR/run/lmtp`, delivering to
/// maildirs under `DIR/mail/USER` for the users given (any other recipient is unknown).
pub struct Dovecot {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub server: Proc,
}

impl Dovecot {
    pub fn start(users: &[&str]) -> Result<Dovecot> {
        let program = require("dovecot", "dovecot-lmtpd");
        require("/usr/lib/dovecot/lmtp", "dovecot-lmtpd");
        let dir = tempfile::Builder::new().prefix("mb-dovecot-").tempdir()?;
        let d = dir.path();
        // Mail is written as nobody: the tree must be traversable and writable for it.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        fs::create_dir_all(d.join("mail"))?;
        fs::set_permissions(d.join("mail"), fs::Permissions::from_mode(0o777))?;
        let (uid, gid) = (65534, 65534);
        let mut passwd = String::new();
        for u in users {
            passwd.push_str(&format!(
                "{u}::{uid}:{gid}::{}::\n",
                d.join("mail").join(u).display()
            ));
        }
        fs::write(d.join("users"), passwd)?;
        let port = free_port();
        let conf = format!(
            "base_dir = {d}/run\n\
             state_dir = {d}/state\n\
             log_path = {d}/dovecot.log\n\
             protocols = lmtp\n\
             ssl = no\n\
             listen = 127.0.0.1\n\
             first_valid_uid = 1\n\
             auth_username_format = %Ln\n\
             mail_location = maildir:~/Maildir\n\
             passdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
             userdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
             service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  unix_listener lmtp {{\n    mode = 0666\n  }}\n}}\n",
            d = d.display()
        );
        fs::write(d.join("dovecot.conf"), conf)?;
        let child = Command::new(program)
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Proc {
            child,
            name: "dovecot".into(),
        };
        let log = d.join("dovecot.log");
        wait_until("dovecot LMTP to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
        Ok(Dovecot { port, dir, server })
    }

    /// The LMTP Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/lmtp")
    }

    /// The messages delivered to `user`, as text.
    pub fn mailbox(&self, user: &str) -> Vec<String> {
        let new = self.dir.path().join("mail").join(user).join("Maildir/new");
        let mut out: Vec<String> = fs::read_dir(new)
            .map(|d| {
                d.filter_map(std::result::Result::ok)
                    .filter_map(|e| fs::read(e.path()).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }
}
