//! The durable spool: mb-smtpd's queue on the segment log of `mb_spool` (under the
//! spool root: `segments/`, `bodies/`). A message is kept in memory while it is received
//! and appended from the session task when it ends; one larger than mb-spool's
//! `large_threshold` streams into `bodies/ID` as it arrives and commits with
//! `append_with_body_file`. Either way the session waits for the append's `Pending`
//! (the batch's fdatasync) before it answers 250; a failed append answers 451.
//!
//! A message's mutable part is its mb-spool `State`: the queue (incoming, deferred,
//! hold), the next attempt, and `DeliveryState` (per-recipient states, attempts,
//! history) as JSON in `State::data`, the format `state/ID` files had. Every change of
//! it goes through `Spool::change`/`update` (read, change, write under one lock), so the
//! queue manager and `mb-queue` never undo each other's changes. Delivered, bounced and
//! deleted messages are completed (`Done` records).
//!
//! Upgrades: at start, messages of the per-message file layout of earlier versions
//! (`incoming/`, `deferred/`, `hold/`, files ending in `MBQ1END\n`, with `state/ID`) are
//! appended with their queue and state, and their files removed only once the import is
//! durable; a torn old file goes to `corrupt/`. `read_old_file` is the only reader of
//! that layout left.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use mb_core::envelope::{Envelope, Recipient};
pub use mb_spool::{Body, Pending};

/// The last bytes of every complete file of the old per-message layout.
pub const OLD_MAGIC: &[u8; 8] = b"MBQ1END\n";

/// The queues an administrator sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Committed, not yet tried (or requeued, or released from hold).
    Incoming,
    /// Tried, with recipients waiting for their next attempt.
    Deferred,
    /// Kept back by an administrator: never delivered until released.
    Hold,
}

impl Queue {
    /// Every queue, in the order `Spool::counts` reports them.
    pub const ALL: [Queue; 3] = [Queue::Incoming, Queue::Deferred, Queue::Hold];

    /// The queue's name in the `Queue` service and `mb-queue` (and its directory in the
    /// old layout).
    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Incoming => "incoming",
            Queue::Deferred => "deferred",
            Queue::Hold => "hold",
        }
    }

    /// The queue with this name, if there is one.
    pub fn from_name(name: &str) -> Option<Queue> {
        Queue::ALL.into_iter().find(|q| q.as_str() == name)
    }
}

impl fmt::Display for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<mb_spool::Queue> for Queue {
    fn from(q: mb_spool::Queue) -> Queue {
        match q {
            mb_spool::Queue::Incoming => Queue::Incoming,
            mb_spool::Queue::Deferred => Queue::Deferred,
            mb_spool::Queue::Hold => Queue::Hold,
        }
    }
}

impl From<Queue> for mb_spool::Queue {
    fn from(q: Queue) -> mb_spool::Queue {
        match q {
            Queue::Incoming => mb_spool::Queue::Incoming,
            Queue::Deferred => mb_spool::Queue::Deferred,
            Queue::Hold => mb_spool::Queue::Hold,
        }
    }
}

/// What can go wrong with the spool. Every one of them is a temporary failure for the
/// client (451) and a retry for the queue manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Log(#[from] mb_spool::SpoolError),
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("message {id} has an envelope that does not parse: {cause}")]
    BadEnvelope {
        id: String,
        cause: serde_json::Error,
    },
    #[error("cannot encode a delivery state: {0}")]
    State(serde_json::Error),
    #[error("cannot encode the envelope of message {id}: {cause}")]
    EncodeEnvelope {
        id: String,
        cause: serde_json::Error,
    },
}

impl Error {
    /// The message is not in the spool (never was, or finished meanwhile).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Log(mb_spool::SpoolError::NotFound(_)))
    }
}

/// The spool directories of the old per-message layout, imported and removed at start.
const OLD_DIRS: [&str; 5] = ["incoming", "deferred", "hold", "state", "tmp"];

pub struct Spool {
    root: PathBuf,
    log: mb_spool::Spool,
    /// Bodies larger than this stream into `bodies/ID` while they are received.
    large_threshold: usize,
    counter: AtomicU64,
    /// This process's id, part of every queue id (read once: glibc does not cache it,
    /// and a system call per message is measurable).
    pid: u32,
    /// Told of every committed message (the queue manager listens).
    notify: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Committed>>,
    /// Held while a message's state is read, changed and queued for writing.
    changes: Mutex<()>,
    /// The poisoned spool was reported (once).
    poison_reported: AtomicBool,
    /// Tests: `create` refuses new messages (as a spool that cannot take a DSN would).
    #[cfg(test)]
    pub(crate) refuse_new: AtomicBool,
}

/// What opening the spool found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// What mb-spool's recovery found in the segments.
    pub log: mb_spool::Recovery,
    /// Messages of the old per-message layout appended to the log.
    pub imported: usize,
    /// Torn files of the old layout, moved to `corrupt/`.
    pub torn: usize,
    /// Unfinished files in the old layout's `tmp/` (never answered 250), removed.
    pub unfinished: usize,
}

/// A queued message as read back.
pub struct Queued {
    pub queue: Queue,
    pub envelope: Envelope,
    /// The message, left where it is on disk.
    pub body: Body,
    pub state: DeliveryState,
}

/// How a caller waits for its record to be durable.
#[derive(Clone, Copy)]
enum Wait {
    /// Awaits the `Pending` in the task: the session's commit, which must not cost a
    /// trip to the blocking pool.
    InTask,
    /// Waits on the blocking pool: the queue manager's and `mb-queue`'s writes, where
    /// the trip costs nothing that matters. Tokio does not advance paused time while a
    /// blocking task runs, so the retry tests (paused time) see each attempt's writes
    /// at the virtual moment they were made, as they did when these writes were file
    /// operations on the blocking pool.
    OffThread,
}

impl Wait {
    async fn until_durable(self, pending: Pending) -> Result<(), Error> {
        match self {
            Wait::InTask => pending.await?,
            Wait::OffThread => tokio::task::spawn_blocking(move || pending.wait())
                .await
                .map_err(io::Error::other)??,
        }
        Ok(())
    }
}

/// What `Spool::change` does to a message.
pub enum Change {
    /// Nothing.
    Keep,
    /// Puts it in a queue, with this delivery state (or the stored one when `None`).
    Set(Queue, Option<DeliveryState>),
    /// Finished: delivered, bounced or deleted.
    Complete,
    /// Finished, and nobody waits for the record: written at once, it is synced with the
    /// next batch another record makes durable (`mb_spool::Spool::complete_lazily`, at
    /// most `mb_spool::LAZY_WAIT` later). For the queue manager after the last delivery.
    CompleteLazily,
}

impl Spool {
    /// Opens the spool under `root` with mb-spool's default layout and imports what the
    /// old layout left there.
    pub fn open(root: &Path) -> Result<(Spool, Recovery), Error> {
        Spool::open_with(root, mb_spool::Config::default())
    }

