//! Child processes and the built binaries: finding programs, starting and stopping
//! them, waiting for them to be ready, and reading their output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The directory of the built binaries (`target/debug`), or `MB_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MB_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test binaries live in target/debug/deps; xtask (the benchmarks) in target/debug.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
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

/// Text of a tool's output, for assertions.
pub fn text(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) fn run_ok(cmd: &mut Command) -> Result<String> {
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

pub(crate) fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
