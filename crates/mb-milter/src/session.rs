//! One milter connection: negotiation, macros, the envelope and the message as Postfix
//! hands them over, and the verdict of an mb-filter worker turned into milter replies.
//!
//! What a connection holds is bounded: the body spills to a file past `SPILL`, and the
//! macros, header fields and recipients it keeps are capped (`MAX_*`, far beyond what
//! Postfix sends); a peer past a cap, or silent longer than `milter.timeout`, is logged
//! once and disconnected. Postfix then applies its `milter_default_action` (tempfail).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mb_core::EnhancedStatus;
use mb_core::policy;
use mb_core::verdict::{Direction, ScanRequest, Verdict};
use mb_scan::Body;
use mb_scan::reply::Disposition;
use mb_smtp::Reply;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::proto::{self, Error};

/// Most macros one connection keeps (Postfix sends a few dozen names in all).
pub const MAX_MACROS: usize = 1000;
/// Most bytes of macro names and values one connection keeps.
pub const MAX_MACRO_BYTES: usize = 256 * 1024;
/// Most header fields in one message (each is kept for deletions by index).
pub const MAX_HEADERS: usize = 10_000;
/// Most bytes of header fields (names and values) in one message: Postfix's own
/// `header_size_limit` is 100 KiB per field, and a real header section is far smaller.
pub const MAX_HEADER_BYTES: usize = 1 << 20;
/// Most recipients of one message (Postfix's `smtpd_recipient_limit` is 1000).
pub const MAX_RCPTS: usize = 10_000;

/// The macros a verdict uses, by stage, asked for when the MTA lets us name them
/// (SMFIF_SETSYMLIST): the client's address and name, TLS, the authenticated user and
/// the queue id (`i`, known for certain only once the message is, so asked for at every
/// later stage). A stage left without a list gets the MTA's default list (Postfix takes
/// an empty list that way too), so each stage names at least one macro.
pub const MACROS_BY_STAGE: &[(u32, &str)] = &[
    (proto::STAGE_CONNECT, "{client_addr} {client_name}"),
    (proto::STAGE_HELO, "{tls_version} {cipher}"),
    (proto::STAGE_MAIL, "{auth_authen}"),
    (proto::STAGE_RCPT, "i"),
    (proto::STAGE_DATA, "i"),
    (proto::STAGE_EOH, "i"),
    (proto::STAGE_EOM, "i"),
];

/// What a connection knows.
#[derive(Default)]
struct State {
    protocol: u32,
    macros: HashMap<String, String>,
    /// Bytes of the names and values in `macros`.
    macro_bytes: usize,
    /// Bytes of the names and values in `headers`.
    header_bytes: usize,
    client_ip: Option<IpAddr>,
    client_name: String,
    helo: String,
    sender: Option<String>,
    rcpts: Vec<String>,
    /// The header fields as received, in order (for deletions by index).
    headers: Vec<(String, String)>,
    message: Buffer,
    /// The blank line after the header section is in `message` (at EOH, or at the
    /// first body packet when the MTA skips EOH under SMFIP_NOEOH).
    headers_ended: bool,
    too_large: bool,
    /// `smtp.message_size_limit` as it was when the message began.
    limit: usize,
}

impl State {
    fn reset_message(&mut self) {
        self.sender = None;
        self.rcpts.clear();
        self.headers.clear();
        self.header_bytes = 0;
        self.message = Buffer::default();
        self.headers_ended = false;
        self.too_large = false;
    }

