//! The mail spool as a segment log with group commit.
//!
//! Concurrent writers append records to one active segment file; a single committer
//! thread writes every record that arrived while the previous batch was syncing, makes
//! them durable with one `fdatasync`, and only then acknowledges each of them. A caller
//! answers 250 only after its `Pending` resolved. Delivery progress (a new state:
//! deferred with its next retry, held, released) and completion (delivered, bounced,
//! deleted) are small records appended the same way. A segment file is deleted when
//! nothing live refers to it; sparse old segments are compacted (their live messages
//! copied forward) so that disk use follows the live queue.
//!
//! # Files
//! - `segments/SEQ.seg` (SEQ: 16 hex digits, increasing): a 16-byte header
//!   (`MBSPOOL1`, SEQ as u64 LE) then records, back to back.
//! - `segments/spare-SEQ`: up to two reclaimed segment files kept to be written over by
//!   later segments (overwriting allocated blocks spares `fdatasync` the journal commit
//!   that growing a file costs).
//! - `segments/spare-new-N`: a zero-filled spare the preparer thread wrote when the
//!   spool grew with none left (`segments/preparing-spare` while it is written).
//! - `bodies/ID`: the body of a message larger than `Config::large_threshold`, written
//!   and fsynced, and its directory fsynced, before the record that names it is written.
//!
//! # Records
//! `magic "MBR1" | payload length u32 | CRC-32 of kind and payload, XOR a mask derived
//! from the segment's SEQ, u32 | kind u8 | payload`, little-endian. The mask binds a
//! record to its segment: the old records left in a recycled file never verify. Kinds:
//! `Commit` (id, state, envelope, body inline or the length of `bodies/ID`), `State` (id,
//! queue, next attempt, caller data), `Done` (id). The log's order (segments by SEQ,
//! records by offset) is the order of events.
//!
//! # How mb-smtpd's queue maps onto it (`mb-smtpd/src/spool.rs`)
//! Queue ids stay `Spool::new_id`'s hex ids. A 250 waits for `append`'s `Pending`; a
//! message over 256 KiB streams into `body_file_path(id)` as it arrives (today's spill
//! file) and commits with `append_with_body_file`. `DeliveryState` (per-recipient
//! states, attempts, history) is `State::data`; deferral is `set_state(Deferred, next
//! attempt)`, hold/release/requeue are `set_state` with `Hold`/`Incoming`, delivered,
//! bounced and deleted are `complete`. A DSN is appended as a new message and made
//! durable before the message it reports on is completed, so a crash can repeat a notice
//! but never lose one. Completion after the next hop's 250 need not be awaited, nor cost
//! an `fdatasync` of its own: `complete_lazily`'s record is written at once (a killed
//! process keeps it) and its sync waits up to `Config::lazy_wait` (5 ms) for the sync a
//! commit needs anyway; a machine crash before it is durable repeats that delivery (the
//! RFC 1047 window, one batch and that wait long).
//! The free-space guard watches the file system of the spool root. `snapshot` reads a
//! spool without changing it, for tests and benchmarks that look at a running daemon's
//! queue.
//!
//! # Invariants
//! - **An acknowledged record is on disk**: the committer acknowledges a record only
//!   after the `fdatasync` of the segment it was written to returned success (and, for a
//!   large body, after the body file and `bodies/` were fsynced). An fsync failure
//!   poisons the spool: every pending and later operation fails (nothing written after a
//!   failed fsync can be trusted), so the caller answers 4xx, never a false 250.
//! - **Recovery returns only whole records**: each record carries its length and a
//!   checksum; a scan stops at the first record that is short or fails its checksum and,
//!   when a later record in the same segment verifies again, skips to it (counted as
//!   corruption, not a torn tail). A torn tail can only hold unacknowledged records.
//! - **The index changes only after durability**: a message becomes visible (and its
//!   id readable) once its commit is durable; where a message's records lie and which
//!   segments are referenced are updated by the committer after the fsync. A state or
//!   completion is ordered in the log exactly as it was accepted (the index lock is held
//!   while it is queued), so a compaction copy always carries the newest state.
//! - **A segment is deleted only when nothing live refers to it**: no live message has
//!   its newest commit copy or its newest state there, and no `Done` record there still
//!   cancels a commit copy in a segment that exists (otherwise recovery would revive a
//!   finished message). Deletions are fsynced (the directory) before the segments they
//!   unpin are considered, so a crash never keeps a commit copy whose `Done` is gone.
//! - **Ids are unique while they matter**: an id that is live, being committed, or whose
//!   `Done` still cancels an old copy is refused (`SpoolError::Duplicate`).
//! - **Nothing live is rewritten**: a segment is only appended to, body files are written
//!   once, and a spare file is written over only after it was reclaimed (nothing live
//!   in it, its deletion durable). After a restart a new segment is started, so nothing
//!   is appended behind a torn tail.

mod record;
mod recover;
mod snapshot;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use record::{Queue, State, valid_id};
pub use recover::Recovery;
pub use snapshot::{LogKind, Snapshot, SnapshotMessage, snapshot};

use record::BodySpec;

/// How the spool lays out its files.
#[derive(Debug, Clone)]
pub struct Config {
    /// A segment is closed and a new one started once it holds this many bytes.
    pub segment_size: u64,
    /// Bodies larger than this go to a file of their own (`bodies/ID`).
    pub large_threshold: usize,
    /// One `Spool::compact` call stops copying once it wrote this many bytes (a record
    /// more at most); the caller calls again later for the rest.
    pub compact_max_bytes: u64,
    /// Prepares a zero-filled spare segment when the spool grows by appending (a thread
    /// of its own writes one once the active segment grew past `PREPARE_AFTER` with no
    /// spare left), and has the committer move to a spare as soon as the active segment
    /// would grow: commits then write over allocated blocks, not only once old segments
    /// were recycled. Tests that count segments or spares turn it off.
    pub prepare_spare: bool,
    /// How long a written lazy record (`Spool::complete_lazily`) waits for the sync that
    /// another record makes the committer do anyway (`LAZY_WAIT`; tests lengthen it).
    pub lazy_wait: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            segment_size: 64 << 20,
            large_threshold: 256 << 10,
            compact_max_bytes: 64 << 20,
            prepare_spare: true,
            lazy_wait: LAZY_WAIT,
        }
    }
}

/// What can go wrong with the spool. A caller tempfails (4xx) on every one of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error: {0}")]
    Io(Arc<io::Error>),
    #[error("an earlier write or fsync of the spool failed; restart the daemon to recover")]
    Poisoned,
    #[error("the spool is shut down")]
    Closed,
    #[error("queue id {0:?} is not 1 to 64 ASCII letters and digits")]
    BadId(String),
    #[error("queue id {0} is already in the spool")]
    Duplicate(String),
    #[error("no message {0} in the spool")]
    NotFound(String),
    #[error("segment {segment} is not a spool segment of this version")]
    BadSegment { segment: PathBuf },
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> SpoolError {
        SpoolError::Io(Arc::new(e))
    }
}

