//! Project automation: `cargo xtask up|down|test|install|deb|gen-config|bench|fuzz`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The daemons of the suite, in start order. Those not built yet are skipped by `up`.
const DAEMONS: &[&str] = &[
    "mb-rpcd",
    "mb-smtpd",
    "mb-filter",
    "mb-milter",
    "mb-cluster",
    "mb-web",
];
/// Administrator tools installed in bin/.
const TOOLS: &[&str] = &[
    "mb-config",
    "mb-status",
    "mb-user",
    "mb-ban",
    "mb-queue",
    "mb-quarantine",
    "mb-log",
    "mb-stats",
    "mb-policy",
    "mb-greylist",
    "mb-dkim",
    "mb-recipient",
    "mb-backup",
];
/// Debian packages of the real peers the tests start (see ../shared/PEERS.md).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("mariadb-server", "/usr/sbin/mariadbd"),
    ("postgresql", "/usr/lib/postgresql"),
    ("redis-server", "/usr/bin/redis-server"),
    ("fail2ban", "/usr/bin/fail2ban-regex"),
    ("systemd", "/usr/bin/systemd-analyze"),
    ("swaks", "/usr/bin/swaks"),
    // swaks only recommends these, and speaks no TLS without them.
    (
        "libnet-ssleay-perl",
        "/usr/lib/x86_64-linux-gnu/perl5/5.36/Net/SSLeay.pm",
    ),
    ("libio-socket-ssl-perl", "/usr/share/perl5/IO/Socket/SSL.pm"),
    // smtp-sink, smtp-source and the private Postfix instances of the delivery tests
    // and the benchmark.
    ("postfix", "/usr/sbin/smtp-sink"),
    ("dovecot-lmtpd", "/usr/lib/dovecot/lmtp"),
    ("dnsmasq-base", "/usr/sbin/dnsmasq"),
    // clamd with a one-line EICAR signature for the filter tests.
    ("clamav-daemon", "/usr/sbin/clamd"),
    // Rspamd for the filter's spam-scoring test.
    ("rspamd", "/usr/bin/rspamd"),
    // dkimpy, the independent DKIM signer and verifier of the filter tests.
    (
        "python3-dkim",
        "/usr/lib/python3/dist-packages/dkim/__init__.py",
    ),
    // authres lets dkimpy make ARC sets.
    (
        "python3-authres",
        "/usr/lib/python3/dist-packages/authres/__init__.py",
    ),
    // The log search benchmark fills SQLite with its own client.
    ("sqlite3", "/usr/bin/sqlite3"),
    // man and groff check the manual pages `install` writes.
    ("man-db", "/usr/bin/man"),
    ("groff-base", "/usr/bin/groff"),
    // Headless Chromium and its WebDriver server for the web interface's browser tests
    // (tests/e2e/web_ui.rs, mb_testkit::browser).
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
    // OpenDKIM's miltertest, an independent milter client for the mb-milter tests.
    ("miltertest", "/usr/bin/miltertest"),
    // lintian checks the package `cargo xtask deb` builds.
    ("lintian", "/usr/bin/lintian"),
    // OpenLDAP's slapd (a private directory per test) and its client tools, for LDAP
    // recipient verification and logins.
    ("slapd", "/usr/sbin/slapd"),
    ("ldap-utils", "/usr/bin/ldapsearch"),
    // promtool checks the text mb-web serves on /metrics.
    ("prometheus", "/usr/bin/promtool"),
    // curl, run as nginx's user, speaks HTTP and gRPC on mb-web.sock (tests/e2e/web_scale.rs).
    ("curl", "/usr/bin/curl"),
];

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build and run the whole gateway locally, unprivileged (run dir under target/)
    Up {
        /// Start the daemons in the background and return (stop them with `cargo xtask down`)
        #[arg(long)]
        detach: bool,
        /// Use the binaries already in target/debug
        #[arg(long)]
        no_build: bool,
    },
    /// Stop the daemons started by `cargo xtask up --detach`
    Down,
    /// Run every test; as root, install the Debian packages of missing peers first
    Test {
        /// Extra arguments for `cargo test` (after --)
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Lay out binaries, systemd units and configuration as a package would
    Install {
        #[arg(long, value_name = "DIR")]
        destdir: PathBuf,
        #[arg(long, default_value = "/usr")]
        prefix: String,
        /// Install the debug build instead of building a release
        #[arg(long)]
        debug: bool,
        /// Use the binaries already built
        #[arg(long)]
        no_build: bool,
    },
    /// Build the Debian package target/debian/mailborder_VERSION_ARCH.deb from the tree
    /// `install` lays out (release build unless --debug)
    Deb {
        /// Debian version (default: the workspace version, revision 1)
        #[arg(long)]
        version: Option<String>,
        /// Package the debug build instead of building a release
        #[arg(long)]
        debug: bool,
        /// Use the binaries already built
        #[arg(long)]
        no_build: bool,
        /// Directory for the .deb (default target/debian)
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Fuzz the parsers of untrusted input with libFuzzer (installs cargo-fuzz on first
    /// use); new inputs are kept in fuzz/corpus/TARGET, crashes in fuzz/artifacts/TARGET
    Fuzz {
        /// One target (default: each in turn): smtp_command, smtp_data, smtp_reply,
        /// milter_frame, mime_attachments, archive, config_value, config_file
        target: Option<String>,
        /// Seconds per target
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Regenerate etc/mailborder/mailborder.toml from the key registry
    GenConfig,
    /// Measure throughput, CPU and memory side by side in one table: smtp-source into
    /// smtp-sink directly, through a private Postfix, through mb-smtpd (relay,
    /// receive-only, filtered), Postfix with mb-milter, mb-smtpd with idle sessions and
    /// under attack, and mb-web's API latency (release build), then issue 18's goals
    Bench {
        /// Messages per path (smtp-source -m)
        #[arg(long, default_value_t = 20_000)]
        messages: u32,
        /// Concurrent sessions (smtp-source -s, default 20); with --idle, the idle
        /// sessions held (default 10,000)
        #[arg(long)]
        sessions: Option<u32>,
        /// Message size in bytes (smtp-source -l)
        #[arg(long, default_value_t = 4096)]
        size: u32,
        /// Use the debug build of mb-smtpd (faster to build, slower to run)
        #[arg(long)]
        debug: bool,
        /// Only these rows of the full bench (comma-separated): ceiling, postfix, relay,
        /// receive, filtered, milter, idle, attack, recovery, api; ratios need their
        /// reference rows
        #[arg(long, value_delimiter = ',', value_name = "STEPS")]
        only: Vec<String>,
        /// Idle sessions held by the full bench's idle row
        #[arg(long, default_value_t = bench::IDLE_SESSIONS)]
        idle_sessions: u32,
        /// Messages the full bench's recovery row queues before it restarts mb-smtpd
        /// (page cache dropped when root) and times its start-up
        #[arg(long, default_value_t = bench::RECOVERY_MESSAGES)]
        recovery_messages: u32,
        /// Only Postfix alone and with mb-milter, with the CPU split between Postfix,
        /// mb-milter and the workers
        #[arg(long)]
        milter: bool,
        /// Instead of mail: time mb-log's searches over a million events on SQLite,
        /// MariaDB and PostgreSQL
        #[arg(long)]
        log_search: bool,
        /// Instead of mail: p50/p99 latency of mb-web's REST API (status, quarantine
        /// pages of 100,000 entries, log searches over a million events) over HTTPS and
        /// over its socket (release build unless --debug)
        #[arg(long)]
        api: bool,
        /// Instead of the relay paths: a legitimate sender's throughput alone and under
        /// attack (floods, idle and slowloris sessions, password guessing, 20 MB
        /// messages from other loopback addresses), against mb-smtpd and Postfix
        #[arg(long)]
        attack: bool,
        /// Seconds the legitimate sender is measured for in each phase of --attack and
        /// --idle, and of the full bench's attack and idle rows (5 at least)
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Instead of the relay paths: peak memory of mb-smtpd and one mb-filter worker
        /// while four 40 MB messages arrive at once
        #[arg(long)]
        big: bool,
        /// Instead of the relay paths: mb-smtpd's memory with N idle sessions (after
        /// EHLO, from many loopback addresses) and a sender's throughput alone and with them
        #[arg(long)]
        idle: bool,
        /// The directory of already built binaries to measure (e.g. an older commit's
        /// release build, or a profiling build), instead of building this tree
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Up { detach, no_build } => up(detach, no_build),
        Cmd::Down => down(),
        Cmd::Test { cargo_args } => test(&cargo_args),
        Cmd::Install {
            destdir,
            prefix,
            debug,
            no_build,
        } => install(&destdir, &prefix, debug, no_build),
        Cmd::GenConfig => gen_config(),
        Cmd::Deb {
            version,
            debug,
            no_build,
            out_dir,
        } => deb::deb(&deb::Options {
            version,
            debug,
            no_build,
            out_dir,
        })
        .map(drop),
        Cmd::Fuzz { target, seconds } => fuzz::fuzz(target.as_deref(), seconds, true),
        Cmd::Bench {
            messages,
            sessions,
            size,
            debug,
            only,
            idle_sessions,
            recovery_messages,
            milter,
            log_search,
            api,
            attack,
            seconds,
            big,
            idle,
            bin_dir,
        } => (|| {
            // A misspelt --only fails before anything is built.
            let steps = bench::Step::parse_list(&only)?;
            ensure_test_packages()?;
            if log_search {
                if let Some(dir) = &bin_dir {
                    if !dir.join("mb-rpcd").is_file() {
                        bail!(
                            "--bin-dir {}: no mb-rpcd there (build it with `cargo build --workspace --bins [--release]`)",
                            dir.display()
                        );
                    }
                    // The test kit's gateway finds its daemons through MB_BIN_DIR, and
                    // this process does not change its own environment: the search runs
                    // in a child that has it.
                    let status = Command::new(std::env::current_exe()?)
                        .args(["bench", "--log-search"])
                        .env("MB_BIN_DIR", dir)
                        .status()?;
                    if !status.success() {
                        bail!(
                            "bench --log-search with {} failed ({status})",
                            dir.display()
                        );
                    }
                    return Ok(());
                }
                if std::env::var_os("MB_BIN_DIR").is_none() {
                    run(cargo().args(["build", "--workspace", "--bins"]))?;
                }
                return logsearch::bench();
            }
            let profile = if debug { "debug" } else { "release" };
            if api {
                if let Some(dir) = &bin_dir {
                    return api_bench::bench(dir);
                }
                let mut build = cargo();
                build.args(["build", "-p", "mb-rpcd", "-p", "mb-web"]);
                if !debug {
                    build.arg("--release");
                }
                run(&mut build)?;
                return api_bench::bench(&root().join("target").join(profile));
            }
            // --bin-dir: measure binaries built elsewhere (an older commit's, a profiling
            // build with frame pointers) instead of building this tree.
            let bins = match &bin_dir {
                Some(dir) => dir.clone(),
                None => {
                    let mut build = cargo();
                    build.args([
                        "build",
                        "-p",
                        "mb-smtpd",
                        "-p",
                        "mb-filter",
                        "-p",
                        "mb-milter",
                        // The API latency row (api_bench.rs).
                        "-p",
                        "mb-rpcd",
                        "-p",
                        "mb-web",
                    ]);
                    if !debug {
                        build.arg("--release");
                    }
                    run(&mut build)?;
                    root().join("target").join(profile)
                }
            };
            let mb_smtpd = bins.join("mb-smtpd");
            if attack {
                return attack::attack(&mb_smtpd, seconds);
            }
            if idle {
                return idle::idle(&mb_smtpd, sessions.unwrap_or(10_000), seconds);
            }
            if big {
                return bigmem::bigmem(&bins).map(|_| ());
            }
            if milter {
                let load = bench::Load {
                    messages,
                    sessions: sessions.unwrap_or(20),
                    size,
                };
                return bench::milter_only(&load, &bins);
            }
            bench::bench(
                &bench::Load {
                    messages,
                    sessions: sessions.unwrap_or(20),
                    size,
                },
                mb_smtpd,
                &bench::Options {
                    steps,
                    idle_sessions,
                    seconds,
                    recovery_messages,
                },
            )
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

mod api_bench;
mod attack;
mod bench;
mod bigmem;
mod deb;
mod fuzz;
mod idle;
mod logsearch;
mod null_milter;
#[cfg(test)]
mod tidy;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Installs the Debian packages the tests need, when root and when missing.
fn ensure_test_packages() -> Result<()> {
    let missing = missing_packages(Path::new("/"));
    if missing.is_empty() {
        return Ok(());
    }
    refuse_unless_root(&missing, is_root())?;
    install_packages(&missing)
}

/// The test packages whose probe file is absent under `root`.
fn missing_packages(root: &Path) -> Vec<&'static str> {
    TEST_PACKAGES
        .iter()
        .filter(|(_, probe)| !root.join(probe.trim_start_matches('/')).exists())
        .map(|(pkg, _)| *pkg)
        .collect()
}

/// Without root nothing can be installed: say what is missing and how to get it, and stop
/// before any test runs (a run without its peers only produces failures).
fn refuse_unless_root(missing: &[&str], root: bool) -> Result<()> {
    if !root {
        bail!(
            "missing test peers: {}\n\
             run `sudo cargo xtask test` once (it installs them from Debian's packages and leaves \
             their system services disabled), or install them yourself: \
             `sudo apt-get install -y --no-install-recommends {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// Installs the packages from Debian's archive without starting their services.
fn install_packages(missing: &[&str]) -> Result<()> {
    eprintln!("xtask: installing test peers: {}", missing.join(" "));
    // Keep Debian from starting the system services: tests start private instances.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))?;
    }
    let result = (|| {
        if missing.contains(&"postfix") {
            // Postfix asks what kind of mail system this is: none, tests configure their own.
            let mut child = Command::new("debconf-set-selections")
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            if let Some(stdin) = child.stdin.as_mut() {
                use std::io::Write;
                stdin.write_all(
                    b"postfix postfix/main_mailer_type select No configuration\npostfix postfix/mailname string localhost\n",
                )?;
            }
            child.wait()?;
        }
        if missing.contains(&"slapd") {
            // Without this slapd's postinst asks for an admin password and builds a system
            // directory for the host's domain; tests load their own configuration.
            let mut child = Command::new("debconf-set-selections")
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            if let Some(stdin) = child.stdin.as_mut() {
                use std::io::Write;
                stdin.write_all(b"slapd slapd/no_configuration boolean true\n")?;
            }
            child.wait()?;
        }
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        disable_services(missing)
    })();
    if ours {
        let _ = fs::remove_file(policy);
    }
    result
}

/// The system services Debian enables for the peer packages: the tests start private
/// instances, so none of them may come up at the next boot (no Postfix on :25, no
/// fail2ban jail, no database listening).
const PEER_SERVICES: &[(&str, &[&str])] = &[
    ("mariadb-server", &["mariadb"]),
    ("postgresql", &["postgresql"]),
    ("redis-server", &["redis-server"]),
    ("fail2ban", &["fail2ban"]),
    ("postfix", &["postfix"]),
    ("dovecot-lmtpd", &["dovecot"]),
    ("clamav-daemon", &["clamav-daemon", "clamav-freshclam"]),
    ("rspamd", &["rspamd"]),
    ("slapd", &["slapd"]),
    ("prometheus", &["prometheus"]),
];

/// Disables the system services of the packages this run installed (and only those: a
/// Postfix the administrator installed is theirs).
fn disable_services(installed: &[&str]) -> Result<()> {
    let units: Vec<&str> = PEER_SERVICES
        .iter()
        .filter(|(pkg, _)| installed.contains(pkg))
        .flat_map(|(_, units)| units.iter().copied())
        // slapd ships a SysV script only; `systemctl disable` handles those too.
        .filter(|unit| {
            Path::new(&format!("/lib/systemd/system/{unit}.service")).exists()
                || Path::new(&format!("/etc/init.d/{unit}")).exists()
        })
        .collect();
    if units.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: disabling the system services of the peers (tests start their own): {}",
        units.join(" ")
    );
    // `systemctl disable` edits the unit links (and the SysV links through
    // systemd-sysv-install) without a running systemd.
    run(Command::new("systemctl")
        .args(["disable", "--no-reload", "--quiet"])
        .args(&units))
}

/// Seconds per fuzz target at the end of `cargo xtask test`.
const FUZZ_SMOKE_SECONDS: u64 = 20;

fn test(extra: &[String]) -> Result<()> {
    ensure_test_packages()?;
    let started = Instant::now();
    // The end-to-end tests run the real binaries: build them all first.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra))?;
    // A short run of every fuzz target over its kept corpus: a parser change that
    // panics on an input found before fails here.
    fuzz::fuzz(None, FUZZ_SMOKE_SECONDS, false)?;
    eprintln!(
        "xtask: all tests passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where `up` keeps its run dir, database and logs (`MB_DEV_DIR` overrides, for tests).
fn dev_dir() -> PathBuf {
    std::env::var_os("MB_DEV_DIR")
        .map_or_else(|| root().join("target/mailborder-dev"), PathBuf::from)
}

/// A port of the local gateway; tests move them with `MB_DEV_<NAME>_PORT`.
fn dev_port(name: &str, default: u16) -> u16 {
    std::env::var(format!("MB_DEV_{name}_PORT"))
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

/// The configuration `cargo xtask up` runs with: unprivileged ports, everything under target/.
fn dev_config(dir: &Path) -> String {
    let built = |d: &str| root().join("target/debug").join(d).exists();
    format!(
        "# Written by `cargo xtask up`: a local, unprivileged gateway.\n\
         process.user = \"\"\n\
         [paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\n\
         [network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp}\n\n\
         [network.submission]\nenabled = true\nport = {submission}\n\n\
         [network.reinject]\nport = {reinject}\n\n\
         [smtp]\nenabled = {smtpd}\nhostname = \"localhost\"\ndomains = \"example.test\"\n\n\
         # The internal mail server accepted mail goes to: e.g. `smtp-sink 127.0.0.1:{relay} 100`.\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {relay}\ntls = \"none\"\n\n\
         [filter]\nenabled = {filter}\nworkers = 1\n\n\
         [milter]\nenabled = {milter}\nport = {milter_port}\n\n\
         # mb-web: HTTPS (a self-signed certificate) and mb-web.sock in the run dir.\n\
         [network.https]\nlisten = \"127.0.0.1\"\nport = {https}\n",
        d = dir.display(),
        smtp = dev_port("SMTP", 2525),
        submission = dev_port("SUBMISSION", 2587),
        reinject = dev_port("REINJECT", 10025),
        relay = dev_port("RELAY", 2526),
        smtpd = built("mb-smtpd"),
        filter = built("mb-filter"),
        milter = built("mb-milter"),
        milter_port = dev_port("MILTER", 10032),
        https = dev_port("HTTPS", 8443),
    )
}

fn up(detach: bool, no_build: bool) -> Result<()> {
    if dev_dir().join("pids").exists() {
        bail!("a local gateway is already running; stop it with `cargo xtask down`");
    }
    if !no_build {
        run(cargo().args(["build", "--workspace", "--bins"]))?;
    }
    let dir = dev_dir();
    for sub in ["run", "spool", "data", "log"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let config = dir.join("mailborder.toml");
    fs::write(&config, dev_config(&dir))?;
    let bin = root().join("target/debug");
    let mut children: Vec<(String, Child)> = Vec::new();
    for daemon in DAEMONS {
        let exe = bin.join(daemon);
        if !exe.exists() {
            continue;
        }
        let mut instances = vec![(daemon.to_string(), Vec::new())];
        if *daemon == "mb-cluster" {
            instances = vec![(daemon.to_string(), vec!["daemon".to_string()])];
        }
        if *daemon == "mb-filter" {
            instances = vec![(
                "mb-filter@1".into(),
                vec!["--instance".to_string(), "1".into()],
            )];
        }
        for (name, extra) in instances {
            let log = fs::File::create(dir.join("log").join(format!("{name}.log")))?;
            let child = Command::new(&exe)
                .arg("--config")
                .arg(&config)
                .args(&extra)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {name}"))?;
            let socket = dir
                .join("run")
                .join(format!("{}.sock", name.replace('@', "-")));
            children.push((name.clone(), child));
            // Wait for each daemon to serve before starting the next (mb-rpcd first).
            if let Err(e) = wait_for(&socket, Duration::from_secs(20), &mut children) {
                let log = fs::read_to_string(dir.join("log").join(format!("{name}.log")))
                    .unwrap_or_default();
                for (_, c) in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("{e}\n{name}'s log:\n{log}");
            }
        }
    }
    let pids: Vec<String> = children
        .iter()
        .map(|(n, c)| format!("{} {n}", c.id()))
        .collect();
    fs::write(dir.join("pids"), pids.join("\n") + "\n")?;
    let names: Vec<&str> = children.iter().map(|(n, _)| n.as_str()).collect();
    println!("Mailborder is running locally: {}", names.join(", "));
    println!("  configuration  {}", config.display());
    println!("  sockets        {}/run", dir.display());
    println!(
        "  database       {}/data/mailborder.db (SQLite)",
        dir.display()
    );
    println!("  logs           {}/log", dir.display());
    // Absolute paths, so every command works as printed from any directory.
    println!(
        "  try            {} --config {}",
        bin.join("mb-status").display(),
        config.display()
    );
    println!(
        "                 {} --config {} show network.smtp",
        bin.join("mb-config").display(),
        config.display()
    );
    if names.contains(&"mb-smtpd") {
        println!(
            "  send mail      swaks --server 127.0.0.1:{} --to user@example.test",
            dev_port("SMTP", 2525)
        );
        println!(
            "  queue          {} --config {} list   (mail waits there until something listens on 127.0.0.1:{}, e.g. `smtp-sink 127.0.0.1:{} 100`; then `flush`)",
            bin.join("mb-queue").display(),
            config.display(),
            dev_port("RELAY", 2526),
            dev_port("RELAY", 2526),
        );
    }
    if names.contains(&"mb-web") {
        println!(
            "  web            https://127.0.0.1:{}/ (self-signed certificate), API under /api/v1/",
            dev_port("HTTPS", 8443)
        );
        match first_web_admin(&bin, &config) {
            Ok(Some(password)) => println!(
                "  web login      admin / {password}   (a TOTP secret is enrolled at the first login)"
            ),
            Ok(None) => println!(
                "  web login      admin (made by an earlier `up`; new password: {} --config {} account passwd admin)",
                bin.join("mb-web").display(),
                config.display()
            ),
            Err(e) => eprintln!("xtask: cannot create the first web account: {e:#}"),
        }
    }
    if detach {
        println!("Stop it with `cargo xtask down`.");
        return Ok(());
    }
    println!("Press Ctrl-C to stop.");
    let waited = wait_for_signal();
    stop_pids(&dir)?;
    for (_, mut c) in children {
        let _ = c.wait();
    }
    waited
}

/// Creates the web account `admin` through mb-web's socket (`mb-web account add`, as
/// the local administrator) with a random password, which it returns; `None` when the
/// account exists already.
fn first_web_admin(bin: &Path, config: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let mut random = [0u8; 18];
    fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";
    let password: String = random
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    let mut child = Command::new(bin.join("mb-web"))
        .arg("--config")
        .arg(config)
        .args(["account", "add", "admin", "--role", "admin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run mb-web account add")?;
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{password}")?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(Some(password));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("exists") {
        return Ok(None);
    }
    bail!("mb-web account add admin: {}", err.trim())
}

/// Blocks until SIGINT or SIGTERM arrives.
fn wait_for_signal() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    set.wait()?;
    Ok(())
}

/// Waits for a daemon's socket; fails at once if a started daemon exits.
fn wait_for(path: &Path, limit: Duration, children: &mut [(String, Child)]) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        for (name, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("{name} exited ({status})");
            }
        }
        if start.elapsed() > limit {
            bail!(
                "{} did not appear within {}s; see {}/log",
                path.display(),
                limit.as_secs(),
                dev_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn down() -> Result<()> {
    let dir = dev_dir();
    if !dir.join("pids").exists() {
        bail!("no local gateway is running (no {}/pids)", dir.display());
    }
    stop_pids(&dir)
}

/// SIGTERM to every daemon `up` started, in reverse order, waiting for each to exit.
fn stop_pids(dir: &Path) -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let text = fs::read_to_string(dir.join("pids"))?;
    for line in text.lines().rev() {
        let Some((pid, name)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        let pid = Pid::from_raw(pid);
        if kill(pid, Signal::SIGTERM).is_err() {
            continue;
        }
        let start = Instant::now();
        while kill(pid, None).is_ok() && start.elapsed() < Duration::from_secs(15) {
            // Our own children stay zombies until waited for; that counts as stopped.
            if fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("stopped {name}");
    }
    fs::remove_file(dir.join("pids"))?;
    Ok(())
}

/// Manual pages (section 8 for the daemons, 1 for the tools) and bash, zsh and fish
/// completions, each written by the program itself from its clap definition
/// (`mb_runtime::docs`), laid out under `share` where Debian's man and shells look.
fn write_docs(bin: &Path, share: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let programs = DAEMONS
        .iter()
        .map(|d| (d, "8"))
        .chain(TOOLS.iter().map(|t| (t, "1")));
    for (program, section) in programs {
        let exe = bin.join(program);
        if !exe.exists() {
            continue;
        }
        run(Command::new(&exe)
            .env("MB_WRITE_DOCS", tmp.path())
            .env("MB_WRITE_DOCS_SECTION", section))?;
    }
    let places = [
        ("man", "man"),
        ("completions/bash", "bash-completion/completions"),
        ("completions/zsh", "zsh/vendor-completions"),
        ("completions/fish", "fish/vendor_completions.d"),
    ];
    for (from, to) in places {
        copy_tree(&tmp.path().join(from), &share.join(to))?;
    }
    Ok(())
}

/// Copies the files of a directory tree, creating directories as needed.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn gen_config() -> Result<()> {
    let path = root().join("etc/mailborder/mailborder.toml");
    fs::create_dir_all(path.parent().unwrap_or(&path))?;
    fs::write(&path, mb_core::config::render_example())?;
    println!("wrote {}", path.display());
    Ok(())
}

fn install(destdir: &Path, prefix: &str, debug: bool, no_build: bool) -> Result<()> {
    let profile = if debug { "debug" } else { "release" };
    if !no_build {
        let mut build = cargo();
        build.args(["build", "--workspace", "--bins"]);
        if !debug {
            build.arg("--release");
        }
        run(&mut build)?;
    }
    let src = root();
    let bin = src.join("target").join(profile);
    let under = |p: &str| destdir.join(p.trim_start_matches('/'));
    let prefix = prefix.trim_end_matches('/');
    let sbin = under(&format!("{prefix}/sbin"));
    let bindir = under(&format!("{prefix}/bin"));
    let units = under(&format!("{prefix}/lib/systemd/system"));
    for d in [&sbin, &bindir, &units] {
        fs::create_dir_all(d)?;
    }
    let copy_exe = |from: &Path, to: &Path| -> Result<()> {
        fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    for d in DAEMONS {
        if bin.join(d).exists() {
            copy_exe(&bin.join(d), &sbin.join(d))?;
        }
    }
    for t in TOOLS {
        copy_exe(&bin.join(t), &bindir.join(t))?;
    }
    write_docs(&bin, &under(&format!("{prefix}/share")))?;
    for entry in fs::read_dir(src.join("systemd"))? {
        let entry = entry?;
        let text =
            fs::read_to_string(entry.path())?.replace("/usr/sbin/", &format!("{prefix}/sbin/"));
        fs::write(units.join(entry.file_name()), text)?;
    }
    let files = [
        (
            "etc/mailborder/mailborder.toml",
            "/etc/mailborder/mailborder.toml".to_string(),
        ),
        (
            "etc/fail2ban/filter.d/mailborder-auth.conf",
            "/etc/fail2ban/filter.d/mailborder-auth.conf".into(),
        ),
        (
            "etc/fail2ban/filter.d/mailborder-web.conf",
            "/etc/fail2ban/filter.d/mailborder-web.conf".into(),
        ),
        (
            "etc/fail2ban/jail.d/mailborder.conf",
            "/etc/fail2ban/jail.d/mailborder.conf".into(),
        ),
        (
            "etc/sysusers.d/mailborder.conf",
            format!("{prefix}/lib/sysusers.d/mailborder.conf"),
        ),
        (
            "etc/tmpfiles.d/mailborder.conf",
            format!("{prefix}/lib/tmpfiles.d/mailborder.conf"),
        ),
        (
            "etc/nginx/mailborder.conf",
            format!("{prefix}/share/doc/mailborder/examples/nginx-mailborder.conf"),
        ),
        (
            "README.md",
            format!("{prefix}/share/doc/mailborder/README.md"),
        ),
        (
            "ARCHITECTURE.md",
            format!("{prefix}/share/doc/mailborder/ARCHITECTURE.md"),
        ),
    ];
    let mut out = std::io::stdout().lock();
    for (from, to) in files {
        let admin_file = to.starts_with("/etc/");
        let to = under(&to);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        let new = fs::read(src.join(from)).with_context(|| format!("cannot read {from}"))?;
        // A file under /etc belongs to the administrator once it exists: an upgrade never
        // overwrites it (as dpkg treats conffiles); the new version goes beside it.
        if admin_file && to.exists() {
            if fs::read(&to).is_ok_and(|old| old == new) {
                continue;
            }
            let mut beside = to.clone().into_os_string();
            beside.push(".new");
            fs::write(&beside, &new).with_context(|| format!("cannot write {}", to.display()))?;
            writeln!(
                out,
                "kept {} as it is; the new version is {} (compare them with diff)",
                to.display(),
                PathBuf::from(&beside).display()
            )?;
            continue;
        }
        fs::write(&to, &new).with_context(|| format!("cannot copy {from}"))?;
        if from == "etc/mailborder/mailborder.toml" {
            protect_config(&to, &mut out)?;
        }
    }
    writeln!(out, "installed into {}", destdir.display())?;
    Ok(())
}

/// mailborder.toml may hold passwords (database.url, ldap.bind_password,
/// relay.auth.password, redis.url): 0640, group mailborder so the daemons read it. Before
/// the group exists (systemd-sysusers runs after the install) or without root, say what
/// to run instead.
fn protect_config(path: &Path, out: &mut impl Write) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o640))?;
    let group = nix::unistd::Group::from_name("mailborder").ok().flatten();
    let chowned = match group {
        Some(g) if nix::unistd::geteuid().is_root() => {
            nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(g.gid)).is_ok()
        }
        _ => false,
    };
    if !chowned {
        writeln!(
            out,
            "{} is mode 0640: once the mailborder group exists, run `chgrp mailborder {}` so the daemons can read it",
            path.display(),
            path.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_root_missing_peers_stop_the_run_with_the_install_command() {
        let empty = tempfile::tempdir().unwrap();
        let missing = missing_packages(empty.path());
        assert_eq!(missing.len(), TEST_PACKAGES.len());
        let err = refuse_unless_root(&missing, false).unwrap_err().to_string();
        assert!(
            err.contains("postfix") && err.contains("clamav-daemon"),
            "{err}"
        );
        assert!(err.contains("sudo cargo xtask test"), "{err}");
        assert!(refuse_unless_root(&missing, true).is_ok());
        // This machine has them all (the suite would not run otherwise).
        assert_eq!(missing_packages(Path::new("/")), Vec::<&str>::new());
    }

    #[test]
    fn peer_services_belong_to_packages_the_tests_install() {
        for (pkg, _) in PEER_SERVICES {
            assert!(TEST_PACKAGES.iter().any(|(p, _)| p == pkg), "{pkg}");
        }
    }
}
