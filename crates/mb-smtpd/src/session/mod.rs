//! One SMTP session: the RFC 5321 state machine with its extensions, relay control and
//! limits, writing accepted messages to the spool. This module holds the state and the
//! dispatcher (`command`, which only routes); each verb has its own file.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio_rustls::TlsAcceptor;

use mb_core::EnhancedStatus;
use mb_core::verdict::{Direction, ScanRequest};
use mb_scan::reply::Disposition;
use mb_smtp::conn::{Conn, Io, ReadError};
use mb_smtp::data::{DataDecoder, DataError};
use mb_smtp::proto::{self, Command, Mailbox, Params, Reply};

use crate::spool::{Envelope, Recipient, Spool, SpoolWriter};

mod auth;
mod data;
mod ehlo;
mod greylist;
mod limits;
mod mail;
mod pace;
mod rcpt;
mod scan;
mod tls;
mod verify;

pub use auth::base64_decode;
pub use data::{received_header, rfc5322_date};
pub use pace::DataRate;

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Port 25: mail from the internet.
    Smtp,
    /// Port 587: authenticated submission.
    Submission,
    /// Port 465: submission over implicit TLS.
    Smtps,
    /// 127.0.0.1:10025: reinjection from a local content filter; trusted, unfiltered.
    Reinject,
}

impl Listener {
    pub fn name(self) -> &'static str {
        match self {
            Listener::Smtp => "smtp",
            Listener::Submission => "submission",
            Listener::Smtps => "smtps",
            Listener::Reinject => "reinject",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    None,
    Enabled,
    Mandatory,
}

/// Checks a user name and password for AUTH (mb-rpcd in the daemon, a table in tests).
/// `Ok(None)`: wrong name or password. `Ok(Some(addresses))`: right, with the sender
/// addresses the account may use (its login when an address, then its aliases;
/// `@domain` for a whole domain), learned in the same round trip for sender binding.
/// `Err` means the check could not be made (answered with a temporary failure).
pub trait Authenticator: Send + Sync {
    fn verify<'a>(&'a self, user: &'a str, password: &'a str, client: IpAddr) -> Verifying<'a>;
    /// The account whose login or alias is exactly `address` (`Ok(None)`: nobody's).
    /// Sender binding asks it before it takes `user-ext@` as `user@`'s.
    fn owner<'a>(&'a self, address: &'a str) -> Owning<'a>;
}

/// An ownership question in progress (see `Authenticator::owner`).
pub type Owning<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<String>, AuthError>> + Send + 'a>,
>;

/// A password check in progress (see `Authenticator`).
pub type Verifying<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<Vec<String>>, AuthError>> + Send + 'a>,
>;

/// Why a password could not be checked (never why it was wrong: that is `Ok(false)`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("mb-rpcd is unreachable: {0}")]
    Unreachable(String),
    #[error("the password check failed: {0}")]
    Check(String),
    #[error("no answer from the password check in time")]
    Timeout,
}

/// NOOP, HELP, RSET and VRFY commands allowed in one session.
const MAX_JUNK_COMMANDS: u32 = 100;

/// Failed AUTH attempts allowed in one session before it is closed.
const MAX_AUTH_FAILURES: u32 = 3;

/// What a session is doing, for the "connections by state" of `Control.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Command = 0,
    Data = 1,
    TlsHandshake = 2,
    Auth = 3,
}