    /// `open` with a chosen segment layout (tests use small segments).
    pub fn open_with(root: &Path, config: mb_spool::Config) -> Result<(Spool, Recovery), Error> {
        std::fs::create_dir_all(root)?;
        let large_threshold = config.large_threshold;
        let (log, found) = mb_spool::Spool::open(root, config)?;
        let mut rec = Recovery {
            log: found,
            ..Recovery::default()
        };
        import_old_layout(root, &log, &mut rec)?;
        Ok((
            Spool {
                root: root.to_path_buf(),
                log,
                large_threshold,
                counter: AtomicU64::new(0),
                pid: std::process::id(),
                notify: std::sync::OnceLock::new(),
                changes: Mutex::new(()),
                poison_reported: AtomicBool::new(false),
                #[cfg(test)]
                refuse_new: AtomicBool::new(false),
            },
            rec,
        ))
    }

    /// A new queue id: microseconds since the epoch, the pid and a counter, in hex.
    /// Sortable by arrival, unique within the node; mb-spool refuses a duplicate anyway.
    pub fn new_id(&self) -> String {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let n = self.counter.fetch_add(1, Ordering::Relaxed) & 0xFFFF;
        // The pid keeps two processes (or a restart after a clock step) apart.
        format!("{micros:X}{:X}{n:04X}", self.pid)
    }

    /// Tells `tx` of every message committed from now on.
    pub fn on_commit(&self, tx: tokio::sync::mpsc::UnboundedSender<Committed>) {
        let _ = self.notify.set(tx);
    }

    /// The spool root: the free-space guard watches its file system.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether a failed write or fsync poisoned the spool: new mail gets 4xx and
    /// nothing is delivered until a restart recovers. Logged once, at error level.
    pub fn is_poisoned(&self) -> bool {
        let poisoned = self.log.is_poisoned();
        if poisoned && !self.poison_reported.swap(true, Ordering::Relaxed) {
            tracing::error!(
                spool = %self.root.display(),
                "a spool write or fsync failed: new mail is refused with 451 and delivery stopped; restart mb-smtpd to recover"
            );
        }
        poisoned
    }

    /// Starts receiving a message. Nothing touches the disk until the message outgrows
    /// mb-spool's `large_threshold` or is committed. Refused when the spool is poisoned.
    pub async fn create(&self, id: &str) -> Result<SpoolWriter, Error> {
        if self.is_poisoned() {
            return Err(mb_spool::SpoolError::Poisoned.into());
        }
        #[cfg(test)]
        if self.refuse_new.load(Ordering::SeqCst) {
            return Err(io::Error::other("new messages refused by the test").into());
        }
        Ok(SpoolWriter {
            log: self.log.clone(),
            spill: self.large_threshold,
            buf: Vec::with_capacity(16 * 1024),
            file: None,
            path: self.log.body_file_path(id)?,
            id: id.to_string(),
            written: 0,
            kicked: 0,
            committed: false,
            handed: Default::default(),
            notify: self.notify.get().cloned(),
            headers: HeaderScan::default(),
        })
    }
}

thread_local! {
    /// The envelope JSON of the message a session task on this thread commits: reused
    /// from one small message's commit to the next (see `commit_waiting`).
    static ENVELOPE_JSON: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most bytes `ENVELOPE_JSON` keeps between two commits.
const ENVELOPE_JSON_KEPT: usize = 64 << 10;

/// Writes `envelope` as JSON into `buf` (emptied first): the bytes of
/// `Envelope::to_json`, which is what the spool has always stored and reads back.
fn write_envelope(envelope: &Envelope, id: &str, buf: &mut Vec<u8>) -> Result<(), Error> {
    buf.clear();
    serde_json::to_writer(&mut *buf, envelope).map_err(|cause| Error::EncodeEnvelope {
        id: id.to_string(),
        cause,
    })
}

/// Bytes of a large message written to its body file between two starts of write-back.
const WRITEBACK_CHUNK: u64 = 4 << 20;

/// Starts write-back of the bytes of `f` from `kicked` to `end` once there are
/// `WRITEBACK_CHUNK` of them, and returns how far write-back has been started.
///
/// Why: a 20 MB message left to the kernel's own write-back sits dirty in the page cache
/// until the commit's fsync, and on ext4 (data=ordered) every other fsync on the
/// filesystem, such as a small message's commit, waits for the journal to flush those
/// pages first: each large commit stalled every small one behind tens of MB. Started
/// early (with the content paced, session/pace.rs), the data goes out while it streams
/// in and the final fsync has little left to do. `POSIX_FADV_DONTNEED` starts write-back
/// of the range without waiting and drops the range's pages that are already clean. It
/// is advice: an error changes nothing about durability (the commit still fsyncs the
/// whole file before the 250), so it is ignored.
fn start_writeback(f: &std::fs::File, kicked: u64, end: u64) -> u64 {
    if end.saturating_sub(kicked) < WRITEBACK_CHUNK {
        return kicked;
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(kicked), i64::try_from(end - kicked)) else {
        return kicked;
    };
    let _ = nix::fcntl::posix_fadvise(
        f,
        offset,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    end
}

/// Counts `Received:` fields in the header section as the message streams by, for the
/// hop limit that stops mail loops (RFC 5321 §6.3).
#[derive(Default)]
struct HeaderScan {
    done: bool,
    line_len: usize,
    prefix: [u8; 9],
    hops: u32,
}

impl HeaderScan {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b == b'\n' {
                if self.line_len <= 1 {
                    // An empty line (CRLF or LF): the body starts.
                    self.done = true;
                } else if self.line_len >= 9 && self.prefix.eq_ignore_ascii_case(b"received:") {
                    self.hops += 1;
                }
                self.line_len = 0;
                continue;
            }
            if self.line_len < 9 {
                self.prefix[self.line_len] = b;
            }
            self.line_len += 1;
        }
    }
}

/// Most `Received:` fields a message may carry (Postfix's hopcount_limit).
pub const MAX_HOPS: u32 = 50;

/// A message being received. Dropping it without `commit` removes its body file.
pub struct SpoolWriter {
    log: mb_spool::Spool,
    /// Bytes kept in memory before the message is written out to its body file.
    spill: usize,
    buf: Vec<u8>,
    file: Option<std::fs::File>,
    /// `bodies/ID`, where a large message streams.
    path: PathBuf,
    pub id: String,
    pub written: u64,
    /// Bytes of the body file already handed to write-back (`start_writeback`).
    kicked: u64,
    committed: bool,
    /// Set once the body file was named to mb-spool by a commit record: from then on the
    /// file is the log's (a record that became durable after all needs it; one that did
    /// not leaves an orphan that the next start-up's recovery removes).
    handed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    notify: Option<tokio::sync::mpsc::UnboundedSender<Committed>>,
    headers: HeaderScan,
}

/// A message just committed, as the queue manager is told of it.
#[derive(Debug)]
pub struct Committed {
    pub id: String,
    /// A message that was whole in memory comes with its bytes and envelope, so its
    /// first delivery attempt reads nothing back from the spool (no trip to the blocking
    /// pool, no JSON parse). Large messages (in their body file) come without.
    pub fresh: Option<Fresh>,
}

/// A committed message's envelope and bytes, exactly as the spool holds them.
#[derive(Debug)]
pub struct Fresh {
    pub envelope: Envelope,
    pub message: Vec<u8>,
}

fn open_body_file(file: Option<std::fs::File>, path: &Path) -> io::Result<std::fs::File> {
    match file {
        Some(f) => Ok(f),
        None => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path),
    }
}

