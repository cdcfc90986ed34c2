//! `cargo xtask bench`: one table from one run on this machine. The same smtp-source load
//! goes into smtp-sink directly (the ceiling), through a private Postfix instance (queue
//! on disk), through mb-smtpd relaying (fsync before 250), receiving only (delivery
//! switched off), filtering with two mb-filter workers, and through Postfix with
//! mb-milter; then mb-smtpd holds idle sessions (idle.rs), mb-smtpd and Postfix are
//! attacked (attack.rs) and mb-web's API latency is taken (api_bench.rs). Each row gets
//! accepted and end-to-end rates, its ratio to its reference, CPU per message and peak
//! memory; below the table, one line per goal of the performance issue says whether the
//! run met it. A harness, not a test: nothing here asserts a time.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mb_testkit::{Postfix, Proc, free_port, require, wait_until};

pub struct Load {
    pub messages: u32,
    pub sessions: u32,
    pub size: u32,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    name: String,
    accept_secs: f64,
    /// Until the last message reached smtp-sink; None when delivery was switched off.
    total_secs: Option<f64>,
    cpu_secs: Option<f64>,
    peak_rss_kib: Option<u64>,
}

/// The idle sessions issue 18's goal is about (the full bench holds this many unless
/// told otherwise).
pub const IDLE_SESSIONS: u32 = 10_000;

/// Clock ticks per second for /proc/PID/stat times (sysconf(_SC_CLK_TCK), 100 on Linux).
const TICKS: f64 = 100.0;

fn proc_stat(pid: i32) -> Option<(i32, u64, u64)> {
    // (ppid, own cpu ticks, reaped children's cpu ticks)
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((f.get(1)?.parse().ok()?, n(11) + n(12), n(13) + n(14)))
}