impl Phase {
    pub const ALL: [(Phase, &'static str); 4] = [
        (Phase::Command, "sessions_command"),
        (Phase::Data, "sessions_data"),
        (Phase::TlsHandshake, "sessions_tls_handshake"),
        (Phase::Auth, "sessions_auth"),
    ];
}

/// Sessions in each phase, shared by all sessions of a process.
#[derive(Default)]
pub struct Phases([std::sync::atomic::AtomicI64; 4]);

impl Phases {
    pub fn get(&self, p: Phase) -> i64 {
        self.0[p as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add(&self, p: Phase, n: i64) {
        self.0[p as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The phase a session is in; moving it updates the shared gauges, dropping it leaves.
struct PhaseGuard {
    phases: Option<std::sync::Arc<Phases>>,
    current: Phase,
}

impl PhaseGuard {
    fn new(phases: Option<std::sync::Arc<Phases>>) -> PhaseGuard {
        if let Some(p) = &phases {
            p.add(Phase::Command, 1);
        }
        PhaseGuard {
            phases,
            current: Phase::Command,
        }
    }

    fn set(&mut self, next: Phase) {
        if let Some(p) = &self.phases {
            p.add(self.current, -1);
            p.add(next, 1);
        }
        self.current = next;
    }
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.phases {
            p.add(self.current, -1);
        }
    }
}

/// The settings a session runs with (a snapshot of the configuration at connect time).
#[derive(Clone)]
pub struct Settings {
    pub hostname: String,
    pub domains: Vec<String>,
    pub mynetworks: Vec<IpNet>,
    pub max_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub timeout: Duration,
    /// Longest time for one message's content, against clients that trickle it.
    pub data_deadline: Duration,
    /// Pacing of unauthenticated clients' messages past an allowance (session/pace.rs;
    /// none: not paced).
    pub data_rate: Option<DataRate>,
    /// Longest TLS handshake (SMTPS and STARTTLS), against clients that stall in it.
    pub tls_handshake_timeout: Duration,
    /// Longest session: an older one is told 421 at its next command, or at once if idle.
    pub session_lifetime: Duration,
    /// The spool's free space and `queue.min_free_space`: below it, MAIL and RCPT get
    /// 452 4.3.1 (none: not checked).
    pub disk: Option<(std::sync::Arc<mb_runtime::diskfree::DiskGuard>, u64)>,
    pub tls_mode: TlsMode,
    pub tls: Option<TlsAcceptor>,
    pub require_auth: bool,
    pub require_tls: bool,
    pub helo_required: bool,
    pub vrfy: bool,
    /// AUTH is offered (submission and SMTPS listeners), once TLS is active.
    pub auth: Option<std::sync::Arc<dyn Authenticator>>,
    /// Where message events go (mb-rpcd's message log).
    pub events: Option<mb_runtime::events::EventSink>,
    /// Where the session reports its phase.
    pub phases: Option<std::sync::Arc<Phases>>,
    /// The mb-filter workers asked at the end of each message (none: not scanned).
    pub scanner: Option<std::sync::Arc<dyn mb_scan::Scanner>>,
    /// `filter.unavailable_action = "accept"`: take mail unscanned when no worker answers.
    pub accept_unscanned: bool,
    // Recipient verification (session/verify.rs): fields below this line.
    /// `smtp.recipient_verification` (at served domains only).
    pub recipient_verification: crate::recipients::Mode,
    /// `smtp.recipient_delimiter`: `user+tag@` is verified as `user@` too (and is
    /// `user@`'s own address for sender binding, session/limits.rs).
    pub recipient_delimiter: String,
    /// The list, callout and LDAP state shared by every session (none: not verified).
    pub verifier: Option<std::sync::Arc<crate::recipients::Verifier>>,
    // Sender binding and per-account limits (session/limits.rs): fields below this line.
    /// `smtp.auth.sender_binding`: MAIL FROM of an AUTH session must be an address the
    /// account owns.
    pub sender_binding: bool,
    /// Hourly message and recipient budgets of AUTH accounts (none: unlimited).
    pub account_limits: Option<crate::account_limits::AccountLimits>,
    // Greylisting (session/greylist.rs): fields below this line.
    /// Greylisting at RCPT (none: `greylist.enabled` is false).
    pub greylist: Option<crate::greylist::Settings>,
}

/// The client as seen at accept time.
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: IpAddr,
    pub port: u16,
}

/// What happened in a session, for the summary log line and counters.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub ehlo: u32,
    pub helo: u32,
    pub mail: u32,
    pub rcpt: u32,
    pub data: u32,
    pub bdat: u32,
    pub rset: u32,
    pub noop: u32,
    pub quit: u32,
    pub starttls: u32,
    pub unknown: u32,
    pub errors: u32,
    pub accepted: Vec<String>,
    pub bytes: u64,
    pub relay_denied: u32,
    pub auth: u32,
    pub auth_failed: u32,
    pub tls: bool,
    pub end: &'static str,
}

impl Summary {
    /// Postfix style: `ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5`.
    pub fn counts(&self) -> String {
        let parts = [
            ("ehlo", self.ehlo),
            ("helo", self.helo),
            ("starttls", self.starttls),
            ("auth", self.auth),
            ("mail", self.mail),
            ("rcpt", self.rcpt),
            ("data", self.data),
            ("bdat", self.bdat),
            ("rset", self.rset),
            ("noop", self.noop),
            ("quit", self.quit),
            ("unknown", self.unknown),
        ];
        let total: u32 = parts.iter().map(|(_, n)| n).sum();
        let mut s: Vec<String> = parts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        s.push(format!("commands={total}"));
        s.join(" ")
    }
}

struct Transaction {
    sender: Option<Mailbox>,
    params: Params,
    rcpts: Vec<(Mailbox, Params)>,
    /// BDAT chunks received so far.
    bdat: Option<(SpoolWriter, u64)>,
    bdat_failed: Option<Reply>,
    bdat_lines: mb_smtp::data::LineChecker,
    /// The pacing of the BDAT chunks (none: not paced, or no chunk yet).
    bdat_pacer: Option<pace::Pacer>,
}

pub struct Session<'a> {
    conn: Conn,
    settings: &'a Settings,
    spool: &'a Spool,
    client: Client,
    listener: Listener,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<String>,
    auth_user: Option<String>,
    /// The sender addresses `auth_user` may use, as mb-rpcd said at AUTH.
    auth_addresses: Vec<String>,
    /// Boxed: only a session inside a transaction pays for one.
    tx: Option<Box<Transaction>>,
    /// Errors since the last accepted message, against `max_errors` (like Postfix's
    /// hard error limit, a client that delivers mail starts afresh).
    error_count: u32,
    /// NOOP, HELP, RSET and VRFY so far (Postfix's junk command limit).
    junk: u32,
    /// The reply about to be sent is the server's own deferral (a further greylisted
    /// recipient, a directory that cannot answer), not the client's error: it does not
    /// count against `max_errors`. Set by the step, taken when the reply is sent.
    own_tempfail: bool,
    /// Greylisting's per-transaction state (session/greylist.rs).
    greylist_tx: greylist::TxState,
    phase: PhaseGuard,
    pub summary: Summary,
}

const HELP: &str = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS";
/// The steps that run in a phase of their own.
enum Step<'a> {
    StartTls,
    Data,
    Bdat(u64, bool),
    Auth(&'a str),
}

impl<'a> Session<'a> {
    pub fn new(
        io: Box<dyn Io>,
        settings: &'a Settings,
        spool: &'a Spool,
        client: Client,
        listener: Listener,
    ) -> Self {
        Session {
            conn: Conn::new(io, settings.timeout),
            settings,
            spool,
            client,
            listener,
            helo: None,
            esmtp: false,
            tls: None,
            auth_user: None,
            auth_addresses: Vec::new(),
            tx: None,
            error_count: 0,
            junk: 0,
            own_tempfail: false,
            greylist_tx: greylist::TxState::default(),
            phase: PhaseGuard::new(settings.phases.clone()),
            summary: Summary::default(),
        }
    }