/// The durable outcome of one appended record: resolves once the record is on disk (or
/// the commit failed). Await it in async code, or `wait` on a plain thread.
#[must_use = "a record is durable only once its Pending resolved"]
pub struct Pending(PendingInner);

enum PendingInner {
    Wait(tokio::sync::oneshot::Receiver<Result<(), SpoolError>>),
    Ready(Option<Result<(), SpoolError>>),
}

impl Pending {
    /// Blocks the calling thread until the record is durable. Not for async tasks.
    pub fn wait(self) -> Result<(), SpoolError> {
        match self.0 {
            PendingInner::Wait(rx) => rx.blocking_recv().unwrap_or(Err(SpoolError::Closed)),
            PendingInner::Ready(r) => r.unwrap_or(Err(SpoolError::Closed)),
        }
    }

    fn ready(r: Result<(), SpoolError>) -> Pending {
        Pending(PendingInner::Ready(Some(r)))
    }
}

impl Future for Pending {
    type Output = Result<(), SpoolError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PendingInner::Wait(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(SpoolError::Closed))),
            PendingInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(SpoolError::Closed))),
        }
    }
}

/// A queued message as read back: its envelope and where its body is.
pub struct Message {
    pub envelope: Vec<u8>,
    pub body: Body,
    pub state: State,
}

/// A message body, left where it is on disk so that a large one is streamed.
pub struct Body {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

impl Body {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes of the body starting at `at`.
    pub fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        if at.saturating_add(buf.len() as u64) > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the body",
            ));
        }
        self.file.read_exact_at(buf, self.offset + at)
    }

    /// The file the body lies in, from `offset()` on to `offset() + len()`: a segment or
    /// `bodies/ID`. An inline body's handle is the segment's, shared with every other
    /// reader of that segment: never seek it or stream from it with `Read` (its one file
    /// position is shared, so concurrent readers would read each other's bytes). Read
    /// with positioned reads (`FileExt::read_exact_at`, or `Body::read_exact_at`), or
    /// open a handle of your own.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where the body starts in `file()`.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The whole body in memory: for small messages and tests.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; usize::try_from(self.len).map_err(io::Error::other)?];
        self.read_exact_at(&mut v, 0)?;
        Ok(v)
    }
}

/// What the spool holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live messages per queue: incoming, deferred, hold.
    pub queues: [usize; 3],
    pub segments: usize,
    pub segment_bytes: u64,
    /// Bytes of segments that still belong to live messages (commit records).
    pub live_bytes: u64,
    pub body_files: usize,
    /// Segment files waiting to be reused (reclaimed or prepared).
    pub spare_segments: usize,
    /// Batches written and `fdatasync`s made since open (one per batch).
    pub batches: u64,
    pub syncs: u64,
    /// Zero-filled spares the preparer could not write since open (each was given up,
    /// and the committer went on appending).
    pub spares_failed: u64,
}

/// The spool. Cheap to clone; the committer stops when the last clone is dropped.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    _committer: Arc<CommitterHandle>,
}

