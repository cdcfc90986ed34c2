//! Spool designs measured side by side (issue 18): mb-spool's segment log with group
//! commit, the file-per-message spool mb-smtpd had before issue 18 (its system calls
//! replicated one for one), and redb and fjall used as the spool with one durable commit
//! per batch.
//!
//! The workload is a relay's: N writer threads each commit messages one at a time and
//! wait until each is durable (the 250), then hand it to one delivery thread that reads
//! it back and records it finished. Reported: messages/s end to end, fsyncs (or store
//! commits) per second, process CPU per message, and the p50/p99 time to durability.
//!
//! Run: `cargo run --release --manifest-path crates/mb-spool/bench/Cargo.toml -- [DIR]`
//! (DIR: where the stores are created, default /var/tmp; it should be the file system
//! the spool lives on).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redb::ReadableDatabase;

trait Store: Send + Sync {
    /// Returns once the message is durable.
    fn commit(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<()>;
    /// Reads the message back and records it finished (durable with a later batch).
    fn deliver(&self, id: &str) -> Result<usize>;
    /// fsync/fdatasync calls made (log, files), or durable commits (redb, fjall).
    fn syncs(&self) -> u64;
    /// Waits until everything recorded so far is durable.
    fn settle(&self) -> Result<()>;
}

// ---- mb-spool's log ----

struct Log(mb_spool::Spool);

impl Store for Log {
    fn commit(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<()> {
        Ok(self.0.append(id, envelope, body).wait()?)
    }
    fn deliver(&self, id: &str) -> Result<usize> {
        let m = self.0.read(id)?;
        let n = m.envelope.len() + m.body.read_all()?.len();
        // A relay does not wait for its completion record: a crash before it is durable
        // repeats the delivery, as RFC 1047 allows.
        let _ = self.0.complete(id);
        Ok(n)
    }
    fn syncs(&self) -> u64 {
        self.0.stats().syncs
    }
    fn settle(&self) -> Result<()> {
        Ok(())
    }
}

// ---- the file-per-message spool, as crates/mb-smtpd/src/spool.rs did it before issue 18 ----

struct Files {
    root: PathBuf,
    group: GroupSync,
    syncs: AtomicU64,
}

const MAGIC: &[u8; 8] = b"MBQ1END\n";

/// mb-smtpd's `GroupSync`: concurrent commits share one directory fsync.
#[derive(Default)]
struct GroupSync {
    state: Mutex<(u64, u64, bool)>,
    done: Condvar,
}

impl GroupSync {
    fn sync(&self, dir: &Path, syncs: &AtomicU64) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.0 += 1;
        let mine = st.0;
        loop {
            if st.1 >= mine {
                return Ok(());
            }
            if st.2 {
                st = self.done.wait(st).unwrap();
                continue;
            }
            st.2 = true;
            let target = st.0;
            drop(st);
            let r = std::fs::File::open(dir).and_then(|d| d.sync_all());
            syncs.fetch_add(1, Ordering::Relaxed);
            st = self.state.lock().unwrap();
            st.2 = false;
            if r.is_ok() {
                st.1 = st.1.max(target);
            }
            self.done.notify_all();
            r?;
        }
    }
}

impl Files {
    fn open(root: &Path) -> Result<Files> {
        for d in ["tmp", "incoming", "deferred", "hold", "state", "corrupt"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(Files {
            root: root.to_path_buf(),
            group: GroupSync::default(),
            syncs: AtomicU64::new(0),
        })
    }
    fn locate(&self, id: &str) -> Option<PathBuf> {
        ["incoming", "deferred", "hold"]
            .iter()
            .map(|q| self.root.join(q).join(id))
            .find(|p| p.exists())
    }
}

impl Store for Files {
    fn commit(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<()> {
        let tmp = self.root.join("tmp").join(id);
        let target = self.root.join("incoming").join(id);
        // SpoolWriter::write spills above 256 KiB, then commit appends the rest.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut buf = Vec::with_capacity(body.len() + envelope.len() + 16);
        buf.extend_from_slice(body);
        buf.extend_from_slice(envelope);
        buf.extend_from_slice(&(envelope.len() as u64).to_le_bytes());
        buf.extend_from_slice(MAGIC);
        f.write_all(&buf)?;
        f.sync_all()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        drop(f);
        std::fs::hard_link(&tmp, &target)?;
        let _ = std::fs::remove_file(&tmp);
        self.group.sync(&self.root.join("incoming"), &self.syncs)?;
        Ok(())
    }
    fn deliver(&self, id: &str) -> Result<usize> {
        // qmgr::Manager::load: locate, read the file (Content::load), load_state.
        let path = self.locate(id).context("message gone")?;
        let mut data = Vec::new();
        std::fs::File::open(&path)?.read_to_end(&mut data)?;
        let _ = std::fs::read(self.root.join("state").join(id));
        // remove_delivered: locate again, unlink the message and its (absent) state.
        if let Some(p) = self.locate(id) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(self.root.join("state").join(id));
        Ok(data.len())
    }
    fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
    fn settle(&self) -> Result<()> {
        Ok(())
    }
}

// ---- a group committer for the embedded stores ----

enum KvOp {
    Put(String, Vec<u8>),
    Del(String),
}

struct Waiting {
    op: KvOp,
    ack: Option<mpsc::SyncSender<Result<(), String>>>,
}

/// Writers queue puts and deletes; one thread commits everything queued in one durable
/// transaction (redb) or one journal sync (fjall), then acknowledges the puts.
struct Group {
    queue: Mutex<(Vec<Waiting>, bool)>,
    wake: Condvar,
    commits: AtomicU64,
}

impl Group {
    fn start(mut commit: impl FnMut(&[Waiting]) -> Result<()> + Send + 'static) -> Arc<Group> {
        let g = Arc::new(Group {
            queue: Mutex::new((Vec::new(), false)),
            wake: Condvar::new(),
            commits: AtomicU64::new(0),
        });
        let me = g.clone();
        std::thread::spawn(move || {
            let mut batch = Vec::new();
            loop {
                {
                    let mut q = me.queue.lock().unwrap();
                    while q.0.is_empty() && !q.1 {
                        q = me.wake.wait(q).unwrap();
                    }
                    if q.0.is_empty() {
                        return;
                    }
                    std::mem::swap(&mut q.0, &mut batch);
                }
                let r = commit(&batch).map_err(|e| e.to_string());
                me.commits.fetch_add(1, Ordering::Relaxed);
                for w in batch.drain(..) {
                    if let Some(ack) = w.ack {
                        let _ = ack.send(r.clone());
                    }
                }
            }
        });
        g
    }