    /// Marks the session as already under TLS (SMTPS).
    pub fn with_tls(mut self, description: String) -> Self {
        self.tls = Some(description);
        self.summary.tls = true;
        self
    }

    /// Runs the session to its end and returns its summary.
    pub async fn run(mut self, shutdown: mb_runtime::lifecycle::Shutdown) -> Summary {
        if self.conn.input_pending().await {
            self.close(
                Reply::new(
                    554,
                    EnhancedStatus::BAD_SEQUENCE,
                    "Error: talking before the greeting",
                ),
                "early talker",
            )
            .await;
            self.end().await;
            return self.summary;
        }
        let greeting = format!("220 {} ESMTP Mailborder\r\n", self.settings.hostname);
        if self.conn.send(&greeting).await.is_err() {
            self.summary.end = "lost";
            return self.summary;
        }
        // Against sessions kept open forever by a client that sends a command just before
        // each timeout: a session ends at the first command after its lifetime, or at
        // once when idle (the read's own timer stops at the end of life: an idle
        // session holds one timer, not two).
        let end_of_life = tokio::time::Instant::now() + self.settings.session_lifetime;
        loop {
            let read = tokio::select! {
                l = self.conn.read_line_until(proto::MAX_COMMAND_LINE, Some(end_of_life)) => Some(l),
                () = shutdown.requested() => None,
            };
            // Boxed: what follows a read (a command, an error, a last reply) makes a
            // future several times the size of the wait for the next line, and an idle
            // session's task would otherwise be sized for it for as long as it lives.
            if Box::pin(self.handle(read, end_of_life)).await {
                break;
            }
        }
        self.end().await;
        self.summary
    }