impl SpoolWriter {
    /// The message as received so far, for the scanner, never whole in memory: a
    /// message still in memory is copied (at most `large_threshold` bytes); a larger one
    /// has the rest of its buffer written to its body file and is streamed from a
    /// read-only handle as the worker takes it. The handle stays readable when the
    /// message is refused and its body file removed while a scan still reads it.
    pub async fn scan_body(&mut self) -> io::Result<mb_scan::Body> {
        let Some(file) = self.file.take() else {
            return Ok(mb_scan::Body::from(self.buf.clone()));
        };
        let buf = std::mem::take(&mut self.buf);
        let path = self.path.clone();
        let (file, reader, mut buf) = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = file;
            f.write_all(&buf)?;
            let reader = std::fs::File::open(&path)?;
            Ok::<_, io::Error>((f, reader, buf))
        })
        .await
        .map_err(io::Error::other)??;
        buf.clear();
        self.file = Some(file);
        self.buf = buf;
        Ok(mb_scan::Body::File {
            file: std::sync::Arc::new(reader),
            len: self.written,
        })
    }

    /// `Received:` fields seen so far in the header section.
    pub fn hops(&self) -> u32 {
        self.headers.hops
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.headers.feed(bytes);
        self.buf.extend_from_slice(bytes);
        self.written += bytes.len() as u64;
        if self.buf.len() >= self.spill {
            let buf = std::mem::take(&mut self.buf);
            let file = self.file.take();
            let path = self.path.clone();
            // Everything received is in the file once this write is done.
            let (kicked, end) = (self.kicked, self.written);
            let (file, mut buf, kicked) = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut f = open_body_file(file, &path)?;
                f.write_all(&buf)?;
                let kicked = start_writeback(&f, kicked, end);
                Ok::<_, io::Error>((f, buf, kicked))
            })
            .await
            .map_err(io::Error::other)??;
            buf.clear();
            self.file = Some(file);
            self.buf = buf;
            self.kicked = kicked;
        }
        Ok(())
    }

    /// Appends the message to the spool and waits until it is durable: the caller
    /// answers 250 only after this returned `Ok`. A message still in memory is appended
    /// from the calling task (no trip to the blocking pool: the committer thread writes
    /// and syncs it); a large one's body file is completed and fsynced on the blocking
    /// pool, then committed by name.
    pub async fn commit(self, envelope: &Envelope) -> Result<(), Error> {
        self.commit_waiting(envelope, Wait::InTask).await
    }

    /// `commit` for the queue manager's notices: the wait for durability is made on the
    /// blocking pool (see `Wait::OffThread`).
    pub async fn commit_off_thread(self, envelope: &Envelope) -> Result<(), Error> {
        self.commit_waiting(envelope, Wait::OffThread).await
    }

    async fn commit_waiting(mut self, envelope: &Envelope, wait: Wait) -> Result<(), Error> {
        let inline = self.file.is_none();
        let pending = match self.file.take() {
            // In memory, it is under `spill`, which is mb-spool's large_threshold: the
            // body goes inline into the record, nothing blocks here. The envelope's JSON
            // is written into this thread's reused buffer (mb-spool copies it into the
            // record), not into a String of its own per message.
            None => ENVELOPE_JSON.with_borrow_mut(|env| {
                write_envelope(envelope, &self.id, env)?;
                let pending = self.log.append(&self.id, env.as_slice(), &self.buf);
                if env.capacity() > ENVELOPE_JSON_KEPT {
                    // A huge envelope (thousands of recipients) is not kept for good.
                    *env = Vec::new();
                }
                Ok::<_, Error>(pending)
            })?,
            Some(file) => {
                // Moved to the blocking pool: this one needs a buffer of its own.
                let mut env = Vec::new();
                write_envelope(envelope, &self.id, &mut env)?;
                let buf = std::mem::take(&mut self.buf);
                let (log, id) = (self.log.clone(), self.id.clone());
                let handed = self.handed.clone();
                tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut f = file;
                    f.write_all(&buf)?;
                    drop(f);
                    handed.store(true, std::sync::atomic::Ordering::Release);
                    Ok::<_, io::Error>(log.append_with_body_file(&id, &env))
                })
                .await
                .map_err(io::Error::other)??
            }
        };
        wait.until_durable(pending).await?;
        self.committed = true;
        if let Some(tx) = &self.notify {
            let fresh = inline.then(|| Fresh {
                envelope: envelope.clone(),
                message: std::mem::take(&mut self.buf),
            });
            let _ = tx.send(Committed {
                id: self.id.clone(),
                fresh,
            });
        }
        Ok(())
    }
}

impl Drop for SpoolWriter {
    /// A message not committed (abandoned, or its commit failed) leaves nothing behind.
    fn drop(&mut self) {
        if !self.committed
            && !self.handed.load(std::sync::atomic::Ordering::Acquire)
            && self.written >= self.spill as u64
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What the queue manager knows about a message's delivery, kept as JSON in the
/// message's mb-spool `State::data` (the format `state/ID` files had). Written (and
/// awaited) after every attempt that deferred a recipient, so a restart never sends a
/// delivered recipient again.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryState {
    pub attempts: u32,
    /// Unix seconds of the next attempt (0: at once).
    pub next_attempt: u64,
    pub delay_warned: bool,
    /// One per envelope recipient, in the envelope's order.
    pub recipients: Vec<RecipientStatus>,
    /// The latest attempts, newest last (at most `HISTORY` lines).
    pub history: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecipientStatus {
    pub address: String,
    pub state: RecipientState,
    pub last_error: String,
    /// The host that answered last, as `name[ip]:port`.
    pub remote: String,
}

/// Where one recipient of a queued message stands. Stored as its lowercase name
/// (`"state":"deferred"`), the format `state/ID` files always had.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Tried; waiting for the next attempt.
    Deferred,
    /// Accepted by the next hop: final.
    Delivered,
    /// Failed permanently, and the sender told: final.
    Bounced,
    /// Not tried yet (new, or requeued).
    #[default]
    // A name this version does not know (a hand-edited file) reads as "not tried yet":
    // the recipient is tried again, where refusing the whole file would start the
    // message over and send its delivered recipients a second copy. (serde wants this
    // fallback to be the last variant.)
    #[serde(other)]
    Queued,
}

impl RecipientState {
    /// The lowercase name, as stored and as the `Queue` service and message log show it.
    pub fn as_str(self) -> &'static str {
        match self {
            RecipientState::Queued => "queued",
            RecipientState::Deferred => "deferred",
            RecipientState::Delivered => "delivered",
            RecipientState::Bounced => "bounced",
        }
    }

    /// Delivered or bounced: nothing more will be done for the recipient.
    pub fn is_final(self) -> bool {
        matches!(self, RecipientState::Delivered | RecipientState::Bounced)
    }
}

impl fmt::Display for RecipientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lines of delivery history kept per message.
pub const HISTORY: usize = 50;