/// Proportional set size: shared pages (libraries, Postfix's many processes) counted
/// once across the processes that share them, so a family's sum is fair.
fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A process and its direct children (Postfix's master and its services).
fn family(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.filter_map(Result::ok) {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
                && proc_stat(pid).is_some_and(|(ppid, ..)| ppid == root)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// CPU seconds used so far by a process family: the live processes and the reaped ones.
pub(crate) fn cpu_secs(root: i32) -> f64 {
    let mut ticks = proc_stat(root).map_or(0, |(_, own, reaped)| own + reaped);
    for pid in family(root).into_iter().skip(1) {
        ticks += proc_stat(pid).map_or(0, |(_, own, _)| own);
    }
    ticks as f64 / TICKS
}

/// Messages incoming or deferred in mb-smtpd's spool under `spool`, read without
/// changing it (a spool that cannot be read counts as empty).
pub(crate) fn queued(spool: &Path) -> usize {
    mb_spool::snapshot(spool).map_or(0, |s| {
        s.messages
            .iter()
            .filter(|m| m.state.queue != mb_spool::Queue::Hold)
            .count()
    })
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

pub(crate) fn sink() -> Result<(u16, Proc)> {
    let program = require("smtp-sink", "postfix");
    let port = free_port();
    let mut cmd = Command::new(program);
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["-u", "nobody"]);
    }
    let child = cmd
        .arg(format!("127.0.0.1:{port}"))
        .arg("1000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_until("smtp-sink", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok((
        port,
        Proc {
            child,
            name: "smtp-sink".into(),
        },
    ))
}

fn source(load: &Load, port: u16) -> Result<f64> {
    let program = require("smtp-source", "postfix");
    let started = Instant::now();
    let out = Command::new(program)
        .args([
            "-s",
            &load.sessions.to_string(),
            "-m",
            &load.messages.to_string(),
            "-l",
            &load.size.to_string(),
            "-f",
            "load@bench.test",
            "-t",
            "rcpt@served.test",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .output()?;
    if !out.status.success() {
        bail!(
            "smtp-source failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Memory of the families of `roots`.
pub(crate) fn pss(roots: &[i32]) -> u64 {
    roots.iter().flat_map(|r| family(*r)).map(rss_kib).sum()
}

/// Waits until `pending()` is 0, sampling memory of the families of `roots`.
fn drain(
    started: Instant,
    roots: &[i32],
    peak: &mut u64,
    mut pending: impl FnMut() -> usize,
) -> Result<f64> {
    let limit = Duration::from_secs(1800);
    loop {
        let rss = pss(roots);
        *peak = (*peak).max(rss);
        if pending() == 0 {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > limit {
            bail!("the queue did not drain in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `source` while sampling memory in another thread.
fn source_sampling(load: &Load, port: u16, roots: &[i32], peak: &mut u64) -> Result<f64> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let roots = roots.to_vec();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(pss(&roots));
                std::thread::sleep(Duration::from_millis(100));
            }
            max
        })
    };
    let r = source(load, port);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    *peak = (*peak).max(sampler.join().unwrap_or(0));
    r
}

fn ceiling(load: &Load) -> Result<Outcome> {
    let (port, _sink) = sink()?;
    let secs = source(load, port)?;
    Ok(Outcome {
        name: "smtp-source -> smtp-sink".into(),
        accept_secs: secs,
        total_secs: Some(secs),
        ..Default::default()
    })
}

fn through_postfix(load: &Load) -> Result<Outcome> {
    let (sink_port, _sink) = sink()?;
    let pf = Postfix::start(&format!("[127.0.0.1]:{sink_port}"), "")?;
    postfix_run(load, &pf, &[], "via Postfix (queue on disk)")
}

/// Postfix with mb-milter in smtpd_milters, mb-milter asking two mb-filter workers (the
/// same checks as the filtered mb-smtpd run).
fn through_postfix_milter(load: &Load, bin: &Path) -> Result<Outcome> {
    through_postfix_milter_split(load, bin, MilterLink::Inet).map(|(r, _)| r)
}

/// Postfix with the bench's null milter (null_milter.rs) in smtpd_milters: the floor of
/// the milter row, what Postfix's own milter machinery costs whatever the milter does.
/// The CPU figure is the Postfix family's alone (the null milter runs in this process).
fn through_postfix_null_milter(load: &Load) -> Result<Outcome> {
    let (sink_port, _sink) = sink()?;
    let null = crate::null_milter::NullMilter::start()?;
    let pf = Postfix::start(
        &format!("[127.0.0.1]:{sink_port}"),
        &format!(
            "smtpd_milters = inet:127.0.0.1:{}\nmilter_default_action = tempfail\n",
            null.port
        ),
    )?;
    let r = postfix_run(load, &pf, &[], "via Postfix + null milter")?;
    let answered = null.messages.load(std::sync::atomic::Ordering::Relaxed);
    if answered < u64::from(load.messages) {
        bail!(
            "the null milter answered {answered} of {} messages:\n{}",
            load.messages,
            pf.log()
        );
    }
    Ok(r)
}

/// How Postfix reaches mb-milter.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MilterLink {
    /// `smtpd_milters = inet:127.0.0.1:PORT` (`milter.port`).
    Inet,
    /// `smtpd_milters = unix:PATH` (`milter.socket`, for group postfix).
    Unix,
}

/// The milter run, and its CPU seconds split between Postfix, mb-milter and the workers.
fn through_postfix_milter_split(
    load: &Load,
    bin: &Path,
    link: MilterLink,
) -> Result<(Outcome, [f64; 3])> {
    let (sink_port, _sink) = sink()?;
    let gw = BenchGateway::start(bin, sink_port, Mode::Filtered)?;
    let milter_port = free_port();
    let d = gw.dir.path();
    // Postfix's smtpd (user postfix) must reach the socket inside.
    fs::set_permissions(d, fs::Permissions::from_mode(0o711))?;
    let socket = d.join("milter/milter.sock");
    fs::write(
        d.join("milter.toml"),
        format!(
            "{}\n[milter]\nenabled = true\nport = {milter_port}\n{}",
            gw.config_text,
            if link == MilterLink::Unix {
                format!(
                    "socket = {:?}\nsocket_group = \"postfix\"\n",
                    socket.display().to_string()
                )
            } else {
                String::new()
            }
        ),
    )?;
    let log = fs::File::create(d.join("milter.log"))?;
    let child = Command::new(bin.with_file_name("mb-milter"))
        .arg("--config")
        .arg(d.join("milter.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let milter = Proc {
        child,
        name: "mb-milter".into(),
    };
    wait_until("mb-milter", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", milter_port)).is_ok()
            && (link == MilterLink::Inet
                || std::os::unix::net::UnixStream::connect(&socket).is_ok())
    })?;
    let milters = match link {
        MilterLink::Inet => format!("inet:127.0.0.1:{milter_port}"),
        MilterLink::Unix => format!("unix:{}", socket.display()),
    };
    let pf = Postfix::start(
        &format!("[127.0.0.1]:{sink_port}"),
        &format!("smtpd_milters = {milters}\nmilter_default_action = tempfail\n"),
    )?;
    let mut extra = vec![milter.pid()];
    extra.extend(gw.workers.iter().map(Proc::pid));
    let master = pf.master_pid().context("no postfix master pid")?;
    let workers_cpu = || gw.workers.iter().map(|w| cpu_secs(w.pid())).sum::<f64>();
    let before = [cpu_secs(master), cpu_secs(milter.pid()), workers_cpu()];
    let r = postfix_run(load, &pf, &extra, "via Postfix + mb-milter + 2 workers")?;
    let split = [
        cpu_secs(master) - before[0],
        cpu_secs(milter.pid()) - before[1],
        workers_cpu() - before[2],
    ];
    let refused = fs::read_to_string(pf.dir.path().join("postfix.log"))
        .unwrap_or_default()
        .matches("milter-reject")
        .count();
    if refused > 0 {
        bail!("the milter refused {refused} benchmark messages");
    }
    Ok((r, split))
}

fn postfix_run(load: &Load, pf: &Postfix, extra: &[i32], name: &str) -> Result<Outcome> {
    let master = pf.master_pid().context("no postfix master pid")?;
    let mut roots = vec![master];
    roots.extend_from_slice(extra);
    let cpu = |pids: &[i32]| pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let cpu0 = cpu(&roots);
    let mut peak = 0;
    let started = Instant::now();
    let accept = source_sampling(load, pf.port, &roots, &mut peak)?;
    let queue = pf.dir.path().join("queue");
    let total = drain(started, &roots, &mut peak, || {
        ["maildrop", "incoming", "active", "deferred"]
            .iter()
            .map(|q| count_files(&queue.join(q)))
            .sum()
    })?;
    let deferred = count_files(&queue.join("deferred"));
    if deferred > 0 {
        bail!("postfix deferred {deferred} messages:\n{}", pf.log());
    }
    Ok(Outcome {
        name: name.into(),
        accept_secs: accept,
        total_secs: Some(total),
        cpu_secs: Some(cpu(&roots) - cpu0),
        peak_rss_kib: Some(peak),
    })
}

/// The policies a filtered run evaluates for every message: twenty that match nothing
/// the load sends, as a site's list of partners and blocked senders would.
fn bench_policies() -> String {
    let items: Vec<String> = (1..=20)
        .map(|i| {
            let (object, pattern, action) = match i % 4 {
                0 => ("address", format!("*@partner{i}.test"), "allow"),
                1 => ("domain", format!("blocked{i}.test"), "block"),
                2 => ("network", format!("198.51.100.{i}/32"), "block"),
                _ => ("domain", format!("*.strict{i}.test"), "allow"),
            };
            format!(
                "{{\"id\":{i},\"name\":\"p{i}\",\"priority\":{},\"object\":\"{object}\",\"pattern\":\"{pattern}\",\
                 \"direction\":\"from\",\"action\":\"{action}\",\"tag\":null,\"quarantine\":null,\"reject\":null}}",
                10 + i
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// How a bench mb-smtpd runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Accept, fsync, relay to smtp-sink: no filtering.
    Relay,
    /// As `Relay` with `queue.delivery_enabled = false`: accepted mail stays queued.
    ReceiveOnly,
    /// Two mb-filter workers check every message (SPF, DKIM, DMARC with the local DNS
    /// server, MIME and attachments, policies; no scanner configured).
    Filtered,
}

/// A bench gateway's directory, configuration and (when filtering) its two workers and
/// DNS server.
struct BenchGateway {
    dir: tempfile::TempDir,
    config: PathBuf,
    config_text: String,
    port: u16,
    workers: Vec<Proc>,
    _dns: Option<mb_testkit::Dnsmasq>,
}

impl BenchGateway {
    fn start(bin: &Path, sink_port: u16, mode: Mode) -> Result<BenchGateway> {
        let filter = mode == Mode::Filtered;
        let dir = tempfile::Builder::new().prefix("mb-bench-").tempdir()?;
        let d = dir.path();
        let port = free_port();
        let config = d.join("mailborder.toml");
        // Filtering checks the sender for real: SPF, DMARC and iprev answered by a local
        // DNS server (the load comes from 127.0.0.1, not in mynetworks: inbound mail).
        let dns = if filter {
            Some(mb_testkit::Dnsmasq::start(&[
                "--auth-server=ns.test,127.0.0.1".into(),
                "--auth-zone=test".into(),
                "--txt-record=bench.test,v=spf1 ip4:127.0.0.1 -all".into(),
                "--txt-record=_dmarc.bench.test,v=DMARC1; p=none".into(),
                "--ptr-record=1.0.0.127.in-addr.arpa,mail.bench.test".into(),
                "--host-record=mail.bench.test,127.0.0.1".into(),
            ])?)
        } else {
            None
        };
        let filter_keys = match &dns {
            Some(dns) => format!(
                "port = {}\n[network.dns]\nservers = \"{}\"\n",
                free_port(),
                dns.servers()
            ),
            None => String::new(),
        };
        if filter {
            let cache = d.join("data/cache");
            fs::create_dir_all(&cache)?;
            for name in ["policies-1.json", "policies-2.json", "policies-milter.json"] {
                fs::write(cache.join(name), bench_policies())?;
            }
        }
        // No mb-rpcd in the bench: the daemons start on the file without waiting for it.
        let config_text = format!(
            "process.user = \"\"\nprocess.config_wait = \"0s\"\n\
             [paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\
             [log]\nlevel = \"warn\"\n\
             [network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nmax_connections = 1000\nmax_per_source = 1000\n\
             connection_rate = 100000\nrate_per_source = 100000\n\
             [network.smtp.tls]\ninbound = \"none\"\n\
             [network.reinject]\nport = {}\n\
             [network.protection]\nmode = \"public\"\n\
             [smtp]\nhostname = \"mb.bench.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"none\"\n\
             [filter]\nenabled = {filter}\nworkers = 2\n{filter_keys}\
             [queue]\ndelivery_enabled = {}\n",
            free_port(),
            mode != Mode::ReceiveOnly,
            d = d.display()
        );
        fs::write(&config, &config_text)?;
        // Two workers, started first (their users find their sockets).
        let mut workers = Vec::new();
        if filter {
            for n in 1..=2 {
                let log = fs::File::create(d.join(format!("filter-{n}.log")))?;
                let child = Command::new(bin.with_file_name("mb-filter"))
                    .arg("--config")
                    .arg(&config)
                    .args(["--instance", &n.to_string()])
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?;
                workers.push(Proc {
                    child,
                    name: format!("mb-filter@{n}"),
                });
                let socket = d.join(format!("run/mb-filter-{n}.sock"));
                wait_until("mb-filter", Duration::from_secs(30), || socket.exists())?;
            }
        }
        Ok(BenchGateway {
            dir,
            config,
            config_text,
            port,
            workers,
            _dns: dns,
        })
    }
}

impl BenchGateway {
    /// Starts mb-smtpd on this gateway's configuration, its output into `log` (a file
    /// name in the gateway's directory).
    fn smtpd(&self, bin: &Path, log: &str) -> Result<Proc> {
        let log = fs::File::create(self.dir.path().join(log))?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Proc {
            child,
            name: "mb-smtpd".into(),
        })
    }
}

fn through_mailborder(load: &Load, bin: &Path, mode: Mode) -> Result<Outcome> {
    let (sink_port, _sink) = sink()?;
    let gw = BenchGateway::start(bin, sink_port, mode)?;
    let (d, port, workers) = (gw.dir.path(), gw.port, &gw.workers);
    let smtpd = gw.smtpd(bin, "smtpd.log")?;
    let socket = d.join("run/mb-smtpd.sock");
    wait_until("mb-smtpd", Duration::from_secs(30), || socket.exists())
        .with_context(|| fs::read_to_string(d.join("smtpd.log")).unwrap_or_default())?;
    let mut pids = vec![smtpd.pid()];
    pids.extend(workers.iter().map(Proc::pid));
    let cpu = |pids: &[i32]| pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let cpu0 = cpu(&pids);
    let mut peak = 0;
    let started = Instant::now();
    let accept = source_sampling(load, port, &pids, &mut peak)?;
    // With delivery off nothing leaves the queue: the run ends with the last 250.
    let total = if mode == Mode::ReceiveOnly {
        None
    } else {
        let spool = d.join("spool");
        Some(drain(started, &pids, &mut peak, || queued(&spool))?)
    };
    let refused = fs::read_to_string(d.join("smtpd.log"))
        .unwrap_or_default()
        .matches("refused by the filter")
        .count();
    if refused > 0 {
        bail!("the filter refused {refused} benchmark messages");
    }
    Ok(Outcome {
        name: match mode {
            Mode::Relay => "via mb-smtpd (fsync before 250)".into(),
            Mode::ReceiveOnly => "via mb-smtpd, delivery off".into(),
            Mode::Filtered => "via mb-smtpd + 2 mb-filter workers".into(),
        },
        accept_secs: accept,
        total_secs: total,
        cpu_secs: Some(cpu(&pids) - cpu0),
        peak_rss_kib: Some(peak),
    })
}

/// Messages the recovery row queues before it restarts mb-smtpd.
pub const RECOVERY_MESSAGES: u32 = 100_000;

/// The recovery row's figures.
#[derive(Debug, Clone, Default, PartialEq)]
struct RecoveryFigures {
    /// Messages in the queue when mb-smtpd was stopped, and after its restart.
    queued: usize,
    recovered: usize,
    /// Bytes under the spool directory.
    spool_bytes: u64,
    /// From the restarted process's start until its SMTP greeting.
    ready_secs: f64,
    /// The spool's own figure, from the "spool opened" line of the restart's log.
    spool_ms: Option<u64>,
    /// Whether the page cache was dropped before the restart (as root).
    cold: bool,
}

/// The recovery row: mb-smtpd with delivery off takes `messages` messages, is stopped
/// (SIGTERM), the page cache is dropped (when root), and it is started again: the time
/// until it greets on its SMTP port, and whether every message is back in its queue.
fn recovery(load: &Load, bin: &Path, messages: u32) -> Result<RecoveryFigures> {
    let (sink_port, _sink) = sink()?;
    let gw = BenchGateway::start(bin, sink_port, Mode::ReceiveOnly)?;
    let (d, port) = (gw.dir.path(), gw.port);
    let spool = d.join("spool");
    let mut smtpd = gw.smtpd(bin, "smtpd.log")?;
    wait_until("mb-smtpd", Duration::from_secs(30), || {
        greets(port, Duration::from_millis(500))
    })
    .with_context(|| fs::read_to_string(d.join("smtpd.log")).unwrap_or_default())?;
    let fill = Load {
        messages,
        sessions: load.sessions,
        size: load.size,
    };
    source(&fill, port)?;
    if smtpd.stop(Duration::from_secs(120)) != Some(0) {
        bail!(
            "mb-smtpd did not stop cleanly: {}",
            fs::read_to_string(d.join("smtpd.log")).unwrap_or_default()
        );
    }
    let queued = queued(&spool);
    let spool_bytes = dir_bytes(&spool);
    // The restart logs at info level: its "spool opened" line has the spool's own time.
    fs::write(
        &gw.config,
        gw.config_text
            .replace("level = \"warn\"", "level = \"info\""),
    )?;
    nix::unistd::sync();
    let cold = fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok();
    let started = Instant::now();
    let restarted = gw.smtpd(bin, "smtpd-restart.log")?;
    let limit = Duration::from_secs(600);
    while !greets(port, Duration::from_millis(500)) {
        if started.elapsed() > limit {
            bail!("mb-smtpd did not greet within {limit:?} of its restart");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready_secs = started.elapsed().as_secs_f64();
    let log = fs::read_to_string(d.join("smtpd-restart.log")).unwrap_or_default();
    let recovered = self::queued(&spool);
    drop(restarted);
    if recovered != queued || queued < messages as usize {
        bail!("{messages} messages sent, {queued} queued before the restart, {recovered} after it");
    }
    Ok(RecoveryFigures {
        queued,
        recovered,
        spool_bytes,
        ready_secs,
        spool_ms: spool_opened_ms(&log),
        cold,
    })
}

/// Whether an SMTP server on 127.0.0.1:`port` sends its 220 greeting within `wait`.
fn greets(port: u16, wait: Duration) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(wait));
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).is_ok() && &buf == b"220"
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `elapsed_ms` of mb-smtpd's "spool opened" log line.
fn spool_opened_ms(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("spool opened"))?;
    let rest = &line[line.find("elapsed_ms=")? + "elapsed_ms=".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The recovery row's text.
fn recovery_text(r: &RecoveryFigures) -> String {
    format!(
        "greets {:.2}s after its start ({}spool recovery {}), {} of {} messages back, spool {:.0} MiB",
        r.ready_secs,
        if r.cold { "cold cache; " } else { "" },
        r.spool_ms.map_or("-".into(), |ms| format!("{ms} ms")),
        r.recovered,
        r.queued,
        r.spool_bytes as f64 / (1024.0 * 1024.0)
    )
}

/// A step of the full bench: one row of its table (two for the attack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Ceiling,
    Postfix,
    Relay,
    Receive,
    Filtered,
    Milter,
    Idle,
    Attack,
    Recovery,
    Api,
}

impl Step {
    /// Every step, in the order the full bench runs them.
    const ALL: [Step; 10] = [
        Step::Ceiling,
        Step::Postfix,
        Step::Relay,
        Step::Receive,
        Step::Filtered,
        Step::Milter,
        Step::Idle,
        Step::Attack,
        Step::Recovery,
        Step::Api,
    ];

    /// The name `--only` takes.
    fn name(self) -> &'static str {
        match self {
            Step::Ceiling => "ceiling",
            Step::Postfix => "postfix",
            Step::Relay => "relay",
            Step::Receive => "receive",
            Step::Filtered => "filtered",
            Step::Milter => "milter",
            Step::Idle => "idle",
            Step::Attack => "attack",
            Step::Recovery => "recovery",
            Step::Api => "api",
        }
    }

    /// The steps `--only` names (every step when it names none), in the bench's order.
    pub fn parse_list(only: &[String]) -> Result<Vec<Step>> {
        let mut chosen = Vec::new();
        for name in only.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let Some(step) = Step::ALL.iter().find(|s| s.name() == name) else {
                let names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
                bail!(
                    "--only: no step {name:?}; the steps are {}",
                    names.join(",")
                );
            };
            chosen.push(*step);
        }
        Ok(Step::ALL
            .into_iter()
            .filter(|s| chosen.is_empty() || chosen.contains(s))
            .collect())
    }
}

/// What the full bench runs beyond the smtp-source load.
pub struct Options {
    pub steps: Vec<Step>,
    /// Idle sessions held by the idle row.
    pub idle_sessions: u32,
    /// Seconds of each measuring window of the idle and attack rows.
    pub seconds: u64,
    /// Messages queued before the recovery row's restart.
    pub recovery_messages: u32,
}

/// The idle row's figures.
#[derive(Debug, Clone, Default, PartialEq)]
struct IdleFigures {
    sessions: u32,
    /// Sessions still open at the end of the sender's run with them.
    held: u32,
    with_idle: f64,
    /// The sender's rate without them (mean of before and after).
    alone: f64,
    cpu_ms: f64,
    /// Peak PSS in KiB while mail flowed with the idle sessions, and quiet with them.
    peak_kib: u64,
    quiet_kib: u64,
}

impl From<&crate::idle::IdleRun> for IdleFigures {
    fn from(r: &crate::idle::IdleRun) -> Self {
        IdleFigures {
            sessions: r.sessions,
            held: r.held,
            with_idle: r.with_idle,
            alone: r.alone,
            cpu_ms: r.idle.cpu_ms,
            peak_kib: r.peak_idle,
            quiet_kib: r.pss_n,
        }
    }
}

/// An attack row's figures.
#[derive(Debug, Clone, Default, PartialEq)]
struct AttackFigures {
    name: String,
    attacked: f64,
    ratio: f64,
    /// The target's CPU per legitimate message under attack.
    cpu_ms: Option<f64>,
    peak_mib: f64,
}

/// Everything one full run measured; a step that was not run or failed is None.
#[derive(Debug, Default)]
struct Results {
    messages: u32,
    ceiling: Option<Outcome>,
    postfix: Option<Outcome>,
    relay: Option<Outcome>,
    receive: Option<Outcome>,
    filtered: Option<Outcome>,
    milter: Option<Outcome>,
    /// Postfix with the null milter (null_milter.rs).
    milter_floor: Option<Outcome>,
    /// Postfix alone, run again just before and just after the milter rows: their
    /// reference, so that the machine's drift between the Postfix row and the milter
    /// step (minutes apart, other rows in between) does not enter their ratio.
    milter_alone: Vec<Outcome>,
    idle: Option<IdleFigures>,
    attack: Vec<AttackFigures>,
    recovery: Option<RecoveryFigures>,
    /// The API row's text: p50/p99 of a few requests.
    api: Option<String>,
}

/// One printed row; a figure that does not apply or was not measured prints "-".
#[derive(Debug, Default, PartialEq)]
struct Line {
    name: String,
    accepted: Option<f64>,
    end_to_end: Option<f64>,
    ratio: Option<String>,
    cpu_ms: Option<f64>,
    peak_mib: Option<f64>,
    /// Replaces the figures (the API row measures latency, not messages).
    text: Option<String>,
}

/// `a / b`, when both are finite and `b` is positive.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

impl Outcome {
    fn accepted(&self, n: f64) -> Option<f64> {
        ratio(n, self.accept_secs)
    }

    fn end_to_end(&self, n: f64) -> Option<f64> {
        self.total_secs.and_then(|t| ratio(n, t))
    }

    fn cpu_ms(&self, n: f64) -> Option<f64> {
        self.cpu_secs.and_then(|c| ratio(c * 1000.0, n))
    }

    fn line(&self, name: &str, n: f64, ratio: Option<String>) -> Line {
        Line {
            name: name.into(),
            accepted: self.accepted(n),
            end_to_end: self.end_to_end(n),
            ratio,
            cpu_ms: self.cpu_ms(n),
            peak_mib: self.peak_rss_kib.map(|k| k as f64 / 1024.0),
            text: None,
        }
    }
}

impl Results {
    fn n(&self) -> f64 {
        f64::from(self.messages)
    }

    /// End-to-end rate of `row` over Postfix's.
    fn e2e_vs_postfix(&self, row: Option<&Outcome>) -> Option<f64> {
        let n = self.n();
        ratio(row?.end_to_end(n)?, self.postfix.as_ref()?.end_to_end(n)?)
    }

    /// A milter row's end-to-end rate over Postfix alone's: the mean of the runs beside
    /// the milter rows, or the Postfix row's when the step did not run them.
    fn milter_vs_alone(&self, row: Option<&Outcome>) -> Option<f64> {
        let n = self.n();
        let rates: Vec<f64> = self
            .milter_alone
            .iter()
            .filter_map(|r| r.end_to_end(n))
            .collect();
        if rates.is_empty() {
            return self.e2e_vs_postfix(row);
        }
        ratio(
            row?.end_to_end(n)?,
            rates.iter().sum::<f64>() / rates.len() as f64,
        )
    }

    /// Receive-only's accepted rate over Postfix's accepted rate, and over the ceiling.
    fn receive_vs_postfix(&self) -> Option<f64> {
        let n = self.n();
        ratio(
            self.receive.as_ref()?.accepted(n)?,
            self.postfix.as_ref()?.accepted(n)?,
        )
    }

    fn receive_vs_ceiling(&self) -> Option<f64> {
        let n = self.n();
        ratio(
            self.receive.as_ref()?.accepted(n)?,
            self.ceiling.as_ref()?.end_to_end(n)?,
        )
    }

    /// The relay's CPU per message over Postfix's.
    fn cpu_vs_postfix(&self) -> Option<f64> {
        let n = self.n();
        ratio(
            self.relay.as_ref()?.cpu_ms(n)?,
            self.postfix.as_ref()?.cpu_ms(n)?,
        )
    }

    /// The table's rows, in the bench's order.
    fn lines(&self) -> Vec<Line> {
        let n = self.n();
        let x = |v: Option<f64>, against: &str| v.map(|v| format!("{v:.2}x {against}"));
        let mut out = Vec::new();
        if let Some(r) = &self.ceiling {
            out.push(r.line("ceiling: smtp-source -> smtp-sink", n, None));
        }
        if let Some(r) = &self.postfix {
            out.push(r.line("Postfix (queue on disk)", n, Some("reference".into())));
        }
        if let Some(r) = &self.relay {
            let v = self.e2e_vs_postfix(Some(r));
            out.push(r.line("mb-smtpd relay (fsync before 250)", n, x(v, "Postfix")));
        }
        if let Some(r) = &self.receive {
            let mut text = x(self.receive_vs_postfix(), "Postfix acc.");
            if let Some(c) = self.receive_vs_ceiling() {
                let pct = format!("{:.0}% ceiling", c * 100.0);
                text = Some(text.map_or(pct.clone(), |t| format!("{t}, {pct}")));
            }
            out.push(r.line("mb-smtpd receive-only (delivery off)", n, text));
        }
        if let Some(r) = &self.filtered {
            let v = self.e2e_vs_postfix(Some(r));
            out.push(r.line("mb-smtpd filtered (2 workers)", n, x(v, "Postfix")));
        }
        if let Some(r) = &self.milter {
            let v = self.milter_vs_alone(Some(r));
            out.push(r.line("Postfix + mb-milter (2 workers)", n, x(v, "Postfix alone")));
        }
        if let Some(r) = &self.milter_floor {
            let v = self.milter_vs_alone(Some(r));
            out.push(r.line("Postfix + null milter (floor)", n, x(v, "Postfix alone")));
        }
        if let Some(i) = &self.idle {
            out.push(Line {
                name: format!("mb-smtpd, {} idle sessions", thousands(i.sessions)),
                accepted: Some(i.with_idle),
                ratio: x(ratio(i.with_idle, i.alone), "alone"),
                cpu_ms: i.cpu_ms.is_finite().then_some(i.cpu_ms),
                peak_mib: Some(i.peak_kib.max(i.quiet_kib) as f64 / 1024.0),
                ..Default::default()
            });
        }
        for a in &self.attack {
            out.push(Line {
                name: format!("{} under attack", a.name),
                accepted: Some(a.attacked),
                ratio: x(a.ratio.is_finite().then_some(a.ratio), "alone"),
                cpu_ms: a.cpu_ms,
                peak_mib: Some(a.peak_mib),
                ..Default::default()
            });
        }
        if let Some(r) = &self.recovery {
            out.push(Line {
                name: format!("mb-smtpd restart, {} queued", thousands(r.queued as u32)),
                text: Some(recovery_text(r)),
                ..Default::default()
            });
        }
        if let Some(api) = &self.api {
            out.push(Line {
                name: "mb-web API (p50/p99 ms, HTTPS)".into(),
                text: Some(api.clone()),
                ..Default::default()
            });
        }
        out
    }

    /// Issue 18's goals, each with its figure and whether this run met it.
    fn goals(&self) -> Vec<Goal> {
        let relay = self.e2e_vs_postfix(self.relay.as_ref());
        let filtered = self.e2e_vs_postfix(self.filtered.as_ref());
        let milter = self.milter_vs_alone(self.milter.as_ref());
        let mut milter_goal = Goal::at_least(
            "Postfix + mb-milter >= 0.8x Postfix alone",
            milter,
            0.8,
            Unit::Times,
        );
        // What any milter could reach here: the ratio with one that does nothing.
        if let (Some(figure), Some(floor)) = (
            milter_goal.figure.as_mut(),
            self.milter_vs_alone(self.milter_floor.as_ref()),
        ) {
            figure.push_str(&format!(" (with a null milter {floor:.2}x)"));
        }
        let mut out = vec![
            Goal::at_least("relay end to end >= 5x Postfix", relay, 5.0, Unit::Times),
            Goal::at_most(
                "CPU per message <= 1/10 of Postfix's",
                self.cpu_vs_postfix(),
                0.1,
                Unit::Times,
            ),
            Goal::at_least(
                "receive-only >= 50% of the ceiling",
                self.receive_vs_ceiling(),
                0.5,
                Unit::Percent,
            ),
            Goal::at_least(
                "filtered end to end >= 3x Postfix plain relay",
                filtered,
                3.0,
                Unit::Times,
            ),
            milter_goal,
        ];
        out.push(idle_goal(self.idle.as_ref()));
        out
    }
}

/// 10,000 as "10,000".
fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    NotMet,
    NotMeasured,
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Times,
    Percent,
}

/// One goal of issue 18 as this run saw it.
#[derive(Debug, PartialEq)]
struct Goal {
    what: String,
    /// The measured figure, as printed; None when not measured.
    figure: Option<String>,
    verdict: Verdict,
}

impl Goal {
    fn check(what: &str, value: Option<f64>, unit: Unit, met: impl Fn(f64) -> bool) -> Goal {
        let value = value.filter(|v| v.is_finite());
        Goal {
            what: what.into(),
            figure: value.map(|v| match unit {
                Unit::Times => format!("{v:.2}x"),
                Unit::Percent => format!("{:.0}%", v * 100.0),
            }),
            verdict: match value {
                None => Verdict::NotMeasured,
                Some(v) if met(v) => Verdict::Met,
                Some(_) => Verdict::NotMet,
            },
        }
    }

    fn at_least(what: &str, value: Option<f64>, target: f64, unit: Unit) -> Goal {
        Goal::check(what, value, unit, |v| v >= target)
    }

    fn at_most(what: &str, value: Option<f64>, target: f64, unit: Unit) -> Goal {
        Goal::check(what, value, unit, |v| v <= target)
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = match self.verdict {
            Verdict::Met => "met",
            Verdict::NotMet => "not met",
            Verdict::NotMeasured => "not measured",
        };
        match &self.figure {
            Some(fig) => write!(f, "{}: {fig}, {verdict}", self.what),
            None => write!(f, "{}: {verdict}", self.what),
        }
    }
}

/// The idle goal: 10,000 sessions held, peak PSS (flowing or quiet) <= 100 MiB, and
/// the sender's rate with them >= 90% of its rate alone.
fn idle_goal(idle: Option<&IdleFigures>) -> Goal {
    let what = format!(
        "{} idle sessions: peak PSS <= 100 MiB, mail >= 0.90x its rate alone",
        thousands(IDLE_SESSIONS)
    );
    let Some(i) = idle else {
        return Goal {
            what,
            figure: None,
            verdict: Verdict::NotMeasured,
        };
    };
    let mib = i.peak_kib.max(i.quiet_kib) as f64 / 1024.0;
    let rate = ratio(i.with_idle, i.alone);
    let figure = format!(
        "{mib:.1} MiB, {} with {} held",
        rate.map_or("-".into(), |r| format!("{r:.2}x")),
        thousands(i.held)
    );
    let verdict = match rate {
        _ if i.sessions < IDLE_SESSIONS => Verdict::NotMeasured,
        None => Verdict::NotMeasured,
        Some(r) if mib <= 100.0 && r >= 0.9 && i.held >= IDLE_SESSIONS => Verdict::Met,
        Some(_) => Verdict::NotMet,
    };
    Goal {
        what,
        figure: Some(figure),
        verdict,
    }
}

const NAME_WIDTH: usize = 38;

/// The table as printed: a header, then one line per row.
fn render(lines: &[Line]) -> String {
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".into(), |v| format!("{v:.prec$}"));
    let mut out = format!(
        "{:<NAME_WIDTH$} {:>9} {:>10} {:<32} {:>10} {:>9}\n",
        "row", "accepted", "end-to-end", "ratio", "CPU ms", "peak PSS"
    );
    out += &format!(
        "{:<NAME_WIDTH$} {:>9} {:>10} {:<32} {:>10} {:>9}\n",
        "", "msg/s", "msg/s", "", "per msg", "MiB"
    );
    for l in lines {
        if let Some(text) = &l.text {
            out += &format!("{:<NAME_WIDTH$} {text}\n", l.name);
            continue;
        }
        out += &format!(
            "{:<NAME_WIDTH$} {:>9} {:>10} {:<32} {:>10} {:>9}\n",
            l.name,
            opt(l.accepted, 0),
            opt(l.end_to_end, 0),
            l.ratio.as_deref().unwrap_or("-"),
            opt(l.cpu_ms, 2),
            opt(l.peak_mib, 1),
        );
    }
    out
}

/// The API row's text: p50/p99 of status, a quarantine page and a log search, over HTTPS.
fn api_text(api: &[crate::api_bench::Row]) -> String {
    let cell = |what: &str| {
        api.iter()
            .find(|r| r.what.starts_with(what) && r.transport == "HTTPS")
            .map_or("-".to_string(), |r| {
                format!(
                    "{:.1}/{:.1}",
                    r.p50.as_secs_f64() * 1000.0,
                    r.p99.as_secs_f64() * 1000.0
                )
            })
    };
    format!(
        "status {}, quarantine page {}, log search {}",
        cell("status"),
        cell("quarantine, page of"),
        cell("log, subject")
    )
}

/// Runs one step into `results`; returns a line for stderr.
fn run_step(
    step: Step,
    load: &Load,
    mb_smtpd: &Path,
    options: &Options,
    results: &mut Results,
) -> Result<String> {
    let rates = |r: &Outcome| {
        format!(
            "{} accepted in {:.1}s{}",
            r.name,
            r.accept_secs,
            r.total_secs
                .map_or(String::new(), |t| format!(", delivered in {t:.1}s")),
        )
    };
    let done = match step {
        Step::Ceiling => rates(results.ceiling.insert(ceiling(load)?)),
        Step::Postfix => rates(results.postfix.insert(through_postfix(load)?)),
        Step::Relay => rates(results.relay.insert(through_mailborder(
            load,
            mb_smtpd,
            Mode::Relay,
        )?)),
        Step::Receive => rates(results.receive.insert(through_mailborder(
            load,
            mb_smtpd,
            Mode::ReceiveOnly,
        )?)),
        Step::Filtered => rates(results.filtered.insert(through_mailborder(
            load,
            mb_smtpd,
            Mode::Filtered,
        )?)),
        Step::Milter => {
            // Postfix alone before and after: the milter rows' reference.
            results.milter_alone = vec![through_postfix(load)?];
            let floor = rates(
                results
                    .milter_floor
                    .insert(through_postfix_null_milter(load)?),
            );
            let milter = rates(
                results
                    .milter
                    .insert(through_postfix_milter(load, mb_smtpd)?),
            );
            results.milter_alone.push(through_postfix(load)?);
            let n = f64::from(load.messages);
            let alone: Vec<String> = results
                .milter_alone
                .iter()
                .filter_map(|r| r.end_to_end(n))
                .map(|r| format!("{r:.0}"))
                .collect();
            format!(
                "{milter}; with the null milter {floor}; Postfix alone before and after: {} msg/s",
                alone.join(" and ")
            )
        }
        Step::Idle => {
            let window = Duration::from_secs(options.seconds.max(5));
            let run = crate::idle::run(mb_smtpd, options.idle_sessions, window)?;
            let i = results.idle.insert(IdleFigures::from(&run));
            format!(
                "{:.0} msg/s with {} idle sessions held, {:.0} alone",
                i.with_idle, i.held, i.alone
            )
        }
        Step::Attack => {
            let rows = crate::attack::run(mb_smtpd, options.seconds)?;
            // The table shows one ratio per target; the log gets what explains it.
            eprint!("{}", crate::attack::details(&rows)?);
            results.attack = rows
                .iter()
                .map(|r| AttackFigures {
                    name: r.name.clone(),
                    attacked: r.attacked,
                    ratio: r.ratio(),
                    cpu_ms: r.cpu_ms_per_message(),
                    peak_mib: r.peak_mib,
                })
                .collect();
            results
                .attack
                .iter()
                .map(|a| format!("{} {:.2}x alone", a.name, a.ratio))
                .collect::<Vec<_>>()
                .join(", ")
        }
        Step::Recovery => {
            let r = recovery(load, mb_smtpd, options.recovery_messages)?;
            recovery_text(results.recovery.insert(r))
        }
        Step::Api => {
            let rows = crate::api_bench::run(mb_smtpd.parent().unwrap_or(Path::new(".")))?;
            results.api.insert(api_text(&rows)).clone()
        }
    };
    Ok(done)
}

/// `cargo xtask bench`: every step of `options` in turn, then one table and issue 18's
/// goals. A step that fails is reported and left out; the run then fails at the end.
pub fn bench(load: &Load, mb_smtpd: PathBuf, options: &Options) -> Result<()> {
    eprintln!(
        "xtask: bench: {} messages of {} bytes over {} sessions per path; idle row {} sessions, attack and idle windows {}s",
        load.messages, load.size, load.sessions, options.idle_sessions, options.seconds
    );
    let mut results = Results {
        messages: load.messages,
        ..Default::default()
    };
    let total = options.steps.len();
    let mut failed = Vec::new();
    for (i, step) in options.steps.iter().enumerate() {
        let started = Instant::now();
        eprintln!("xtask: bench {}/{total}: {} ...", i + 1, step.name());
        match run_step(*step, load, &mb_smtpd, options, &mut results) {
            Ok(done) => eprintln!(
                "xtask: bench {}/{total}: {} done in {:.0}s: {done}",
                i + 1,
                step.name(),
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!(
                    "xtask: bench {}/{total}: {} failed: {e:#}",
                    i + 1,
                    step.name()
                );
                failed.push(step.name());
            }
        }
    }
    print!("{}", render(&results.lines()));
    println!(
        "ratio: end to end against Postfix's (receive-only: accepted against Postfix's accepted, and against the ceiling; \
         milter rows: against the mean of Postfix alone run just before and after them); \
         idle and attack rows: the sender's rate (4 sessions) against its rate alone; CPU: the MTA's processes per message"
    );
    println!("\ngoals (issue 18):");
    for g in results.goals() {
        println!("- {g}");
    }
    if !failed.is_empty() {
        bail!("{} step(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask bench --milter --bin-dir DIR`: only Postfix alone and Postfix with
/// mb-milter (and its two workers), side by side in one run, with the CPU per message of
/// each process family, so the milter path can be measured without the other rows.
pub fn milter_only(load: &Load, bin_dir: &Path) -> Result<()> {
    let n = f64::from(load.messages);
    let bin = bin_dir.join("mb-smtpd");
    eprintln!(
        "xtask: bench: {} messages of {} bytes over {} sessions: Postfix alone, with the null milter, then with mb-milter over TCP and over its Unix socket",
        load.messages, load.size, load.sessions
    );
    let pf = through_postfix(load)?;
    let mut floor = through_postfix_null_milter(load)?;
    floor.name.push_str(" (floor)");
    let (mut inet, inet_split) = through_postfix_milter_split(load, &bin, MilterLink::Inet)?;
    inet.name.push_str(" (inet)");
    let (mut unix, unix_split) = through_postfix_milter_split(load, &bin, MilterLink::Unix)?;
    unix.name.push_str(" (unix)");
    println!(
        "{:<46} {:>14} {:>16} {:>12} {:>14} {:>9}",
        "path", "accepted msg/s", "end-to-end msg/s", "CPU ms/msg", "peak PSS MiB", "vs alone"
    );
    let alone = pf.end_to_end(n).unwrap_or(f64::NAN);
    for r in [&pf, &floor, &inet, &unix] {
        println!(
            "{:<46} {:>14.0} {:>16.0} {:>12} {:>14} {:>9}",
            r.name,
            n / r.accept_secs,
            r.end_to_end(n).unwrap_or(f64::NAN),
            r.cpu_secs
                .map_or("-".into(), |c| format!("{:.2}", c * 1000.0 / n)),
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            ratio(r.end_to_end(n).unwrap_or(f64::NAN), alone)
                .map_or("-".into(), |v| format!("{v:.2}x")),
        );
    }
    for (link, split) in [("inet", inet_split), ("unix", unix_split)] {
        println!(
            "CPU ms/msg of the milter run over {link}: Postfix {:.2}, mb-milter {:.2}, mb-filter workers {:.2}",
            split[0] * 1000.0 / n,
            split[1] * 1000.0 / n,
            split[2] * 1000.0 / n
        );
    }
    println!(
        "The floor row's CPU is Postfix's alone (the null milter runs in this process): what Postfix's own processes spend per message with any milter."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(accept_secs: f64, total_secs: Option<f64>, cpu_secs: f64, kib: u64) -> Outcome {
        Outcome {
            name: String::new(),
            accept_secs,
            total_secs,
            cpu_secs: Some(cpu_secs),
            peak_rss_kib: Some(kib),
        }
    }

    fn idle(sessions: u32, held: u32, with_idle: f64, peak_mib: u64) -> IdleFigures {
        IdleFigures {
            sessions,
            held,
            with_idle,
            alone: 100.0,
            cpu_ms: 0.75,
            peak_kib: peak_mib * 1024,
            quiet_kib: 10 * 1024,
        }
    }

    /// 1,000 messages: ceiling 4,000 msg/s, Postfix 500 accepted / 400 end to end at
    /// 3 ms of CPU each, mb-smtpd 2,000 / 1,000 at 1 ms, receive-only 2,500 accepted.
    fn results() -> Results {
        Results {
            messages: 1000,
            ceiling: Some(outcome(0.25, Some(0.25), 0.0, 0)),
            postfix: Some(outcome(2.0, Some(2.5), 3.0, 90 * 1024)),
            relay: Some(outcome(0.5, Some(1.0), 1.0, 20 * 1024)),
            receive: Some(outcome(0.4, None, 0.8, 18 * 1024)),
            filtered: Some(outcome(1.0, Some(1.25), 2.0, 60 * 1024)),
            milter: Some(outcome(2.5, Some(5.0), 5.0, 150 * 1024)),
            milter_floor: Some(outcome(2.5, Some(3.2), 4.0, 100 * 1024)),
            milter_alone: Vec::new(),
            idle: Some(idle(10_000, 10_000, 95.0, 80)),
            attack: vec![AttackFigures {
                name: "mb-smtpd".into(),
                attacked: 90.0,
                ratio: 0.9,
                cpu_ms: Some(0.5),
                peak_mib: 40.0,
            }],
            recovery: None,
            api: Some("status 1.0/2.0".into()),
        }
    }

    fn line<'a>(lines: &'a [Line], name: &str) -> &'a Line {
        lines.iter().find(|l| l.name.starts_with(name)).unwrap()
    }

    #[test]
    fn only_names_steps_in_the_bench_order_and_none_means_all() {
        assert_eq!(Step::parse_list(&[]).unwrap(), Step::ALL.to_vec());
        let only = ["idle".to_string(), " relay".into()];
        assert_eq!(
            Step::parse_list(&only).unwrap(),
            vec![Step::Relay, Step::Idle]
        );
        let err = Step::parse_list(&["relais".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"relais\"") && err.contains("receive,filtered"),
            "{err}"
        );
    }

    #[test]
    fn each_row_has_its_rates_and_the_ratio_to_its_reference() {
        let lines = results().lines();
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ceiling: smtp-source -> smtp-sink",
                "Postfix (queue on disk)",
                "mb-smtpd relay (fsync before 250)",
                "mb-smtpd receive-only (delivery off)",
                "mb-smtpd filtered (2 workers)",
                "Postfix + mb-milter (2 workers)",
                "Postfix + null milter (floor)",
                "mb-smtpd, 10,000 idle sessions",
                "mb-smtpd under attack",
                "mb-web API (p50/p99 ms, HTTPS)",
            ]
        );
        let relay = line(&lines, "mb-smtpd relay");
        assert_eq!(relay.accepted, Some(2000.0));
        assert_eq!(relay.end_to_end, Some(1000.0));
        assert_eq!(relay.ratio.as_deref(), Some("2.50x Postfix"));
        assert_eq!(relay.cpu_ms, Some(1.0));
        assert_eq!(relay.peak_mib, Some(20.0));
        let receive = line(&lines, "mb-smtpd receive-only");
        assert_eq!(receive.end_to_end, None);
        assert_eq!(
            receive.ratio.as_deref(),
            Some("5.00x Postfix acc., 62% ceiling")
        );
        let milter = line(&lines, "Postfix + mb-milter");
        assert_eq!(milter.ratio.as_deref(), Some("0.50x Postfix alone"));
        let floor = line(&lines, "Postfix + null milter");
        assert_eq!(floor.ratio.as_deref(), Some("0.78x Postfix alone"));
        let idle = line(&lines, "mb-smtpd, 10,000");
        assert_eq!(idle.accepted, Some(95.0));
        assert_eq!(idle.ratio.as_deref(), Some("0.95x alone"));
        assert_eq!(idle.cpu_ms, Some(0.75));
        assert_eq!(idle.peak_mib, Some(80.0));
        let attack = line(&lines, "mb-smtpd under attack");
        assert_eq!(attack.ratio.as_deref(), Some("0.90x alone"));
    }

    /// With Postfix alone run beside the milter rows, they are measured against the mean
    /// of those runs (500 and 250 msg/s here), not against the Postfix row (400).
    #[test]
    fn the_milter_rows_are_measured_against_postfix_alone_beside_them() {
        let r = Results {
            milter_alone: vec![
                outcome(1.5, Some(2.0), 3.0, 0),
                outcome(2.0, Some(4.0), 3.0, 0),
            ],
            ..results()
        };
        let lines = r.lines();
        assert_eq!(
            line(&lines, "Postfix + mb-milter").ratio.as_deref(),
            Some("0.53x Postfix alone")
        );
        assert_eq!(
            line(&lines, "Postfix + null milter").ratio.as_deref(),
            Some("0.83x Postfix alone")
        );
        assert_eq!(
            r.goals()[4].to_string(),
            "Postfix + mb-milter >= 0.8x Postfix alone: 0.53x (with a null milter 0.83x), not met"
        );
        // The relay row still compares with the Postfix row.
        assert_eq!(
            line(&lines, "mb-smtpd relay").ratio.as_deref(),
            Some("2.50x Postfix")
        );
    }

    #[test]
    fn without_its_reference_a_row_has_no_ratio() {
        let r = Results {
            postfix: None,
            ceiling: None,
            ..results()
        };
        let lines = r.lines();
        assert_eq!(line(&lines, "mb-smtpd relay").ratio, None);
        assert_eq!(line(&lines, "mb-smtpd receive-only").ratio, None);
        let goals = r.goals();
        assert_eq!(goals[0].verdict, Verdict::NotMeasured);
        assert_eq!(
            goals[0].to_string(),
            "relay end to end >= 5x Postfix: not measured"
        );
    }

    #[test]
    fn each_goal_says_met_or_not_with_its_figure() {
        let goals: Vec<String> = results().goals().iter().map(Goal::to_string).collect();
        assert_eq!(
            goals,
            [
                "relay end to end >= 5x Postfix: 2.50x, not met",
                "CPU per message <= 1/10 of Postfix's: 0.33x, not met",
                "receive-only >= 50% of the ceiling: 62%, met",
                "filtered end to end >= 3x Postfix plain relay: 2.00x, not met",
                "Postfix + mb-milter >= 0.8x Postfix alone: 0.50x (with a null milter 0.78x), not met",
                "10,000 idle sessions: peak PSS <= 100 MiB, mail >= 0.90x its rate alone: 80.0 MiB, 0.95x with 10,000 held, met",
            ]
        );
        let fast = Results {
            relay: Some(outcome(0.1, Some(0.4), 0.2, 0)),
            ..results()
        };
        let goals = fast.goals();
        assert_eq!(
            goals[0].to_string(),
            "relay end to end >= 5x Postfix: 6.25x, met"
        );
        assert_eq!(goals[1].verdict, Verdict::Met);
    }

    #[test]
    fn the_idle_goal_needs_every_session_little_memory_and_the_rate() {
        let check = |i: IdleFigures| idle_goal(Some(&i)).verdict;
        assert_eq!(check(idle(10_000, 10_000, 95.0, 80)), Verdict::Met);
        assert_eq!(check(idle(10_000, 10_000, 95.0, 120)), Verdict::NotMet);
        assert_eq!(check(idle(10_000, 10_000, 85.0, 80)), Verdict::NotMet);
        assert_eq!(check(idle(10_000, 9_000, 95.0, 80)), Verdict::NotMet);
        // A shortened run (--idle-sessions 300) cannot tell.
        assert_eq!(check(idle(300, 300, 95.0, 80)), Verdict::NotMeasured);
        // Quiet memory with the sessions counts as much as the peak while mail flows.
        let quiet = IdleFigures {
            quiet_kib: 101 * 1024,
            ..idle(10_000, 10_000, 95.0, 80)
        };
        assert_eq!(check(quiet), Verdict::NotMet);
        assert_eq!(idle_goal(None).verdict, Verdict::NotMeasured);
    }

    #[test]
    fn the_recovery_row_takes_the_spools_own_time_from_its_log_line() {
        let log = "2026-12-02T15:00:00.1Z  INFO mb_smtpd: started\n\
                   2026-12-02T15:00:01.0Z  INFO mb_smtpd: spool opened messages=100000 segments=7 \
                   elapsed_ms=912 spool=/tmp/mb-bench-x/spool\n";
        assert_eq!(spool_opened_ms(log), Some(912));
        assert_eq!(
            spool_opened_ms("INFO mb_smtpd: listening elapsed_ms=5"),
            None
        );
        let r = RecoveryFigures {
            queued: 100_000,
            recovered: 100_000,
            spool_bytes: 440 * 1024 * 1024,
            ready_secs: 1.234,
            spool_ms: spool_opened_ms(log),
            cold: true,
        };
        assert_eq!(
            recovery_text(&r),
            "greets 1.23s after its start (cold cache; spool recovery 912 ms), \
             100000 of 100000 messages back, spool 440 MiB"
        );
        let results = Results {
            recovery: Some(r),
            ..Default::default()
        };
        assert_eq!(results.lines()[0].name, "mb-smtpd restart, 100,000 queued");
    }

    #[test]
    fn the_table_aligns_its_columns_and_prints_a_dash_for_what_does_not_apply() {
        let table = render(&results().lines());
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 2 + 10);
        let receive = rows
            .iter()
            .find(|l| l.starts_with("mb-smtpd receive-only"))
            .unwrap();
        let cells: Vec<&str> = receive[NAME_WIDTH..].split_whitespace().collect();
        assert_eq!(cells[..2], ["2500", "-"]);
        assert!(receive.ends_with("     0.80      18.0"), "{receive:?}");
        // The ratio column starts at the same offset in the header and in every row.
        let at = rows[0].find("ratio").unwrap();
        for r in &rows[2..rows.len() - 1] {
            assert_ne!(&r[at..at + 1], " ", "{r:?}");
            assert_eq!(&r[at - 1..at], " ", "{r:?}");
        }
        // Every row with figures is as wide as the header: no cell pushes the next.
        for r in &rows[..rows.len() - 1] {
            assert_eq!(r.len(), rows[0].len(), "{r:?}");
        }
        assert!(rows[rows.len() - 1].ends_with(" status 1.0/2.0"));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
