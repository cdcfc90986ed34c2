//! The durable spool. A message is streamed into `tmp/ID` as it arrives; at the end of
//! DATA its envelope and a footer are appended, the file is fsynced, renamed into
//! `incoming/ID`, and the directory is fsynced: only then does the client get 250.
//!
//! File layout: `message bytes | envelope JSON | envelope length (u64 LE) | MAGIC`. A file
//! without the footer, or whose lengths disagree, is torn: found at start and moved to
//! `corrupt/`, never delivered. A crash before the rename leaves only `tmp/`, which is
//! emptied at start (the client never got a 250 for it).
//!
//! Upgrades: the footer's `MAGIC` names the layout (`MBQ1`). Fields added to the envelope
//! take serde defaults, so older files read without a new layout. A new layout (the spool
//! redesign) gets a new magic, and `read_message` dispatches on it: files of every
//! earlier layout stay deliverable, and new files are written in the newest one only.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use mb_core::envelope::{Envelope, Recipient};

/// The last bytes of every complete spool file.
pub const MAGIC: &[u8; 8] = b"MBQ1END\n";

/// The queues an administrator sees, one directory each under the spool root.
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

    /// The queue's name: its directory under the spool root, and its name in the
    /// `Queue` service and `mb-queue`.
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

/// Spool directories that are not queues: messages being received, torn files found at
/// start, and delivery states.
const WORK_DIRS: [&str; 3] = ["tmp", "corrupt", "state"];

pub struct Spool {
    root: PathBuf,
    counter: AtomicU64,
    /// Told the id of every committed message (the queue manager listens).
    notify: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
    incoming_sync: std::sync::Arc<GroupSync>,
}

