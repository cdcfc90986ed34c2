//! `cargo xtask bench --idle`: mb-smtpd's memory per idle session, and a sender's
//! throughput while thousands of sessions sit idle.
//!
//! A release mb-smtpd is started with its connection, per-client and rate limits raised
//! for the run. The legitimate sender of `--attack` (4 sessions from 127.0.0.10, 4 KiB
//! messages, connections reused) is measured alone; then N sessions are opened from
//! 127.0.10.x and beyond (50 per address, so that neither per-address ephemeral ports nor
//! the per-client limit is the bottleneck), each reading the greeting and sending EHLO
//! before it falls silent, and the sender is measured again. mb-smtpd's PSS
//! (smaps_rollup) is taken quiet at 0, 1,000 and N idle sessions, and at its peak while
//! mail flows with and without them. The idle sessions are held without any task of
//! ours polling them, so the load generator spends no CPU on them while the sender is
//! measured. Once they are closed, the sender is measured alone a second time: the rate
//! without idle sessions is the mean of the runs before and after, so that a machine
//! whose load drifts during the run (other builds, a spool that grows) does not pass for
//! the idle sessions' cost; mb-smtpd's CPU time per message in each run tells the same
//! story without depending on how busy the machine is.
//!
//! There is no mb-rpcd in the bench, so mb-smtpd keeps the message events it cannot
//! send (up to its buffer's bound): the quiet PSS at 0 idle sessions includes them, and
//! the memory per session is measured from there. A harness, not a test: nothing here
//! asserts a figure.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mb_testkit::{Proc, free_port, wait_until};
use tokio::io::BufReader;
use tokio::net::TcpStream;

use crate::attack::{
    LEGIT_PACE, LEGIT_SESSIONS, Tally, Target, command, connect_from, legit, raise_nofile, reply,
    stalled,
};
use crate::bench::{cpu_secs, pss, sink};

/// Idle sessions opened from each loopback address.
const PER_ADDRESS: u32 = 50;
/// Sessions being opened at once (the listener's backlog is 1,024).
const OPENING: usize = 200;
/// The quiet step at which memory is also reported.
const FIRST_STEP: u32 = 1000;

/// What one `--idle` run measured.
pub struct IdleRun {
    pub sessions: u32,
    /// Idle sessions still open after the sender's measurement.
    pub held: u32,
    /// Idle sessions that could not be opened.
    pub failed: u32,
    /// The sender's rate without idle sessions: the mean of `before` and `after`.
    pub alone: f64,
    pub with_idle: f64,
    /// The sender alone, before the idle sessions were opened and after they were closed.
    pub before: Flow,
    pub after: Flow,
    /// The sender while the idle sessions were held.
    pub idle: Flow,
    /// PSS in KiB just after start, before any traffic.
    pub pss_fresh: u64,
    /// Quiet PSS in KiB: at 0 idle sessions (after the sender's first run), at
    /// `FIRST_STEP` and at `sessions`.
    pub pss_0: u64,
    pub pss_step: u64,
    pub pss_n: u64,
    /// Peak PSS in KiB while the sender ran alone and with the idle sessions.
    pub peak_alone: u64,
    pub peak_idle: u64,
}

impl IdleRun {
    /// Memory one idle session costs mb-smtpd, in KiB.
    pub fn kib_per_session(&self) -> f64 {
        self.pss_n.saturating_sub(self.pss_0) as f64 / f64::from(self.sessions.max(1))
    }

    pub fn ratio(&self) -> f64 {
        if self.alone > 0.0 {
            self.with_idle / self.alone
        } else {
            f64::NAN
        }
    }
}

/// The address the `i`th idle session comes from.
fn source(i: u32) -> Ipv4Addr {
    let a = i / PER_ADDRESS;
    // 250 addresses per /24 from 127.0.10.0 up: 12,500 sessions per /24.
    let third = u8::try_from(10 + a / 250).unwrap_or(u8::MAX);
    Ipv4Addr::new(127, 0, third, 1 + (a % 250) as u8)
}

/// Opens one session, reads its greeting and sends EHLO; the stream is kept open.
async fn open(src: Ipv4Addr, port: u16) -> Option<BufReader<TcpStream>> {
    let mut s = BufReader::new(connect_from(src, port).await.ok()?);
    if !matches!(reply(&mut s).await, Ok(220)) {
        return None;
    }
    if !matches!(command(&mut s, "EHLO idle.bench.test\r\n").await, Ok(250)) {
        return None;
    }
    Some(s)
}

/// Opens idle sessions `from..to`; returns how many failed.
fn open_range(
    rt: &tokio::runtime::Runtime,
    port: u16,
    from: u32,
    to: u32,
    held: &mut Vec<BufReader<TcpStream>>,
) -> u32 {
    let gate = Arc::new(tokio::sync::Semaphore::new(OPENING));
    let tasks: Vec<_> = (from..to)
        .map(|i| {
            let gate = gate.clone();
            rt.spawn(async move {
                let _permit = gate.acquire_owned().await.ok()?;
                open(source(i), port).await
            })
        })
        .collect();
    let mut failed = 0;
    rt.block_on(async {
        for t in tasks {
            match t.await {
                Ok(Some(s)) => held.push(s),
                _ => failed += 1,
            }
        }
    });
    failed
}

