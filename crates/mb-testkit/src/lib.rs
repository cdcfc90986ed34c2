//! Test helpers: the built binaries, mb-rpcd on a temp directory, and private MariaDB,
//! PostgreSQL and Redis servers on loopback ports. A missing peer is a failure that says
//! which Debian package to install, never a skip.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The directory of the built binaries (`target/debug`), or `MB_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MB_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test binaries live in target/debug/deps.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of a built binary; fails with the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// The source tree's root.
pub fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("source root")
}

/// A loopback TCP port nobody listens on right now, and that nothing else in this
/// process was handed. Ports come from below the kernel's ephemeral range (32768 and up
/// on Linux), so an outgoing connection's source port cannot take a port between the
/// moment a test picks it and the moment its daemon binds it; each test process starts
/// at its own offset so that parallel test binaries rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let _ = NEXT.compare_exchange(
            u32::MAX,
            (std::process::id() * 397) % SPAN,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        // TCP and UDP: the DNS server a test starts listens on both.
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN)
}

/// Fails with an install hint when a peer program is missing.
pub fn require(program: &str, package: &str) -> PathBuf {
    let candidates = [
        PathBuf::from(program),
        Path::new("/usr/bin").join(program),
        Path::new("/usr/sbin").join(program),
        Path::new("/usr/local/bin").join(program),
    ];
    candidates.into_iter().find(|p| p.is_absolute() && p.exists()).unwrap_or_else(|| {
        panic!("{program} is missing: install it with `apt-get install -y {package}` (`cargo xtask test` does this when run as root)")
    })
}