struct Shared {
    root: PathBuf,
    config: Config,
    index: Mutex<Index>,
    /// Held by a `reclaim` (never while waiting for it with `index` held).
    reclaiming: Mutex<()>,
    queue: Mutex<Batch>,
    wake: Condvar,
    /// Wakes the spare preparer (with `index`): a spare is wanted, or the spool closes.
    prepare: Condvar,
    /// The spool is closing: the preparer stops (between two chunks of its writing).
    closing: std::sync::atomic::AtomicBool,
    batches: AtomicU64,
    syncs: AtomicU64,
    spares_failed: AtomicU64,
    /// Tests: the next batch's `fdatasync` fails (after its records were written).
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

/// Records accepted but not yet written, in acceptance order.
#[derive(Default)]
struct Batch {
    ops: Vec<Op>,
    /// How many of `ops` are not lazy: with none, the committer writes the lazy ones and
    /// lets their sync wait (up to `Config::lazy_wait`) for a record that needs one anyway.
    eager: usize,
    shutdown: bool,
    poisoned: bool,
}

struct Op {
    bytes: Vec<u8>,
    kind: OpKind,
    ack: tokio::sync::oneshot::Sender<Result<(), SpoolError>>,
}

/// How long, by default (`Config::lazy_wait`), a lazy record (`Spool::complete_lazily`),
/// written at once, waits for the sync another record makes the committer do anyway
/// before it is synced on its own. Under load the next commit comes well within it, so a
/// relayed message costs one `fdatasync` share instead of two; it bounds how much longer
/// than one batch a machine crash can leave a finished delivery undone (RFC 1047's
/// window). A killed process does not widen that window: the record is already written.
pub const LAZY_WAIT: Duration = Duration::from_millis(5);

enum OpKind {
    Commit {
        id: Box<str>,
        envelope_at: usize,
        envelope_len: u32,
        body: BodySpec,
        body_at: usize,
        /// A compaction copy of a live message, not a new one.
        copy: bool,
    },
    State {
        id: Box<str>,
    },
    Done {
        id: Box<str>,
    },
}

impl OpKind {
    fn has_file_body(&self) -> bool {
        matches!(
            self,
            OpKind::Commit {
                body: BodySpec::File { .. },
                copy: false,
                ..
            }
        )
    }
}

/// The in-memory index, rebuilt from the segments at start.
#[derive(Default)]
struct Index {
    live: HashMap<Box<str>, Entry>,
    /// Ids whose commit is queued but not yet durable.
    reserved: HashSet<Box<str>>,
    /// Finished messages whose `Done` still cancels a commit copy in an existing segment.
    ghosts: HashMap<Box<str>, Ghost>,
    segs: BTreeMap<u64, Seg>,
    active: u64,
    body_files: usize,
    /// Segment files kept for reuse, each at least `Config::segment_size` long:
    /// reclaimed ones (`segments/spare-SEQ`) and zero-filled ones the preparer wrote
    /// (`segments/spare-new-N`).
    spares: Vec<PathBuf>,
    /// The committer asked the preparer for a spare, which is not ready yet.
    spare_wanted: bool,
}

/// Reclaimed segment files kept for reuse. Writing over blocks a file already has makes
/// `fdatasync` a pure data flush, where appending also commits the file's new size and
/// block allocation through the file system's journal (measured: about 70 µs against
/// 100 to 140 µs per 32 KiB write and sync on this ext4).
const MAX_SPARES: usize = 2;

/// `Spool::compact` waits for its queued copies to be durable (and lets them go) each
/// time it queued this many bytes of them, so that its memory stays bounded.
pub const COMPACT_WAIT_BYTES: u64 = 16 << 20;

struct Entry {
    /// The state as accepted (a queued change shows at once; it is durable when its
    /// `Pending` resolves).
    state: State,
    /// A `Done` is queued: no further change is accepted.
    dying: bool,
    commit_seg: u64,
    envelope: (u64, u32),
    body: BodyLoc,
    record_len: u64,
    state_seg: u64,
    /// Segments (existing) that hold a commit record of this id.
    copies: u32,
}

#[derive(Clone, Copy)]
enum BodyLoc {
    Inline { offset: u64, len: u64 },
    File { len: u64 },
}

struct Ghost {
    done_seg: u64,
    copies: u32,
}

struct Seg {
    read: Arc<File>,
    size: u64,
    /// Live messages whose newest commit copy or newest state is here (counted once per
    /// role, so a message with both here counts twice).
    refs: u32,
    /// `Done` records here that still cancel a commit copy in an existing segment.
    pins: u32,
    live_bytes: u64,
    /// Ids with a commit record here.
    commits: Vec<Box<str>>,
}

impl Seg {
    fn new(read: Arc<File>, size: u64) -> Seg {
        Seg {
            read,
            size,
            refs: 0,
            pins: 0,
            live_bytes: 0,
            commits: Vec::new(),
        }
    }
}

struct CommitterHandle {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    preparer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for CommitterHandle {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        {
            let _index = lock(&self.shared.index);
            self.shared.closing.store(true, Ordering::SeqCst);
            self.shared.prepare.notify_all();
        }
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        if let Some(t) = lock(&self.preparer).take() {
            let _ = t.join();
        }
    }
}

/// The file the preparer fills before renaming it to a spare name (removed at open:
/// a crash can leave it half written).
const PREPARING: &str = "preparing-spare";

/// Bytes the preparer writes between two `fdatasync`s: on a journalled ext4
/// (data=ordered) a commit's journal flush waits for every newly allocated dirty page,
/// so the preparer never leaves more than this for a commit to wait for.
const PREPARE_CHUNK: usize = 4 << 20;

/// Bytes the committer appends to a segment with no spare left before it asks the
/// preparer for one: a spool that takes a few messages (tests, a quiet node) never
/// writes a whole segment of zeros.
const PREPARE_AFTER: u64 = 1 << 20;

/// The spare preparer's thread: when the committer asks (`Index::spare_wanted`), writes
/// a zero-filled file of `segment_size` bytes, syncs it, names it `spare-new-N`
/// (directory synced) and offers it. Zeros never verify as a record, so a spare written
/// this way is as safe as a recycled one. An error changes nothing but a count
/// (`Stats::spares_failed`): the committer goes on appending as it would without the
/// preparer, and asks again only in its next segment.
fn prepare_spares(shared: &Shared) {
    let segments = shared.root.join("segments");
    let mut n: u64 = 0;
    loop {
        {
            let mut index = lock(&shared.index);
            while !index.spare_wanted && !shared.closing.load(Ordering::SeqCst) {
                index = shared
                    .prepare
                    .wait(index)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let tmp = segments.join(PREPARING);
        let ready = match write_zeros(shared, &tmp) {
            Ok(true) => loop {
                n += 1;
                let name = segments.join(format!("spare-new-{n:X}"));
                if !name.exists() {
                    break std::fs::rename(&tmp, &name)
                        .and_then(|()| sync_dir(&segments))
                        .map(|()| name);
                }
            },
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let mut index = lock(&shared.index);
        // Asked again (if need be) once the committer appends past 1 MiB of its next
        // segment.
        index.spare_wanted = false;
        match ready {
            Ok(name) => index.spares.push(name),
            Err(_) => {
                shared.spares_failed.fetch_add(1, Ordering::Relaxed);
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
}

/// Writes `segment_size` zero bytes to `path` in `PREPARE_CHUNK`s, each synced.
/// `Ok(false)`: the spool closed meanwhile.
fn write_zeros(shared: &Shared, path: &Path) -> io::Result<bool> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; PREPARE_CHUNK];
    let mut at = 0u64;
    let size = shared
        .config
        .segment_size
        .max(record::SEGMENT_HEADER as u64);
    while at < size {
        if shared.closing.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(path);
            return Ok(false);
        }
        let n = (size - at).min(PREPARE_CHUNK as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        f.sync_data()?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(true)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn segment_path(root: &Path, seq: u64) -> PathBuf {
    root.join("segments").join(format!("{seq:016X}.seg"))
}

fn spare_path(root: &Path, seq: u64) -> PathBuf {
    root.join("segments").join(format!("spare-{seq:016X}"))
}

fn body_path(root: &Path, id: &str) -> PathBuf {
    root.join("bodies").join(id)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating if need be) the spool under `root`, recovers its index from the
    /// segments, deletes what nothing refers to, and starts a new active segment.
    pub fn open(root: &Path, config: Config) -> Result<(Spool, Recovery), SpoolError> {
        std::fs::create_dir_all(root.join("segments"))?;
        std::fs::create_dir_all(root.join("bodies"))?;
        let (mut index, mut recovery) = recover::scan(root)?;
        // A spare shorter than a segment (left by a smaller `segment_size`) would grow
        // when written: no better than a new file. The preparer's unfinished file goes.
        let mut spares = Vec::new();
        for spare in std::mem::take(&mut index.spares) {
            if std::fs::metadata(&spare)?.len() >= config.segment_size {
                spares.push(spare);
            } else {
                std::fs::remove_file(&spare)?;
            }
        }
        index.spares = spares;
        let _ = std::fs::remove_file(root.join("segments").join(PREPARING));
        let seq = index.segs.keys().next_back().map_or(1, |s| s + 1);
        let (file, file_len) = create_segment(root, seq, index.spares.pop())?;
        index.segs.insert(
            seq,
            Seg::new(
                Arc::new(File::open(segment_path(root, seq))?),
                record::SEGMENT_HEADER as u64,
            ),
        );
        index.active = seq;
        let index = Mutex::new(index);
        let reclaiming = Mutex::new(());
        recovery.reclaimed += reclaim(root, &index, &reclaiming, config.segment_size)?;
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            config,
            index,
            reclaiming,
            queue: Mutex::new(Batch::default()),
            wake: Condvar::new(),
            prepare: Condvar::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            batches: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            spares_failed: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        });
        let committer = Committer {
            shared: shared.clone(),
            file,
            seq,
            pos: record::SEGMENT_HEADER as u64,
            file_len,
            asked_in: 0,
            written: Vec::new(),
        };
        let preparer = if shared.config.prepare_spare {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("mb-spool-spare".into())
                    .spawn(move || prepare_spares(&shared))?,
            )
        } else {
            None
        };
        let thread = std::thread::Builder::new()
            .name("mb-spool-commit".into())
            .spawn(move || committer.run())?;
        Ok((
            Spool {
                shared: shared.clone(),
                _committer: Arc::new(CommitterHandle {
                    shared,
                    thread: Mutex::new(Some(thread)),
                    preparer: Mutex::new(preparer),
                }),
            },
            recovery,
        ))
    }

    /// Appends a new message. A body above `Config::large_threshold` is first written to
    /// `bodies/ID` and fsynced on the calling thread (call from a blocking context).
    /// The message is durable, and visible, once the returned `Pending` resolves.
    pub fn append(&self, id: &str, envelope: &[u8], body: &[u8]) -> Pending {
        if body.len() > self.shared.config.large_threshold {
            return match self.write_body_file(id, body) {
                Ok(()) => self.enqueue_commit(
                    id,
                    envelope,
                    BodySpec::File {
                        len: body.len() as u64,
                    },
                    &[],
                ),
                Err(e) => Pending::ready(Err(e)),
            };
        }
        self.enqueue_commit(
            id,
            envelope,
            BodySpec::Inline {
                len: body.len() as u64,
            },
            body,
        )
    }

    /// Appends a new message whose body the caller already wrote to `body_file_path(id)`
    /// (streamed there as it arrived); the file is fsynced here, on the calling thread.
    pub fn append_with_body_file(&self, id: &str, envelope: &[u8]) -> Pending {
        let r = (|| {
            check_id(id)?;
            let f = File::open(body_path(&self.shared.root, id))?;
            f.sync_data()?;
            Ok::<u64, SpoolError>(f.metadata()?.len())
        })();
        match r {
            Ok(len) => self.enqueue_commit(id, envelope, BodySpec::File { len }, &[]),
            Err(e) => Pending::ready(Err(e)),
        }
    }

    /// Where a large body is written before `append_with_body_file`.
    pub fn body_file_path(&self, id: &str) -> Result<PathBuf, SpoolError> {
        check_id(id)?;
        Ok(body_path(&self.shared.root, id))
    }

    fn write_body_file(&self, id: &str, body: &[u8]) -> Result<(), SpoolError> {
        let path = self.body_file_path(id)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    SpoolError::Duplicate(id.to_string())
                } else {
                    e.into()
                }
            })?;
        let r = f.write_all(body).and_then(|()| f.sync_data());
        if let Err(e) = r {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        Ok(())
    }

    fn enqueue_commit(&self, id: &str, envelope: &[u8], body: BodySpec, inline: &[u8]) -> Pending {
        if let Err(e) = check_id(id) {
            return Pending::ready(Err(e));
        }
        let mut bytes =
            Vec::with_capacity(record::RECORD_HEADER + 96 + envelope.len() + inline.len());
        let (envelope_at, body_at) =
            record::encode_commit(&mut bytes, id, &State::default(), envelope, body, inline);
        let kind = OpKind::Commit {
            id: id.into(),
            envelope_at,
            envelope_len: envelope.len() as u32,
            body,
            body_at,
            copy: false,
        };
        let mut index = lock(&self.shared.index);
        if index.live.contains_key(id)
            || index.reserved.contains(id)
            || index.ghosts.contains_key(id)
        {
            drop(index);
            if matches!(body, BodySpec::File { .. }) {
                // Only our own write_body_file made it (create_new): not someone else's.
                let _ = std::fs::remove_file(body_path(&self.shared.root, id));
            }
            return Pending::ready(Err(SpoolError::Duplicate(id.to_string())));
        }
        self.push(bytes, kind, || {
            index.reserved.insert(id.into());
        })
    }

    /// Queues a record. Called with the index lock held, so that the log's order is the
    /// order in which the index accepted the changes. `accept` makes the change in the
    /// index, only once the record is queued (not on a poisoned or closed spool).
    fn push(&self, bytes: Vec<u8>, kind: OpKind, accept: impl FnOnce()) -> Pending {
        self.push_op(bytes, kind, false, accept)
    }

    /// `push`; a `lazy` record is written at once but does not make the committer sync
    /// before `lazy_wait`.
    fn push_op(&self, bytes: Vec<u8>, kind: OpKind, lazy: bool, accept: impl FnOnce()) -> Pending {
        let (ack, rx) = tokio::sync::oneshot::channel();
        let mut q = lock(&self.shared.queue);
        if q.poisoned {
            return Pending::ready(Err(SpoolError::Poisoned));
        }
        if q.shutdown {
            return Pending::ready(Err(SpoolError::Closed));
        }
        accept();
        // The committer waits for the first record (and, with only lazy ones queued,
        // for the first eager one or `LAZY_WAIT`).
        let wake = if lazy { q.ops.is_empty() } else { q.eager == 0 };
        if !lazy {
            q.eager += 1;
        }
        q.ops.push(Op { bytes, kind, ack });
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Pending(PendingInner::Wait(rx))
    }

    /// Records a message's new state (deferred with its next attempt, held, released,
    /// requeued), durable once the `Pending` resolves.
    pub fn set_state(&self, id: &str, state: State) -> Pending {
        let mut bytes = Vec::with_capacity(record::RECORD_HEADER + 80 + state.data.len());
        record::encode_state(&mut bytes, id, &state);
        let mut index = lock(&self.shared.index);
        let Some(e) = index.live.get_mut(id).filter(|e| !e.dying) else {
            return Pending::ready(Err(SpoolError::NotFound(id.to_string())));
        };
        self.push(bytes, OpKind::State { id: id.into() }, || e.state = state)
    }

    /// Records that a message is finished (delivered, bounced or deleted). Its space is
    /// reclaimed once this is durable and its segments hold nothing else live.
    pub fn complete(&self, id: &str) -> Pending {
        self.finish(id, false)
    }

    /// `complete` for a completion nobody waits for (a delivered message): its record is
    /// written at once, and its sync waits up to `Config::lazy_wait` for the one another
    /// record needs anyway instead of costing an `fdatasync` of its own; its `Pending`
    /// resolves then. A machine crash in between repeats the delivery, as one during any
    /// batch does; a killed process does not (the written record survives it).
    pub fn complete_lazily(&self, id: &str) -> Pending {
        self.finish(id, true)
    }

    fn finish(&self, id: &str, lazy: bool) -> Pending {
        let mut bytes = Vec::with_capacity(record::RECORD_HEADER + 1 + id.len());
        record::encode_done(&mut bytes, id);
        let mut index = lock(&self.shared.index);
        let Some(e) = index.live.get_mut(id).filter(|e| !e.dying) else {
            return Pending::ready(Err(SpoolError::NotFound(id.to_string())));
        };
        self.push_op(bytes, OpKind::Done { id: id.into() }, lazy, || {
            e.dying = true
        })
    }

    /// Whether a failed write or fsync has poisoned the spool: every operation fails
    /// from then on, until the process restarts and recovers.
    pub fn is_poisoned(&self) -> bool {
        lock(&self.shared.queue).poisoned
    }

    /// The state of a live message (as accepted, possibly not yet durable).
    pub fn state(&self, id: &str) -> Option<State> {
        let index = lock(&self.shared.index);
        index
            .live
            .get(id)
            .filter(|e| !e.dying)
            .map(|e| e.state.clone())
    }

    /// Every live message with its whole state (`data` included), ordered by id (ids sort
    /// by arrival). For ids, queues and retry times only, `list_brief` copies far less.
    pub fn list(&self) -> Vec<(String, State)> {
        let index = lock(&self.shared.index);
        let mut v: Vec<(String, State)> = index
            .live
            .iter()
            .filter(|(_, e)| !e.dying)
            .map(|(id, e)| (id.to_string(), e.state.clone()))
            .collect();
        drop(index);
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every live message's id, queue and next attempt, ordered by id, without its
    /// `State::data` (for counts and id lists: `list` clones every message's data; take
    /// one message's whole state with `state`).
    pub fn list_brief(&self) -> Vec<(String, Queue, u64)> {
        let index = lock(&self.shared.index);
        let mut v: Vec<(String, Queue, u64)> = index
            .live
            .iter()
            .filter(|(_, e)| !e.dying)
            .map(|(id, e)| (id.to_string(), e.state.queue, e.state.next_attempt))
            .collect();
        drop(index);
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Reads a live message: its envelope (read now) and a handle on its body.
    pub fn read(&self, id: &str) -> Result<Message, SpoolError> {
        let (file, envelope, body, state) = {
            let index = lock(&self.shared.index);
            let e = index
                .live
                .get(id)
                .filter(|e| !e.dying)
                .ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
            let seg = index
                .segs
                .get(&e.commit_seg)
                .ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
            (seg.read.clone(), e.envelope, e.body, e.state.clone())
        };
        let mut env = vec![0u8; envelope.1 as usize];
        file.read_exact_at(&mut env, envelope.0)?;
        let body = match body {
            BodyLoc::Inline { offset, len } => Body { file, offset, len },
            BodyLoc::File { len } => Body {
                file: Arc::new(File::open(body_path(&self.shared.root, id))?),
                offset: 0,
                len,
            },
        };
        Ok(Message {
            envelope: env,
            body,
            state,
        })
    }

    pub fn stats(&self) -> Stats {
        let index = lock(&self.shared.index);
        let mut queues = [0; 3];
        for e in index.live.values().filter(|e| !e.dying) {
            queues[e.state.queue as usize] += 1;
        }
        Stats {
            queues,
            segments: index.segs.len(),
            segment_bytes: index.segs.values().map(|s| s.size).sum(),
            live_bytes: index.segs.values().map(|s| s.live_bytes).sum(),
            body_files: index.body_files,
            spare_segments: index.spares.len(),
            batches: self.shared.batches.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            spares_failed: self.shared.spares_failed.load(Ordering::Relaxed),
        }
    }

    /// Copies the live messages of closed segments whose live bytes are under
    /// `max_live_fraction` of their size into the active segment (commit copies with
    /// their current state, and fresh state records for messages whose newest state is
    /// there), so that the old segments can be deleted. Returns how many records it
    /// wrote; they are durable when it returns.
    ///
    /// One call copies about `Config::compact_max_bytes` (oldest segments first) and
    /// holds at most `COMPACT_WAIT_BYTES` of copies in memory at a time; when it returned
    /// a non-zero count, there may be more to do: call it again later.
    pub fn compact(&self, max_live_fraction: f64) -> Result<usize, SpoolError> {
        let max_bytes = self.shared.config.compact_max_bytes;
        let (victims, work) = {
            let index = lock(&self.shared.index);
            let victims: HashSet<u64> = index
                .segs
                .iter()
                .filter(|(seq, s)| {
                    **seq != index.active
                        && (s.live_bytes as f64) < max_live_fraction * s.size as f64
                })
                .map(|(seq, _)| *seq)
                .collect();
            let mut work: Vec<(u64, Box<str>, bool)> = index
                .live
                .iter()
                .filter(|(_, e)| !e.dying)
                .filter_map(|(id, e)| {
                    if victims.contains(&e.commit_seg) {
                        Some((e.commit_seg.min(e.state_seg), id.clone(), true))
                    } else if victims.contains(&e.state_seg) {
                        Some((e.state_seg, id.clone(), false))
                    } else {
                        None
                    }
                })
                .collect();
            // Oldest segments first: a call that stops at its cap has emptied them.
            work.sort_unstable();
            (victims, work)
        };
        let mut pending: Vec<Pending> = Vec::new();
        let mut n = 0;
        let (mut copied, mut unwaited) = (0u64, 0u64);
        for (_, id, whole) in work {
            if copied >= max_bytes {
                break;
            }
            if unwaited >= COMPACT_WAIT_BYTES {
                n += pending.len();
                for p in pending.drain(..) {
                    p.wait()?;
                }
                unwaited = 0;
            }
            let len = if whole {
                // Bodies never change, so they are read without the lock; the state is
                // taken under it, with the copy queued in the same critical section.
                let Ok(msg) = self.read(&id) else { continue };
                let (spec, inline) = match lock(&self.shared.index).live.get(&id).map(|e| e.body) {
                    Some(BodyLoc::File { len }) => (BodySpec::File { len }, Vec::new()),
                    Some(BodyLoc::Inline { len, .. }) => {
                        (BodySpec::Inline { len }, msg.body.read_all()?)
                    }
                    None => continue,
                };
                let index = lock(&self.shared.index);
                let Some(e) = index
                    .live
                    .get(&id)
                    .filter(|e| !e.dying && victims.contains(&e.commit_seg))
                else {
                    continue;
                };
                let mut bytes = Vec::new();
                let (envelope_at, body_at) =
                    record::encode_commit(&mut bytes, &id, &e.state, &msg.envelope, spec, &inline);
                let len = bytes.len() as u64;
                let kind = OpKind::Commit {
                    id: id.clone(),
                    envelope_at,
                    envelope_len: msg.envelope.len() as u32,
                    body: spec,
                    body_at,
                    copy: true,
                };
                pending.push(self.push(bytes, kind, || ()));
                drop(index);
                len
            } else {
                let index = lock(&self.shared.index);
                let Some(e) = index.live.get(&id).filter(|e| !e.dying) else {
                    continue;
                };
                let mut bytes = Vec::new();
                record::encode_state(&mut bytes, &id, &e.state);
                let len = bytes.len() as u64;
                pending.push(self.push(bytes, OpKind::State { id }, || ()));
                drop(index);
                len
            };
            copied += len;
            unwaited += len;
        }
        n += pending.len();
        for p in pending {
            p.wait()?;
        }
        // The committer reclaims after every batch; this catches segments that only the
        // last batch's bookkeeping emptied, should it have raced with the scan above.
        reclaim(
            &self.shared.root,
            &self.shared.index,
            &self.shared.reclaiming,
            self.shared.config.segment_size,
        )?;
        Ok(n)
    }
}

fn check_id(id: &str) -> Result<(), SpoolError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(SpoolError::BadId(id.to_string()))
    }
}

/// Starts segment `seq`, in a spare file when there is one (its old records stay behind
/// the new ones but never verify: their checksums are bound to the old sequence number).
/// Returns the file and its length (up to which writes overwrite allocated blocks).
fn create_segment(root: &Path, seq: u64, spare: Option<PathBuf>) -> io::Result<(File, u64)> {
    let path = segment_path(root, seq);
    let f = match spare {
        Some(spare) => {
            std::fs::rename(spare, &path)?;
            std::fs::OpenOptions::new().write(true).open(&path)?
        }
        None => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?,
    };
    let mut header = [0u8; record::SEGMENT_HEADER];
    header[..8].copy_from_slice(record::SEGMENT_MAGIC);
    header[8..].copy_from_slice(&seq.to_le_bytes());
    f.write_all_at(&header, 0)?;
    f.sync_data()?;
    sync_dir(&root.join("segments"))?;
    let len = f.metadata()?.len();
    Ok((f, len))
}

/// Deletes every closed segment nothing refers to, in rounds: a round's deletions are
/// made durable (directory fsync) before the `Done` records they unpin may go in the
/// next round. Returns how many segments went.
///
/// The index lock is held only to choose a round's segments and to record that they
/// went, never across the renames, unlinks and directory fsync, which can take a
/// journal commit: callers on async threads take that lock. While it is released the
/// chosen segments stay dead: only the active segment (never chosen) gains references
/// or pins, a live message whose older copy lies in one is finished as if that copy
/// were still there (its ghost counts it, and loses it below), and no reader can reach
/// one (nothing live has its newest commit there). `serial` keeps two reclaims (the
/// committer's and `compact`'s) from choosing the same segment.
/// A dead segment becomes a spare only when its file is at least `segment_size` long
/// (a segment left early for a prepared spare is deleted instead).
fn reclaim(
    root: &Path,
    index: &Mutex<Index>,
    serial: &Mutex<()>,
    segment_size: u64,
) -> io::Result<usize> {
    let _serial = lock(serial);
    let mut total = 0;
    loop {
        let (dead, room) = {
            let index = lock(index);
            let dead: Vec<u64> = index
                .segs
                .iter()
                .filter(|(seq, s)| **seq != index.active && s.refs == 0 && s.pins == 0)
                .map(|(seq, _)| *seq)
                .collect();
            // Only a reclaim and the preparer add spares (reclaims are serial, and the
            // preparer adds one only when none is left): while the lock is released the
            // room can shrink by that one at most, which MAX_SPARES tolerates.
            (dead, MAX_SPARES.saturating_sub(index.spares.len()))
        };
        if dead.is_empty() {
            return Ok(total);
        }
        let mut spares = Vec::new();
        for seq in &dead {
            #[cfg(test)]
            test_hooks::deleting(index);
            let whole =
                std::fs::metadata(segment_path(root, *seq)).is_ok_and(|m| m.len() >= segment_size);
            if spares.len() < room && whole {
                let spare = spare_path(root, *seq);
                std::fs::rename(segment_path(root, *seq), &spare)?;
                spares.push(spare);
            } else {
                std::fs::remove_file(segment_path(root, *seq))?;
            }
        }
        sync_dir(&root.join("segments"))?;
        total += dead.len();
        let mut index = lock(index);
        // A spare is offered for reuse only now that its deletion is durable.
        index.spares.extend(spares);
        for seq in dead {
            let Some(seg) = index.segs.remove(&seq) else {
                continue;
            };
            for id in seg.commits {
                if let Some(e) = index.live.get_mut(&id) {
                    e.copies = e.copies.saturating_sub(1);
                } else if let Some(g) = index.ghosts.get_mut(&id)
                    && g.done_seg != seq
                {
                    g.copies = g.copies.saturating_sub(1);
                    if g.copies == 0 {
                        let done_seg = g.done_seg;
                        index.ghosts.remove(&id);
                        if let Some(s) = index.segs.get_mut(&done_seg) {
                            s.pins -= 1;
                        }
                    }
                }
            }
        }
    }
}

/// Test-only probes into the committer's work.
#[cfg(test)]
mod test_hooks {
    use super::Index;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Segment deletions seen, and how many of them ran with the index lock held.
    pub static DELETIONS: AtomicUsize = AtomicUsize::new(0);
    pub static DELETIONS_UNDER_LOCK: AtomicUsize = AtomicUsize::new(0);

