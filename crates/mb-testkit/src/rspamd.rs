//! A private Rspamd, the spam-scoring peer.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::procs::{Proc, require, wait_until};

/// Rspamd's local rules (`$LOCAL_CONFDIR/rspamd.local.lua`): the action a test asks for,
/// as a pre-result (the way Rspamd's own greylist and ratelimit modules force theirs).
const FORCED_ACTION: &str = r#"
rspamd_config:register_symbol({
  name = 'MB_TEST_FORCED_ACTION',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    local action = task:get_header('X-Test-Rspamd-Action')
    if action then
      task:set_pre_result(action, 'forced by the test', 'mb_test')
    end
  end,
})
"#;

/// A private Rspamd on a loopback port, with its own run, log and database dirs and DNS
/// pointed at a closed local port (offline: lookups fail fast). Its normal worker
/// listens on `port` and on the Unix socket `socket`; [`Rspamd::with_controller`] adds
/// a controller worker on `controller_port` that wants a password from every client,
/// loopback included.
/// Rspamd takes 20-30 s to load its rules: `start` returns at once and `wait_ready`
/// waits for `/ping`, so a test can set up the rest meanwhile.
///
/// A local rule makes its action deterministic: a message with the field
/// `X-Test-Rspamd-Action: ACTION` (`greylist`, `soft reject`, `rewrite subject`,
/// `add header`, `reject`, `no action`) gets that action, whatever it scores.
pub struct Rspamd {
    // Stopped before its directory goes.
    pub server: Proc,
    pub port: u16,
    /// The normal worker's Unix socket (`rspamd.url = "unix:PATH"`).
    pub socket: PathBuf,
    /// The controller worker's port, when started [`Rspamd::with_controller`].
    pub controller_port: Option<u16>,
    pub dir: tempfile::TempDir,
}

impl Rspamd {
    pub fn start() -> Result<Rspamd> {
        Rspamd::launch(None, None)
    }

    /// As [`Rspamd::start`], with a controller worker (`/stat`, `/graph`, the web
    /// interface) that answers only requests carrying `password` in their `Password`
    /// header: its `secure_ip` is a documentation address, so loopback is not trusted.
    pub fn with_controller(password: &str) -> Result<Rspamd> {
        Rspamd::launch(Some(password), None)
    }

    /// As [`Rspamd::with_controller`], with the Bayes classifier's statistics in the
    /// Redis server at `redis` (`127.0.0.1:PORT`), so `/learnspam` and `/learnham`
    /// learn. Without a backend (the others) Rspamd refuses every learn.
    pub fn with_bayes(password: &str, redis: &str) -> Result<Rspamd> {
        Rspamd::launch(Some(password), Some(redis))
    }

    fn launch(controller_password: Option<&str>, bayes_redis: Option<&str>) -> Result<Rspamd> {
        let program = require("rspamd", "rspamd");
        let dir = tempfile::Builder::new().prefix("mb-rspamd-").tempdir()?;
        let d = dir.path().to_path_buf();
        for sub in ["db", "local"] {
            fs::create_dir_all(d.join(sub))?;
        }
        let port = free_port();
        let socket = d.join("normal.sock");
        let controller_port = controller_password.map(|_| free_port());
        let controller = match (controller_password, controller_port) {
            (Some(password), Some(cport)) => format!(
                "worker \"controller\" {{\n  bind_socket = \"127.0.0.1:{cport}\";\n  count = 1;\n  \
                 password = \"{password}\";\n  secure_ip = \"192.0.2.1\";\n  static_dir = \"${{WWWDIR}}\";\n}}\n"
            ),
            _ => String::new(),
        };
        fs::write(d.join("local").join("rspamd.local.lua"), FORCED_ACTION)?;
        if let Some(redis) = bayes_redis {
            // `local.d/classifier-bayes.conf` merges into Rspamd's own `statistic.conf`.
            fs::create_dir_all(d.join("local").join("local.d"))?;
            fs::write(
                d.join("local")
                    .join("local.d")
                    .join("classifier-bayes.conf"),
                format!("backend = \"redis\";\nservers = \"{redis}\";\nmin_learns = 1;\n"),
            )?;
        }
        fs::write(
            d.join("rspamd.conf"),
            format!(
                ".include \"$CONFDIR/common.conf\"\n\
                 options {{\n  pidfile = \"{d}/rspamd.pid\";\n  .include \"$CONFDIR/options.inc\"\n\
                 dns {{\n    nameserver = [\"127.0.0.1:9\"];\n    timeout = 0.3s;\n    retransmits = 1;\n  }}\n}}\n\
                 logging {{\n  type = \"file\";\n  filename = \"{d}/rspamd.log\";\n  level = \"info\";\n}}\n\
                 worker \"normal\" {{\n  bind_socket = \"127.0.0.1:{port}\";\n  bind_socket = \"{socket} mode=0666\";\n  \
                 .include \"$CONFDIR/worker-normal.inc\"\n  count = 1;\n}}\n{controller}",
                d = d.display(),
                socket = socket.display()
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
            socket,
            controller_port,
            dir,
            server: Proc {
                child,
                name: "rspamd".into(),
            },
        })
    }

    /// Waits (up to 180 s: loading its TLD list takes 20 s on a quiet machine and several
    /// times that when the test run loads both cores) until the normal worker answers `/ping` (and the controller,
    /// when there is one, answers at all: it wants the password even for that).
    pub fn wait_ready(&self) -> Result<()> {
        let ports: Vec<u16> = std::iter::once(self.port)
            .chain(self.controller_port)
            .collect();
        wait_until("rspamd to answer /ping", Duration::from_secs(180), || {
            ports.iter().all(|port| {
                std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok_and(|mut s| {
                    use std::io::Write;
                    let mut buf = Vec::new();
                    s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").is_ok()
                        && s.read_to_end(&mut buf).is_ok()
                        && (String::from_utf8_lossy(&buf).contains("pong")
                            || Some(*port) == self.controller_port && buf.starts_with(b"HTTP/1."))
                })
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

    /// The normal worker's Unix socket as an `rspamd.url`.
    pub fn unix_url(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// The controller's URL (`rspamd.controller_url`), when there is one.
    pub fn controller_url(&self) -> Option<String> {
        self.controller_port
            .map(|p| format!("http://127.0.0.1:{p}"))
    }
}
