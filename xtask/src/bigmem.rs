//! `cargo xtask bench --big`: peak memory of mb-smtpd and of one mb-filter worker while
//! four 40 MB messages arrive at once (issue 14, item 6), so the figure in the note can
//! be measured again, on this build or on another one (`--bin-dir` names the directory
//! of the binaries, e.g. a release build of an older commit in a `git worktree`).
//!
//! Both daemons' RSS and PSS are sampled from /proc every 50 ms; the kernel's own peak
//! (`VmHWM`) is read at the end too, since a sample can miss a short peak. Two phases:
//! receiving and scanning with delivery held (`queue.delivery_enabled = false`), then
//! delivery released (config rewritten, SIGHUP) until the queue is empty. The messages
//! are plain text (lines of 76 characters), relayed to Postfix's smtp-sink; the client
//! is 127.0.0.1, in mynetworks, so no DNS is asked. A harness, not a test: nothing here
//! asserts a figure (tests/e2e/memory.rs holds mb-smtpd to its bound).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mb_testkit::{Proc, free_port, wait_until};

/// Concurrent messages and their size.
pub const MESSAGES: usize = 4;
pub const SIZE: usize = 40 << 20;

/// The peaks of one process, in KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Peak {
    rss: u64,
    pss: u64,
    hwm: u64,
}

fn status_kib(pid: i32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn pss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A message of about `size` bytes, dot-stuffing free (no line starts with a dot).
pub fn message(n: usize, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: alice@served.test\r\nTo: bob@example.test\r\nSubject: big {n}\r\n\
         Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <big{n}@served.test>\r\n\r\n"
    )
    .into_bytes();
    let line: Vec<u8> = (0..76u8).map(|i| b'A' + (i + n as u8) % 26).collect();
    while m.len() < size {
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// Sends one message; the final reply line.
fn send(port: u16, body: &[u8]) -> Result<String> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut reply = || -> Result<String> {
        let mut last = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                bail!("connection closed after {last:?}");
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line.trim_end().to_string());
            }
            last = line;
        }
    };
    reply()?;
    for cmd in [
        "EHLO big.test",
        "MAIL FROM:<alice@served.test>",
        "RCPT TO:<bob@example.test>",
        "DATA",
    ] {
        w.write_all(format!("{cmd}\r\n").as_bytes())?;
        let r = reply()?;
        if !(r.starts_with('2') || r.starts_with('3')) {
            return Ok(r);
        }
    }
    w.write_all(body)?;
    w.write_all(b".\r\n")?;
    let r = reply()?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(r)
}

/// Runs the measurement with the binaries in `bin_dir`; prints and returns
/// (mb-smtpd, mb-filter) peak RSS in KiB.
pub fn bigmem(bin_dir: &Path) -> Result<(u64, u64)> {
    let (sink_port, _sink) = crate::bench::sink()?;
    let dir = tempfile::Builder::new().prefix("mb-bigmem-").tempdir()?;
    let d = dir.path();
    let port = free_port();
    let config = d.join("mailborder.toml");
    fs::write(
        &config,
        format!(
            "process.user = \"\"\nprocess.config_wait = \"0s\"\n\
             [paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\
             [log]\nlevel = \"warn\"\n\
             [network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
             [network.smtp.tls]\ninbound = \"none\"\n\
             [network.reinject]\nport = {}\n\
             [smtp]\nhostname = \"mb.bench.test\"\ndomains = \"served.test\"\nmynetworks = \"127.0.0.0/8\"\n\
             message_size_limit = \"100M\"\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"none\"\n\
             [filter]\nenabled = true\nworkers = 1\nport = {}\n\
             [queue]\ndelivery_enabled = false\n",
            free_port(),
            free_port(),
            d = d.display()
        ),
    )?;
    let start = |program: &str, args: &[&str], log: &str| -> Result<Proc> {
        let log = fs::File::create(d.join(log))?;
        let child = Command::new(bin_dir.join(program))
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin_dir.join(program).display()))?;
        Ok(Proc {
            child,
            name: program.into(),
        })
    };
    let held = fs::read_to_string(&config)?;
    let mut worker = start("mb-filter", &["--instance", "1"], "filter.log")?;
    let socket = d.join("run/mb-filter-1.sock");
    wait_until("mb-filter", Duration::from_secs(60), || socket.exists())?;
    let mut smtpd = start("mb-smtpd", &[], "smtpd.log")?;
    wait_until("mb-smtpd", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let pids = [smtpd.pid(), worker.pid()];
    let idle = pids.map(|p| status_kib(p, "VmRSS:"));

    let bodies: Vec<Arc<Vec<u8>>> = (0..MESSAGES).map(|n| Arc::new(message(n, SIZE))).collect();
    let sample = |done: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let mut peaks = [Peak::default(); 2];
            while !done.load(Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(pids) {
                    peak.rss = peak.rss.max(status_kib(pid, "VmRSS:"));
                    peak.pss = peak.pss.max(pss_kib(pid));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            for (peak, pid) in peaks.iter_mut().zip(pids) {
                peak.hwm = status_kib(pid, "VmHWM:");
            }
            peaks
        })
    };
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample(done.clone());
    let started = Instant::now();
    let senders: Vec<_> = bodies
        .iter()
        .map(|b| {
            let b = b.clone();
            std::thread::spawn(move || send(port, &b))
        })
        .collect();
    let replies: Vec<String> = senders
        .into_iter()
        .map(|h| match h.join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => format!("error: {e:#}"),
            Err(_) => "sender panicked".into(),
        })
        .collect();
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let peaks = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    // Phase two: delivery released, sampled until the queue is empty.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample(done.clone());
    fs::write(
        &config,
        held.replace("delivery_enabled = false", "delivery_enabled = true"),
    )?;
    smtpd.signal(nix::sys::signal::Signal::SIGHUP);
    let spool = d.join("spool");
    let delivered = wait_until("the queue to empty", Duration::from_secs(600), || {
        crate::bench::queued(&spool) == 0
    });
    done.store(true, Ordering::Relaxed);
    let delivery = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    smtpd.stop(Duration::from_secs(10));
    worker.stop(Duration::from_secs(10));

    println!(
        "{MESSAGES} concurrent messages of {} MiB through mb-smtpd and one mb-filter worker ({}), {:.1}s",
        SIZE >> 20,
        bin_dir.display(),
        elapsed.as_secs_f64()
    );
    for r in &replies {
        println!("  reply: {r}");
    }
    println!(
        "  {:<10} {:>10} {:>14} {:>14} {:>14}",
        "", "idle RSS", "peak RSS(50ms)", "peak PSS(50ms)", "VmHWM"
    );
    for (phase, peaks) in [("receive + scan", &peaks), ("then delivery", &delivery)] {
        println!("  {phase}");
        for (name, (peak, idle)) in ["mb-smtpd", "mb-filter"].iter().zip(peaks.iter().zip(idle)) {
            println!(
                "  {name:<10} {:>7} MiB {:>10} MiB {:>10} MiB {:>10} MiB",
                idle >> 10,
                peak.rss >> 10,
                peak.pss >> 10,
                peak.hwm >> 10
            );
        }
    }
    delivered?;
    if replies.iter().any(|r| !r.starts_with("250")) {
        bail!("not every message was accepted: {replies:?}");
    }
    Ok((peaks[0].hwm, peaks[1].hwm))
}