/// Waits until `check` holds, or fails with `what`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > limit {
            bail!("{what} did not happen within {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// SIGTERM and wait up to `limit`; returns the exit code (None if killed).
    pub fn stop(&mut self, limit: Duration) -> Option<i32> {
        self.signal(Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(10));
        }
    }
}

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
        let text = format!(
            "process.user = \"\"\n[paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\n{extra}\n"
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

/// Text of a tool's output, for assertions.
pub fn text(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

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
        run_ok(
            Command::new(install)
                .arg(format!("--datadir={}", data.display()))
                .args([
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ]),
        )?;
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

/// A private Redis server on a loopback port, without persistence.
pub struct Redis {
    pub port: u16,
    pub server: Proc,
}

impl Redis {
    pub fn start() -> Result<Redis> {
        let program = require("redis-server", "redis-server");
        let port = free_port();
        let child = Command::new(program)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Proc {
            child,
            name: "redis-server".into(),
        };
        wait_until("redis to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::Write;
                let mut buf = [0u8; 7];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
            })
        })?;
        Ok(Redis { port, server })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1: (cert PEM, key PEM).
pub fn self_signed() -> (String, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("generate certificate");
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

/// A self-signed certificate for `localhost` whose subject CN is `cn`: (cert PEM, key PEM).
pub fn self_signed_named(cn: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

/// Creates the `mailborder` system group and user if missing, as the package's
/// sysusers.d entry would (tests that check group access or privilege dropping need them).
pub fn ensure_mailborder_account() {
    use nix::unistd::{Group, User};
    if Group::from_name("mailborder").ok().flatten().is_none() {
        let _ = Command::new(require("groupadd", "passwd"))
            .args(["--system", "mailborder"])
            .status();
    }
    if User::from_name("mailborder").ok().flatten().is_none() {
        let _ = Command::new(require("useradd", "passwd"))
            .args([
                "--system",
                "--gid",
                "mailborder",
                "--no-create-home",
                "--home-dir",
                "/var/lib/mailborder",
            ])
            .args(["--shell", "/usr/sbin/nologin", "mailborder"])
            .status();
    }
    // Another test may have been creating them at the same time: check the outcome.
    assert!(
        Group::from_name("mailborder").ok().flatten().is_some(),
        "cannot create the mailborder group"
    );
    assert!(
        User::from_name("mailborder").ok().flatten().is_some(),
        "cannot create the mailborder user"
    );
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
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

/// dnsmasq serving a test zone on a loopback port. `records` are dnsmasq options such
/// as `--mx-host=example.test,mx1.example.test,10` and `--host-record=mx1.example.test,127.0.0.1`.
pub struct Dnsmasq {
    pub port: u16,
    pub server: Proc,
}

impl Dnsmasq {
    pub fn start(records: &[String]) -> Result<Dnsmasq> {
        let program = require("dnsmasq", "dnsmasq-base");
        let port = free_port();
        let mut cmd = Command::new(program);
        cmd.args([
            "--no-daemon",
            "--port",
            &port.to_string(),
            "--listen-address",
            "127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--log-facility=-",
            "--pid-file",
        ]);
        if is_root() {
            cmd.arg("--user=root");
        }
        cmd.args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = Proc {
            child: cmd.spawn()?,
            name: "dnsmasq".into(),
        };
        // dnsmasq answers TCP too: listening means it is ready.
        wait_until("dnsmasq to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(Dnsmasq { port, server })
    }

    /// The `network.dns.servers` value for this server.
    pub fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

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
        fs::write(
            &conf,
            format!(
                "DatabaseDirectory {}\nLocalSocket {}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nForeground yes\nUser root\nLogFile {}\n",
                db.display(),
                d.join("clamd.sock").display(),
                d.join("clamd.log").display()
            ),
        )?;
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
}

/// A private Rspamd (normal worker only) on a loopback port, with its own run, log and
/// database dirs and DNS pointed at a closed local port (offline: lookups fail fast).
/// Rspamd takes 20-30 s to load its rules: `start` returns at once and `wait_ready`
/// waits for `/ping`, so a test can set up the rest meanwhile.
pub struct Rspamd {
    // Stopped before its directory goes.
    pub server: Proc,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Rspamd {
    pub fn start() -> Result<Rspamd> {
        let program = require("rspamd", "rspamd");
        let dir = tempfile::Builder::new().prefix("mb-rspamd-").tempdir()?;
        let d = dir.path().to_path_buf();
        for sub in ["db", "local"] {
            fs::create_dir_all(d.join(sub))?;
        }
        let port = free_port();
        fs::write(
            d.join("rspamd.conf"),
            format!(
                ".include \"$CONFDIR/common.conf\"\n\
                 options {{\n  pidfile = \"{d}/rspamd.pid\";\n  .include \"$CONFDIR/options.inc\"\n\
                 dns {{\n    nameserver = [\"127.0.0.1:9\"];\n    timeout = 0.3s;\n    retransmits = 1;\n  }}\n}}\n\
                 logging {{\n  type = \"file\";\n  filename = \"{d}/rspamd.log\";\n  level = \"info\";\n}}\n\
                 worker \"normal\" {{\n  bind_socket = \"127.0.0.1:{port}\";\n  .include \"$CONFDIR/worker-normal.inc\"\n  count = 1;\n}}\n",
                d = d.display()
            ),
        )?;
        // Rspamd drops to its own user, which must reach these dirs.
        let _ = Command::new("chown")
            .args(["-R", "_rspamd:_rspamd"])
            .arg(&d)
            .status();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        let var = |k: &str, v: &Path| format!("--var={k}={}", v.display());
        let child = Command::new(program)
            .args(["-f", "-u", "_rspamd", "-g", "_rspamd", "-c"])
            .arg(d.join("rspamd.conf"))
            .arg(var("DBDIR", &d.join("db")))
            .arg(var("RUNDIR", &d))
            .arg(var("LOGDIR", &d))
            .arg(var("LOCAL_CONFDIR", &d.join("local")))
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("stderr.log"))?)
            .spawn()?;
        Ok(Rspamd {
            port,
            dir,
            server: Proc {
                child,
                name: "rspamd".into(),
            },
        })
    }

    /// Waits (up to 90 s) until the normal worker answers `/ping`.
    pub fn wait_ready(&self) -> Result<()> {
        let port = self.port;
        wait_until("rspamd to answer /ping", Duration::from_secs(90), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::Write;
                let mut buf = Vec::new();
                s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").is_ok()
                    && s.read_to_end(&mut buf).is_ok()
                    && String::from_utf8_lossy(&buf).contains("pong")
            })
        })
        .with_context(|| {
            format!(
                "{}{}",
                fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default(),
                fs::read_to_string(self.dir.path().join("rspamd.log")).unwrap_or_default()
            )
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A TCP relay on a loopback port in front of another loopback address, that can cut the
/// link the way a failed network does: while cut, nothing is forwarded in either
/// direction and no packet says so (connections stay open, new ones are accepted and
/// go nowhere). Connections from before a cut stay dead after `heal`, as TCP sessions
/// across a real outage do; new ones work again.
pub struct LinkProxy {
    pub port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LinkProxy {
    pub fn start(upstream: std::net::SocketAddr) -> Result<LinkProxy> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let generation = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let (g, c) = (generation.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let born = g.load(Ordering::SeqCst);
                let server = if c.load(Ordering::SeqCst) {
                    None
                } else {
                    std::net::TcpStream::connect(upstream).ok()
                };
                let alive = {
                    let (g, c) = (g.clone(), c.clone());
                    move || !c.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) == born
                };
                match server {
                    Some(server) => {
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            let alive = alive.clone();
                            std::thread::spawn(move || {
                                use std::io::Write;
                                let mut buf = [0u8; 16384];
                                loop {
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => {
                                            if alive() {
                                                let _ = to.shutdown(std::net::Shutdown::Write);
                                            }
                                            return;
                                        }
                                        Ok(n) => {
                                            if alive() && to.write_all(&buf[..n]).is_err() {
                                                return;
                                            }
                                        }
                                    }
                                }
                            });
                        }
                    }
                    None => {
                        // Swallow what the client sends, answer nothing.
                        std::thread::spawn(move || {
                            let mut client = client;
                            let mut buf = [0u8; 16384];
                            while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                }
            }
        });
        Ok(LinkProxy {
            port,
            generation,
            cut,
        })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Cuts the link.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Restores the link for new connections.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