impl DeliveryState {
    pub fn fresh(env: &Envelope) -> DeliveryState {
        DeliveryState {
            recipients: env
                .recipients
                .iter()
                .map(|r| RecipientStatus {
                    address: r.address.clone(),
                    state: RecipientState::Queued,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    pub fn settled(&self) -> bool {
        self.recipients.iter().all(|r| r.state.is_final())
    }

    pub fn note(&mut self, line: String) {
        self.history.push(line);
        if self.history.len() > HISTORY {
            let extra = self.history.len() - HISTORY;
            self.history.drain(..extra);
        }
    }
}

/// The delivery state stored in `data`, if it is one for `env` (else a fresh one).
fn decode_state(data: &[u8], env: &Envelope) -> DeliveryState {
    serde_json::from_slice::<DeliveryState>(data)
        .ok()
        .filter(|s| s.recipients.len() == env.recipients.len())
        .unwrap_or_else(|| DeliveryState::fresh(env))
}

impl Spool {
    /// Reads a queued message: its queue, envelope, delivery state and a handle on its
    /// body. Reads the envelope from disk: call it off the async threads.
    pub fn read(&self, id: &str) -> Result<Queued, Error> {
        let m = self.log.read(id)?;
        let text = String::from_utf8_lossy(&m.envelope);
        let envelope = Envelope::from_json(&text).map_err(|cause| Error::BadEnvelope {
            id: id.to_string(),
            cause,
        })?;
        let state = decode_state(&m.state.data, &envelope);
        Ok(Queued {
            queue: m.state.queue.into(),
            envelope,
            body: m.body,
            state,
        })
    }

    /// A message whole in memory, with its envelope: for tests and small messages.
    pub fn read_message(&self, id: &str) -> Result<(Vec<u8>, Envelope), Error> {
        let q = self.read(id)?;
        Ok((q.body.read_all()?, q.envelope))
    }

    /// Every message of a queue whole in memory, with its envelope, oldest first: for
    /// tests.
    pub fn messages(&self, queue: Queue) -> Vec<(Vec<u8>, Envelope)> {
        self.ids(queue)
            .iter()
            .filter_map(|id| self.read_message(id).ok())
            .collect()
    }

    /// The queue and delivery state of `id` from the index in memory (no disk read):
    /// with the envelope the caller already has.
    pub fn queued_state(&self, id: &str, env: &Envelope) -> Option<(Queue, DeliveryState)> {
        let st = self.log.state(id)?;
        Some((st.queue.into(), decode_state(&st.data, env)))
    }

    /// Which queue holds `id`, if any.
    pub fn locate(&self, id: &str) -> Option<Queue> {
        self.log.state(id).map(|s| s.queue.into())
    }

    /// Every live message: its id, queue and next attempt (unix seconds), by id (which
    /// is by arrival).
    pub fn list(&self) -> Vec<(String, Queue, u64)> {
        // Without the delivery states: a long queue's states stay in the index only once.
        self.log
            .list_brief()
            .into_iter()
            .map(|(id, queue, next_attempt)| (id, queue.into(), next_attempt))
            .collect()
    }

    /// The ids in a queue, oldest first.
    pub fn ids(&self, queue: Queue) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|(_, q, _)| *q == queue)
            .map(|(id, _, _)| id)
            .collect()
    }

    /// Reads a message's queue and stored delivery state, lets `f` decide a change, and
    /// queues that change, all under one lock, so that two changes (the queue manager's
    /// deferral, an administrator's hold) never interleave: the later one sees the
    /// earlier. Returns `f`'s value and the change's `Pending` (none for `Keep`); the
    /// change is durable once it resolves. `f` gets `None` for a message never tried.
    pub fn change<T>(
        &self,
        id: &str,
        f: impl FnOnce(Queue, Option<DeliveryState>) -> (Change, T),
    ) -> Result<(Option<Pending>, T), Error> {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let stored = self
            .log
            .state(id)
            .ok_or_else(|| mb_spool::SpoolError::NotFound(id.to_string()))?;
        let current = serde_json::from_slice::<DeliveryState>(&stored.data).ok();
        let (change, value) = f(stored.queue.into(), current);
        let pending = match change {
            Change::Keep => None,
            Change::Set(queue, state) => {
                let (next_attempt, data) = match state {
                    Some(s) => (
                        s.next_attempt,
                        serde_json::to_vec(&s).map_err(Error::State)?,
                    ),
                    None => (stored.next_attempt, stored.data),
                };
                Some(self.log.set_state(
                    id,
                    mb_spool::State {
                        queue: queue.into(),
                        next_attempt,
                        data,
                    },
                ))
            }
            Change::Complete => Some(self.log.complete(id)),
            Change::CompleteLazily => Some(self.log.complete_lazily(id)),
        };
        Ok((pending, value))
    }

    /// `change`, waiting until the change is durable.
    pub async fn update<T>(
        &self,
        id: &str,
        f: impl FnOnce(Queue, Option<DeliveryState>) -> (Change, T),
    ) -> Result<T, Error> {
        let (pending, value) = self.change(id, f)?;
        if let Some(p) = pending {
            Wait::OffThread.until_durable(p).await?;
        }
        Ok(value)
    }

    /// Messages per queue and the age in seconds of the oldest one, from the index.
    pub fn counts(&self) -> ([usize; 3], u64) {
        let mut counts = [0; 3];
        let mut oldest: Option<String> = None;
        for (id, q, _) in self.list() {
            counts[q as usize] += 1;
            if oldest.as_ref().is_none_or(|o| id < *o) {
                oldest = Some(id);
            }
        }
        let age = oldest.and_then(|id| arrival_micros(&id)).map_or(0, |t| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            u64::try_from(now.saturating_sub(t) / 1_000_000).unwrap_or(0)
        });
        (counts, age)
    }

    /// What the log holds on disk (segments, bytes, body files).
    pub fn stats(&self) -> mb_spool::Stats {
        self.log.stats()
    }

    /// Copies the live messages of segments under a quarter live forward so that the
    /// segments can go (blocking: run it on the blocking pool). Returns the records
    /// written.
    pub fn compact(&self) -> Result<usize, Error> {
        Ok(self.log.compact(COMPACT_BELOW)?)
    }
}

/// Segments whose live bytes are under this fraction of their size are compacted.
pub const COMPACT_BELOW: f64 = 0.25;

/// The arrival time encoded in a queue id (its first 13 hex digits are microseconds).
pub fn arrival_micros(id: &str) -> Option<u128> {
    u128::from_str_radix(id.get(..13)?, 16).ok()
}

/// A queued message as `snapshot` sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshotted {
    pub id: String,
    pub queue: Queue,
    pub message: Vec<u8>,
    pub envelope: Envelope,
    /// The stored delivery state (`None` before the first attempt).
    pub state: Option<DeliveryState>,
}

/// The queue under a spool root, read without changing any file (mb-spool's
/// `snapshot`), ordered by id: for tests and the benchmark, which look at the spool of
/// a running daemon. A message whose envelope does not parse is left out.
pub fn snapshot(root: &Path) -> Result<Vec<Snapshotted>, Error> {
    Ok(mb_spool::snapshot(root)?
        .messages
        .into_iter()
        .filter_map(|m| {
            let envelope = Envelope::from_json(std::str::from_utf8(&m.envelope).ok()?).ok()?;
            Some(Snapshotted {
                id: m.id,
                queue: m.state.queue.into(),
                message: m.body,
                envelope,
                state: serde_json::from_slice(&m.state.data).ok(),
            })
        })
        .collect())
}

/// Imports what the old per-message layout left under `root`: every whole message of
/// `incoming/`, `deferred/` and `hold/` is appended with its queue and `state/ID`, and
/// its files are removed once all of that is durable (a crash before then imports them
/// again: the ids already in the log are only given their state again). Torn files go
/// to `corrupt/`; `tmp/` (never answered 250) is emptied. The emptied directories go.
/// Makes the removals in an old-layout directory durable, so that a power cut cannot bring
/// back a file whose message was imported (and maybe delivered since).
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Old-layout messages read into memory at most at once during the import.
const IMPORT_BATCH_BYTES: usize = 64 << 20;
const IMPORT_BATCH_MESSAGES: usize = 1000;