/// Quiet PSS of `pid` in KiB: the largest of a few samples over a second, after a pause
/// that lets the allocator settle.
fn quiet_pss(pid: i32) -> u64 {
    std::thread::sleep(Duration::from_secs(2));
    let mut max = 0;
    for _ in 0..5 {
        max = max.max(pss(&[pid]));
        std::thread::sleep(Duration::from_millis(200));
    }
    max
}

/// One window of the legitimate sender.
#[derive(Clone, Copy, Default)]
pub struct Flow {
    /// Messages a second.
    pub rate: f64,
    pub refused: u64,
    /// mb-smtpd's peak PSS in KiB meanwhile.
    pub peak: u64,
    /// mb-smtpd's CPU time per message in ms (delivery to the sink included).
    pub cpu_ms: f64,
}

/// Runs the legitimate sender for `window` and measures it.
fn measure(rt: &tokio::runtime::Runtime, target: Target, window: Duration, pid: i32) -> Flow {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..LEGIT_SESSIONS)
        .map(|n| {
            rt.spawn(legit(
                n,
                target,
                tally.clone(),
                measuring.clone(),
                stop.clone(),
            ))
        })
        .collect();
    std::thread::sleep(LEGIT_PACE * 4);
    measuring.store(true, Relaxed);
    let cpu_before = cpu_secs(pid);
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < window {
        peak = peak.max(pss(&[pid]));
        std::thread::sleep(Duration::from_millis(200));
    }
    measuring.store(false, Relaxed);
    let stalls = stalled(&tally);
    if let Ok(mut reasons) = tally.legit_reasons.lock() {
        reasons.extend(stalls);
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu_before;
    stop.store(true, Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    });
    let reasons = tally
        .legit_reasons
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    if !reasons.is_empty() {
        eprintln!("xtask: bench --idle: the sender was refused or stalled: {reasons:?}");
    }
    let sent = tally.legit_sent.load(Relaxed);
    Flow {
        rate: sent as f64 / secs,
        refused: tally.legit_refused.load(Relaxed),
        peak,
        cpu_ms: if sent > 0 {
            cpu * 1000.0 / sent as f64
        } else {
            f64::NAN
        },
    }
}