    /// Sends what is left and ends the connection. TLS says goodbye (close_notify, so a
    /// client can tell the end from a truncation); plain TCP needs no `shutdown` before
    /// the socket is closed: the close sends the FIN, and the client has usually closed
    /// its side already after our 221 (a shutdown then only fails with ENOTCONN).
    async fn end(&mut self) {
        if self.summary.tls {
            self.conn.shutdown().await;
        } else {
            let _ = self.conn.flush().await;
        }
    }

    /// What a read ended with (`None`: the service is shutting down); returns true when
    /// the session ends.
    async fn handle(
        &mut self,
        read: Option<Result<Vec<u8>, ReadError>>,
        end_of_life: tokio::time::Instant,
    ) -> bool {
        let Some(line) = read else {
            let r = self.fatal(421, EnhancedStatus::new(4, 3, 2), "Service shutting down");
            self.close(r, "shutdown").await;
            return true;
        };
        if tokio::time::Instant::now() >= end_of_life {
            let r = self.fatal(
                421,
                EnhancedStatus::new(4, 4, 2),
                "Error: session lifetime exceeded",
            );
            self.close(r, "session lifetime").await;
            return true;
        }
        let line = match line {
            Ok(l) => l,
            Err(ReadError::TooLong) => {
                return self
                    .error(Reply::new(
                        500,
                        EnhancedStatus::SYNTAX_ERROR,
                        "Error: command line too long",
                    ))
                    .await;
            }
            Err(ReadError::BareLf) => {
                self.close(
                    self.fatal(
                        521,
                        EnhancedStatus::SYNTAX_ERROR,
                        "Error: bare <LF> received",
                    ),
                    "bare LF",
                )
                .await;
                return true;
            }
            Err(ReadError::Timeout) => {
                self.close(
                    self.fatal(421, EnhancedStatus::new(4, 4, 2), "Error: timeout exceeded"),
                    "timeout",
                )
                .await;
                return true;
            }
            Err(ReadError::Eof | ReadError::Io(_)) => {
                self.summary.end = "lost";
                return true;
            }
        };
        match proto::parse_command(&line) {
            Ok(cmd) => self.command(cmd).await,
            Err(proto::ParseError(reply)) => {
                if reply.code == 502 {
                    self.summary.unknown += 1;
                }
                // A BDAT line we cannot read leaves its chunk unread: the stream can
                // no longer be trusted to be commands.
                if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"BDAT") {
                    let _ = self.conn.send(&reply.to_wire()).await;
                    self.summary.end = "bad BDAT";
                    return true;
                }
                self.error(reply).await
            }
        }
    }

    /// A reply that ends the session, naming this server (as Postfix's 421s do).
    fn fatal(&self, code: u16, status: EnhancedStatus, text: &str) -> Reply {
        Reply::new(code, status, format!("{} {text}", self.settings.hostname))
    }

    /// The 452 for MAIL and RCPT while the spool's filesystem is short of space.
    fn insufficient_storage(&self) -> Option<Reply> {
        let (guard, min) = self.settings.disk.as_ref()?;
        let free = guard.low(*min)?;
        tracing::warn!(client = %self.client.ip, free, min, "refusing mail: the spool's filesystem is below queue.min_free_space");
        Some(Reply::new(
            452,
            EnhancedStatus::new(4, 3, 1),
            "Insufficient system storage",
        ))
    }

    /// Sends a last reply and records why the session ends.
    async fn close(&mut self, reply: Reply, end: &'static str) {
        let _ = self.conn.send(&reply.to_wire()).await;
        self.summary.end = end;
    }

    /// Sends an error reply; returns true when the session must end (too many errors).
    async fn error(&mut self, reply: Reply) -> bool {
        self.summary.errors += 1;
        self.error_count += 1;
        if self.error_count >= self.settings.max_errors {
            self.conn.queue(
                &self
                    .fatal(421, EnhancedStatus::new(4, 7, 0), "Error: too many errors")
                    .to_wire(),
            );
            let _ = self.conn.flush().await;
            self.summary.end = "too many errors";
            return true;
        }
        self.conn.queue(&reply.to_wire());
        false
    }