    pub fn deleting(index: &Mutex<Index>) {
        DELETIONS.fetch_add(1, Ordering::SeqCst);
        if index.try_lock().is_err() {
            DELETIONS_UNDER_LOCK.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The one thread that writes and syncs segments.
struct Committer {
    shared: Arc<Shared>,
    file: File,
    seq: u64,
    pos: u64,
    /// The active file's length: writes below it overwrite allocated blocks (a spare),
    /// writes past it grow the file (which costs `fdatasync` a metadata write).
    file_len: u64,
    /// The segment in which the committer last asked the preparer for a spare (0:
    /// never): it asks once per segment, so a preparer that fails (a full disk) is not
    /// set to write a segment of zeros again after every batch.
    asked_in: u64,
    /// Records written to the active segment and not yet synced, in log order.
    written: Vec<Written>,
}

/// A record written but not yet synced, and where in the active segment.
struct Written {
    op: Op,
    offset: u64,
}

impl Committer {
    fn run(mut self) {
        let mut ops = Vec::new();
        // Set while `written` holds lazy records only: when they are synced on their own.
        let mut lazy_until: Option<Instant> = None;
        loop {
            let (eager, shutdown) = {
                let mut q = lock(&self.shared.queue);
                // Queued records are written at once (a process kill keeps a written
                // record); written lazy records alone wait for an eager record, a
                // shutdown or `lazy_wait` before the sync.
                while !q.shutdown && q.eager == 0 && q.ops.is_empty() {
                    let Some(until) = lazy_until else {
                        q = self.shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    let now = Instant::now();
                    if now >= until {
                        break;
                    }
                    q = self
                        .shared
                        .wake
                        .wait_timeout(q, until - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                std::mem::swap(&mut q.ops, &mut ops);
                let eager = q.eager > 0;
                q.eager = 0;
                (eager, q.shutdown)
            };
            if ops.is_empty() && self.written.is_empty() {
                if shutdown {
                    return;
                }
                lazy_until = None;
                continue;
            }
            if !ops.is_empty()
                && let Err(e) = self.write(&mut ops)
            {
                // After a failed write the page cache may hold data that never reaches
                // the disk: refuse everything from now on.
                let mut failed: Vec<Op> = self.written.drain(..).map(|w| w.op).collect();
                failed.append(&mut ops);
                self.poison(e.into(), failed);
                lazy_until = None;
                continue;
            }
            let due = lazy_until.is_some_and(|u| Instant::now() >= u);
            if eager || shutdown || due {
                let _ = self.sync();
                lazy_until = None;
            } else if lazy_until.is_none() {
                lazy_until = Some(Instant::now() + self.shared.config.lazy_wait);
            }
        }
    }

    /// Refuses everything from now on: `failed` and every queued op get `err`.
    fn poison(&self, err: SpoolError, failed: Vec<Op>) {
        let mut q = lock(&self.shared.queue);
        q.poisoned = true;
        let rest = std::mem::take(&mut q.ops);
        q.eager = 0;
        drop(q);
        for op in failed.into_iter().chain(rest) {
            let _ = op.ack.send(Err(err.clone()));
        }
        let mut index = lock(&self.shared.index);
        index.reserved.clear();
    }

    /// Writes `ops` (drained) after the records already written, without syncing them:
    /// they join `written`. Moving to a new segment first syncs what the old one holds.
    fn write(&mut self, ops: &mut Vec<Op>) -> io::Result<()> {
        let root = self.shared.root.clone();
        let batch: u64 = ops.iter().map(|op| op.bytes.len() as u64).sum();
        if self.pos >= self.shared.config.segment_size
            || (self.pos + batch > self.file_len && self.spare_ready())
        {
            if !self.written.is_empty() && !self.sync() {
                return Err(io::Error::other("the previous segment's sync failed"));
            }
            self.rotate()?;
        }
        for op in ops.iter_mut() {
            record::bind(&mut op.bytes, self.seq);
        }
        if ops.iter().any(|op| op.kind.has_file_body()) {
            // Each body file was fsynced by its writer; its name needs the directory.
            sync_dir(&root.join("bodies"))?;
        }
        let start = self.pos;
        {
            let mut slices: Vec<IoSlice<'_>> =
                ops.iter().map(|op| IoSlice::new(&op.bytes)).collect();
            let mut slices = &mut slices[..];
            let mut at = start;
            while !slices.is_empty() {
                let n = write_vectored_at(&self.file, slices, at)?;
                at += n as u64;
                IoSlice::advance_slices(&mut slices, n);
            }
        }
        let mut offset = start;
        for op in ops.drain(..) {
            let len = op.bytes.len() as u64;
            self.written.push(Written { op, offset });
            offset += len;
        }
        self.pos = offset;
        Ok(())
    }

    /// Makes `written` durable with one `fdatasync`, applies it to the index, reclaims
    /// what it freed and acknowledges it; a failed sync poisons the spool instead (and
    /// returns false).
    fn sync(&mut self) -> bool {
        let written = std::mem::take(&mut self.written);
        match self.sync_and_apply(&written) {
            Ok(finished_files) => {
                // The batch is durable and in the index whatever happens now: a failed
                // reclaim must not fail it (its clients would resend it), so it is
                // acknowledged and the spool poisoned for what comes later.
                let reclaimed = reclaim(
                    &self.shared.root,
                    &self.shared.index,
                    &self.shared.reclaiming,
                    self.shared.config.segment_size,
                );
                for id in finished_files {
                    // The Done is durable: the body file is no longer needed. A lost
                    // unlink leaves an orphan, which recovery removes.
                    let _ = std::fs::remove_file(body_path(&self.shared.root, &id));
                }
                if let Err(e) = reclaimed {
                    self.poison(e.into(), Vec::new());
                }
                for w in written {
                    let _ = w.op.ack.send(Ok(()));
                }
                true
            }
            Err(e) => {
                // After a failed fsync the page cache may hold data that never reaches
                // the disk: refuse everything from now on.
                self.poison(e.into(), written.into_iter().map(|w| w.op).collect());
                false
            }
        }
    }

    /// The `fdatasync` of the active segment, then `written` applied to the index.
    /// Returns the ids whose body files a durable `Done` freed.
    fn sync_and_apply(&mut self, written: &[Written]) -> io::Result<Vec<Box<str>>> {
        #[cfg(test)]
        if self.shared.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("fdatasync failed (injected by the test)"));
        }
        self.file.sync_data()?;
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        let at = self.pos;
        let grew = at > self.file_len;
        self.file_len = self.file_len.max(at);
        let mut index = lock(&self.shared.index);
        if grew
            && at >= PREPARE_AFTER
            && self.shared.config.prepare_spare
            && self.asked_in != self.seq
            && index.spares.is_empty()
            && !index.spare_wanted
        {
            self.asked_in = self.seq;
            index.spare_wanted = true;
            self.shared.prepare.notify_one();
        }
        let mut finished_files = Vec::new();
        for w in written {
            apply(
                &mut index,
                self.seq,
                w.offset,
                w.op.bytes.len() as u64,
                &w.op.kind,
                &mut finished_files,
            );
        }
        if let Some(s) = index.segs.get_mut(&self.seq) {
            s.size = self.pos;
        }
        Ok(finished_files)
    }

    /// Whether the preparer (or a reclaim) left a spare to move to.
    fn spare_ready(&self) -> bool {
        self.shared.config.prepare_spare && !lock(&self.shared.index).spares.is_empty()
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next = self.seq + 1;
        let spare = lock(&self.shared.index).spares.pop();
        let (file, file_len) = create_segment(&self.shared.root, next, spare)?;
        let read = Arc::new(File::open(segment_path(&self.shared.root, next))?);
        let mut index = lock(&self.shared.index);
        index
            .segs
            .insert(next, Seg::new(read, record::SEGMENT_HEADER as u64));
        index.active = next;
        drop(index);
        reclaim(
            &self.shared.root,
            &self.shared.index,
            &self.shared.reclaiming,
            self.shared.config.segment_size,
        )?;
        self.file = file;
        self.seq = next;
        self.pos = record::SEGMENT_HEADER as u64;
        self.file_len = file_len;
        Ok(())
    }
}

/// Writes as much of `slices` as one `pwritev` takes (the records as they are, without
/// gathering them into one buffer first). Positioned writes need no seek and keep the
/// committer's idea of the end of the segment authoritative.
fn write_vectored_at(file: &File, slices: &[IoSlice<'_>], at: u64) -> io::Result<usize> {
    // At most IOV_MAX (1024 on Linux) slices per call; the caller loops for the rest.
    let slices = &slices[..slices.len().min(1024)];
    let offset = i64::try_from(at).map_err(io::Error::other)?;
    let n = loop {
        match nix::sys::uio::pwritev(file, slices, offset) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "segment write"));
    }
    Ok(n)
}

/// Applies one durable record (written at `offset` of segment `seq`, `len` bytes) to the
/// index: the committer after each fsync, and recovery for every record it reads.
fn apply(
    index: &mut Index,
    seq: u64,
    offset: u64,
    len: u64,
    kind: &OpKind,
    finished_files: &mut Vec<Box<str>>,
) {
    match kind {
        OpKind::Commit {
            id,
            envelope_at,
            envelope_len,
            body,
            body_at,
            copy,
        } => {
            let envelope = (offset + *envelope_at as u64, *envelope_len);
            let body = match body {
                BodySpec::Inline { len } => BodyLoc::Inline {
                    offset: offset + *body_at as u64,
                    len: *len,
                },
                BodySpec::File { len } => BodyLoc::File { len: *len },
            };
            if let Some(seg) = index.segs.get_mut(&seq) {
                seg.commits.push(id.clone());
                seg.refs += 2;
                seg.live_bytes += len;
            }
            if *copy {
                let Some(e) = index.live.get_mut(id) else {
                    return;
                };
                let (old_c, old_s, old_len) = (e.commit_seg, e.state_seg, e.record_len);
                e.commit_seg = seq;
                e.state_seg = seq;
                e.envelope = envelope;
                e.body = body;
                e.record_len = len;
                e.copies += 1;
                unref(index, old_c, old_len);
                unref(index, old_s, 0);
            } else {
                index.reserved.remove(id);
                if matches!(body, BodyLoc::File { .. }) {
                    index.body_files += 1;
                }
                index.live.insert(
                    id.clone(),
                    Entry {
                        state: State::default(),
                        dying: false,
                        commit_seg: seq,
                        envelope,
                        body,
                        record_len: len,
                        state_seg: seq,
                        copies: 1,
                    },
                );
            }
        }
        OpKind::State { id } => {
            let Some(e) = index.live.get_mut(id) else {
                return;
            };
            let old = std::mem::replace(&mut e.state_seg, seq);
            if let Some(seg) = index.segs.get_mut(&seq) {
                seg.refs += 1;
            }
            unref(index, old, 0);
        }
        OpKind::Done { id } => {
            let Some(e) = index.live.remove(id) else {
                return;
            };
            if matches!(e.body, BodyLoc::File { .. }) {
                index.body_files -= 1;
                finished_files.push(id.clone());
            }
            unref(index, e.commit_seg, e.record_len);
            unref(index, e.state_seg, 0);
            // A segment holds at most one commit copy of an id (copies go forward into
            // the active segment only); one here goes with this Done, so only copies
            // in other segments pin it.
            let elsewhere = e.copies - u32::from(e.commit_seg == seq);
            if elsewhere > 0 {
                index.ghosts.insert(
                    id.clone(),
                    Ghost {
                        done_seg: seq,
                        copies: elsewhere,
                    },
                );
                if let Some(seg) = index.segs.get_mut(&seq) {
                    seg.pins += 1;
                }
            }
        }
    }
}

fn unref(index: &mut Index, seq: u64, live_bytes: u64) {
    if let Some(seg) = index.segs.get_mut(&seq) {
        seg.refs -= 1;
        seg.live_bytes -= live_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renames, unlinks and the directory fsync of a reclaim run with the index lock
    /// released: async callers (append, set_state, list) take it.
    #[test]
    fn segments_are_deleted_without_the_index_lock() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            // Every batch starts a new segment, so every completion frees one.
            segment_size: 0,
            ..Config::default()
        };
        let (spool, _) = Spool::open(dir.path(), config).unwrap();
        let before = test_hooks::DELETIONS.load(Ordering::SeqCst);
        for i in 0..6 {
            let id = format!("R{i}");
            spool.append(&id, b"env", b"body").wait().unwrap();
            spool.complete(&id).wait().unwrap();
        }
        assert!(test_hooks::DELETIONS.load(Ordering::SeqCst) >= before + 6);
        assert_eq!(test_hooks::DELETIONS_UNDER_LOCK.load(Ordering::SeqCst), 0);
    }

    /// A failed `fdatasync` of a batch whose records were written (in the active
    /// segment, no rotation involved), after earlier records were acknowledged: the
    /// batch's append fails and is never visible, the spool is poisoned, every later
    /// append, state change and completion is refused and changes nothing, and what was
    /// acknowledged before is what a restart recovers.
    #[test]
    fn a_failed_sync_after_a_write_poisons_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), Config::default()).unwrap();
        spool.append("A1", b"env", b"body").wait().unwrap();
        let held = State {
            queue: Queue::Hold,
            next_attempt: 7,
            data: b"x".to_vec(),
        };
        spool.set_state("A1", held.clone()).wait().unwrap();
        let segments = spool.stats().segments;
        spool.shared.fail_next_sync.store(true, Ordering::SeqCst);
        assert!(matches!(
            spool.append("A2", b"env", b"body 2").wait(),
            Err(SpoolError::Io(_))
        ));
        assert!(spool.is_poisoned());
        assert_eq!(spool.stats().segments, segments, "no rotation");
        assert!(
            spool.read("A2").is_err(),
            "a failed commit is never visible"
        );
        assert!(matches!(
            spool.append("A3", b"env", b"body 3").wait(),
            Err(SpoolError::Poisoned)
        ));
        assert!(matches!(
            spool.set_state("A1", State::default()).wait(),
            Err(SpoolError::Poisoned)
        ));
        assert!(matches!(
            spool.complete("A1").wait(),
            Err(SpoolError::Poisoned)
        ));
        assert_eq!(spool.state("A1"), Some(held.clone()));
        assert_eq!(spool.read("A1").unwrap().body.read_all().unwrap(), b"body");
        drop(spool);
        let (spool, _) = Spool::open(dir.path(), Config::default()).unwrap();
        assert!(!spool.is_poisoned());
        assert_eq!(spool.state("A1"), Some(held));
        assert!(spool.state("A3").is_none());
    }
}