    /// A macro by its name without braces (`client_addr` for `{client_addr}`): they are
    /// kept that way, as either spelling means the same macro.
    fn macro_value(&self, name: &str) -> Option<&str> {
        self.macros
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A connection from the MTA: TCP from an address in `milter.allowed_clients`, or the
/// Unix socket `milter.socket`.
pub trait Conn: AsyncRead + AsyncWrite + Unpin {
    /// Called before each wait for the MTA's next packet.
    fn before_wait(&self) {}
}

impl Conn for tokio::net::TcpStream {
    /// The MTA writes a macro packet and its command separately and waits for no answer
    /// to the first: acknowledging at once keeps Nagle's algorithm on its side from
    /// holding the command for our delayed ACK (40 ms per message otherwise). Set
    /// before each wait on the socket (not per packet: packets already buffered need
    /// no ACK).
    fn before_wait(&self) {
        let _ = socket2::SockRef::from(self).set_tcp_quickack(true);
    }
}

/// A Unix socket has no acknowledgements to hurry.
impl Conn for tokio::net::UnixStream {}

/// Serves one connection until the MTA closes it; `peer` names the MTA in log lines.
pub async fn run<S: Conn>(io: &mut S, shared: Arc<Shared>, peer: &str) {
    let mut st = State::default();
    let mut reader = proto::Reader::default();
    loop {
        let read = match reader.ready() {
            Ok(true) => Ok(()),
            Ok(false) => {
                io.before_wait();
                // Only the wait for the MTA's next packet is timed: while we scan, the
                // MTA waits for us (and gets PROGRESS packets).
                let silence = shared.follower.current().duration("milter.timeout");
                let Ok(read) = tokio::time::timeout(silence, reader.read_more(io)).await else {
                    tracing::warn!(client = %peer, after = ?silence, "milter connection closed: the MTA was silent longer than milter.timeout");
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                match read {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match read {
            Ok(()) => {}
            Err(Error::Closed) => return,
            Err(e) => {
                tracing::warn!(client = %peer, cause = %e, "milter connection closed: malformed input");
                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let Some((cmd, data)) = reader.packet() else {
            continue;
        };
        let handled = handle(io, &shared, &mut st, cmd, data).await;
        reader.consume();
        match handled {
            Ok(true) => {}
            Ok(false) => return,
            Err(SessionError::Limit(why)) => {
                tracing::warn!(client = %peer, "milter connection closed: {why}");
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(client = %peer, cause = %e, "milter connection closed: bad packet or write failure");
                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Why a milter connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The MTA broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The connection passed one of the `MAX_*` bounds.
    #[error("{0}")]
    Limit(String),
}

/// A failure to hold a message, with what was being done.
fn hold_error(doing: &str, e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{doing}: {e}"))
}

/// Why an MTA's option negotiation cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NegotiationError {
    #[error("short option negotiation")]
    Short,
    #[error("milter protocol version {0} is too old")]
    TooOld(u32),
}

/// The answer to the MTA's option negotiation (`data`: its version, actions and
/// protocol steps): the steps this session runs under and the OPTNEG reply. `block_at_mail`
/// and `block_at_rcpt` say whether a block policy could refuse there now (else the MTA
/// is told not to wait for a reply at that step). Public so that the bench's null milter
/// (`cargo xtask bench`, the milter floor row) negotiates exactly as mb-milter does.
pub fn negotiate(
    data: &[u8],
    block_at_mail: bool,
    block_at_rcpt: bool,
) -> Result<(u32, Vec<u8>), NegotiationError> {
    let word = |i: usize| {
        data.get(i..i + 4)
            .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
    };
    let (Some(version), Some(actions), Some(offered)) = (word(0), word(4), word(8)) else {
        return Err(NegotiationError::Short);
    };
    if version < 2 {
        return Err(NegotiationError::TooOld(version));
    }
    // Naming our macros (protocol 6) spares the MTA looking up, and both sides sending
    // and parsing, the dozen others it sends by default at every stage.
    let symlist = version >= 6 && actions & proto::SETSYMLIST != 0;
    let mut want_actions = proto::ADDHDRS | proto::CHGHDRS | proto::QUARANTINE_ACT;
    // Steps we do not need are declined, and replies we would only "continue" are
    // skipped where the MTA allows it.
    let mut want_protocol = proto::NOUNKNOWN
        | proto::NODATA
        | proto::NOHREPL
        | proto::NR_CONN
        | proto::NR_HELO
        | proto::NR_EOH
        | proto::NR_BODY;
    if !block_at_mail {
        want_protocol |= proto::NR_MAIL;
    }
    if !block_at_rcpt {
        want_protocol |= proto::NR_RCPT;
    }
    // CONNECT is still asked for although its data then comes as connect macros too:
    // clients such as OpenDKIM's miltertest stop at a declined CONNECT, and skipping it
    // saved no system call (it travels with the HELO and MAIL).
    if symlist {
        want_actions |= proto::SETSYMLIST;
    }
    let protocol = offered & want_protocol;
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&version.min(6).to_be_bytes());
    out.extend_from_slice(&(actions & want_actions).to_be_bytes());
    out.extend_from_slice(&protocol.to_be_bytes());
    if symlist {
        for (stage, names) in MACROS_BY_STAGE {
            out.extend_from_slice(&stage.to_be_bytes());
            out.extend_from_slice(names.as_bytes());
            out.push(0);
        }
    }
    Ok((protocol, out))
}

/// Handles one packet; `Ok(false)` ends the connection.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    shared: &Shared,
    st: &mut State,
    cmd: u8,
    data: &[u8],
) -> Result<bool, SessionError> {
    let io_err = SessionError::Io;
    let reply_unless = |flag: u32, st: &State| st.protocol & flag == 0;
    match cmd {
        proto::OPTNEG => {
            // A reply at MAIL or RCPT only ever refuses by policy: when no policy could
            // refuse there now, the MTA need not wait for one (a block that arrives
            // later in the session is still applied by the scan, at end of message).
            let policies = shared.policies.current();
            let blocks = |at_rcpt: bool| {
                policies.iter().any(|p| {
                    p.action == policy::Action::Block
                        && !(at_rcpt && p.direction == policy::Direction::From)
                })
            };
            let (protocol, out) = negotiate(data, blocks(false), blocks(true))
                .map_err(|e| SessionError::Protocol(e.to_string()))?;
            st.protocol = protocol;
            proto::write(io, proto::OPTNEG, &out)
                .await
                .map_err(io_err)?;
        }
        proto::MACRO => {
            // Postfix sends the same macros again at every stage: a value that did not
            // change is left as it is, without copying it again.
            let data = data.get(1..).unwrap_or_default();
            let data = data.strip_suffix(&[0]).unwrap_or(data);
            let mut parts = data.split(|b| *b == 0);
            while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                let k = String::from_utf8_lossy(k);
                let k = k
                    .strip_prefix('{')
                    .and_then(|k| k.strip_suffix('}'))
                    .unwrap_or(&k);
                let v = String::from_utf8_lossy(v);
                if let Some(old) = st.macros.get_mut(k) {
                    if *old != v {
                        st.macro_bytes = (st.macro_bytes + v.len()).saturating_sub(old.len());
                        *old = v.into_owned();
                    }
                } else {
                    st.macro_bytes += k.len() + v.len();
                    st.macros.insert(k.to_string(), v.into_owned());
                }
            }
            if st.macros.len() > MAX_MACROS || st.macro_bytes > MAX_MACRO_BYTES {
                return Err(SessionError::Limit(format!(
                    "{} macros of {} bytes, more than {MAX_MACROS} or {MAX_MACRO_BYTES} bytes",
                    st.macros.len(),
                    st.macro_bytes
                )));
            }
        }
        proto::CONNECT => {
            let parts = data.splitn(2, |b| *b == 0).collect::<Vec<_>>();
            st.client_name =
                String::from_utf8_lossy(parts.first().copied().unwrap_or_default()).into_owned();
            if let Some(rest) = parts.get(1)
                && rest.len() > 3
                && matches!(rest[0], b'4' | b'6')
            {
                let addr = proto::strings(&rest[3..]);
                st.client_ip = addr
                    .first()
                    .and_then(|a| a.trim_start_matches("IPv6:").parse().ok());
            }
            if reply_unless(proto::NR_CONN, st) {
                proto::write(io, proto::CONTINUE, &[])
                    .await
                    .map_err(io_err)?;
            }
        }
        proto::HELO => {
            st.helo = proto::strings(data).first().cloned().unwrap_or_default();
            if reply_unless(proto::NR_HELO, st) {
                proto::write(io, proto::CONTINUE, &[])
                    .await
                    .map_err(io_err)?;
            }
        }
        proto::MAIL => {
            st.reset_message();
            st.limit = usize::try_from(shared.follower.current().size("smtp.message_size_limit"))
                .unwrap_or(usize::MAX);
            let sender = proto::address(&proto::strings(data).first().cloned().unwrap_or_default());
            if reply_unless(proto::NR_MAIL, st) {
                let blocked = blocked_by(shared, &sender, &[], st.client_ip);
                respond_policy(io, shared, blocked).await?;
            }
            st.sender = Some(sender);
        }
        proto::RCPT => {
            let rcpt = proto::address(&proto::strings(data).first().cloned().unwrap_or_default());
            if st.rcpts.len() >= MAX_RCPTS {
                return Err(SessionError::Limit(format!(
                    "more than {MAX_RCPTS} recipients"
                )));
            }
            if reply_unless(proto::NR_RCPT, st) {
                let blocked = blocked_by(shared, "", std::slice::from_ref(&rcpt), None)
                    .filter(|p| p.1 != "from");
                let refused = blocked.is_some();
                respond_policy(io, shared, blocked).await?;
                if refused {
                    return Ok(true);
                }
            }
            st.rcpts.push(rcpt);
        }
        proto::HEADER => {
            let mut parts = proto::strings(data).into_iter();
            let (name, value) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            st.header_bytes += name.len() + value.len();
            if st.headers.len() >= MAX_HEADERS || st.header_bytes > MAX_HEADER_BYTES {
                return Err(SessionError::Limit(format!(
                    "more than {MAX_HEADERS} header fields or {MAX_HEADER_BYTES} bytes of them"
                )));
            }
            append(st, shared, &header_line(&name, &value)).await;
            st.headers.push((name, value));
            if reply_unless(proto::NOHREPL, st) {
                proto::write(io, proto::CONTINUE, &[])
                    .await
                    .map_err(io_err)?;
            }
        }
        proto::EOH => {
            end_headers(st, shared).await;
            if reply_unless(proto::NR_EOH, st) {
                proto::write(io, proto::CONTINUE, &[])
                    .await
                    .map_err(io_err)?;
            }
        }
        proto::BODY => {
            end_headers(st, shared).await;
            append(st, shared, data).await;
            if reply_unless(proto::NR_BODY, st) {
                proto::write(io, proto::CONTINUE, &[])
                    .await
                    .map_err(io_err)?;
            }
        }
        proto::BODYEOB => {
            end_headers(st, shared).await;
            append(st, shared, data).await;
            end_of_message(io, shared, st).await?;
            st.reset_message();
        }
        proto::ABORT => st.reset_message(),
        proto::QUIT => return Ok(false),
        // A new connection on the same socket keeps what was negotiated (the MTA does
        // not negotiate again): answering steps it no longer waits for would put every
        // later reply out of step.
        proto::QUIT_NC => {
            let protocol = st.protocol;
            *st = State::default();
            st.protocol = protocol;
        }
        proto::DATA | proto::UNKNOWN => {
            proto::write(io, proto::CONTINUE, &[])
                .await
                .map_err(io_err)?;
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "unknown milter command {:?}",
                char::from(other)
            )));
        }
    }
    Ok(true)
}

/// Bytes of a message held in memory; beyond, it goes to a file.
const SPILL: usize = 1 << 20;

/// Where a message accumulates: in memory up to `SPILL` bytes, then in an anonymous
/// temporary file under `paths.spool_dir/milter` (the kernel removes it when closed), so
/// a connection holds at most `SPILL` bytes however large the message.
#[derive(Default)]
struct Buffer {
    memory: Vec<u8>,
    file: Option<tokio::fs::File>,
    len: u64,
    /// Why the message could not be kept (it is tempfailed at the end).
    failed: Option<std::io::Error>,
}

impl Buffer {
    async fn append(&mut self, bytes: &[u8], spill_dir: impl FnOnce() -> std::path::PathBuf) {
        use tokio::io::AsyncWriteExt;
        if self.failed.is_some() {
            return;
        }
        self.len += bytes.len() as u64;
        if let Some(f) = &mut self.file {
            if let Err(e) = f.write_all(bytes).await {
                self.failed = Some(hold_error("cannot write the spilled message", &e));
            }
            return;
        }
        if self.memory.len() + bytes.len() <= SPILL {
            self.memory.extend_from_slice(bytes);
            return;
        }
        let dir = spill_dir();
        let opened = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            tempfile::tempfile_in(&dir)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        let mut f = match opened {
            Ok(f) => tokio::fs::File::from_std(f),
            Err(e) => {
                self.failed = Some(hold_error("cannot spill a large message to a file", &e));
                return;
            }
        };
        let memory = std::mem::take(&mut self.memory);
        if let Err(e) = async {
            f.write_all(&memory).await?;
            f.write_all(bytes).await
        }
        .await
        {
            self.failed = Some(hold_error("cannot write the spilled message", &e));
            return;
        }
        self.file = Some(f);
    }

    /// The message for the scan.
    async fn take(&mut self) -> Result<Body, std::io::Error> {
        use tokio::io::AsyncWriteExt;
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match self.file.take() {
            Some(mut f) => {
                f.flush()
                    .await
                    .map_err(|e| hold_error("cannot write the spilled message", &e))?;
                Ok(Body::File {
                    file: Arc::new(f.into_std().await),
                    len: self.len,
                })
            }
            None => Ok(Body::from(std::mem::take(&mut self.memory))),
        }
    }
}

/// `Name: value` with CRLF line ends, as the field was received (Postfix hands folded
/// values over with bare LF).
fn header_line(name: &str, value: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(name.len() + value.len() + 8);
    line.extend_from_slice(name.as_bytes());
    line.extend_from_slice(b": ");
    let mut prev = 0u8;
    for &b in value.as_bytes() {
        if b == b'\n' && prev != b'\r' {
            line.push(b'\r');
        }
        line.push(b);
        prev = b;
    }
    line.extend_from_slice(b"\r\n");
    line
}

/// The blank line that ends the header section, once per message.
async fn end_headers(st: &mut State, shared: &Shared) {
    if !st.headers_ended {
        st.headers_ended = true;
        append(st, shared, b"\r\n").await;
    }
}

/// Adds to the message, up to the size limit.
async fn append(st: &mut State, shared: &Shared, bytes: &[u8]) {
    if st.too_large {
        return;
    }
    if st.message.len + bytes.len() as u64 > st.limit as u64 {
        st.too_large = true;
        st.message = Buffer::default();
        return;
    }
    st.message
        .append(bytes, || {
            shared
                .follower
                .current()
                .path("paths.spool_dir")
                .join("milter")
        })
        .await;
}

/// The blocking policy for a sender (or recipient), with its direction.
fn blocked_by(
    shared: &Shared,
    sender: &str,
    rcpts: &[String],
    ip: Option<IpAddr>,
) -> Option<(String, &'static str)> {
    let set = shared.policies.current();
    let delimiter = shared.follower.current().text("smtp.recipient_delimiter");
    // Each recipient's own policy (an allow for one never hides another's block). The
    // sender is taken as authenticated here: whether it is, only the scan knows, and it
    // refuses at the end of the message what an allow for a forged sender hid.
    let outcome = policy::outcome(
        &set,
        &policy::Subject {
            sender,
            recipients: rcpts,
            client_ip: ip,
            delimiter: &delimiter,
        },
        true,
    );
    let p = outcome.blocked()?;
    Some((p.name.clone(), p.direction.as_str()))
}

async fn respond_policy<S: AsyncWrite + Unpin>(
    io: &mut S,
    shared: &Shared,
    blocked: Option<(String, &'static str)>,
) -> Result<(), SessionError> {
    let io_err = SessionError::Io;
    match blocked {
        Some((name, _)) => {
            shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let line = milter_line(
                550,
                EnhancedStatus::POLICY_REJECT,
                &format!("Refused by policy {name}"),
            );
            proto::write(io, proto::REPLYCODE, &proto::cstrings(&[&line]))
                .await
                .map_err(io_err)
        }
        None => proto::write(io, proto::CONTINUE, &[]).await.map_err(io_err),
    }
}

async fn end_of_message<S: AsyncWrite + Unpin>(
    io: &mut S,
    shared: &Shared,
    st: &mut State,
) -> Result<(), SessionError> {
    let io_err = SessionError::Io;
    let cfg = shared.follower.current();
    shared.stats.messages.fetch_add(1, Ordering::Relaxed);
    if st.too_large {
        let line = milter_line(552, EnhancedStatus::TOO_BIG, "Message too big");
        shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
        return proto::write(io, proto::REPLYCODE, &proto::cstrings(&[&line]))
            .await
            .map_err(io_err);
    }
    let client_ip = st
        .macro_value("client_addr")
        .and_then(|a| a.parse().ok())
        .or(st.client_ip);
    let auth_user = st
        .macro_value("auth_authen")
        .unwrap_or_default()
        .to_string();
    let direction = Direction::of(
        !auth_user.is_empty(),
        client_ip,
        &cfg.nets("smtp.mynetworks"),
    );
    let tls = match (st.macro_value("tls_version"), st.macro_value("cipher")) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        (Some(v), None) => v.to_string(),
        _ => String::new(),
    };
    let queue_id = st.macro_value("i").unwrap_or_default().to_string();
    let request = ScanRequest {
        queue_id: queue_id.clone(),
        client_ip,
        client_name: st
            .macro_value("client_name")
            .map_or_else(|| st.client_name.clone(), str::to_string),
        helo: st.helo.clone(),
        sender: st.sender.clone().unwrap_or_default(),
        recipients: st.rcpts.clone(),
        auth_user,
        tls,
        direction,
    };
    let message = match st.message.take().await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(id = %queue_id, cause = %e, "tempfailing a message that could not be held");
            shared.stats.tempfailed.fetch_add(1, Ordering::Relaxed);
            let line = milter_line(
                451,
                EnhancedStatus::SYSTEM_TEMPORARY,
                "Cannot hold the message now, try again later",
            );
            return proto::write(io, proto::REPLYCODE, &proto::cstrings(&[&line]))
                .await
                .map_err(io_err);
        }
    };
    let started = Instant::now();
    let scan = shared.scanner.scan(&request, message);
    tokio::pin!(scan);
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + shared.progress_every,
        shared.progress_every,
    );
    let verdict = loop {
        tokio::select! {
            v = &mut scan => break v,
            _ = progress.tick() => {
                proto::write(io, proto::PROGRESS, &[]).await.map_err(io_err)?;
            }
        }
    };
    shared.stats.latency_micros.fetch_add(
        u64::try_from(started.elapsed().as_micros()).unwrap_or(0),
        Ordering::Relaxed,
    );
    let v = match verdict {
        Ok(v) => v,
        // Full workers (`filter.max_inflight_bytes`) tempfail whatever
        // `milter.unavailable_action` says: a flood must not switch scanning off.
        Err(e) if e.is_busy() => {
            tracing::warn!(id = %queue_id, cause = %e, "every mb-filter worker is full; tempfailing");
            shared.stats.tempfailed.fetch_add(1, Ordering::Relaxed);
            let line = mb_scan::reply::busy().to_milter();
            return proto::write(io, proto::REPLYCODE, &proto::cstrings(&[&line]))
                .await
                .map_err(io_err);
        }
        Err(e) if cfg.text("milter.unavailable_action") == "accept" => {
            tracing::warn!(id = %queue_id, cause = %e, "no mb-filter worker answered; accepting unscanned (milter.unavailable_action = accept)");
            shared.stats.unscanned.fetch_add(1, Ordering::Relaxed);
            // Unscanned is not unfiltered: the sender's forged verdict fields go.
            let mut out = Vec::new();
            remove_fields(&mut out, st, mb_core::message::FORGEABLE);
            proto::put(&mut out, proto::CONTINUE, &[]);
            return io.write_all(&out).await.map_err(io_err);
        }
        Err(e) => {
            tracing::warn!(id = %queue_id, cause = %e, "no mb-filter worker answered; tempfailing");
            shared.stats.tempfailed.fetch_add(1, Ordering::Relaxed);
            let line = mb_scan::reply::unavailable().to_milter();
            return proto::write(io, proto::REPLYCODE, &proto::cstrings(&[&line]))
                .await
                .map_err(io_err);
        }
    };
    apply(io, shared, st, &v).await.map_err(io_err)
}

/// Deletes every occurrence of each named field, by its index among the fields of that
/// name as Postfix counts them (CHGHEADER with an empty value).
fn remove_fields(out: &mut Vec<u8>, st: &State, names: &[impl AsRef<str>]) {
    for name in names {
        let name = name.as_ref();
        let count = st
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count();
        for index in (1..=count).rev() {
            let mut data = u32::try_from(index).unwrap_or(1).to_be_bytes().to_vec();
            data.extend_from_slice(&proto::cstrings(&[name, ""]));
            proto::put(out, proto::CHGHEADER, &data);
        }
    }
}

/// One reply line as REPLYCODE carries it.
fn milter_line(code: u16, status: EnhancedStatus, text: &str) -> String {
    Reply::new(code, status, text).to_milter()
}

/// Turns a verdict into milter modifications and the final reply.
async fn apply<S: AsyncWrite + Unpin>(
    io: &mut S,
    shared: &Shared,
    st: &State,
    v: &Verdict,
) -> std::io::Result<()> {
    let (add_headers, remove_headers) = match mb_scan::reply::disposition(v) {
        Disposition::Refuse(reply) => {
            if reply.code >= 500 {
                shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.stats.tempfailed.fetch_add(1, Ordering::Relaxed);
            }
            let line = reply.to_milter();
            return proto::write(io, proto::REPLYCODE, &proto::cstrings(&[&line])).await;
        }
        Disposition::Discard => {
            shared.stats.discarded.fetch_add(1, Ordering::Relaxed);
            return proto::write(io, proto::DISCARD, &[]).await;
        }
        // A quarantined message still gets its headers (so a release carries them) and
        // is then held in Postfix's hold queue.
        Disposition::Quarantined(_) => (v.add_headers.as_slice(), v.remove_headers.as_slice()),
        Disposition::Deliver {
            add_headers,
            remove_headers,
        } => (add_headers, remove_headers),
    };
    // The modifications and the final reply go out in one write: the MTA reads them
    // all before it acts, and one segment costs both sides less than one per packet.
    let mut out = Vec::new();
    remove_fields(&mut out, st, remove_headers);
    for (name, value) in add_headers.iter().rev() {
        let mut data = 0u32.to_be_bytes().to_vec();
        let value = value.replace("\r\n", "\n");
        data.extend_from_slice(&proto::cstrings(&[name, &value]));
        proto::put(&mut out, proto::INSHEADER, &data);
    }
    if v.action == mb_core::Action::Quarantine {
        shared.stats.quarantined.fetch_add(1, Ordering::Relaxed);
        let reason = format!(
            "mailborder: {} (quarantine id {})",
            v.refusal.text, v.quarantine_id
        );
        proto::put(&mut out, proto::QUARANTINE, &proto::cstrings(&[&reason]));
    } else {
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    }
    proto::put(&mut out, proto::CONTINUE, &[]);
    io.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use mb_scan::ScanError;
    use tokio::io::AsyncWriteExt;

    /// What `negotiate` refuses, and that it never asks for more than the MTA offered.
    #[test]
    fn negotiation_refuses_short_and_ancient_offers_and_asks_only_what_is_offered() {
        let offer = |version: u32, actions: u32, steps: u32| {
            [version, actions, steps]
                .iter()
                .flat_map(|w| w.to_be_bytes())
                .collect::<Vec<u8>>()
        };
        assert_eq!(
            negotiate(&offer(6, 0x1ff, 0x1f_ffff)[..11], false, false).unwrap_err(),
            NegotiationError::Short
        );
        assert_eq!(
            negotiate(&offer(1, 0x1ff, 0x1f_ffff), false, false).unwrap_err(),
            NegotiationError::TooOld(1)
        );
        // An MTA that offers no step flags and no actions gets none asked of it.
        let (steps, reply) = negotiate(&offer(6, 0, 0), false, false).unwrap();
        assert_eq!(steps, 0);
        assert_eq!(reply, offer(6, 0, 0), "no macro lists without SETSYMLIST");
        // Protocol 2 gets version 2 back and no macro lists even when offered the action.
        let (_, reply) = negotiate(&offer(2, proto::SETSYMLIST, 0), false, false).unwrap();
        assert_eq!(reply.len(), 12);
        assert_eq!(&reply[..4], &2u32.to_be_bytes());
        // A block at RCPT keeps RCPT's reply but not MAIL's.
        let (steps, _) = negotiate(&offer(6, 0x1ff, 0x1f_ffff), false, true).unwrap();
        assert_eq!(steps & (proto::NR_MAIL | proto::NR_RCPT), proto::NR_MAIL);
    }

    /// Postfix is silent towards the milter while a client uploads DATA and between
    /// commands up to its smtpd_timeout (300 s): the default idle limit must leave room
    /// for a large message on a slow link, or honest mail is tempfailed.
    #[test]
    fn default_timeout_outlasts_a_slow_upload() {
        let def = mb_core::registry::find("milter.timeout").unwrap();
        let d = mb_core::value::parse_duration(def.default).unwrap();
        assert!(
            d >= Duration::from_secs(3600),
            "milter.timeout default {d:?}"
        );
    }

    /// A scanner that takes its time and tags everything.
    struct Slow;

    #[tonic::async_trait]
    impl mb_scan::Scanner for Slow {
        async fn scan(&self, env: &ScanRequest, message: Body) -> Result<Verdict, ScanError> {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let message = message.read_all().unwrap();
            assert!(String::from_utf8_lossy(&message).contains("X-Spam: Yes\r\n\r\nbody"));
            assert_eq!(
                (env.sender.as_str(), env.queue_id.as_str()),
                ("a@b.example", "Q1")
            );
            Ok(Verdict {
                action: mb_core::Action::Tag,
                add_headers: vec![("X-Spam-Status".into(), "Yes".into())],
                remove_headers: vec!["X-Spam".into()],
                ..Verdict::default()
            })
        }
    }

    async fn packet<W: AsyncWrite + Unpin>(w: &mut W, cmd: u8, data: &[u8]) {
        proto::write(w, cmd, data).await.unwrap();
    }

    /// One message as Postfix hands it over (protocol 6, every step answered): option
    /// negotiation, `macros` before MAIL, `headers`, a short body, end of message; every
    /// packet the milter sent after end of message, the final CONTINUE included.
    async fn one_message(
        mta: &mut tokio::io::DuplexStream,
        macros: &[u8],
        headers: &[&[u8]],
    ) -> Vec<(u8, Vec<u8>)> {
        let mut opt = 6u32.to_be_bytes().to_vec();
        opt.extend_from_slice(&0x3fu32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        packet(mta, proto::OPTNEG, &opt).await;
        assert_eq!(proto::read(mta).await.unwrap().0, proto::OPTNEG);
        if !macros.is_empty() {
            packet(mta, proto::MACRO, macros).await;
        }
        packet(mta, proto::MAIL, b"<a@b.example>\0").await;
        assert_eq!(proto::read(mta).await.unwrap().0, proto::CONTINUE);
        packet(mta, proto::RCPT, b"<c@d.example>\0").await;
        assert_eq!(proto::read(mta).await.unwrap().0, proto::CONTINUE);
        for header in headers {
            packet(mta, proto::HEADER, header).await;
            assert_eq!(proto::read(mta).await.unwrap().0, proto::CONTINUE);
        }
        packet(mta, proto::EOH, b"").await;
        assert_eq!(proto::read(mta).await.unwrap().0, proto::CONTINUE);
        packet(mta, proto::BODYEOB, b"body\r\n").await;
        let mut seen = Vec::new();
        loop {
            let (cmd, data) = proto::read(mta).await.unwrap();
            seen.push((cmd, data));
            if cmd == proto::CONTINUE {
                return seen;
            }
        }
    }

    /// A milter session on an in-memory pipe, with `config` and `scanner`.
    fn session(
        config: &str,
        scanner: Box<dyn mb_scan::Scanner>,
    ) -> (
        Arc<Shared>,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
    ) {
        let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let cfg = mb_core::Config::from_toml_str(config, "test").unwrap();
        let shared = Arc::new(Shared {
            follower: mb_runtime::follow::Follower::start("mb-milter-test", cfg, shutdown),
            policies: mb_runtime::policies::PolicySet::fixed(Vec::new()),
            scanner,
            stats: crate::Stats::default(),
            progress_every: Duration::from_millis(60),
        });
        let (mta, mut milter) = tokio::io::duplex(1 << 16);
        let server = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut st = State::default();
                loop {
                    let Ok((cmd, data)) = proto::read(&mut milter).await else {
                        return;
                    };
                    if !handle(&mut milter, &shared, &mut st, cmd, &data)
                        .await
                        .unwrap()
                    {
                        return;
                    }
                }
            })
        };
        (shared, mta, server)
    }

    /// What a scanner was given: (in a file, length, content) per message.
    type Seen = Arc<std::sync::Mutex<Vec<(bool, u64, Vec<u8>)>>>;

    struct Recorder(Seen);

    #[tonic::async_trait]
    impl mb_scan::Scanner for Recorder {
        async fn scan(&self, _env: &ScanRequest, message: Body) -> Result<Verdict, ScanError> {
            let in_file = matches!(message, Body::File { .. });
            let data = message.read_all().unwrap();
            self.0.lock().unwrap().push((in_file, message.len(), data));
            Ok(Verdict::accept())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_messages_spill_to_a_file_and_reach_the_scanner_whole() {
        let spool = tempfile::tempdir().unwrap();
        let seen = Seen::default();
        let (shared, mut mta, server) = session(
            &format!(
                "[paths]\nspool_dir = \"{}\"\n[smtp]\nmessage_size_limit = \"10M\"\n",
                spool.path().display()
            ),
            Box::new(Recorder(seen.clone())),
        );
        let mut opt = 6u32.to_be_bytes().to_vec();
        opt.extend_from_slice(&0x3fu32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        packet(&mut mta, proto::OPTNEG, &opt).await;
        assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::OPTNEG);
        let mut expected = Vec::new();
        for (size, label) in [(1000usize, "small"), (3 << 20, "large")] {
            packet(&mut mta, proto::MAIL, b"<a@b.example>\0").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            packet(&mut mta, proto::RCPT, b"<c@d.example>\0").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            packet(
                &mut mta,
                proto::HEADER,
                format!("Subject\0{label}\0").as_bytes(),
            )
            .await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            packet(&mut mta, proto::EOH, b"").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            let body: Vec<u8> = (0..size).map(|i| b"abcdefghij\r\n"[i % 12]).collect();
            for piece in body.chunks(65_535) {
                packet(&mut mta, proto::BODY, piece).await;
                assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            }
            packet(&mut mta, proto::BODYEOB, b"").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            let mut whole = format!("Subject: {label}\r\n\r\n").into_bytes();
            whole.extend_from_slice(&body);
            expected.push(whole);
        }
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(!seen[0].0, "a small message stays in memory");
        assert!(seen[1].0, "a large one goes to a file");
        for (i, (_, len, data)) in seen.iter().enumerate() {
            assert_eq!(*len as usize, expected[i].len());
            assert!(*data == expected[i], "message {i} arrived whole");
        }
        // The file was anonymous: nothing is left behind.
        let left: Vec<_> = std::fs::read_dir(spool.path().join("milter"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(shared.stats.accepted.load(Ordering::Relaxed), 2);
    }

    /// Macros repeated at each stage, packets buffered together, end of headers: the
    /// message reaches the scanner with the blank line after its header section once,
    /// with a body or without. SMFIP_NOEOH is not asked for (OpenDKIM's miltertest
    /// scripts fail under it), and a peer that skips end of headers anyway still gets
    /// the blank line.
    #[tokio::test]
    async fn the_header_section_ends_once_with_or_without_end_of_headers() {
        let seen = Seen::default();
        let (_shared, mut mta, server) = session("", Box::new(Recorder(seen.clone())));
        let mut opt = 6u32.to_be_bytes().to_vec();
        opt.extend_from_slice(&0x3fu32.to_be_bytes());
        opt.extend_from_slice(&(proto::NOEOH | proto::NOHREPL).to_be_bytes());
        packet(&mut mta, proto::OPTNEG, &opt).await;
        let (cmd, reply) = proto::read(&mut mta).await.unwrap();
        assert_eq!(cmd, proto::OPTNEG);
        assert_eq!(&reply[8..12], &proto::NOHREPL.to_be_bytes());
        for (eoh, body, expected) in [
            (true, &b"body\r\n"[..], &b"Subject: one\r\n\r\nbody\r\n"[..]),
            (false, b"body\r\n", b"Subject: one\r\n\r\nbody\r\n"),
            (false, b"", b"Subject: one\r\n\r\n"),
        ] {
            packet(&mut mta, proto::MACRO, b"M{i}\0Q1\0i\0Q1\0").await;
            packet(&mut mta, proto::MAIL, b"<a@b.example>\0").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            packet(&mut mta, proto::RCPT, b"<c@d.example>\0").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            packet(&mut mta, proto::HEADER, b"Subject\0one\0").await;
            if eoh {
                packet(&mut mta, proto::EOH, b"").await;
                assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            }
            if !body.is_empty() {
                packet(&mut mta, proto::BODY, body).await;
                assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            }
            packet(&mut mta, proto::BODYEOB, b"").await;
            assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
            let last = seen.lock().unwrap().last().unwrap().2.clone();
            assert_eq!(last, expected, "{}", String::from_utf8_lossy(&last));
        }
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
    }

    /// What a scanner was told about each message.
    type Told = Arc<std::sync::Mutex<Vec<ScanRequest>>>;

    struct Teller(Told);

    #[tonic::async_trait]
    impl mb_scan::Scanner for Teller {
        async fn scan(&self, env: &ScanRequest, _message: Body) -> Result<Verdict, ScanError> {
            self.0.lock().unwrap().push(env.clone());
            Ok(Verdict::accept())
        }
    }

    /// Postfix offers SMFIF_SETSYMLIST: the reply names our macros stage by stage. The verdict
    /// still sees the client's address and name, HELO, the authenticated user, TLS and
    /// the queue id, and header fields named like macros change none of them.
    #[tokio::test]
    async fn named_macros_are_negotiated_and_reach_the_verdict() {
        let told = Told::default();
        let (_shared, mut mta, server) = session("", Box::new(Teller(told.clone())));
        // Postfix 3.7, milter_protocol = 6: every action and every step offered.
        let mut opt = 6u32.to_be_bytes().to_vec();
        opt.extend_from_slice(&0x1ffu32.to_be_bytes());
        opt.extend_from_slice(&0x1f_ffffu32.to_be_bytes());
        packet(&mut mta, proto::OPTNEG, &opt).await;
        let (cmd, reply) = proto::read(&mut mta).await.unwrap();
        assert_eq!(cmd, proto::OPTNEG);
        let mut expected = Vec::new();
        expected.extend_from_slice(&6u32.to_be_bytes());
        expected.extend_from_slice(&0x131u32.to_be_bytes());
        expected.extend_from_slice(&0x000c_f380u32.to_be_bytes());
        for (stage, names) in [
            (0u32, "{client_addr} {client_name}"),
            (1, "{tls_version} {cipher}"),
            (2, "{auth_authen}"),
            (3, "i"),
            (4, "i"),
            (6, "i"),
            (5, "i"),
        ] {
            expected.extend_from_slice(&stage.to_be_bytes());
            expected.extend_from_slice(names.as_bytes());
            expected.push(0);
        }
        assert_eq!(reply, expected, "{}", String::from_utf8_lossy(&reply));
        // As Postfix sends a message then: macros, CONNECT (here with another address:
        // the macro wins), HELO without a reply.
        packet(
            &mut mta,
            proto::MACRO,
            b"C{client_addr}\x00192.0.2.9\x00{client_name}\x00mx.sender.example\x00",
        )
        .await;
        packet(
            &mut mta,
            proto::CONNECT,
            b"other.example\x004\x00\x19198.51.100.1\x00",
        )
        .await;
        packet(
            &mut mta,
            proto::MACRO,
            b"H{tls_version}\0TLSv1.3\0{cipher}\0TLS_AES_256_GCM_SHA384\0",
        )
        .await;
        packet(&mut mta, proto::HELO, b"helo.sender.example\0").await;
        packet(&mut mta, proto::MACRO, b"M{auth_authen}\0alice\0").await;
        // No policy could refuse at MAIL or RCPT: no replies asked for there either.
        packet(&mut mta, proto::MAIL, b"<alice@sender.example>\0").await;
        packet(&mut mta, proto::MACRO, b"Ri\0Q7\0").await;
        packet(&mut mta, proto::RCPT, b"<bob@served.example>\0").await;
        packet(&mut mta, proto::MACRO, b"Ti\0Q7\0").await;
        // Forged: fields named like the macros, as a sender may write them.
        for field in [
            &b"{client_addr}\x00203.0.113.66\x00"[..],
            b"client_addr\x00203.0.113.66\x00",
            b"{auth_authen}\x00mallory\x00",
            b"auth_authen\x00mallory\x00",
            b"i\x00FORGED\x00",
            b"Subject\x00hi\x00",
        ] {
            packet(&mut mta, proto::HEADER, field).await;
        }
        packet(&mut mta, proto::MACRO, b"Ni\0Q7\0").await;
        packet(&mut mta, proto::EOH, b"").await;
        packet(&mut mta, proto::BODY, b"hello\r\n").await;
        packet(&mut mta, proto::MACRO, b"Ei\0Q7\0").await;
        packet(&mut mta, proto::BODYEOB, b"").await;
        assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
        let told = told.lock().unwrap();
        assert_eq!(
            *told,
            [ScanRequest {
                queue_id: "Q7".into(),
                client_ip: Some("192.0.2.9".parse().unwrap()),
                client_name: "mx.sender.example".into(),
                helo: "helo.sender.example".into(),
                sender: "alice@sender.example".into(),
                recipients: vec!["bob@served.example".into()],
                auth_user: "alice".into(),
                tls: "TLSv1.3 TLS_AES_256_GCM_SHA384".into(),
                direction: Direction::Outbound,
            }]
        );
    }

    /// An MTA that cannot take a macro list (SMFIF_SETSYMLIST not offered) gets the
    /// plain 12-byte reply and still sends CONNECT, where the client's address is read.
    #[tokio::test]
    async fn without_macro_lists_the_connect_packet_gives_the_client() {
        let told = Told::default();
        let (_shared, mut mta, server) = session("", Box::new(Teller(told.clone())));
        let mut opt = 6u32.to_be_bytes().to_vec();
        opt.extend_from_slice(&0xffu32.to_be_bytes());
        opt.extend_from_slice(&0x1f_ffffu32.to_be_bytes());
        packet(&mut mta, proto::OPTNEG, &opt).await;
        let (cmd, reply) = proto::read(&mut mta).await.unwrap();
        assert_eq!(cmd, proto::OPTNEG);
        assert_eq!(reply.len(), 12);
        assert_eq!(&reply[4..8], &0x31u32.to_be_bytes());
        assert_eq!(&reply[8..12], &0x000c_f380u32.to_be_bytes());
        packet(
            &mut mta,
            proto::CONNECT,
            b"mx.sender.example\x004\x00\x19192.0.2.9\x00",
        )
        .await;
        packet(&mut mta, proto::HELO, b"helo.sender.example\0").await;
        packet(&mut mta, proto::MAIL, b"<a@sender.example>\0").await;
        packet(&mut mta, proto::RCPT, b"<b@served.example>\0").await;
        packet(&mut mta, proto::HEADER, b"Subject\0hi\0").await;
        packet(&mut mta, proto::EOH, b"").await;
        packet(&mut mta, proto::BODYEOB, b"hello\r\n").await;
        assert_eq!(proto::read(&mut mta).await.unwrap().0, proto::CONTINUE);
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
        let told = told.lock().unwrap();
        assert_eq!(told.len(), 1);
        assert_eq!(
            (
                told[0].client_ip,
                told[0].client_name.as_str(),
                told[0].helo.as_str()
            ),
            (
                Some("192.0.2.9".parse().unwrap()),
                "mx.sender.example",
                "helo.sender.example"
            )
        );
        assert_eq!(told[0].direction, Direction::Inbound);
    }

    fn block(id: i64, pattern: &str, direction: policy::Direction) -> policy::Policy {
        policy::Policy {
            id,
            name: format!("b{id}"),
            priority: 10,
            object: policy::Object::Domain,
            pattern: pattern.into(),
            direction,
            action: policy::Action::Block,
            tag: None,
            quarantine: None,
            reject: None,
            unauthenticated: false,
            recipient: String::new(),
        }
    }

    /// MAIL and RCPT are answered only while a block policy could refuse there: a
    /// sender block keeps the MAIL reply (and refuses at MAIL), a recipient block keeps
    /// the RCPT reply (and refuses that recipient).
    #[tokio::test]
    async fn mail_and_rcpt_replies_are_kept_while_a_block_could_refuse_there() {
        use policy::Direction::{From, FromOrTo, To};
        for (policies, nr, mail_reply, rcpt_reply) in [
            (vec![], proto::NR_MAIL | proto::NR_RCPT, None, None),
            (
                vec![block(1, "spammer.example", From)],
                proto::NR_RCPT,
                Some(proto::REPLYCODE),
                None,
            ),
            (
                vec![block(1, "closed.example", To)],
                0,
                Some(proto::CONTINUE),
                Some(proto::REPLYCODE),
            ),
            (
                vec![block(1, "closed.example", FromOrTo)],
                0,
                Some(proto::CONTINUE),
                Some(proto::REPLYCODE),
            ),
        ] {
            let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
            let cfg = mb_core::Config::from_toml_str("", "test").unwrap();
            let shared = Shared {
                follower: mb_runtime::follow::Follower::start("mb-milter-test", cfg, shutdown),
                policies: mb_runtime::policies::PolicySet::fixed(policies.clone()),
                scanner: Box::new(Gone),
                stats: crate::Stats::default(),
                progress_every: Duration::from_millis(60),
            };
            let (mut io, mut mta) = tokio::io::duplex(1 << 16);
            let mut st = State::default();
            let mut opt = 6u32.to_be_bytes().to_vec();
            opt.extend_from_slice(&0x3fu32.to_be_bytes());
            opt.extend_from_slice(&0x1f_ffffu32.to_be_bytes());
            handle(&mut io, &shared, &mut st, proto::OPTNEG, &opt)
                .await
                .unwrap();
            let (_, reply) = proto::read(&mut mta).await.unwrap();
            let negotiated = u32::from_be_bytes([reply[8], reply[9], reply[10], reply[11]]);
            assert_eq!(
                negotiated & (proto::NR_MAIL | proto::NR_RCPT),
                nr,
                "{policies:?}"
            );
            handle(
                &mut io,
                &shared,
                &mut st,
                proto::MAIL,
                b"<a@spammer.example>\0",
            )
            .await
            .unwrap();
            handle(
                &mut io,
                &shared,
                &mut st,
                proto::RCPT,
                b"<b@closed.example>\0",
            )
            .await
            .unwrap();
            let (mut done, _) = tokio::io::duplex(1);
            std::mem::swap(&mut io, &mut done);
            drop(done);
            let mut replies = Vec::new();
            while let Ok((cmd, _)) = proto::read(&mut mta).await {
                replies.push(cmd);
            }
            let expected: Vec<u8> = [mail_reply, rcpt_reply].into_iter().flatten().collect();
            assert_eq!(replies, expected, "{policies:?}");
            // A refused recipient is not scanned for.
            let kept = usize::from(rcpt_reply != Some(proto::REPLYCODE));
            assert_eq!(st.rcpts.len(), kept, "{policies:?}");
            // Quit with a new connection to follow: the negotiated steps stay.
            handle(&mut io, &shared, &mut st, proto::QUIT_NC, b"")
                .await
                .unwrap();
            assert_eq!((st.protocol, st.rcpts.len()), (negotiated, 0));
        }
    }

    #[tokio::test]
    async fn long_scans_send_progress_then_the_changes_and_continue() {
        let (shared, mut mta, server) = session("", Box::new(Slow));
        let seen = one_message(&mut mta, b"Mi\0Q1\0", &[b"X-Spam\0Yes\0"]).await;
        let cmds: Vec<u8> = seen.iter().map(|(c, _)| *c).collect();
        assert!(
            cmds.starts_with(&[proto::PROGRESS, proto::PROGRESS]),
            "{cmds:?}"
        );
        let changes: Vec<&(u8, Vec<u8>)> =
            seen.iter().filter(|(c, _)| *c != proto::PROGRESS).collect();
        assert_eq!(changes[0].0, proto::CHGHEADER);
        assert_eq!(changes[0].1, b"\0\0\0\x01X-Spam\0\0");
        assert_eq!(changes[1].0, proto::INSHEADER);
        assert_eq!(changes[1].1, b"\0\0\0\0X-Spam-Status\0Yes\0");
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
        assert_eq!(shared.stats.accepted.load(Ordering::Relaxed), 1);
    }

    /// Quarantines with the forgeable fields removed, as the filter's verdict does.
    struct Quarantines;

    #[tonic::async_trait]
    impl mb_scan::Scanner for Quarantines {
        async fn scan(&self, _env: &ScanRequest, _message: Body) -> Result<Verdict, ScanError> {
            Ok(Verdict {
                action: mb_core::Action::Quarantine,
                remove_headers: mb_core::message::FORGEABLE
                    .iter()
                    .map(|f| f.to_string())
                    .collect(),
                ..Verdict::default()
            })
        }
    }

    /// Postfix hands over a field's label without the white space the obsolete syntax
    /// allows before the colon, and finds the field to delete by that label, case
    /// insensitively, with the index among fields of that label: the deletions count
    /// the same fields, every spelling of the name included, before the message is held.
    #[tokio::test]
    async fn a_quarantined_message_loses_every_forged_field_by_its_index() {
        let (shared, mut mta, server) = session("", Box::new(Quarantines));
        let headers: [&[u8]; 4] = [
            b"Authentication-Results\0gw.served.test; dmarc=pass\0",
            b"X-Spam-Status\0No\0",
            b"authentication-results\0gw.served.test; spf=pass\0",
            b"Subject\0hi\0",
        ];
        let seen: Vec<(u8, Vec<u8>)> = one_message(&mut mta, b"", &headers)
            .await
            .into_iter()
            .filter(|(c, _)| *c != proto::PROGRESS)
            .collect();
        let deleted: Vec<&[u8]> = seen
            .iter()
            .filter(|(c, _)| *c == proto::CHGHEADER)
            .map(|(_, d)| d.as_slice())
            .collect();
        assert_eq!(
            deleted,
            [
                &b"\0\0\0\x01X-Spam-Status\0\0"[..],
                b"\0\0\0\x02Authentication-Results\0\0",
                b"\0\0\0\x01Authentication-Results\0\0",
            ]
        );
        let cmds: Vec<u8> = seen.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            cmds[3..],
            [proto::QUARANTINE, proto::CONTINUE],
            "deleted, then held"
        );
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
        assert_eq!(shared.stats.quarantined.load(Ordering::Relaxed), 1);
    }

    /// No worker answers.
    struct Gone;

    #[tonic::async_trait]
    impl mb_scan::Scanner for Gone {
        async fn scan(&self, _env: &ScanRequest, _message: Body) -> Result<Verdict, ScanError> {
            Err(ScanError::NoWorkers)
        }
    }

    /// With `milter.unavailable_action = accept` an unscanned message passes, but not
    /// with the sender's forged verdict fields.
    #[tokio::test]
    async fn an_unscanned_message_still_loses_forged_fields() {
        let (shared, mut mta, server) = session(
            "[milter]\nunavailable_action = \"accept\"\n",
            Box::new(Gone),
        );
        let headers: [&[u8]; 2] = [
            b"Authentication-Results\0gw.served.test; dmarc=pass\0",
            b"X-Spam\0No\0",
        ];
        let seen: Vec<(u8, Vec<u8>)> = one_message(&mut mta, b"", &headers)
            .await
            .into_iter()
            .filter(|(c, _)| *c != proto::PROGRESS)
            .collect();
        assert_eq!(
            seen,
            [
                (proto::CHGHEADER, b"\0\0\0\x01X-Spam\0\0".to_vec()),
                (
                    proto::CHGHEADER,
                    b"\0\0\0\x01Authentication-Results\0\0".to_vec()
                ),
                (proto::CONTINUE, Vec::new()),
            ]
        );
        packet(&mut mta, proto::QUIT, b"").await;
        mta.shutdown().await.unwrap();
        server.await.unwrap();
        assert_eq!(shared.stats.unscanned.load(Ordering::Relaxed), 1);
    }

    /// Handles `packets` on a fresh connection state (no replies expected for headers),
    /// until one fails.
    async fn feed(
        shared: &Shared,
        st: &mut State,
        packets: impl IntoIterator<Item = (u8, Vec<u8>)>,
    ) -> Result<usize, SessionError> {
        let (mut io, _mta) = tokio::io::duplex(1 << 20);
        let mut n = 0;
        for (cmd, data) in packets {
            handle(&mut io, shared, st, cmd, &data).await?;
            n += 1;
        }
        Ok(n)
    }

    fn limit_of(r: Result<usize, SessionError>) -> String {
        match r {
            Err(SessionError::Limit(why)) => why,
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn floods_of_macros_headers_and_recipients_are_cut_off() {
        let spool = tempfile::tempdir().unwrap();
        let (shared, _mta, _server) = session(
            &format!("[paths]\nspool_dir = \"{}\"\n", spool.path().display()),
            Box::new(Gone),
        );
        // Postfix resends the same few macros at every stage: that never adds up.
        let mut st = State::default();
        let stage = b"Cj\0gw.example\0{daemon_name}\0smtpd\0i\0Q1\0".to_vec();
        let sent = feed(
            &shared,
            &mut st,
            (0..20_000).map(|_| (proto::MACRO, stage.clone())),
        )
        .await;
        assert_eq!(sent.unwrap(), 20_000);
        assert_eq!(st.macros.len(), 3);
        // New names without end are cut off past MAX_MACROS ...
        let mut st = State::default();
        let names =
            (0..=MAX_MACROS).map(|i| (proto::MACRO, format!("C{{m{i}}}\0v\0").into_bytes()));
        assert!(limit_of(feed(&shared, &mut st, names).await).contains("macros"));
        // ... and so are huge values past MAX_MACRO_BYTES.
        let mut st = State::default();
        let big = (0..3).map(|i| {
            let mut d = format!("Cbig{i}\0").into_bytes();
            d.extend(std::iter::repeat_n(b'x', 100_000));
            d.push(0);
            (proto::MACRO, d)
        });
        assert!(limit_of(feed(&shared, &mut st, big).await).contains("macros"));
        // Header fields: at most MAX_HEADERS of them ...
        let mut st = State {
            protocol: proto::NOHREPL,
            limit: 100 << 20,
            ..State::default()
        };
        let many = (0..=MAX_HEADERS).map(|_| (proto::HEADER, b"X-A\0b\0".to_vec()));
        assert!(limit_of(feed(&shared, &mut st, many).await).contains("header fields"));
        // ... and at most MAX_HEADER_BYTES (eleven fields of 100 KB pass 1 MiB).
        let mut st = State {
            protocol: proto::NOHREPL,
            limit: 100 << 20,
            ..State::default()
        };
        let mut field = b"X-Big\0".to_vec();
        field.extend(std::iter::repeat_n(b'y', 100_000));
        field.push(0);
        let fat = (0..11).map(|_| (proto::HEADER, field.clone()));
        let r = feed(&shared, &mut st, fat).await;
        assert!(limit_of(r).contains("bytes"));
        // A new message starts a new header count.
        st.reset_message();
        assert_eq!((st.headers.len(), st.header_bytes), (0, 0));
        // Recipients: at most MAX_RCPTS per message.
        let mut st = State::default();
        let rcpts =
            (0..=MAX_RCPTS).map(|i| (proto::RCPT, format!("<u{i}@d.example>\0").into_bytes()));
        assert!(limit_of(feed(&shared, &mut st, rcpts).await).contains("recipients"));
    }
}