    fn reply(&mut self, reply: Reply) {
        self.conn.queue(&reply.to_wire());
    }

    /// Handles one command; returns true when the session ends.
    async fn command(&mut self, cmd: Command) -> bool {
        if let Some(end) = self.gate(&cmd).await {
            return end;
        }
        match cmd {
            Command::Ehlo(name) => {
                self.ehlo(name);
                false
            }
            Command::Helo(name) => {
                self.helo(name);
                false
            }
            Command::StartTls => self.in_phase(Phase::TlsHandshake, Step::StartTls).await,
            Command::Mail(sender, params) => {
                self.summary.mail += 1;
                // MAIL's and RCPT's checks (verification, greylisting, limits) make
                // large futures: boxed, they are paid for while they run, not by every
                // idle session.
                let r = Box::pin(self.mail(sender, params)).await;
                self.answer(r).await
            }
            Command::Rcpt(rcpt, params) => {
                self.summary.rcpt += 1;
                let r = Box::pin(self.rcpt(rcpt, params)).await;
                if std::mem::take(&mut self.own_tempfail) {
                    self.reply(r);
                    return false;
                }
                self.answer(r).await
            }
            Command::Data => {
                self.summary.data += 1;
                self.in_phase(Phase::Data, Step::Data).await
            }
            Command::Bdat { size, last } => {
                self.summary.bdat += 1;
                self.in_phase(Phase::Data, Step::Bdat(size, last)).await
            }
            Command::Rset => {
                self.summary.rset += 1;
                self.tx = None;
                self.answer(Reply::new(250, EnhancedStatus::OK, "Ok")).await
            }
            Command::Noop => {
                self.summary.noop += 1;
                self.answer(Reply::new(250, EnhancedStatus::OK, "Ok")).await
            }
            Command::Quit => {
                self.summary.quit += 1;
                let bye = Reply::new(221, EnhancedStatus::OK, "Bye").to_wire();
                let _ = self.conn.send(&bye).await;
                self.summary.end = "quit";
                true
            }
            Command::Help => self.answer(Reply::new(214, EnhancedStatus::OK, HELP)).await,
            Command::Vrfy(_) => {
                let text = "Cannot VRFY user, but will accept message and attempt delivery";
                self.answer(Reply::new(252, EnhancedStatus::OK, text)).await
            }
            Command::Expn(_) => {
                let text = "Error: EXPN is not supported";
                self.answer(Reply::new(502, EnhancedStatus::BAD_SEQUENCE, text))
                    .await
            }
            // LMTP and XFORWARD belong to the content filter's listener, not here.
            Command::Lhlo(_) | Command::Xforward(_) => {
                let text = "Error: command not recognized";
                self.answer(Reply::new(502, EnhancedStatus::SYNTAX_ERROR, text))
                    .await
            }
            Command::Auth(arg) => {
                self.summary.auth += 1;
                self.in_phase(Phase::Auth, Step::Auth(&arg)).await
            }
        }
    }

    /// What every command passes before its verb runs: pipelining without PIPELINING,
    /// too many commands without mail, and mandatory TLS. `Some(end)` when the command
    /// was answered here.
    async fn gate(&mut self, cmd: &Command) -> Option<bool> {
        // Without PIPELINING, a client may not send a command before its reply came.
        if !self.conn.buffered().is_empty() && !self.esmtp {
            let reply = Reply::new(
                554,
                EnhancedStatus::new(5, 5, 0),
                "Error: improper command pipelining",
            );
            self.close(reply, "improper pipelining").await;
            return Some(true);
        }
        if matches!(
            cmd,
            Command::Noop | Command::Help | Command::Rset | Command::Vrfy(_)
        ) {
            self.junk += 1;
            if self.junk > MAX_JUNK_COMMANDS {
                let reply = self.fatal(
                    421,
                    EnhancedStatus::new(4, 7, 0),
                    "Error: too many commands without mail",
                );
                self.close(reply, "too many junk commands").await;
                return Some(true);
            }
        }
        if self.settings.tls_mode != TlsMode::Mandatory || self.tls.is_some() {
            return None;
        }
        let first = Reply::new(
            530,
            EnhancedStatus::new(5, 7, 0),
            "Must issue a STARTTLS command first",
        );
        match cmd {
            // The chunk follows the command whatever the answer: read it first.
            Command::Bdat { size, .. } => {
                if !self.skip(*size).await {
                    return Some(true);
                }
                Some(self.error(first).await)
            }
            Command::Ehlo(_)
            | Command::Helo(_)
            | Command::StartTls
            | Command::Noop
            | Command::Quit
            | Command::Rset => None,
            _ => Some(self.error(first).await),
        }
    }

