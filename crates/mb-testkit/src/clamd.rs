//! A private clamd, the anti-virus peer, and the EICAR test file it detects.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::procs::{Proc, require, wait_until};

/// The 68-byte EICAR anti-virus test file.
pub const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// A private clamd on a loopback port whose only signature is EICAR's (an `.hdb` line:
/// MD5, size, name), so it starts offline in seconds.
pub struct Clamd {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub server: Proc,
}

impl Clamd {
    pub fn start() -> Result<Clamd> {
        Clamd::start_configured(None)
    }

    /// A clamd whose StreamMaxLength is `bytes` instead of its default 25 MiB: a longer
    /// INSTREAM is answered "INSTREAM size limit exceeded. ERROR".
    pub fn with_stream_max_length(bytes: u64) -> Result<Clamd> {
        Clamd::start_configured(Some(bytes))
    }

    fn start_configured(stream_max_length: Option<u64>) -> Result<Clamd> {
        let program = require("clamd", "clamav-daemon");
        let dir = tempfile::Builder::new().prefix("mb-clamd-").tempdir()?;
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        let db = d.join("db");
        fs::create_dir_all(&db)?;
        let md5 = Command::new("md5sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let out = {
            let mut md5 = md5;
            use std::io::Write;
            md5.stdin
                .take()
                .context("md5sum stdin")?
                .write_all(EICAR.as_bytes())?;
            md5.wait_with_output()?
        };
        let hash = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        fs::write(
            db.join("test.hdb"),
            format!("{hash}:{}:Test.EICAR\n", EICAR.len()),
        )?;
        let port = free_port();
        let conf = d.join("clamd.conf");
        let mut settings = format!(
            "DatabaseDirectory {}\nLocalSocket {}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nForeground yes\nUser root\nLogFile {}\n",
            db.display(),
            d.join("clamd.sock").display(),
            d.join("clamd.log").display()
        );
        if let Some(n) = stream_max_length {
            settings.push_str(&format!("StreamMaxLength {n}\n"));
        }
        fs::write(&conf, settings)?;
        let child = Command::new(program)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Proc {
            child,
            name: "clamd".into(),
        };
        let log = d.join("clamd.log");
        wait_until("clamd to answer PING", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::Write;
                let mut buf = [0u8; 5];
                s.write_all(b"zPING\0").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"PONG\0"
            })
        })
        .with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
        Ok(Clamd { port, dir, server })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("clamd.sock")
    }

    /// What clamd logged so far (its refusals of streams past StreamMaxLength among them).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("clamd.log")).unwrap_or_default()
    }
}