    fn submit(&self, op: KvOp, wait: bool) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        let ack = wait.then_some(tx);
        {
            let mut q = self.queue.lock().unwrap();
            q.0.push(Waiting { op, ack });
        }
        self.wake.notify_one();
        if wait {
            rx.recv()?.map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    fn stop(&self) {
        self.queue.lock().unwrap().1 = true;
        self.wake.notify_all();
    }
}

fn value(envelope: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + envelope.len() + body.len());
    v.extend_from_slice(&(envelope.len() as u64).to_le_bytes());
    v.extend_from_slice(envelope);
    v.extend_from_slice(body);
    v
}

const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("spool");

struct Redb {
    db: Arc<redb::Database>,
    group: Arc<Group>,
}

impl Redb {
    fn open(root: &Path) -> Result<Redb> {
        std::fs::create_dir_all(root)?;
        let db = Arc::new(redb::Database::create(root.join("spool.redb"))?);
        let d = db.clone();
        let group = Group::start(move |batch| {
            let mut txn = d.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            {
                let mut t = txn.open_table(TABLE)?;
                for w in batch {
                    match &w.op {
                        KvOp::Put(k, v) => {
                            t.insert(k.as_str(), v.as_slice())?;
                        }
                        KvOp::Del(k) => {
                            t.remove(k.as_str())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        });
        Ok(Redb { db, group })
    }
}

impl Store for Redb {
    fn commit(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<()> {
        self.group
            .submit(KvOp::Put(id.into(), value(envelope, body)), true)
    }
    fn deliver(&self, id: &str) -> Result<usize> {
        let n = {
            let r = self.db.begin_read()?;
            let t = r.open_table(TABLE)?;
            t.get(id)?.context("message gone")?.value().len()
        };
        self.group.submit(KvOp::Del(id.into()), false)?;
        Ok(n)
    }
    fn syncs(&self) -> u64 {
        self.group.commits.load(Ordering::Relaxed)
    }
    fn settle(&self) -> Result<()> {
        self.group.submit(KvOp::Del("settle".into()), true)
    }
}

impl Drop for Redb {
    fn drop(&mut self) {
        self.group.stop();
    }
}

struct Fjall {
    ks: fjall::Keyspace,
    group: Arc<Group>,
}

impl Fjall {
    fn open(root: &Path) -> Result<Fjall> {
        let db = fjall::Database::builder(root).open()?;
        let ks = db.keyspace("spool", fjall::KeyspaceCreateOptions::default)?;
        let k2 = ks.clone();
        let group = Group::start(move |batch| {
            let mut b = db.batch();
            for w in batch {
                match &w.op {
                    KvOp::Put(k, v) => b.insert(&k2, k.as_str(), v.as_slice()),
                    KvOp::Del(k) => b.remove(&k2, k.as_str()),
                }
            }
            b.commit()?;
            db.persist(fjall::PersistMode::SyncData)?;
            Ok(())
        });
        Ok(Fjall { ks, group })
    }
}

impl Store for Fjall {
    fn commit(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<()> {
        self.group
            .submit(KvOp::Put(id.into(), value(envelope, body)), true)
    }
    fn deliver(&self, id: &str) -> Result<usize> {
        let n = self.ks.get(id)?.context("message gone")?.len();
        self.group.submit(KvOp::Del(id.into()), false)?;
        Ok(n)
    }
    fn syncs(&self) -> u64 {
        self.group.commits.load(Ordering::Relaxed)
    }
    fn settle(&self) -> Result<()> {
        self.group.submit(KvOp::Del("settle".into()), true)
    }
}

impl Drop for Fjall {
    fn drop(&mut self) {
        self.group.stop();
    }
}

// ---- the harness ----

/// Process CPU time (user + system) so far, from /proc/self/stat.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Bytes this process caused to be written to storage so far.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct Row {
    store: &'static str,
    writers: usize,
    size: usize,
    messages: usize,
    rate: f64,
    syncs_per_s: f64,
    msgs_per_sync: f64,
    cpu_us: f64,
    /// KiB the process sent to storage per message (/proc/self/io write_bytes).
    disk_kib: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn envelope(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","sender":"s@sender.example","recipients":[{{"address":"r@served.example"}}],"client_ip":"127.0.0.1","helo":"bench","received_at":1764590000}}"#
    )
    .into_bytes()
}

/// One measurement: `writers` threads commit `size`-byte messages for `secs` seconds
/// (each waiting for durability), one thread delivers and completes them.
fn run(
    store: Arc<dyn Store>,
    name: &'static str,
    writers: usize,
    size: usize,
    secs: f64,
) -> Result<Row> {
    // Incompressible bytes: fjall's journal compresses values of 4 KiB and more with
    // LZ4 by default, and a repeated pattern would measure that, not the spool.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let body: Arc<Vec<u8>> = Arc::new(
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect(),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let deliverer = {
        let store = store.clone();
        std::thread::spawn(move || -> Result<usize> {
            let mut n = 0;
            for id in rx {
                store.deliver(&id)?;
                n += 1;
            }
            Ok(n)
        })
    };
    let syncs0 = store.syncs();
    let cpu0 = cpu();
    let disk0 = written();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (store, tx, body) = (store.clone(), tx.clone(), body.clone());
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut lat = Vec::new();
                for i in 0.. {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let id = format!("{w:04X}{i:08X}");
                    let env = envelope(&id);
                    let t = Instant::now();
                    store.commit(&id, &env, &body)?;
                    lat.push(t.elapsed());
                    tx.send(id)?;
                }
                Ok(lat)
            })
        })
        .collect();
    drop(tx);
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??);
    }
    let delivered = deliverer
        .join()
        .map_err(|_| anyhow::anyhow!("deliverer panicked"))??;
    store.settle()?;
    let wall = started.elapsed().as_secs_f64();
    let cpu_used = cpu() - cpu0;
    let disk = written().saturating_sub(disk0);
    let syncs = store.syncs() - syncs0;
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    Ok(Row {
        store: name,
        writers,
        size,
        messages: delivered,
        rate: delivered as f64 / wall,
        syncs_per_s: syncs as f64 / wall,
        msgs_per_sync: delivered as f64 / syncs.max(1) as f64,
        cpu_us: cpu_used.as_secs_f64() * 1e6 / delivered as f64,
        disk_kib: disk as f64 / 1024.0 / delivered as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}

fn open(name: &str, dir: &Path) -> Result<Arc<dyn Store>> {
    Ok(match name {
        "log" => Arc::new(Log(mb_spool::Spool::open(
            dir,
            mb_spool::Config::default(),
        )?
        .0)),
        // Every body in the log itself, however large: no body files.
        "log-inline" => Arc::new(Log(mb_spool::Spool::open(
            dir,
            mb_spool::Config {
                large_threshold: usize::MAX,
                ..mb_spool::Config::default()
            },
        )?
        .0)),
        "files" => Arc::new(Files::open(dir)?),
        "redb" => Arc::new(Redb::open(dir)?),
        "fjall" => Arc::new(Fjall::open(dir)?),
        _ => anyhow::bail!("unknown store {name}"),
    })
}

fn du(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += du(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

/// Start-up recovery of the log with `n` queued 4 KiB messages.
fn recovery(base: &Path, n: usize) -> Result<()> {
    let dir = base.join("recovery");
    let _ = std::fs::remove_dir_all(&dir);
    {
        let (spool, _) = mb_spool::Spool::open(&dir, mb_spool::Config::default())?;
        let body = vec![b'x'; 4096];
        let threads: Vec<_> = (0..100)
            .map(|w| {
                let (spool, body) = (spool.clone(), body.clone());
                std::thread::spawn(move || -> Result<()> {
                    for i in 0..n / 100 {
                        let id = format!("{w:04X}{i:08X}");
                        spool.append(&id, &envelope(&id), &body).wait()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
    }
    // Drop the page cache's copy where we may (root): recovery from a cold start.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let t = Instant::now();
    let (spool, rec) = mb_spool::Spool::open(&dir, mb_spool::Config::default())?;
    println!(
        "recovery: {} messages in {} segments ({} MiB) recovered in {:.2} s (cold cache where permitted)",
        spool.stats().queues[0],
        rec.segments,
        du(&dir) >> 20,
        t.elapsed().as_secs_f64()
    );
    drop(spool);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base =
        PathBuf::from(args.first().map_or("/var/tmp", String::as_str)).join("mb-spool-bench");
    let only: Option<&str> = args.get(1).map(String::as_str);
    std::fs::create_dir_all(&base)?;
    // (writers, message size); each store runs each case for SECS seconds, stores
    // interleaved, ROUNDS times, and the median round is reported: these machines are
    // shared, and one run alone measures the neighbours as much as the spool.
    let cases: &[(usize, usize)] = &[(20, 4096), (100, 4096), (20, 1 << 20), (100, 1 << 20)];
    let rounds: usize = std::env::var("MB_SPOOL_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let secs: f64 = std::env::var("MB_SPOOL_BENCH_SECS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3.0);
    let mut all: Vec<Row> = Vec::new();
    // MB_SPOOL_BENCH_CASE=N runs only the Nth case (for `strace -c` counts of one).
    let case: Option<usize> = std::env::var("MB_SPOOL_BENCH_CASE")
        .ok()
        .and_then(|c| c.parse().ok());
    println!(
        "   {:<6} {:>7} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "store",
        "writers",
        "size",
        "msgs",
        "msg/s",
        "syncs/s",
        "msg/sync",
        "cpu/msg",
        "KiB/msg",
        "p50 ms",
        "p99 ms"
    );
    for round in 0..rounds {
        for (i, &(writers, size)) in cases.iter().enumerate() {
            if case.is_some_and(|c| c != i) {
                continue;
            }
            for name in ["files", "log", "log-inline", "redb", "fjall"] {
                if only.is_some_and(|o| o != name && o != "all") {
                    continue;
                }
                let dir = base.join(name);
                let _ = std::fs::remove_dir_all(&dir);
                let store = open(name, &dir)?;
                let static_name: &'static str = match name {
                    "files" => "files",
                    "log" => "log",
                    "log-inline" => "log-in",
                    "redb" => "redb",
                    _ => "fjall",
                };
                let r = run(store, static_name, writers, size, secs)?;
                print!("r{round} ");
                println!(
                    "{:<6} {:>7} {:>8} {:>6} {:>9.0} {:>9.0} {:>9.1} {:>7.0}µs {:>8.1} {:>8.2} {:>8.2}",
                    r.store,
                    r.writers,
                    r.size,
                    r.messages,
                    r.rate,
                    r.syncs_per_s,
                    r.msgs_per_sync,
                    r.cpu_us,
                    r.disk_kib,
                    r.p50_ms,
                    r.p99_ms
                );
                // Give each store's background threads (flushes, compactions) time to end
                // before the next measurement's CPU clock starts.
                std::thread::sleep(Duration::from_millis(300));
                let _ = std::fs::remove_dir_all(&dir);
                all.push(r);
            }
        }
    }
    println!(
        "\nmedian of {rounds} rounds ({secs} s each); ratio: msg/s against the file-per-message spool"
    );
    println!(
        "{:<6} {:>7} {:>8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "store",
        "writers",
        "size",
        "msg/s",
        "ratio",
        "syncs/s",
        "msg/sync",
        "cpu/msg",
        "KiB/msg",
        "p50 ms",
        "p99 ms"
    );
    for &(writers, size) in cases {
        let mut files_rate = 0.0;
        for name in ["files", "log", "log-in", "redb", "fjall"] {
            let mut rows: Vec<&Row> = all
                .iter()
                .filter(|r| r.store == name && r.writers == writers && r.size == size)
                .collect();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let r = rows[rows.len() / 2];
            if name == "files" {
                files_rate = r.rate;
            }
            let ratio = if files_rate > 0.0 {
                r.rate / files_rate
            } else {
                0.0
            };
            println!(
                "{:<6} {:>7} {:>8} {:>9.0} {:>5.1}x {:>9.0} {:>9.1} {:>7.0}µs {:>8.1} {:>8.2} {:>8.2}",
                r.store,
                r.writers,
                r.size,
                r.rate,
                ratio,
                r.syncs_per_s,
                r.msgs_per_sync,
                r.cpu_us,
                r.disk_kib,
                r.p50_ms,
                r.p99_ms
            );
        }
    }
    if case.is_none() && only.is_none_or(|o| o == "recovery" || o == "all") {
        recovery(&base, 100_000)?;
    }
    Ok(())
}