    /// Sends a reply: an error counts against the client (and may end the session).
    async fn answer(&mut self, reply: Reply) -> bool {
        if reply.is_error() {
            return self.error(reply).await;
        }
        self.reply(reply);
        false
    }

    /// Runs a step that has a phase of its own (shown by `mb-status`).
    async fn in_phase(&mut self, phase: Phase, step: Step<'_>) -> bool {
        self.phase.set(phase);
        let end = match step {
            Step::StartTls => Box::pin(self.starttls()).await,
            Step::Data => {
                self.conn.expect_bulk();
                Box::pin(self.data()).await
            }
            Step::Bdat(size, last) => {
                self.conn.expect_bulk();
                Box::pin(self.bdat(size, last)).await
            }
            Step::Auth(arg) => Box::pin(self.auth(arg)).await,
        };
        self.phase.set(Phase::Command);
        end
    }

    /// Reads and throws away `size` bytes (a BDAT chunk we refuse); false if the client left.
    async fn skip(&mut self, size: u64) -> bool {
        let mut remaining = size;
        while remaining > 0 {
            if self.conn.buffered().is_empty() && self.conn.fill().await.is_err() {
                self.summary.end = "lost in BDAT";
                return false;
            }
            let n = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.conn.buffered().len());
            self.conn.consume(n);
            remaining -= n as u64;
        }
        true
    }

    /// Records a message event for the message log.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        stage: &str,
        verdict: &str,
        sender: &str,
        recipients: Vec<String>,
        size: u64,
        queue_id: String,
        detail: &str,
    ) {
        if let Some(sink) = &self.settings.events {
            sink.send(mb_proto::v1::MessageEvent {
                daemon: "mb-smtpd".into(),
                node: self.settings.hostname.clone(),
                queue_id,
                client_ip: self.client.ip.to_string(),
                helo: self.helo.clone().unwrap_or_default(),
                sender: sender.to_string(),
                recipients,
                size,
                stage: stage.into(),
                verdict: verdict.into(),
                detail: detail.into(),
                // The statistics count these refusals by direction, as the scan's own.
                direction: Direction::of(
                    self.auth_user.is_some(),
                    Some(self.client.ip),
                    &self.settings.mynetworks,
                )
                .as_str()
                .into(),
                ..Default::default()
            });
        }
    }

    /// Input already waiting behind a command that must end a pipelined group (STARTTLS,
    /// DATA) is refused with 554 and the session closed; true when that happened.
    async fn refuse_pipelined_input(&mut self, verb: &str) -> bool {
        if self.conn.buffered().is_empty() {
            return false;
        }
        self.close(
            Reply::new(
                554,
                EnhancedStatus::new(5, 5, 0),
                format!("Error: improper pipelining after {verb}"),
            ),
            "improper pipelining",
        )
        .await;
        true
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Most of what an idle session costs is its task: the future of `run`, sized for
    /// the largest state it can be in. The states a session is rarely in (MAIL's and
    /// RCPT's checks, DATA, BDAT, AUTH, STARTTLS), the handling of each line read (the
    /// command, an error, a last reply) and the transaction are boxed, and the early
    /// talker check reads into the input buffer, not a buffer of its own, so that every
    /// idle session does not pay for them (8.7 KB, then 2 KB, now 1.3 KB in a debug
    /// build; `cargo xtask bench --idle` measures the whole).
    #[test]
    fn an_idle_session_future_is_small() {
        let settings = crate::tests::settings();
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let (_client, server) = tokio::io::duplex(64);
        let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let session = Session::new(
            Box::new(server),
            &settings,
            &spool,
            Client {
                ip: IpAddr::from([192, 0, 2, 1]),
                port: 1,
            },
            Listener::Smtp,
        );
        let session_size = std::mem::size_of_val(&session);
        assert!(session_size <= 512, "a Session is {session_size} bytes");
        let run = session.run(shutdown);
        let size = std::mem::size_of_val(&run);
        assert!(size <= 1500, "a session's future is {size} bytes");
    }
}
