//! `cargo xtask bench`: the same load, in one run on this machine, through three paths:
//! smtp-source straight into smtp-sink (the ceiling), through a private Postfix instance
//! (queue on disk) into smtp-sink, and through mb-smtpd (fsync before 250) into
//! smtp-sink. Reports accepted and end-to-end rates, CPU per message and peak memory,
//! and the ratios mb-smtpd / Postfix. A harness, not a test: nothing here asserts a time.

use std::fs;
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
    total_secs: f64,
    cpu_secs: Option<f64>,
    peak_rss_kib: Option<u64>,
}

/// Idle sessions held by the full bench's idle row, and its measuring window (each of
/// alone and with them).
const IDLE_SESSIONS: u32 = 10_000;
const IDLE_WINDOW: Duration = Duration::from_secs(15);

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
        total_secs: secs,
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
    through_postfix_milter_split(load, bin).map(|(r, _)| r)
}

/// The milter run, and its CPU seconds split between Postfix, mb-milter and the workers.
fn through_postfix_milter_split(load: &Load, bin: &Path) -> Result<(Outcome, [f64; 3])> {
    let (sink_port, _sink) = sink()?;
    let gw = BenchGateway::start(bin, sink_port, true)?;
    let milter_port = free_port();
    let d = gw.dir.path();
    fs::write(
        d.join("milter.toml"),
        format!(
            "{}\n[milter]\nenabled = true\nport = {milter_port}\n",
            gw.config_text
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
    })?;
    let pf = Postfix::start(
        &format!("[127.0.0.1]:{sink_port}"),
        &format!(
            "smtpd_milters = inet:127.0.0.1:{milter_port}\nmilter_default_action = tempfail\n"
        ),
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
        total_secs: total,
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
    fn start(bin: &Path, sink_port: u16, filter: bool) -> Result<BenchGateway> {
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
             [filter]\nenabled = {filter}\nworkers = 2\n{filter_keys}",
            free_port(),
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

fn through_mailborder(load: &Load, bin: &Path, filter: bool) -> Result<Outcome> {
    let (sink_port, _sink) = sink()?;
    let gw = BenchGateway::start(bin, sink_port, filter)?;
    let (d, config, port, workers) = (gw.dir.path(), &gw.config, gw.port, &gw.workers);
    let log = fs::File::create(d.join("smtpd.log"))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let smtpd = Proc {
        child,
        name: "mb-smtpd".into(),
    };
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
    let spool = d.join("spool");
    let total = drain(started, &pids, &mut peak, || {
        count_files(&spool.join("incoming")) + count_files(&spool.join("deferred"))
    })?;
    let refused = fs::read_to_string(d.join("smtpd.log"))
        .unwrap_or_default()
        .matches("refused by the filter")
        .count();
    if refused > 0 {
        bail!("the filter refused {refused} benchmark messages");
    }
    Ok(Outcome {
        name: if filter {
            "via mb-smtpd + 2 mb-filter workers".into()
        } else {
            "via mb-smtpd (fsync before 250)".into()
        },
        accept_secs: accept,
        total_secs: total,
        cpu_secs: Some(cpu(&pids) - cpu0),
        peak_rss_kib: Some(peak),
    })
}

pub fn bench(load: &Load, mb_smtpd: PathBuf, filter: bool, milter: bool) -> Result<()> {
    let n = f64::from(load.messages);
    eprintln!(
        "xtask: bench: {} messages of {} bytes over {} sessions, each path in turn",
        load.messages, load.size, load.sessions
    );
    let mut results = Vec::new();
    let mut steps = vec!["ceiling", "postfix", "mailborder"];
    if filter {
        steps.push("mailborder+filter");
    }
    if milter {
        steps.push("postfix+milter");
    }
    let total = steps.len();
    for (i, step) in steps.iter().enumerate() {
        eprintln!("xtask: bench {}/{total}: {step} ...", i + 1);
        let r = match *step {
            "ceiling" => ceiling(load)?,
            "postfix" => through_postfix(load)?,
            "mailborder" => through_mailborder(load, &mb_smtpd, false)?,
            "postfix+milter" => through_postfix_milter(load, &mb_smtpd)?,
            _ => through_mailborder(load, &mb_smtpd, true)?,
        };
        eprintln!(
            "xtask: bench {}/{total}: {} accepted in {:.1}s, delivered in {:.1}s",
            i + 1,
            r.name,
            r.accept_secs,
            r.total_secs
        );
        results.push(r);
    }
    eprintln!("xtask: bench: mb-smtpd with {IDLE_SESSIONS} idle sessions ...");
    // The relay figures above are worth printing even when this row cannot run.
    let idle = crate::idle::run(&mb_smtpd, IDLE_SESSIONS, IDLE_WINDOW)
        .inspect_err(|e| eprintln!("xtask: bench: no idle-sessions row: {e:#}"))
        .ok();
    eprintln!("xtask: bench: mb-web API latency ...");
    let api = crate::api_bench::run(mb_smtpd.parent().unwrap_or(Path::new(".")))
        .inspect_err(|e| eprintln!("xtask: bench: no API latency rows: {e:#}"))
        .ok();
    println!(
        "{:<34} {:>14} {:>16} {:>12} {:>14}",
        "path", "accepted msg/s", "end-to-end msg/s", "CPU ms/msg", "peak PSS MiB"
    );
    for r in &results {
        println!(
            "{:<34} {:>14.0} {:>16.0} {:>12} {:>14}",
            r.name,
            n / r.accept_secs,
            n / r.total_secs,
            r.cpu_secs
                .map_or("-".into(), |c| format!("{:.2}", c * 1000.0 / n)),
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        );
    }
    // A fixed-time measurement (4 reused sessions), not smtp-source's: no end-to-end rate.
    if let Some(idle) = &idle {
        println!(
            "{:<34} {:>14.0} {:>16} {:>12} {:>14.1}",
            format!("mb-smtpd, {}k idle sessions", IDLE_SESSIONS / 1000),
            idle.with_idle,
            "-",
            "-",
            idle.peak_idle as f64 / 1024.0,
        );
    }
    // The API's latency: status, a quarantine page, a log search, over HTTPS.
    if let Some(api) = &api {
        let row = |what: &str| {
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
        println!(
            "{:<34} status {} ms, quarantine page {} ms, log search {} ms (p50/p99, HTTPS)",
            "mb-web API",
            row("status"),
            row("quarantine, page of"),
            row("log, subject")
        );
    }
    let (pf, mb) = (&results[1], &results[2]);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "mb-smtpd / Postfix: accepted {:.2}x, end-to-end {:.2}x, CPU per message {:.2}x, peak memory {:.2}x",
        ratio(pf.accept_secs, mb.accept_secs),
        ratio(pf.total_secs, mb.total_secs),
        ratio(mb.cpu_secs.unwrap_or(0.0), pf.cpu_secs.unwrap_or(0.0)),
        ratio(
            mb.peak_rss_kib.unwrap_or(0) as f64,
            pf.peak_rss_kib.unwrap_or(0) as f64
        ),
    );
    println!(
        "ceiling / mb-smtpd end-to-end: {:.2}x",
        ratio(mb.total_secs, results[0].total_secs)
    );
    if let Some(idle) = &idle {
        println!(
            "mb-smtpd with {} idle sessions: 4 sessions' rate {:.0} vs {:.0} msg/s alone ({:.2}x), PSS {:.1} MiB at rest ({:.1} KiB per idle session), {} of them held to the end",
            idle.sessions,
            idle.with_idle,
            idle.alone,
            idle.ratio(),
            idle.pss_n as f64 / 1024.0,
            idle.kib_per_session(),
            idle.held,
        );
    }
    for r in &results[3..] {
        if r.name.contains("mb-milter") {
            println!(
                "Postfix with mb-milter / Postfix alone: end-to-end {:.2} ({:.0}% of Postfix's throughput)",
                ratio(pf.total_secs, r.total_secs),
                100.0 * ratio(pf.total_secs, r.total_secs)
            );
        } else {
            println!(
                "mb-smtpd with filtering / Postfix plain relay: end-to-end {:.2}x",
                ratio(pf.total_secs, r.total_secs)
            );
        }
    }
    if let Some(api) = &api {
        crate::api_bench::print(api);
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
        "xtask: bench: {} messages of {} bytes over {} sessions: Postfix alone, then with mb-milter",
        load.messages, load.size, load.sessions
    );
    let pf = through_postfix(load)?;
    let (m, split) = through_postfix_milter_split(load, &bin)?;
    println!(
        "{:<34} {:>14} {:>16} {:>12} {:>14}",
        "path", "accepted msg/s", "end-to-end msg/s", "CPU ms/msg", "peak PSS MiB"
    );
    for r in [&pf, &m] {
        println!(
            "{:<34} {:>14.0} {:>16.0} {:>12} {:>14}",
            r.name,
            n / r.accept_secs,
            n / r.total_secs,
            r.cpu_secs
                .map_or("-".into(), |c| format!("{:.2}", c * 1000.0 / n)),
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        );
    }
    println!(
        "CPU ms/msg of the milter run: Postfix {:.2}, mb-milter {:.2}, mb-filter workers {:.2}",
        split[0] * 1000.0 / n,
        split[1] * 1000.0 / n,
        split[2] * 1000.0 / n
    );
    println!(
        "Postfix with mb-milter / Postfix alone: end-to-end {:.2} ({:.0}% of Postfix's throughput)",
        pf.total_secs / m.total_secs,
        100.0 * pf.total_secs / m.total_secs
    );
    Ok(())
}