/// Group commit for a directory: callers that linked a file ask for an fsync of the
/// directory; one fsync started after a caller's link covers it, so concurrent commits
/// share one fsync instead of paying one each.
#[derive(Default)]
pub struct GroupSync {
    state: std::sync::Mutex<GroupState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct GroupState {
    requested: u64,
    synced: u64,
    running: bool,
}

impl GroupSync {
    /// Blocks (on a blocking-pool thread) until an fsync of `dir` that started after
    /// this call has finished.
    pub fn sync(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requested += 1;
        let mine = st.requested;
        loop {
            if st.synced >= mine {
                return Ok(());
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.running = true;
            let target = st.requested;
            drop(st);
            let result = std::fs::File::open(dir).and_then(|d| d.sync_all());
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.running = false;
            if result.is_ok() {
                st.synced = st.synced.max(target);
            }
            self.done.notify_all();
            result?;
        }
    }
}

/// What a start-up scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub complete: usize,
    pub torn: usize,
    pub unfinished: usize,
}

impl Spool {
    /// Opens the spool under `root`, creating its directories, and recovers from a crash:
    /// unfinished files in `tmp/` are removed, torn files in `incoming/` are moved aside.
    pub fn open(root: &Path) -> io::Result<(Spool, Recovery)> {
        for sub in Queue::ALL.map(Queue::as_str).into_iter().chain(WORK_DIRS) {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let mut rec = Recovery::default();
        for entry in std::fs::read_dir(root.join("tmp"))? {
            std::fs::remove_file(entry?.path())?;
            rec.unfinished += 1;
        }
        for entry in std::fs::read_dir(root.join(Queue::Incoming.as_str()))? {
            let path = entry?.path();
            if read_message(&path).is_ok() {
                rec.complete += 1;
            } else {
                let name = path
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                tracing::error!(file = %path.display(), "torn spool file moved to corrupt/");
                std::fs::rename(&path, root.join("corrupt").join(name))?;
                rec.torn += 1;
            }
        }
        Ok((
            Spool {
                root: root.to_path_buf(),
                counter: AtomicU64::new(0),
                notify: std::sync::OnceLock::new(),
                incoming_sync: std::sync::Arc::default(),
            },
            rec,
        ))
    }

    /// A new queue id: microseconds since the epoch, the pid and a counter, in hex.
    /// Sortable by arrival, unique within the node; `commit` never replaces a file anyway.
    pub fn new_id(&self) -> String {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let n = self.counter.fetch_add(1, Ordering::Relaxed) & 0xFFFF;
        // The pid keeps two processes (or a restart after a clock step) apart.
        format!("{micros:X}{:X}{n:04X}", std::process::id())
    }

    /// Sends the id of every message committed from now on to `tx`.
    pub fn on_commit(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.notify.set(tx);
    }

    pub fn incoming(&self) -> PathBuf {
        self.dir(Queue::Incoming)
    }

    fn dir(&self, queue: Queue) -> PathBuf {
        self.root.join(queue.as_str())
    }

    /// Starts writing a message. Nothing touches the disk until the message outgrows
    /// `SPILL` or is committed, so a small message costs one trip to the blocking pool.
    pub async fn create(&self, id: &str) -> io::Result<SpoolWriter> {
        Ok(SpoolWriter {
            buf: Vec::with_capacity(16 * 1024),
            file: None,
            tmp: self.root.join("tmp").join(id),
            incoming: self.incoming(),
            id: id.to_string(),
            written: 0,
            kicked: 0,
            committed: false,
            notify: self.notify.get().cloned(),
            sync: self.incoming_sync.clone(),
            headers: HeaderScan::default(),
        })
    }
}

/// Bytes kept in memory before a message being received is written out to `tmp/`.
const SPILL: usize = 256 * 1024;

/// Bytes of a large message written to `tmp/` between two starts of write-back.
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

/// A message being received. Dropping it without `commit` removes the partial file.
pub struct SpoolWriter {
    buf: Vec<u8>,
    file: Option<std::fs::File>,
    tmp: PathBuf,
    incoming: PathBuf,
    pub id: String,
    pub written: u64,
    /// Bytes of the temporary file already handed to write-back (`start_writeback`).
    kicked: u64,
    committed: bool,
    notify: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    sync: std::sync::Arc<GroupSync>,
    headers: HeaderScan,
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

fn open_tmp(file: Option<std::fs::File>, tmp: &Path) -> io::Result<std::fs::File> {
    match file {
        Some(f) => Ok(f),
        None => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp),
    }
}

impl SpoolWriter {
    /// The message as received so far, for the scanner, never whole in memory: a
    /// message still under `SPILL` is copied from memory (at most 256 KiB); a larger one
    /// has the rest of its buffer written to its temporary file (`commit` then appends
    /// only the envelope, so the spool format is unchanged) and is streamed from a
    /// read-only handle as the worker takes it. The handle stays readable when the
    /// message is refused and its temporary file removed while a scan still reads it.
    pub async fn scan_body(&mut self) -> io::Result<mb_scan::Body> {
        let Some(file) = self.file.take() else {
            return Ok(mb_scan::Body::from(self.buf.clone()));
        };
        let buf = std::mem::take(&mut self.buf);
        let tmp = self.tmp.clone();
        let (file, reader, mut buf) = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = file;
            f.write_all(&buf)?;
            let reader = std::fs::File::open(&tmp)?;
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
        if self.buf.len() >= SPILL {
            let buf = std::mem::take(&mut self.buf);
            let file = self.file.take();
            let tmp = self.tmp.clone();
            // Everything received is in the file once this write is done.
            let (kicked, end) = (self.kicked, self.written);
            let (file, mut buf, kicked) = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut f = open_tmp(file, &tmp)?;
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

    /// Appends the envelope, makes the file durable and links it into `incoming/`, all
    /// in one trip to the blocking pool.
    pub async fn commit(mut self, envelope: &Envelope) -> io::Result<()> {
        let env = envelope.to_json();
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(env.as_bytes());
        buf.extend_from_slice(&(env.len() as u64).to_le_bytes());
        buf.extend_from_slice(MAGIC);
        let file = self.file.take();
        let (tmp, dir) = (self.tmp.clone(), self.incoming.clone());
        let target = self.incoming.join(&self.id);
        let sync = self.sync.clone();
        let linked = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = open_tmp(file, &tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            drop(f);
            // A hard link fails if the name is taken, where rename would replace a
            // message already answered 250; then the temporary name goes.
            std::fs::hard_link(&tmp, &target)?;
            let _ = std::fs::remove_file(&tmp);
            sync.sync(&dir)
        })
        .await
        .map_err(io::Error::other)?;
        match linked {
            Ok(()) => {
                self.committed = true;
                if let Some(tx) = &self.notify {
                    let _ = tx.send(self.id.clone());
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for SpoolWriter {
    /// A message not committed (abandoned, or its commit failed) leaves nothing behind.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// What the queue manager knows about a message's delivery, kept in `state/ID` next to
/// the immutable message file. Written atomically (temporary file, fsync, rename,
/// directory fsync) after every attempt that settled or deferred a recipient, so a
/// restart never sends a delivered recipient again.
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
/// (`"state":"deferred"`), the format `state/ID` files have always had.
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

impl Spool {
    fn state_path(&self, id: &str) -> PathBuf {
        self.root.join("state").join(id)
    }

    /// The delivery state of a message, or a fresh one when none was written yet (or
    /// it does not match the envelope).
    pub fn load_state(&self, env: &Envelope) -> DeliveryState {
        std::fs::read(self.state_path(&env.id))
            .ok()
            .and_then(|b| serde_json::from_slice::<DeliveryState>(&b).ok())
            .filter(|s| s.recipients.len() == env.recipients.len())
            .unwrap_or_else(|| DeliveryState::fresh(env))
    }

    pub fn has_state(&self, id: &str) -> bool {
        self.state_path(id).exists()
    }

    /// Writes the state durably.
    pub fn save_state(&self, id: &str, state: &DeliveryState) -> io::Result<()> {
        use std::io::Write;
        let dir = self.root.join("state");
        let tmp = dir.join(format!("{id}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(state).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.state_path(id))?;
        std::fs::File::open(dir)?.sync_all()
    }

    pub fn remove_state(&self, id: &str) {
        let _ = std::fs::remove_file(self.state_path(id));
    }

    /// Removes state files whose message is gone (deleted while it was being delivered,
    /// or a crash between removing a message and its state).
    pub fn prune_states(&self) -> usize {
        let mut n = 0;
        if let Ok(rd) = std::fs::read_dir(self.root.join("state")) {
            for e in rd.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                if !valid_id(&name) || self.locate(&name).is_none() {
                    let _ = std::fs::remove_file(e.path());
                    n += 1;
                }
            }
        }
        n
    }

    /// Removes a delivered message. No directory fsync: should the unlink be lost in a
    /// crash, the message is delivered again (a duplicate, never a loss), which is the
    /// window Postfix has too.
    pub fn remove_delivered(&self, id: &str) {
        if let Some((_, path)) = self.locate(id) {
            let _ = std::fs::remove_file(path);
        }
        self.remove_state(id);
    }
}

/// A queue id as `new_id` makes them: hex digits only, so it is safe as a file name.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Spool {
    /// The ids in a queue, oldest first.
    pub fn ids(&self, queue: Queue) -> io::Result<Vec<String>> {
        let mut ids: Vec<String> = std::fs::read_dir(self.dir(queue))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_id(n))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Which queue holds `id`, if any.
    pub fn locate(&self, id: &str) -> Option<(Queue, PathBuf)> {
        if !valid_id(id) {
            return None;
        }
        Queue::ALL
            .into_iter()
            .map(|q| (q, self.dir(q).join(id)))
            .find(|(_, p)| p.exists())
    }

    /// Moves a message between queues durably (rename, then both directories fsynced).
    pub fn move_to(&self, id: &str, to: Queue) -> io::Result<()> {
        let (from, path) = self
            .locate(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no message {id}")))?;
        if from == to {
            return Ok(());
        }
        let target = self.dir(to).join(id);
        std::fs::rename(&path, &target)?;
        std::fs::File::open(self.dir(to))?.sync_all()?;
        std::fs::File::open(self.dir(from))?.sync_all()
    }

    /// Deletes a message; the directory is fsynced so it stays deleted.
    pub fn delete(&self, id: &str) -> io::Result<()> {
        let (queue, path) = self
            .locate(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no message {id}")))?;
        std::fs::remove_file(path)?;
        self.remove_state(id);
        std::fs::File::open(self.dir(queue))?.sync_all()
    }

    /// Messages per queue and the age in seconds of the oldest one.
    pub fn counts(&self) -> ([usize; 3], u64) {
        let mut counts = [0; 3];
        let mut oldest: Option<String> = None;
        for (i, q) in Queue::ALL.into_iter().enumerate() {
            let ids = self.ids(q).unwrap_or_default();
            counts[i] = ids.len();
            if let Some(first) = ids.first()
                && oldest.as_ref().is_none_or(|o| first < o)
            {
                oldest = Some(first.clone());
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
}

/// The arrival time encoded in a queue id (its first 13 hex digits are microseconds).
pub fn arrival_micros(id: &str) -> Option<u128> {
    u128::from_str_radix(id.get(..13)?, 16).ok()
}

/// Reads a spool file: (message, envelope). Fails on a torn or foreign file.
pub fn read_message(path: &Path) -> io::Result<(Vec<u8>, Envelope)> {
    split_spooled(path, std::fs::read(path)?)
}

/// A queued message opened for delivery (`open_message`).
pub enum Spooled {
    /// Read whole: a small message.
    Memory(Vec<u8>),
    /// Left in its spool file, bytes `0..len`: streamed by whoever reads it.
    File { file: std::fs::File, len: u64 },
}

/// Opens a spool file for delivery: its envelope, and its message read whole when the
/// file is at most `whole_limit` bytes, or else left in the file (only the footer and
/// the envelope are read), so that a large message is streamed, never held whole. A
/// small file costs the same system calls as `read_message`. Fails on a torn or
/// foreign file.
pub fn open_message(path: &Path, whole_limit: u64) -> io::Result<(Spooled, Envelope)> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size <= whole_limit {
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut data)?;
        let (message, envelope) = split_spooled(path, data)?;
        return Ok((Spooled::Memory(message), envelope));
    }
    let torn = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is torn", path.display()),
        )
    };
    if size < 16 {
        return Err(torn());
    }
    let mut footer = [0u8; 16];
    file.read_exact_at(&mut footer, size - 16)?;
    if &footer[8..] != MAGIC {
        return Err(torn());
    }
    let env_len = u64::from_le_bytes(footer[..8].try_into().map_err(|_| torn())?);
    if env_len > size - 16 {
        return Err(torn());
    }
    let env_start = size - 16 - env_len;
    let mut env = vec![0u8; usize::try_from(env_len).map_err(|_| torn())?];
    file.read_exact_at(&mut env, env_start)?;
    let env = std::str::from_utf8(&env).map_err(|_| torn())?;
    let envelope = Envelope::from_json(env).map_err(|_| torn())?;
    Ok((
        Spooled::File {
            file,
            len: env_start,
        },
        envelope,
    ))
}

/// Splits the bytes of a whole spool file into (message, envelope), keeping the
/// message in the same buffer.
fn split_spooled(path: &Path, mut data: Vec<u8>) -> io::Result<(Vec<u8>, Envelope)> {
    let torn = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is torn", path.display()),
        )
    };
    if data.len() < 16 || &data[data.len() - 8..] != MAGIC {
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
mod tests {
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

    #[test]
    fn group_sync_lets_every_caller_through() {
        let dir = tempfile::tempdir().unwrap();
        let g = std::sync::Arc::new(GroupSync::default());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, d) = (g.clone(), dir.path().to_path_buf());
                std::thread::spawn(move || (0..20).all(|_| g.sync(&d).is_ok()))
            })
            .collect();
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
        let st = g.state.lock().unwrap();
        assert_eq!(st.requested, 320);
        assert!(st.synced == 320 && !st.running);
        drop(st);
        // A directory that cannot be opened is an error for the caller, not a hang.
        assert!(g.sync(&dir.path().join("missing")).is_err());
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

    #[test]
    fn state_files_in_the_existing_format_read_and_write_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let id = "18F0A1B2C3D4E5";
        let env = Envelope {
            id: id.into(),
            recipients: ["a", "b", "c", "d"]
                .map(|l| Recipient {
                    address: format!("{l}@served.example"),
                    ..Default::default()
                })
                .to_vec(),
            ..Default::default()
        };
        std::fs::write(dir.path().join("state").join(id), STATE_FILE).unwrap();
        let st = spool.load_state(&env);
        let states: Vec<RecipientState> = st.recipients.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [
                RecipientState::Delivered,
                RecipientState::Bounced,
                RecipientState::Deferred,
                RecipientState::Queued
            ]
        );
        assert_eq!(
            (st.attempts, st.next_attempt, st.delay_warned),
            (2, 1767225600, true)
        );
        assert_eq!(st.recipients[1].last_error, "550 5.1.1 no such user");
        assert_eq!(st.history.len(), 1);
        assert!(!st.settled());

        spool.save_state(id, &st).unwrap();
        let written = std::fs::read_to_string(dir.path().join("state").join(id)).unwrap();
        assert_eq!(written, STATE_FILE);

        // A state name this version does not know retries the recipient; the rest of
        // the file (a delivered recipient) still counts.
        let odd = STATE_FILE.replacen(r#""state":"deferred""#, r#""state":"parked""#, 1);
        std::fs::write(dir.path().join("state").join(id), odd).unwrap();
        let st = spool.load_state(&env);
        assert_eq!(st.recipients[0].state, RecipientState::Delivered);
        assert_eq!(st.recipients[2].state, RecipientState::Queued);
    }

    /// A spool file byte for byte as the hand-written envelope encoder of earlier versions
    /// wrote it (sorted keys, every field present) is read and delivered as it was.
    #[test]
    fn spool_files_written_by_earlier_versions_read() {
        let env = r#"{"add_headers":[["X-Spam-Status","No, score=0.0"]],"auth_user":"","body":"","client_ip":"192.0.2.7","client_name":"unknown","envid":"","helo":"mx.sender.example","id":"00000001A2B3C4D5","listener":"smtp","protocol":"ESMTP","received_at":1764590000,"recipients":[{"address":"a@served.example","notify":"","orcpt":""}],"remove_headers":["X-Spam"],"ret":"","sender":"s@sender.example","smtputf8":false,"tls":""}"#;
        let message = b"Received: from x\r\nSubject: old\r\n\r\nbody\r\n";
        let mut file = message.to_vec();
        file.extend_from_slice(env.as_bytes());
        file.extend_from_slice(&(env.len() as u64).to_le_bytes());
        file.extend_from_slice(MAGIC);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000001A2B3C4D5");
        std::fs::write(&path, &file).unwrap();
        let (m, e) = read_message(&path).unwrap();
        assert_eq!(m, message);
        assert_eq!(e.id, "00000001A2B3C4D5");
        assert_eq!(e.recipients[0].address, "a@served.example");
        assert_eq!(
            e.add_headers,
            vec![("X-Spam-Status".into(), "No, score=0.0".into())]
        );
        // One byte less of envelope: torn, never delivered.
        let mut short = file.clone();
        short.remove(message.len());
        std::fs::write(&path, &short).unwrap();
        assert!(read_message(&path).is_err());
        for limit in [0, 1 << 20] {
            assert!(open_message(&path, limit).is_err(), "limit {limit}");
        }
        std::fs::write(&path, b"MBQ1END\n").unwrap();
        assert!(open_message(&path, 0).is_err());

        // Opened for delivery: read whole under the limit, left in the file above it,
        // with the same envelope either way.
        std::fs::write(&path, &file).unwrap();
        let (whole, e1) = open_message(&path, file.len() as u64).unwrap();
        assert!(matches!(&whole, Spooled::Memory(m) if m == message));
        let (streamed, e2) = open_message(&path, file.len() as u64 - 1).unwrap();
        let Spooled::File { file: f, len } = streamed else {
            panic!("a file above the limit is read whole");
        };
        assert_eq!(len, message.len() as u64);
        let mut head = vec![0u8; message.len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
        assert_eq!(head, message);
        assert_eq!((e1.id.as_str(), e2), ("00000001A2B3C4D5", e));
    }

    #[test]
    fn queues_are_named_by_their_directories() {
        let names: Vec<&str> = Queue::ALL.map(Queue::as_str).to_vec();
        assert_eq!(names, ["incoming", "deferred", "hold"]);
        for q in Queue::ALL {
            assert_eq!(Queue::from_name(q.as_str()), Some(q));
            assert_eq!(q.to_string(), q.as_str());
        }
        assert_eq!(Queue::from_name("corrupt"), None);
        assert_eq!(Queue::from_name("Hold"), None);
        assert_eq!(Queue::from_name("../hold"), None);
    }

    /// A large message is scanned from its spool file, not from a copy in memory, and
    /// the file committed afterwards is byte for byte what it would have been; a refused
    /// one leaves nothing in `tmp/`, though a scan still reading it can finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_messages_are_scanned_from_the_spool_file() {
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

        let id = spool.new_id();
        let mut w = spool.create(&id).await.unwrap();
        for piece in message.chunks(70_000) {
            w.write(piece).await.unwrap();
        }
        let body = w.scan_body().await.unwrap();
        assert!(matches!(body, mb_scan::Body::File { .. }));
        assert_eq!(body.len(), message.len() as u64);
        assert!(body.read_all().unwrap() == message);
        let env = Envelope {
            id: id.clone(),
            sender: "a@b.example".into(),
            ..Default::default()
        };
        w.commit(&env).await.unwrap();
        let (got, got_env) = read_message(&spool.incoming().join(&id)).unwrap();
        assert!(got == message);
        assert_eq!(got_env, env);

        // Refused after the scan began: the writer goes, the scan's handle still reads.
        let refused = spool.new_id();
        let mut w = spool.create(&refused).await.unwrap();
        w.write(&message).await.unwrap();
        let body = w.scan_body().await.unwrap();
        drop(w);
        assert!(!dir.path().join("tmp").join(&refused).exists());
        assert!(body.read_all().unwrap() == message);
    }

    #[tokio::test]
    async fn commit_recover_and_detect_torn_files() {
        let dir = std::env::temp_dir().join(format!("mb-spool-test-{}", std::process::id()));
        let (spool, rec) = Spool::open(&dir).unwrap();
        assert_eq!(rec, Recovery::default());
        let id = spool.new_id();
        assert_ne!(id, spool.new_id());
        let mut w = spool.create(&id).await.unwrap();
        w.write(b"Subject: hi\r\n\r\nbody\r\n").await.unwrap();
        let env = Envelope {
            id: id.clone(),
            sender: "a@b.example".into(),
            recipients: vec![Recipient {
                address: "c@d.example".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        w.commit(&env).await.unwrap();
        let (msg, got) = read_message(&spool.incoming().join(&id)).unwrap();
        assert_eq!(msg, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(got, env);

        // A commit never replaces a message already in incoming/.
        let mut w = spool.create(&format!("{id}-again")).await.unwrap();
        w.id = id.clone();
        w.write(b"other").await.unwrap();
        assert!(w.commit(&env).await.is_err());
        assert_eq!(
            read_message(&spool.incoming().join(&id)).unwrap().0,
            b"Subject: hi\r\n\r\nbody\r\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.join("tmp")).unwrap().count(),
            0,
            "failed commit left a file"
        );

        // An abandoned writer leaves nothing behind.
        let other = spool.new_id();
        let mut w = spool.create(&other).await.unwrap();
        w.write(b"partial").await.unwrap();
        drop(w);
        assert!(!dir.join("tmp").join(&other).exists());

        // A crash mid-write leaves tmp/ files; a torn file in incoming/ is moved aside.
        std::fs::write(dir.join("tmp/leftover"), b"half").unwrap();
        let full = std::fs::read(spool.incoming().join(&id)).unwrap();
        std::fs::write(spool.incoming().join("TORN"), &full[..full.len() - 3]).unwrap();
        let (_, rec) = Spool::open(&dir).unwrap();
        assert_eq!(
            rec,
            Recovery {
                complete: 1,
                torn: 1,
                unfinished: 1
            }
        );
        assert!(dir.join("corrupt/TORN").exists());
        // Queue operations: hold, release, delete; ids that could be paths are refused.
        let (spool, _) = Spool::open(&dir).unwrap();
        assert_eq!(spool.locate(&id).unwrap().0, Queue::Incoming);
        spool.move_to(&id, Queue::Hold).unwrap();
        assert_eq!(spool.locate(&id).unwrap().0, Queue::Hold);
        assert!(
            dir.join("hold").join(&id).exists(),
            "the queue is its directory"
        );
        assert_eq!(spool.counts().0, [0, 0, 1]);
        spool.move_to(&id, Queue::Incoming).unwrap();
        assert!(spool.locate("../incoming/x").is_none());
        assert!(spool.delete("../../etc/passwd").is_err());
        spool.delete(&id).unwrap();
        assert!(spool.locate(&id).is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