/// Appends one batch of old-layout messages of `queue` with their states, waits until
/// all of it is durable, then removes their old files. A message already in the log (a
/// crash after an earlier import, before its files were removed) gets its old state again
/// (nothing was delivered since: the import runs before the queue manager); one that was
/// imported and finished since (`Duplicate`, then no state to set) only loses its file.
/// Returns how many old files were taken in.
fn import_batch(
    root: &Path,
    log: &mb_spool::Spool,
    queue: Queue,
    batch: Vec<(String, PathBuf, Vec<u8>, Envelope)>,
) -> Result<usize, Error> {
    let mut appended = Vec::new();
    for (id, _, message, envelope) in &batch {
        appended.push(log.append(id, envelope.to_json().as_bytes(), message));
    }
    let mut fresh = Vec::new();
    for (p, (id, ..)) in appended.into_iter().zip(&batch) {
        match p.wait() {
            Ok(()) => fresh.push(true),
            Err(mb_spool::SpoolError::Duplicate(_)) => fresh.push(false),
            Err(e) => {
                tracing::error!(id = %id, cause = %e, "cannot import a message of the old spool layout");
                return Err(e.into());
            }
        }
    }
    let mut states = Vec::new();
    for (id, _, _, envelope) in &batch {
        let stored = std::fs::read(root.join("state").join(id))
            .ok()
            .and_then(|b| serde_json::from_slice::<DeliveryState>(&b).ok())
            .filter(|s| s.recipients.len() == envelope.recipients.len());
        let state = mb_spool::State {
            queue: queue.into(),
            next_attempt: stored.as_ref().map_or(0, |s| s.next_attempt),
            data: match &stored {
                Some(s) => serde_json::to_vec(s).map_err(Error::State)?,
                None => Vec::new(),
            },
        };
        states.push(log.set_state(id, state));
    }
    for (p, fresh) in states.into_iter().zip(&fresh) {
        match p.wait() {
            Ok(()) => {}
            // Imported before and delivered since: only its old file is left to remove.
            Err(mb_spool::SpoolError::NotFound(_)) if !fresh => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (id, path, _, _) in &batch {
        std::fs::remove_file(path)?;
        let _ = std::fs::remove_file(root.join("state").join(id));
    }
    Ok(batch.len())
}

fn import_old_layout(root: &Path, log: &mb_spool::Spool, rec: &mut Recovery) -> Result<(), Error> {
    if let Ok(rd) = std::fs::read_dir(root.join("tmp")) {
        for entry in rd {
            std::fs::remove_file(entry?.path())?;
            rec.unfinished += 1;
        }
    }
    // In batches (at most IMPORT_BATCH_BYTES of messages read at once), so that a large
    // old queue is imported without holding it in memory.
    for queue in Queue::ALL {
        let dir = root.join(queue.as_str());
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let paths = rd
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<Vec<_>>>()?;
        let mut batch = Vec::new();
        let mut bytes = 0;
        for path in paths {
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            match read_old_file(&path) {
                Ok((message, envelope)) if mb_spool::valid_id(&id) => {
                    bytes += message.len();
                    batch.push((id, path, message, envelope));
                }
                _ => {
                    tracing::error!(file = %path.display(), "torn spool file moved to corrupt/");
                    std::fs::create_dir_all(root.join("corrupt"))?;
                    std::fs::rename(&path, root.join("corrupt").join(&id))?;
                    rec.torn += 1;
                }
            }
            if bytes >= IMPORT_BATCH_BYTES || batch.len() >= IMPORT_BATCH_MESSAGES {
                rec.imported += import_batch(root, log, queue, std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        rec.imported += import_batch(root, log, queue, batch)?;
        sync_dir(&dir)?;
    }
    if let Ok(rd) = std::fs::read_dir(root.join("state")) {
        // States of messages that were already gone.
        for entry in rd {
            let _ = std::fs::remove_file(entry?.path());
        }
    }
    for dir in OLD_DIRS {
        // Only an empty directory goes: a file not imported stays where it was.
        let _ = std::fs::remove_dir(root.join(dir));
    }
    if rec.imported > 0 || rec.torn > 0 {
        tracing::info!(
            imported = rec.imported,
            torn = rec.torn,
            "messages of the old spool layout imported"
        );
    }
    Ok(())
}

/// Reads a file of the old layout (`message | envelope JSON | envelope length (u64 LE)
/// | OLD_MAGIC`): (message, envelope). Fails on a torn or foreign file.
pub fn read_old_file(path: &Path) -> io::Result<(Vec<u8>, Envelope)> {
    let mut data = std::fs::read(path)?;
    let torn = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is torn", path.display()),
        )
    };
    if data.len() < 16 || &data[data.len() - 8..] != OLD_MAGIC {
        return Err(torn());
    }
    let len_at = data.len() - 16;
    let env_len = u64::from_le_bytes(data[len_at..len_at + 8].try_into().map_err(|_| torn())?);
    let env_len = usize::try_from(env_len).map_err(|_| torn())?;
    if env_len > len_at {
        return Err(torn());
    }
    let env_start = len_at - env_len;
    let env = std::str::from_utf8(&data[env_start..len_at]).map_err(|_| torn())?;
    let envelope = Envelope::from_json(env).map_err(|_| torn())?;
    data.truncate(env_start);
    Ok((data, envelope))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn verdict_headers_are_applied_at_delivery() {
        let msg = b"Received: x\r\nX-Spam: Yes\r\n\tforged continuation\r\nSubject: s\r\n\r\nX-Spam: body stays\r\n";
        let out = mb_core::message::with_headers(
            msg,
            &[
                (
                    "X-Spam-Status".into(),
                    "No, score=0.0\r\nInjected: x".into(),
                ),
                ("Authentication-Results".into(), "gw;\r\n\tspf=pass".into()),
            ],
            &["x-spam".into()],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Spam-Status: No, score=0.0  Injected: x\r\nAuthentication-Results: gw;\r\n\tspf=pass\r\nReceived: x\r\nSubject: s\r\n\r\nX-Spam: body stays\r\n"
        );
        assert_eq!(mb_core::message::with_headers(msg, &[], &[]), msg);
    }

    #[test]
    fn received_fields_are_counted_across_chunks() {
        let mut h = HeaderScan::default();
        let msg = b"Received: a\r\n\tcontinued\r\nRECEIVED: b\r\nX-Received: no\r\nSubject: x\r\n\r\nReceived: in the body\r\n";
        for chunk in msg.chunks(3) {
            h.feed(chunk);
        }
        assert_eq!(h.hops, 2);
        assert!(h.done);
    }

    /// A `state/ID` file exactly as earlier versions wrote it (serde_json, compact,
    /// fields in declaration order, states as lowercase strings).
    const STATE_FILE: &str = concat!(
        r#"{"attempts":2,"next_attempt":1767225600,"delay_warned":true,"recipients":["#,
        r#"{"address":"a@served.example","state":"delivered","last_error":"","remote":"mx.served.example[192.0.2.1]:25"},"#,
        r#"{"address":"b@served.example","state":"bounced","last_error":"550 5.1.1 no such user","remote":"mx.served.example[192.0.2.1]:25"},"#,
        r#"{"address":"c@served.example","state":"deferred","last_error":"451 4.2.0 try later","remote":"mx.served.example[192.0.2.1]:25"},"#,
        r#"{"address":"d@served.example","state":"queued","last_error":"","remote":""}],"#,
        r#""history":["2026-01-01 00:00:00 <a@served.example> delivered via mx.served.example[192.0.2.1]:25: 250 2.0.0 ok"]}"#
    );

    /// A file of the old layout: message, envelope JSON, its length, the magic.
    fn old_file(message: &[u8], env: &str) -> Vec<u8> {
        let mut file = message.to_vec();
        file.extend_from_slice(env.as_bytes());
        file.extend_from_slice(&(env.len() as u64).to_le_bytes());
        file.extend_from_slice(OLD_MAGIC);
        file
    }

    /// A file of the old layout byte for byte as the hand-written envelope encoder of
    /// earlier versions wrote it (sorted keys, every field present) reads; a torn one
    /// does not.
    #[test]
    fn files_of_the_old_layout_read_and_torn_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000001A2B3C4D5");
        let file = old_file(OLD_MESSAGE, OLD_ENVELOPE);
        std::fs::write(&path, &file).unwrap();
        let (m, e) = read_old_file(&path).unwrap();
        assert_eq!(m, OLD_MESSAGE);
        assert_eq!(e.id, "00000001A2B3C4D5");
        assert_eq!(e.recipients[0].address, "a@served.example");
        assert_eq!(
            e.add_headers,
            vec![("X-Spam-Status".into(), "No, score=0.0".into())]
        );
        // One byte less of envelope: torn, never delivered.
        let mut short = file.clone();
        short.remove(OLD_MESSAGE.len());
        std::fs::write(&path, &short).unwrap();
        assert!(read_old_file(&path).is_err());
        std::fs::write(&path, b"MBQ1END\n").unwrap();
        assert!(read_old_file(&path).is_err());
    }

    const OLD_ENVELOPE: &str = r#"{"add_headers":[["X-Spam-Status","No, score=0.0"]],"auth_user":"","body":"","client_ip":"192.0.2.7","client_name":"unknown","envid":"","helo":"mx.sender.example","id":"00000001A2B3C4D5","listener":"smtp","protocol":"ESMTP","received_at":1764590000,"recipients":[{"address":"a@served.example","notify":"","orcpt":""}],"remove_headers":["X-Spam"],"ret":"","sender":"s@sender.example","smtputf8":false,"tls":""}"#;
    const OLD_MESSAGE: &[u8] = b"Received: from x\r\nSubject: old\r\n\r\nbody\r\n";

    fn envelope_for(id: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: id.into(),
            sender: "a@b.example".into(),
            recipients: rcpts.iter().map(|r| Recipient::plain(r)).collect(),
            ..Default::default()
        }
    }

    /// The old layout is imported at start: each whole message in its queue with its
    /// state (byte for byte), a large one with its body in a file of its own, torn files
    /// to corrupt/, tmp/ emptied, the old files and directories gone; a second start
    /// imports nothing again. A crash after the import became durable but before the
    /// old files went (the message already in the log) imports it once, not twice.
    #[test]
    fn the_old_layout_is_imported_once_with_queues_and_states() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in OLD_DIRS {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let deferred = "18F0A1B2C3D4E5";
        let held = "18F0A1B2C3D4E6";
        let big = "18F0A1B2C3D4E7";
        let env_json = |id: &str, rcpts: &[&str]| envelope_for(id, rcpts).to_json();
        std::fs::write(
            root.join("incoming/00000001A2B3C4D5"),
            old_file(OLD_MESSAGE, OLD_ENVELOPE),
        )
        .unwrap();
        std::fs::write(
            root.join("deferred").join(deferred),
            old_file(
                b"Subject: d\r\n\r\nd\r\n",
                &env_json(
                    deferred,
                    &[
                        "a@served.example",
                        "b@served.example",
                        "c@served.example",
                        "d@served.example",
                    ],
                ),
            ),
        )
        .unwrap();
        std::fs::write(root.join("state").join(deferred), STATE_FILE).unwrap();
        std::fs::write(
            root.join("hold").join(held),
            old_file(
                b"Subject: h\r\n\r\nh\r\n",
                &env_json(held, &["x@y.example"]),
            ),
        )
        .unwrap();
        let large: Vec<u8> = b"Subject: big\r\n\r\n"
            .iter()
            .copied()
            .chain((0..400_000u32).map(|i| b'a' + (i % 26) as u8))
            .collect();
        std::fs::write(
            root.join("incoming").join(big),
            old_file(&large, &env_json(big, &["x@y.example"])),
        )
        .unwrap();
        let torn = old_file(
            b"Subject: t\r\n\r\n",
            &env_json("18F0A1B2C3D4E8", &["x@y.example"]),
        );
        std::fs::write(
            root.join("incoming/18F0A1B2C3D4E8"),
            &torn[..torn.len() - 3],
        )
        .unwrap();
        std::fs::write(root.join("tmp/18F0A1B2C3D4E9"), b"half").unwrap();
        std::fs::write(root.join("state/0000000000DEAD"), b"{}").unwrap();

        // As if an earlier start had imported this one and crashed before removing it.
        {
            let (log, _) = mb_spool::Spool::open(root, mb_spool::Config::default()).unwrap();
            log.append(
                held,
                env_json(held, &["x@y.example"]).as_bytes(),
                b"Subject: h\r\n\r\nh\r\n",
            )
            .wait()
            .unwrap();
        }

        let (spool, rec) = Spool::open(root).unwrap();
        assert_eq!((rec.imported, rec.torn, rec.unfinished), (4, 1, 1));
        assert!(root.join("corrupt/18F0A1B2C3D4E8").exists());
        for d in OLD_DIRS {
            assert!(!root.join(d).exists(), "{d}/ is left");
        }
        let list: Vec<(String, Queue)> =
            spool.list().into_iter().map(|(id, q, _)| (id, q)).collect();
        assert_eq!(
            list,
            [
                ("00000001A2B3C4D5".to_string(), Queue::Incoming),
                (deferred.to_string(), Queue::Deferred),
                (held.to_string(), Queue::Hold),
                (big.to_string(), Queue::Incoming),
            ]
        );
        let (m, e) = spool.read_message("00000001A2B3C4D5").unwrap();
        assert_eq!(
            (m.as_slice(), e.sender.as_str()),
            (OLD_MESSAGE, "s@sender.example")
        );
        assert!(spool.read_message(big).unwrap().0 == large);
        assert_eq!(spool.stats().body_files, 1, "the large body has a file");
        // The state, byte for byte as the old state file, and its next attempt.
        let stored = spool.log.state(deferred).unwrap();
        assert_eq!(String::from_utf8(stored.data).unwrap(), STATE_FILE);
        assert_eq!(stored.next_attempt, 1767225600);
        let q = spool.read(deferred).unwrap();
        assert_eq!((q.state.attempts, q.state.delay_warned), (2, true));
        assert_eq!(q.state.recipients[2].state, RecipientState::Deferred);
        drop(spool);

        let (spool, rec) = Spool::open(root).unwrap();
        assert_eq!((rec.imported, rec.torn, rec.log.messages), (0, 0, 4));
        assert_eq!(spool.list().len(), 4);
    }

    /// A crash in the middle of the import loses nothing and duplicates nothing. The
    /// state a crash leaves: incoming/ imported and its files removed; deferred/
    /// imported (messages and states durable) while its files were being removed, one
    /// message's files still there and another's state file left behind its removed
    /// message file; hold/ not reached yet. The next start takes in what is left: every
    /// message once (one commit record each), in its queue, with its state.
    #[test]
    fn a_crash_in_the_middle_of_the_import_loses_and_duplicates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let four = [
            "a@served.example",
            "b@served.example",
            "c@served.example",
            "d@served.example",
        ];
        let (a, b, c, e, h) = (
            "18F0A1B2C3D501",
            "18F0A1B2C3D502",
            "18F0A1B2C3D503",
            "18F0A1B2C3D504",
            "18F0A1B2C3D505",
        );
        let body = |id: &str| format!("Subject: {id}\r\n\r\nbody of {id}\r\n").into_bytes();
        let file =
            |id: &str, rcpts: &[&str]| old_file(&body(id), &envelope_for(id, rcpts).to_json());
        let put = |queue: &str, id: &str, bytes: &[u8]| {
            std::fs::create_dir_all(root.join(queue)).unwrap();
            std::fs::write(root.join(queue).join(id), bytes).unwrap();
        };
        put("incoming", a, &file(a, &["x@y.example"]));
        for id in [b, c, e] {
            put("deferred", id, &file(id, &four));
            put("state", id, STATE_FILE.as_bytes());
        }
        // The start that crashed, up to the end of deferred/'s import.
        let (spool, rec) = Spool::open(root).unwrap();
        assert_eq!(rec.imported, 4);
        drop(spool);
        // What its crash left of the old layout.
        put("deferred", b, &file(b, &four));
        put("state", b, STATE_FILE.as_bytes());
        put("state", c, STATE_FILE.as_bytes());
        put("hold", h, &file(h, &["x@y.example"]));

        let (spool, rec) = Spool::open(root).unwrap();
        assert_eq!(
            (rec.imported, rec.torn),
            (2, 0),
            "b again (already in the log) and h"
        );
        for d in OLD_DIRS {
            assert!(!root.join(d).exists(), "{d}/ is left");
        }
        let list: Vec<(String, Queue)> =
            spool.list().into_iter().map(|(id, q, _)| (id, q)).collect();
        let want = [
            (a, Queue::Incoming),
            (b, Queue::Deferred),
            (c, Queue::Deferred),
            (e, Queue::Deferred),
            (h, Queue::Hold),
        ]
        .map(|(id, q)| (id.to_string(), q));
        assert_eq!(list, want);
        for (id, _) in &want {
            assert_eq!(spool.read_message(id).unwrap().0, body(id), "{id}");
        }
        for id in [b, c, e] {
            let stored = spool.log.state(id).unwrap();
            assert_eq!(
                (stored.data.as_slice(), stored.next_attempt),
                (STATE_FILE.as_bytes(), 1767225600),
                "{id}"
            );
        }
        drop(spool);
        // Each message is in the log once.
        let log = mb_spool::snapshot(root).unwrap().log;
        for (id, _) in &want {
            let commits = log
                .iter()
                .filter(|(k, i)| *k == mb_spool::LogKind::Commit && i == id)
                .count();
            assert_eq!(commits, 1, "{id}: {log:?}");
        }
        let (spool, rec) = Spool::open(root).unwrap();
        assert_eq!((rec.imported, rec.log.messages), (0, 5));
        assert_eq!(spool.list().len(), 5);
    }

    /// The envelope a commit stores is exactly `Envelope::to_json`'s bytes: for small
    /// messages (written through the thread's reused buffer), after an envelope too large
    /// for that buffer to be kept, for a small envelope right after a larger one (nothing
    /// of it left over), and for a large message (committed with its body file).
    #[tokio::test]
    async fn committed_envelopes_are_the_bytes_of_to_json() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let rich = |id: &str, n: usize| Envelope {
            id: id.into(),
            received_at: 1_764_590_000,
            sender: "\u{c5}sa@sender.example".into(),
            recipients: (0..n)
                .map(|i| Recipient {
                    address: format!("r{i}@served.example"),
                    notify: "SUCCESS,FAILURE".into(),
                    orcpt: format!("rfc822;r{i}@served.example"),
                })
                .collect(),
            add_headers: vec![(
                "X-Spam-Status".into(),
                "No, score=0.0 \"quoted\"\tand a tab".into(),
            )],
            remove_headers: vec!["X-Spam".into()],
            client_ip: "192.0.2.7".into(),
            helo: "mx.sender.example".into(),
            smtputf8: true,
            ..Default::default()
        };
        // (recipients, body bytes)
        for (n, size) in [
            (3, 20),
            (2000, 20),
            (1, 20),
            (40, 20),
            (2, 20),
            (5, 400_000),
        ] {
            let id = spool.new_id();
            let env = rich(&id, n);
            let mut w = spool.create(&id).await.unwrap();
            w.write(&vec![b'x'; size]).await.unwrap();
            w.commit(&env).await.unwrap();
            let stored = spool.log.read(&id).unwrap().envelope;
            assert!(
                stored == env.to_json().as_bytes(),
                "{n} recipients, {size} bytes: {}",
                String::from_utf8_lossy(&stored)
            );
            assert_eq!(spool.read(&id).unwrap().envelope, env);
        }
        assert!(ENVELOPE_JSON.with_borrow(|b| b.capacity()) <= ENVELOPE_JSON_KEPT);
    }

    /// The delivery state round trip: written by `update`, read back as it was, with the
    /// queue and next attempt; a state of another envelope's size reads as fresh; a
    /// change of a finished message is refused as not found.
    #[tokio::test]
    async fn delivery_states_round_trip_through_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let id = spool.new_id();
        let env = envelope_for(
            &id,
            &[
                "a@served.example",
                "b@served.example",
                "c@served.example",
                "d@served.example",
            ],
        );
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: s\r\n\r\nx\r\n").await.unwrap();
        w.commit(&env).await.unwrap();
        let fresh = spool.read(&id).unwrap();
        assert_eq!(
            (fresh.queue, &fresh.state),
            (Queue::Incoming, &DeliveryState::fresh(&env))
        );

        let st: DeliveryState = serde_json::from_str(STATE_FILE).unwrap();
        let seen = spool
            .update(&id, |q, stored| {
                (Change::Set(Queue::Deferred, Some(st.clone())), (q, stored))
            })
            .await
            .unwrap();
        assert_eq!(seen, (Queue::Incoming, None));
        let q = spool.read(&id).unwrap();
        assert_eq!((q.queue, &q.state), (Queue::Deferred, &st));
        assert_eq!(spool.list()[0].2, st.next_attempt);
        // The stored JSON is the old state file's format, byte for byte.
        assert_eq!(spool.log.state(&id).unwrap().data, STATE_FILE.as_bytes());
        // Hold keeps the state; the reopened spool has both.
        spool
            .update(&id, |_, _| (Change::Set(Queue::Hold, None), ()))
            .await
            .unwrap();
        drop(spool);
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let q = spool.read(&id).unwrap();
        assert_eq!((q.queue, &q.state), (Queue::Hold, &st));
        assert_eq!(spool.counts().0, [0, 0, 1]);
        // A state file for another envelope (other recipients) is not applied to this one.
        let other = envelope_for(&id, &["a@served.example"]);
        assert_eq!(
            decode_state(STATE_FILE.as_bytes(), &other),
            DeliveryState::fresh(&other)
        );
        // A state name this version does not know retries the recipient.
        let odd = STATE_FILE.replacen(r#""state":"deferred""#, r#""state":"parked""#, 1);
        let st = decode_state(odd.as_bytes(), &env);
        assert_eq!(st.recipients[0].state, RecipientState::Delivered);
        assert_eq!(st.recipients[2].state, RecipientState::Queued);

        spool
            .update(&id, |_, _| (Change::Complete, ()))
            .await
            .unwrap();
        assert!(spool.locate(&id).is_none());
        let gone = spool.update(&id, |_, _| (Change::Keep, ())).await;
        assert!(gone.is_err_and(|e| e.is_not_found()));
    }

    #[test]
    fn queues_have_their_names() {
        let names: Vec<&str> = Queue::ALL.map(Queue::as_str).to_vec();
        assert_eq!(names, ["incoming", "deferred", "hold"]);
        for q in Queue::ALL {
            assert_eq!(Queue::from_name(q.as_str()), Some(q));
            assert_eq!(q.to_string(), q.as_str());
            assert_eq!(Queue::from(mb_spool::Queue::from(q)), q);
        }
        assert_eq!(Queue::from_name("corrupt"), None);
        assert_eq!(Queue::from_name("Hold"), None);
        assert_eq!(Queue::from_name("../hold"), None);
    }

    /// A large message is scanned from its body file, not from a copy in memory, and
    /// committed by name (`bodies/ID`), byte for byte; a small one stays in memory and
    /// goes inline; a refused large one leaves no body file, though a scan still reading
    /// it can finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_messages_are_scanned_from_and_committed_with_their_body_file() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let message: Vec<u8> = (0..1_000_000u32)
            .map(|i| {
                if i % 80 == 79 {
                    b'\n'
                } else {
                    b'a' + (i % 26) as u8
                }
            })
            .collect();
        let small = spool.new_id();
        let mut w = spool.create(&small).await.unwrap();
        w.write(b"Subject: small\r\n\r\nhi\r\n").await.unwrap();
        assert!(matches!(
            w.scan_body().await.unwrap(),
            mb_scan::Body::Memory(_)
        ));
        w.commit(&envelope_for(&small, &["x@y.example"]))
            .await
            .unwrap();
        assert_eq!(spool.stats().body_files, 0, "a small body is inline");

        let id = spool.new_id();
        let mut w = spool.create(&id).await.unwrap();
        for piece in message.chunks(70_000) {
            w.write(piece).await.unwrap();
        }
        let body = w.scan_body().await.unwrap();
        assert!(matches!(body, mb_scan::Body::File { .. }));
        assert_eq!(body.len(), message.len() as u64);
        assert!(body.read_all().unwrap() == message);
        let env = envelope_for(&id, &["x@y.example"]);
        w.commit(&env).await.unwrap();
        assert_eq!(spool.stats().body_files, 1);
        assert!(dir.path().join("bodies").join(&id).exists());
        let (got, got_env) = spool.read_message(&id).unwrap();
        assert!(got == message);
        assert_eq!(got_env, env);
        // And after a restart.
        drop(spool);
        let (spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!((rec.log.messages, rec.log.orphan_bodies), (2, 0));
        assert!(spool.read_message(&id).unwrap().0 == message);

        // Refused after the scan began: the writer goes, the scan's handle still reads.
        let refused = spool.new_id();
        let mut w = spool.create(&refused).await.unwrap();
        w.write(&message).await.unwrap();
        let body = w.scan_body().await.unwrap();
        drop(w);
        assert!(!dir.path().join("bodies").join(&refused).exists());
        assert!(body.read_all().unwrap() == message);
        assert!(spool.locate(&refused).is_none());
    }

    /// A commit is visible and readable once it returns, and survives a restart; an id
    /// already in the spool is refused; an abandoned writer leaves nothing behind.
    #[tokio::test]
    async fn commits_are_durable_unique_and_abandoned_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!((rec.imported, rec.log.messages), (0, 0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spool.on_commit(tx);
        let id = spool.new_id();
        assert_ne!(id, spool.new_id());
        let env = envelope_for(&id, &["c@d.example"]);
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: hi\r\n\r\nbody\r\n").await.unwrap();
        w.commit(&env).await.unwrap();
        let told = rx.try_recv().unwrap();
        assert_eq!(told.id, id, "the queue manager is told");
        let fresh = told.fresh.expect("a small message comes with its bytes");
        assert_eq!(
            (fresh.message.as_slice(), &fresh.envelope),
            (&b"Subject: hi\r\n\r\nbody\r\n"[..], &env),
            "exactly what the spool holds"
        );
        assert_eq!(spool.locate(&id), Some(Queue::Incoming));

        // A commit never replaces a message already in the spool.
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"other").await.unwrap();
        assert!(w.commit(&env).await.is_err());
        assert_eq!(
            spool.read_message(&id).unwrap().0,
            b"Subject: hi\r\n\r\nbody\r\n"
        );

        // An abandoned writer leaves nothing behind.
        let other = spool.new_id();
        let mut w = spool.create(&other).await.unwrap();
        w.write(&b"x".repeat(300_000)).await.unwrap();
        assert!(dir.path().join("bodies").join(&other).exists());
        drop(w);
        assert!(!dir.path().join("bodies").join(&other).exists());
        assert!(spool.locate(&other).is_none());

        drop(spool);
        let (spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(rec.log.messages, 1);
        let (msg, got) = spool.read_message(&id).unwrap();
        assert_eq!(
            (msg.as_slice(), got),
            (b"Subject: hi\r\n\r\nbody\r\n".as_slice(), env)
        );
        assert!(!spool.is_poisoned());
    }

    /// A spool whose commit failed (the next segment's name taken, so the rotation
    /// fails) is poisoned: that commit errs (the session's 451), a new message is
    /// refused before it is received, and nothing was made visible.
    #[tokio::test]
    async fn a_poisoned_spool_refuses_new_mail() {
        let dir = tempfile::tempdir().unwrap();
        let config = mb_spool::Config {
            segment_size: 0,
            ..mb_spool::Config::default()
        };
        let (spool, _) = Spool::open_with(dir.path(), config).unwrap();
        block_next_segment(dir.path());
        let id = spool.new_id();
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: hi\r\n\r\nbody\r\n").await.unwrap();
        assert!(
            w.commit(&envelope_for(&id, &["c@d.example"]))
                .await
                .is_err()
        );
        assert!(spool.is_poisoned());
        assert!(spool.locate(&id).is_none());
        assert!(spool.create(&spool.new_id()).await.is_err());
    }

    /// Puts a directory where the spool's next segment goes, so that its next rotation
    /// fails (a spare segment file cannot be renamed over a directory either).
    pub(crate) fn block_next_segment(root: &Path) {
        let last = std::fs::read_dir(root.join("segments"))
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .max()
            .unwrap();
        std::fs::create_dir(root.join("segments").join(format!("{:016X}.seg", last + 1))).unwrap();
    }
}