/// Counts the held sessions the server has not closed (no EOF waiting on them).
fn still_open(held: &[BufReader<TcpStream>]) -> u32 {
    let mut byte = [0u8; 1];
    let open = held
        .iter()
        .filter(|s| {
            matches!(s.get_ref().try_read(&mut byte),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    u32::try_from(open).unwrap_or(u32::MAX)
}

/// Starts mb-smtpd (`bin`) with limits that admit `sessions` idle sessions, then
/// measures as the module says.
pub fn run(bin: &Path, sessions: u32, window: Duration) -> Result<IdleRun> {
    raise_nofile(u64::from(sessions) + 1000)?;
    let (sink_port, _sink) = sink()?;
    let dir = tempfile::Builder::new().prefix("mb-idle-").tempdir()?;
    let d = dir.path();
    let port = free_port();
    let (cert, key) = mb_testkit::self_signed();
    fs::write(d.join("tls.crt"), cert)?;
    fs::write(d.join("tls.key"), key)?;
    // The shipped defaults (STARTTLS offered, autoban on), with the limits raised so that
    // every idle session is admitted and none times out during the run; only loopback's
    // own 127.0.0.1 is trusted, so every client here is judged as a stranger.
    let config = format!(
        "process.user = \"\"\nprocess.config_wait = \"0s\"\n\
         [paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\
         [log]\nlevel = \"warn\"\n\
         [network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nmax_connections = {}\n\
         max_per_source = {}\nconnection_rate = 1000000\nrate_per_source = 1000000\ntimeout = \"1h\"\n\
         [network.smtp.tls]\ncert = \"{d}/tls.crt\"\nkey = \"{d}/tls.key\"\n\
         [network.reinject]\nport = {}\n\
         [network.protection]\ntrusted_networks = \"127.0.0.1/32\"\n\
         [smtp]\nhostname = \"mb.bench.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [queue]\nmin_free_space = \"0\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"none\"\n\
         [filter]\nenabled = false\n",
        (sessions + 1000).min(100_000),
        PER_ADDRESS * 4,
        free_port(),
        d = d.display()
    );
    fs::write(d.join("mailborder.toml"), config)?;
    let log = fs::File::create(d.join("smtpd.log"))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(d.join("mailborder.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let smtpd = Proc {
        child,
        name: "mb-smtpd".into(),
    };
    let socket = d.join("run/mb-smtpd.sock");
    wait_until("mb-smtpd", Duration::from_secs(30), || socket.exists())
        .with_context(|| fs::read_to_string(d.join("smtpd.log")).unwrap_or_default())?;
    let pid = smtpd.pid();
    let target = Target {
        smtp: port,
        submission: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let pss_fresh = quiet_pss(pid);
    eprintln!(
        "xtask: bench --idle: the sender alone for {}s ...",
        window.as_secs()
    );
    let before = measure(&rt, target, window, pid);
    let pss_0 = quiet_pss(pid);

    let mut held = Vec::with_capacity(sessions as usize);
    let step = FIRST_STEP.min(sessions);
    eprintln!("xtask: bench --idle: opening {step} idle sessions ...");
    let mut failed = open_range(&rt, port, 0, step, &mut held);
    let pss_step = quiet_pss(pid);
    eprintln!("xtask: bench --idle: opening {} more ...", sessions - step);
    failed += open_range(&rt, port, step, sessions, &mut held);
    if held.is_empty() {
        bail!(
            "no idle session could be opened:\n{}",
            fs::read_to_string(d.join("smtpd.log")).unwrap_or_default()
        );
    }
    let pss_n = quiet_pss(pid);

    eprintln!(
        "xtask: bench --idle: the sender with {} idle sessions for {}s ...",
        held.len(),
        window.as_secs()
    );
    let idle = measure(&rt, target, window, pid);
    let held_at_end = still_open(&held);
    // Closed by us: mb-smtpd sees EOF on each and ends its sessions before the sender
    // runs alone again.
    rt.block_on(async { drop(held) });
    std::thread::sleep(Duration::from_secs(3));
    eprintln!(
        "xtask: bench --idle: the idle sessions closed; the sender alone again for {}s ...",
        window.as_secs()
    );
    let after = measure(&rt, target, window, pid);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(IdleRun {
        sessions,
        held: held_at_end,
        failed,
        pss_fresh,
        alone: (before.rate + after.rate) / 2.0,
        with_idle: idle.rate,
        before,
        after,
        idle,
        pss_0,
        pss_step,
        pss_n,
        peak_alone: before.peak.max(after.peak),
        peak_idle: idle.peak,
    })
}

/// `cargo xtask bench --idle`: one run, printed as a table.
pub fn idle(bin: &Path, sessions: u32, seconds: u64) -> Result<()> {
    let window = Duration::from_secs(seconds.max(5));
    let r = run(bin, sessions, window)?;
    let mib = |k: u64| k as f64 / 1024.0;
    let step = FIRST_STEP.min(sessions);
    println!(
        "{:>8} {:>6} {:>10} {:>11} {:>11} {:>11} {:>12} {:>13} {:>6} {:>12} {:>12}",
        "sessions",
        "held",
        "PSS 0 MiB",
        format!("PSS {step} MiB"),
        format!("PSS {sessions} MiB"),
        "KiB/session",
        "alone msg/s",
        "w/ idle msg/s",
        "ratio",
        "peak PSS MiB",
        "refused"
    );
    println!(
        "{:>8} {:>6} {:>10.1} {:>11.1} {:>11.1} {:>11.1} {:>12.0} {:>13.0} {:>6.2} {:>12.1} {:>12}",
        r.sessions,
        r.held,
        mib(r.pss_0),
        mib(r.pss_step),
        mib(r.pss_n),
        r.kib_per_session(),
        r.alone,
        r.with_idle,
        r.ratio(),
        mib(r.peak_alone.max(r.peak_idle)),
        r.before.refused + r.idle.refused + r.after.refused,
    );
    println!(
        "sender alone before: {:.0} msg/s, {:.2} CPU ms/msg, peak PSS {:.1} MiB",
        r.before.rate,
        r.before.cpu_ms,
        mib(r.before.peak)
    );
    println!(
        "sender with {} idle: {:.0} msg/s, {:.2} CPU ms/msg, peak PSS {:.1} MiB",
        r.held,
        r.idle.rate,
        r.idle.cpu_ms,
        mib(r.idle.peak)
    );
    println!(
        "sender alone after:  {:.0} msg/s, {:.2} CPU ms/msg, peak PSS {:.1} MiB",
        r.after.rate,
        r.after.cpu_ms,
        mib(r.after.peak)
    );
    println!(
        "PSS just after start: {:.1} MiB; KiB/session from 0 to {step}: {:.1}",
        mib(r.pss_fresh),
        r.pss_step.saturating_sub(r.pss_0) as f64 / f64::from(step.max(1)),
    );
    if r.failed > 0 {
        println!("{} idle sessions could not be opened", r.failed);
    }
    println!(
        "held: idle sessions still open after the sender's run with them; KiB/session: (PSS at {sessions} - PSS at 0) / {sessions}; \
         alone: mean of the runs before and after; ratio: w/ idle / alone; CPU ms/msg: mb-smtpd's own, delivery included; \
         PSS at 0 includes the message events kept for want of mb-rpcd; \
         goal: PSS at 10,000 <= 100 MiB (peak too), ratio >= 0.90"
    );
    Ok(())
}
