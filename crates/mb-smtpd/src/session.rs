//! One SMTP session: the RFC 5321 state machine with its extensions, relay control and
//! limits, writing accepted messages to the spool.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio_rustls::TlsAcceptor;

use crate::conn::{Conn, Io, ReadError};
use crate::data::{DataDecoder, DataError};
use crate::proto::{self, Command, Mailbox, Params, Reply};
use crate::spool::{Envelope, Recipient, Spool, SpoolWriter};

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
/// `Err` means the check could not be made (answered with a temporary failure).
pub trait Authenticator: Send + Sync {
    fn verify<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
        client: IpAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>;
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
    pub scanner: Option<std::sync::Arc<dyn crate::scan::Scanner>>,
    /// `filter.unavailable_action = "accept"`: take mail unscanned when no worker answers.
    pub accept_unscanned: bool,
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
    bdat_lines: crate::data::LineChecker,
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
    tx: Option<Transaction>,
    /// Errors since the last accepted message, against `max_errors` (like Postfix's
    /// hard error limit, a client that delivers mail starts afresh).
    error_count: u32,
    /// NOOP, HELP, RSET and VRFY so far (Postfix's junk command limit).
    junk: u32,
    phase: PhaseGuard,
    pub summary: Summary,
}

const HELP: &str = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS";

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
            tx: None,
            error_count: 0,
            junk: 0,
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
                Reply::new(554, "5.5.1", "Error: talking before the greeting"),
                "early talker",
            )
            .await;
            self.conn.shutdown().await;
            return self.summary;
        }
        let greeting = format!("220 {} ESMTP Mailborder\r\n", self.settings.hostname);
        if self.conn.send(&greeting).await.is_err() {
            self.summary.end = "lost";
            return self.summary;
        }
        loop {
            let line = tokio::select! {
                l = self.conn.read_line(proto::MAX_COMMAND_LINE) => l,
                () = shutdown.requested() => {
                    let r = self.fatal(421, "4.3.2", "Service shutting down");
                    self.close(r, "shutdown").await;
                    break;
                }
            };
            let line = match line {
                Ok(l) => l,
                Err(ReadError::TooLong) => {
                    if self
                        .error(Reply::new(500, "5.5.2", "Error: command line too long"))
                        .await
                    {
                        break;
                    }
                    continue;
                }
                Err(ReadError::BareLf) => {
                    self.close(
                        self.fatal(521, "5.5.2", "Error: bare <LF> received"),
                        "bare LF",
                    )
                    .await;
                    break;
                }
                Err(ReadError::Timeout) => {
                    self.close(
                        self.fatal(421, "4.4.2", "Error: timeout exceeded"),
                        "timeout",
                    )
                    .await;
                    break;
                }
                Err(ReadError::Eof) => {
                    self.summary.end = "lost";
                    break;
                }
                Err(ReadError::Io(_)) => {
                    self.summary.end = "lost";
                    break;
                }
            };
            match proto::parse_command(&line) {
                Ok(cmd) => {
                    if self.command(cmd).await {
                        break;
                    }
                }
                Err(proto::ParseError(reply)) => {
                    if reply.code == 502 {
                        self.summary.unknown += 1;
                    }
                    // A BDAT line we cannot read leaves its chunk unread: the stream can
                    // no longer be trusted to be commands.
                    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"BDAT") {
                        let _ = self.conn.send(&reply.to_wire()).await;
                        self.summary.end = "bad BDAT";
                        break;
                    }
                    if self.error(reply).await {
                        break;
                    }
                }
            }
        }
        self.conn.shutdown().await;
        self.summary
    }

    /// A reply that ends the session, naming this server (as Postfix's 421s do).
    fn fatal(&self, code: u16, status: &'static str, text: &str) -> Reply {
        Reply::new(code, status, format!("{} {text}", self.settings.hostname))
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
            self.conn
                .queue(&self.fatal(421, "4.7.0", "Error: too many errors").to_wire());
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
        // Without PIPELINING, a client may not send a command before its reply came.
        let pipelined = !self.conn.buffered().is_empty();
        if pipelined && !self.esmtp {
            self.close(
                Reply::new(554, "5.5.0", "Error: improper command pipelining"),
                "improper pipelining",
            )
            .await;
            return true;
        }
        if matches!(
            cmd,
            Command::Noop | Command::Help | Command::Rset | Command::Vrfy(_)
        ) {
            self.junk += 1;
            if self.junk > MAX_JUNK_COMMANDS {
                self.close(
                    self.fatal(421, "4.7.0", "Error: too many commands without mail"),
                    "too many junk commands",
                )
                .await;
                return true;
            }
        }
        if self.settings.tls_mode == TlsMode::Mandatory
            && self.tls.is_none()
            && let Command::Bdat { size, .. } = cmd
        {
            // The chunk follows the command whatever the answer: read it first.
            if !self.skip(size).await {
                return true;
            }
            return self
                .error(Reply::new(
                    530,
                    "5.7.0",
                    "Must issue a STARTTLS command first",
                ))
                .await;
        }
        if self.settings.tls_mode == TlsMode::Mandatory
            && self.tls.is_none()
            && !matches!(
                cmd,
                Command::Ehlo(_)
                    | Command::Helo(_)
                    | Command::StartTls
                    | Command::Noop
                    | Command::Quit
                    | Command::Rset
            )
        {
            return self
                .error(Reply::new(
                    530,
                    "5.7.0",
                    "Must issue a STARTTLS command first",
                ))
                .await;
        }
        match cmd {
            Command::Ehlo(name) => {
                self.summary.ehlo += 1;
                self.helo = Some(name);
                self.esmtp = true;
                self.tx = None;
                let mut lines = vec![self.settings.hostname.clone(), "PIPELINING".into()];
                lines.push(format!("SIZE {}", self.settings.max_size));
                if self.settings.vrfy {
                    lines.push("VRFY".into());
                }
                lines.extend(
                    [
                        "ENHANCEDSTATUSCODES",
                        "8BITMIME",
                        "DSN",
                        "SMTPUTF8",
                        "CHUNKING",
                    ]
                    .map(String::from),
                );
                if self.settings.auth.is_some() && self.tls.is_some() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                if self.tls.is_none()
                    && self.settings.tls.is_some()
                    && self.settings.tls_mode != TlsMode::None
                {
                    lines.insert(2, "STARTTLS".into());
                }
                let text = lines.join("\n");
                self.reply(Reply::new(250, "", text));
            }
            Command::Helo(name) => {
                self.summary.helo += 1;
                self.helo = Some(name);
                self.esmtp = false;
                self.tx = None;
                self.reply(Reply::new(250, "", self.settings.hostname.clone()));
            }
            Command::StartTls => {
                self.phase.set(Phase::TlsHandshake);
                let end = self.starttls().await;
                self.phase.set(Phase::Command);
                return end;
            }
            Command::Mail(sender, params) => {
                self.summary.mail += 1;
                let r = self.mail(sender, params);
                if r.is_error() {
                    return self.error(r).await;
                }
                self.reply(r);
            }
            Command::Rcpt(rcpt, params) => {
                self.summary.rcpt += 1;
                let r = self.rcpt(rcpt, params);
                if r.is_error() {
                    return self.error(r).await;
                }
                self.reply(r);
            }
            Command::Data => {
                self.summary.data += 1;
                self.phase.set(Phase::Data);
                let end = self.data().await;
                self.phase.set(Phase::Command);
                return end;
            }
            Command::Bdat { size, last } => {
                self.summary.bdat += 1;
                self.phase.set(Phase::Data);
                let end = self.bdat(size, last).await;
                self.phase.set(Phase::Command);
                return end;
            }
            Command::Rset => {
                self.summary.rset += 1;
                self.tx = None;
                self.reply(Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Noop => {
                self.summary.noop += 1;
                self.reply(Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Quit => {
                self.summary.quit += 1;
                let _ = self
                    .conn
                    .send(&Reply::new(221, "2.0.0", "Bye").to_wire())
                    .await;
                self.summary.end = "quit";
                return true;
            }
            Command::Help => self.reply(Reply::new(214, "2.0.0", HELP)),
            Command::Vrfy(_) => self.reply(Reply::new(
                252,
                "2.0.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn(_) => {
                return self
                    .error(Reply::new(502, "5.5.1", "Error: EXPN is not supported"))
                    .await;
            }
            Command::Auth(arg) => {
                self.summary.auth += 1;
                self.phase.set(Phase::Auth);
                let end = self.auth(&arg).await;
                self.phase.set(Phase::Command);
                return end;
            }
        }
        false
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
                ..Default::default()
            });
        }
    }

    /// AUTH PLAIN and LOGIN (RFC 4954), only under TLS.
    async fn auth(&mut self, arg: &str) -> bool {
        if self.tls.is_none() {
            return self
                .error(Reply::new(
                    538,
                    "5.7.11",
                    "Encryption required for requested authentication mechanism",
                ))
                .await;
        }
        let Some(auth) = self.settings.auth.clone() else {
            return self
                .error(Reply::new(
                    503,
                    "5.5.1",
                    "Error: authentication not enabled",
                ))
                .await;
        };
        if self.auth_user.is_some() {
            return self
                .error(Reply::new(503, "5.5.1", "Error: already authenticated"))
                .await;
        }
        if self.tx.is_some() {
            return self
                .error(Reply::new(
                    503,
                    "5.5.1",
                    "Error: MAIL transaction in progress",
                ))
                .await;
        }
        let mut words = arg.split_ascii_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => Some(r),
                    None => self.challenge("").await,
                };
                match response.as_deref().map(decode_plain) {
                    Some(Ok(c)) => Some(c),
                    Some(Err(r)) => return self.error(r).await,
                    None => None,
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(r) => Some(r),
                    None => self.challenge("VXNlcm5hbWU6").await,
                };
                let user = match user.as_deref().map(base64_text) {
                    Some(Ok(u)) => u,
                    Some(Err(r)) => return self.error(r).await,
                    None => {
                        return self
                            .error(Reply::new(501, "5.7.0", "Authentication aborted"))
                            .await;
                    }
                };
                match self
                    .challenge("UGFzc3dvcmQ6")
                    .await
                    .as_deref()
                    .map(base64_text)
                {
                    Some(Ok(p)) => Some((user, p)),
                    Some(Err(r)) => return self.error(r).await,
                    None => None,
                }
            }
            _ => {
                return self
                    .error(Reply::new(504, "5.5.4", "Unrecognized authentication type"))
                    .await;
            }
        };
        let Some((user, password)) = creds else {
            return self
                .error(Reply::new(501, "5.7.0", "Authentication aborted"))
                .await;
        };
        let verdict = tokio::time::timeout(
            self.settings.timeout,
            auth.verify(&user, &password, self.client.ip),
        )
        .await
        .unwrap_or_else(|_| Err("no answer from the password check in time".into()));
        match verdict {
            Ok(true) => {
                tracing::info!(client = %self.client.ip, user = %loggable(&user), mechanism = %mechanism, "authenticated");
                self.auth_user = Some(user);
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
                false
            }
            Ok(false) => {
                self.summary.auth_failed += 1;
                // One stable line per failure: etc/fail2ban/filter.d/mailborder-auth.conf matches it.
                tracing::warn!(
                    "authentication failed client={} user={} service=mb-smtpd mechanism={mechanism}",
                    self.client.ip,
                    loggable(&user)
                );
                // Each failure costs the client more time.
                let pause = Duration::from_millis(500 * u64::from(self.summary.auth_failed))
                    .min(Duration::from_secs(5));
                let _ = self.conn.flush().await;
                tokio::time::sleep(pause).await;
                if self.summary.auth_failed >= MAX_AUTH_FAILURES {
                    self.close(
                        self.fatal(421, "4.7.0", "Error: too many failed authentications"),
                        "too many auth failures",
                    )
                    .await;
                    return true;
                }
                self.error(Reply::new(535, "5.7.8", "Error: authentication failed"))
                    .await
            }
            Err(e) => {
                tracing::error!(client = %self.client.ip, cause = %e, "cannot check a password");
                self.error(Reply::new(454, "4.7.0", "Temporary authentication failure"))
                    .await
            }
        }
    }

    /// Sends a 334 challenge and reads the answer; `None` when the client cancels ("*")
    /// or goes away.
    async fn challenge(&mut self, text: &str) -> Option<String> {
        self.conn.queue(&format!("334 {text}\r\n"));
        let line = self
            .conn
            .read_line(proto::MAX_COMMAND_LINE * 24)
            .await
            .ok()?;
        let line = String::from_utf8(line).ok()?;
        (line != "*").then_some(line)
    }

    async fn starttls(&mut self) -> bool {
        self.summary.starttls += 1;
        let Some(acceptor) = self
            .settings
            .tls
            .clone()
            .filter(|_| self.settings.tls_mode != TlsMode::None)
        else {
            return self
                .error(Reply::new(502, "5.5.1", "Error: STARTTLS is not offered"))
                .await;
        };
        if self.tls.is_some() {
            return self
                .error(Reply::new(503, "5.5.1", "Error: TLS already active"))
                .await;
        }
        // Anything pipelined after STARTTLS would cross into the TLS session (CVE-2011-0411).
        if self.refuse_pipelined_input("STARTTLS").await {
            return true;
        }
        if self
            .conn
            .send(&Reply::new(220, "2.0.0", "Ready to start TLS").to_wire())
            .await
            .is_err()
        {
            return true;
        }
        let io = self.conn.take_io();
        match tokio::time::timeout(self.settings.timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                let (_, state) = tls.get_ref();
                self.tls = Some(describe_tls(state));
                self.conn.set_io(Box::new(tls));
                // RFC 3207: forget everything learned before TLS.
                self.helo = None;
                self.esmtp = false;
                self.tx = None;
                self.summary.tls = true;
                false
            }
            _ => {
                self.summary.end = "TLS handshake failed";
                true
            }
        }
    }

    fn mail(&mut self, sender: Option<Mailbox>, params: Params) -> Reply {
        if self.helo.is_none() && self.settings.helo_required {
            return Reply::new(503, "5.5.1", "Error: send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return Reply::new(503, "5.5.1", "Error: nested MAIL command");
        }
        if !self.esmtp && (params != Params::default()) {
            return Reply::new(555, "5.5.4", "Error: MAIL parameters need EHLO");
        }
        if self.settings.require_tls && self.tls.is_none() {
            return Reply::new(530, "5.7.0", "Must issue a STARTTLS command first");
        }
        if self.settings.require_auth && self.auth_user.is_none() {
            return Reply::new(530, "5.7.0", "Authentication required");
        }
        if params.size.is_some_and(|s| s > self.settings.max_size) {
            return Reply::new(552, "5.3.4", "Message size exceeds fixed limit");
        }
        let from = sender.as_ref().map(ToString::to_string).unwrap_or_default();
        self.tx = Some(Transaction {
            sender,
            params,
            rcpts: Vec::new(),
            bdat: None,
            bdat_failed: None,
            bdat_lines: crate::data::LineChecker::default(),
        });
        tracing::debug!(client = %self.client.ip, from = %from, "mail");
        Reply::new(250, "2.1.0", "Ok")
    }

    /// Whether this client may send to any domain.
    fn may_relay(&self) -> bool {
        self.auth_user.is_some()
            || self.listener == Listener::Reinject
            || self
                .settings
                .mynetworks
                .iter()
                .any(|n| n.contains(&self.client.ip))
    }

    fn rcpt(&mut self, rcpt: Mailbox, params: Params) -> Reply {
        let may_relay = self.may_relay();
        // <postmaster> without a domain is always accepted (RFC 5321 §4.5.1).
        let (rcpt, served) = if rcpt.domain.is_empty() {
            let domain = self
                .settings
                .domains
                .first()
                .cloned()
                .unwrap_or_else(|| self.settings.hostname.clone());
            (
                Mailbox {
                    local: "postmaster".into(),
                    domain,
                },
                true,
            )
        } else {
            let served = self.serves(&rcpt);
            (rcpt, served)
        };
        let esmtp = self.esmtp;
        let max = self.settings.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(503, "5.5.1", "Error: need MAIL command");
        };
        if !esmtp && params != Params::default() {
            return Reply::new(555, "5.5.4", "Error: RCPT parameters need EHLO");
        }
        let ascii = rcpt.local.is_ascii() && rcpt.domain.is_ascii();
        if !tx.params.smtputf8 && !ascii {
            return Reply::new(553, "5.6.7", "Non-ASCII address without SMTPUTF8");
        }
        if !served && !may_relay {
            self.summary.relay_denied += 1;
            tracing::info!(client = %self.client.ip, to = %rcpt, "relay access denied");
            let sender = tx
                .sender
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            self.event(
                "rejected",
                "reject",
                &sender,
                vec![rcpt.to_string()],
                0,
                String::new(),
                "relay access denied",
            );
            return Reply::new(554, "5.7.1", format!("<{rcpt}>: Relay access denied"));
        }
        if tx.rcpts.len() >= max {
            return Reply::new(452, "4.5.3", "Error: too many recipients");
        }
        if tx.rcpts.iter().any(|(r, _)| *r == rcpt) {
            return Reply::new(250, "2.1.5", "Ok (duplicate recipient)");
        }
        tx.rcpts.push((rcpt, params));
        Reply::new(250, "2.1.5", "Ok")
    }

    fn serves(&self, m: &Mailbox) -> bool {
        !m.is_literal() && self.serves_domain(&m.domain)
    }

    fn serves_domain(&self, domain: &str) -> bool {
        let domain = domain.to_lowercase();
        self.settings.domains.iter().any(|d| {
            let d = d.to_lowercase();
            match d.strip_prefix('.') {
                // ".example.com" serves every subdomain of example.com.
                Some(parent) => domain.ends_with(&format!(".{parent}")),
                None => d == domain,
            }
        })
    }

    fn ready_for_data(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => {
                Some(Reply::new(554, "5.5.1", "Error: no valid recipients"))
            }
            _ => None,
        }
    }

    async fn data(&mut self) -> bool {
        if let Some(r) = self.ready_for_data() {
            return self.error(r).await;
        }
        if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
            return self
                .error(Reply::new(503, "5.5.1", "Error: DATA after BDAT"))
                .await;
        }
        // DATA ends a pipelined group (RFC 2920): input before 354 is not a message.
        if self.refuse_pipelined_input("DATA").await {
            return true;
        }
        let id = self.spool.new_id();
        let mut writer = match self.spool.create(&id).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(cause = %e, "cannot create a spool file");
                self.tx = None;
                return self
                    .error(Reply::new(451, "4.3.0", "Error: queue file write error"))
                    .await;
            }
        };
        let received = self.received_header(&id);
        if writer.write(received.as_bytes()).await.is_err() {
            self.tx = None;
            return self
                .error(Reply::new(451, "4.3.0", "Error: queue file write error"))
                .await;
        }
        if self
            .conn
            .send("354 End data with <CR><LF>.<CR><LF>\r\n")
            .await
            .is_err()
        {
            return true;
        }
        let mut decoder = DataDecoder::default();
        let mut out = Vec::with_capacity(64 * 1024);
        let mut size: u64 = 0;
        let mut too_big = false;
        let mut write_failed = false;
        let deadline = tokio::time::Instant::now() + self.settings.data_deadline;
        loop {
            if tokio::time::Instant::now() > deadline {
                self.close(
                    self.fatal(421, "4.4.2", "Error: message took too long to send"),
                    "DATA deadline",
                )
                .await;
                return true;
            }
            if self.conn.buffered().is_empty()
                && let Err(e) = self.conn.fill().await
            {
                match e {
                    ReadError::Timeout => {
                        let r = self.fatal(421, "4.4.2", "Error: timeout exceeded");
                        self.close(r, "timeout in DATA").await;
                    }
                    _ => self.summary.end = "lost in DATA",
                }
                return true;
            }
            out.clear();
            let (used, done) = match decoder.feed(self.conn.buffered(), &mut out) {
                Ok(r) => r,
                Err(e) => {
                    let what = if e == DataError::BareLf {
                        "bare <LF>"
                    } else {
                        "bare <CR>"
                    };
                    self.close(
                        self.fatal(521, "5.5.2", &format!("Error: {what} received")),
                        "smuggling attempt",
                    )
                    .await;
                    tracing::warn!(client = %self.client.ip, "{what} in DATA, session closed");
                    return true;
                }
            };
            self.conn.consume(used);
            size += out.len() as u64;
            if size > self.settings.max_size {
                too_big = true;
            }
            if !too_big && !write_failed && writer.write(&out).await.is_err() {
                write_failed = true;
            }
            if done {
                break;
            }
        }
        let reply = if too_big {
            Reply::new(552, "5.3.4", "Error: message file too big")
        } else if write_failed {
            Reply::new(451, "4.3.0", "Error: queue file write error")
        } else if decoder.nul_seen {
            Reply::new(554, "5.6.0", "Error: message contains a NUL byte")
        } else if decoder.longest_line > proto::MAX_TEXT_LINE {
            Reply::new(
                554,
                "5.6.0",
                "Error: message has a line longer than 998 characters",
            )
        } else {
            self.commit(writer, size).await
        };
        self.tx = None;
        if reply.is_error() {
            return self.error(reply).await;
        }
        self.reply(reply);
        false
    }

    async fn bdat(&mut self, size: u64, last: bool) -> bool {
        // The chunk follows whatever happens: read it before answering.
        let mut remaining = size;
        let mut chunk = Vec::new();
        let keep = self.ready_for_data().is_none()
            && self.tx.as_ref().is_some_and(|t| t.bdat_failed.is_none());
        let deadline = tokio::time::Instant::now() + self.settings.data_deadline;
        while remaining > 0 {
            if tokio::time::Instant::now() > deadline {
                self.close(
                    self.fatal(421, "4.4.2", "Error: message took too long to send"),
                    "DATA deadline",
                )
                .await;
                return true;
            }
            if self.conn.buffered().is_empty() && self.conn.fill().await.is_err() {
                self.summary.end = "lost in BDAT";
                return true;
            }
            let avail = self.conn.buffered();
            let n = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(avail.len());
            if keep {
                chunk.extend_from_slice(&avail[..n]);
            }
            self.conn.consume(n);
            remaining -= n as u64;
            if keep && chunk.len() >= 64 * 1024 {
                self.bdat_write(&chunk).await;
                chunk.clear();
            }
        }
        if let Some(r) = self.ready_for_data() {
            return self.error(r).await;
        }
        self.bdat_write(&chunk).await;
        let failed = self.tx.as_ref().and_then(|t| t.bdat_failed.clone());
        if !last {
            if let Some(r) = failed {
                return self.error(r).await;
            }
            let got = self
                .tx
                .as_ref()
                .and_then(|t| t.bdat.as_ref())
                .map_or(0, |(_, n)| *n);
            self.reply(Reply::new(250, "2.0.0", format!("{got} octets received")));
            return false;
        }
        let writer = self.tx.as_mut().and_then(|t| t.bdat.take());
        let content = self.tx.as_mut().map(|t| {
            t.bdat_lines.finish();
            (
                t.bdat_lines.bare,
                t.bdat_lines.nul_seen,
                t.bdat_lines.longest_line,
            )
        });
        let failed = failed.or_else(|| match content {
            Some((true, _, _)) => Some(Reply::new(
                554,
                "5.6.0",
                "Error: message contains a bare CR or LF",
            )),
            Some((_, true, _)) => Some(Reply::new(
                554,
                "5.6.0",
                "Error: message contains a NUL byte",
            )),
            Some((_, _, n)) if n > proto::MAX_TEXT_LINE => Some(Reply::new(
                554,
                "5.6.0",
                "Error: message has a line longer than 998 characters",
            )),
            _ => None,
        });
        let reply = match (failed, writer) {
            (Some(r), _) => r,
            (None, Some((writer, total))) => self.commit(writer, total).await,
            (None, None) => Reply::new(451, "4.3.0", "Error: queue file write error"),
        };
        self.tx = None;
        if reply.is_error() {
            return self.error(reply).await;
        }
        self.reply(reply);
        false
    }

    async fn bdat_write(&mut self, bytes: &[u8]) {
        let max = self.settings.max_size;
        let Some(tx) = self.tx.as_mut() else { return };
        if tx.bdat_failed.is_some() {
            return;
        }
        if tx.bdat.is_none() {
            let id = self.spool.new_id();
            match self.spool.create(&id).await {
                Ok(mut w) => {
                    let received = received_header(
                        &self.settings.hostname,
                        self.helo.as_deref().unwrap_or(""),
                        &self.client,
                        &protocol(
                            self.esmtp,
                            self.tls.is_some(),
                            self.auth_user.is_some(),
                            tx.params.smtputf8,
                        ),
                        self.tls.as_deref(),
                        &id,
                        // "for" names the recipient only when there is one: others may be Bcc.
                        (tx.rcpts.len() == 1).then(|| &tx.rcpts[0].0),
                    );
                    if w.write(received.as_bytes()).await.is_err() {
                        tx.bdat_failed =
                            Some(Reply::new(451, "4.3.0", "Error: queue file write error"));
                        return;
                    }
                    tx.bdat = Some((w, 0));
                }
                Err(_) => {
                    tx.bdat_failed =
                        Some(Reply::new(451, "4.3.0", "Error: queue file write error"));
                    return;
                }
            }
        }
        tx.bdat_lines.feed(bytes);
        if let Some((w, total)) = tx.bdat.as_mut() {
            *total += bytes.len() as u64;
            if *total > max {
                tx.bdat_failed = Some(Reply::new(552, "5.3.4", "Error: message file too big"));
                tx.bdat = None;
            } else if w.write(bytes).await.is_err() {
                tx.bdat_failed = Some(Reply::new(451, "4.3.0", "Error: queue file write error"));
                tx.bdat = None;
            }
        }
    }

    fn received_header(&self, id: &str) -> String {
        let tx = self.tx.as_ref();
        received_header(
            &self.settings.hostname,
            self.helo.as_deref().unwrap_or(""),
            &self.client,
            &protocol(
                self.esmtp,
                self.tls.is_some(),
                self.auth_user.is_some(),
                tx.is_some_and(|t| t.params.smtputf8),
            ),
            self.tls.as_deref(),
            id,
            tx.filter(|t| t.rcpts.len() == 1).map(|t| &t.rcpts[0].0),
        )
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
                "5.5.0",
                format!("Error: improper pipelining after {verb}"),
            ),
            "improper pipelining",
        )
        .await;
        true
    }

    /// Asks the filter for a verdict before the message is committed. `Ok` carries the
    /// header changes to keep with the envelope; `Err` is the reply that ends the
    /// transaction instead (reject, tempfail, discard, or no scanner and tempfail).
    async fn scan(
        &mut self,
        scanner: &dyn crate::scan::Scanner,
        writer: &SpoolWriter,
        id: &str,
    ) -> Result<Option<(Vec<(String, String)>, Vec<String>)>, Reply> {
        let Some(tx) = self.tx.as_ref() else {
            return Ok(None);
        };
        let message = writer
            .contents()
            .await
            .map_err(|_| Reply::new(451, "4.3.0", "Error: queue file read error"))?;
        let outbound = self.auth_user.is_some()
            || self
                .settings
                .mynetworks
                .iter()
                .any(|n| n.contains(&self.client.ip));
        let envelope = mb_proto::v1::ScanEnvelope {
            queue_id: id.into(),
            client_ip: self.client.ip.to_string(),
            client_name: "unknown".into(),
            helo: self.helo.clone().unwrap_or_default(),
            sender: tx
                .sender
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            recipients: tx.rcpts.iter().map(|(r, _)| r.to_string()).collect(),
            auth_user: self.auth_user.clone().unwrap_or_default(),
            tls: self.tls.clone().unwrap_or_default(),
            direction: if outbound { "outbound" } else { "inbound" }.into(),
            size: 0,
        };
        let (sender, rcpts) = (envelope.sender.clone(), envelope.recipients.clone());
        match scanner.scan(envelope, message.into()).await {
            Ok(v) => match v.action.as_str() {
                "reject" | "tempfail" => {
                    let fallback = if v.action == "reject" { 554 } else { 451 };
                    let code = u16::try_from(v.smtp_code)
                        .ok()
                        .filter(|c| (400..600).contains(c))
                        .unwrap_or(fallback);
                    tracing::info!(
                        client = %self.client.ip,
                        id,
                        action = %v.action,
                        score = v.score,
                        "message refused by the filter: {}",
                        v.smtp_text
                    );
                    Err(Reply::new(
                        code,
                        crate::scan::status_of(u32::from(code), &v.smtp_status),
                        v.smtp_text,
                    ))
                }
                // The filter logs the verdict in the message log; the sender is not told
                // (a quarantined message is safe on disk before this 250).
                "discard" => {
                    tracing::info!(client = %self.client.ip, id, "message discarded by the filter");
                    Err(Reply::new(250, "2.0.0", format!("Ok: queued as {id}")))
                }
                "quarantine" => {
                    tracing::info!(client = %self.client.ip, id, quarantine_id = %v.quarantine_id, from = %sender, nrcpt = rcpts.len(), "message quarantined by the filter");
                    self.summary.accepted.push(id.to_string());
                    Err(Reply::new(250, "2.0.0", format!("Ok: queued as {id}")))
                }
                _ => Ok(Some((
                    v.add_headers
                        .into_iter()
                        .map(|h| (h.name, h.value))
                        .collect(),
                    v.remove_headers,
                ))),
            },
            Err(e) if self.settings.accept_unscanned => {
                tracing::warn!(id, cause = %e, "no mb-filter worker answered; accepting unscanned (filter.unavailable_action = accept)");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(id, cause = %e, "no mb-filter worker answered; message tempfailed");
                Err(Reply::new(
                    451,
                    "4.7.1",
                    "Error: content scanner unavailable, try again later",
                ))
            }
        }
    }

    /// Makes the message durable; only then is 250 sent.
    async fn commit(&mut self, writer: SpoolWriter, size: u64) -> Reply {
        let id = writer.id.clone();
        if writer.hops() > crate::spool::MAX_HOPS {
            tracing::warn!(client = %self.client.ip, hops = writer.hops(), "message refused: too many hops");
            return Reply::new(554, "5.4.6", "Error: too many hops (a mail loop?)");
        }
        let mut verdict_headers = (Vec::new(), Vec::new());
        if let Some(scanner) = self.settings.scanner.clone() {
            match self.scan(scanner.as_ref(), &writer, &id).await {
                Ok(Some((add, remove))) => verdict_headers = (add, remove),
                Ok(None) => {}
                Err(reply) => return reply,
            }
        }
        let Some(tx) = self.tx.as_ref() else {
            return Reply::new(451, "4.3.0", "Error: no transaction");
        };
        let envelope = Envelope {
            id: id.clone(),
            received_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            client_ip: self.client.ip.to_string(),
            client_name: "unknown".into(),
            helo: self.helo.clone().unwrap_or_default(),
            protocol: protocol(
                self.esmtp,
                self.tls.is_some(),
                self.auth_user.is_some(),
                tx.params.smtputf8,
            ),
            tls: self.tls.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone().unwrap_or_default(),
            sender: tx
                .sender
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            recipients: tx
                .rcpts
                .iter()
                .map(|(r, p)| Recipient {
                    address: r.to_string(),
                    notify: p.notify.clone().unwrap_or_default(),
                    orcpt: p.orcpt.clone().unwrap_or_default(),
                })
                .collect(),
            body: tx.params.body.clone().unwrap_or_default(),
            smtputf8: tx.params.smtputf8,
            ret: tx.params.ret.clone().unwrap_or_default(),
            envid: tx.params.envid.clone().unwrap_or_default(),
            listener: self.listener.name().into(),
            add_headers: verdict_headers.0,
            remove_headers: verdict_headers.1,
        };
        match writer.commit(&envelope).await {
            Ok(()) => {
                tracing::info!(
                    client = %self.client.ip,
                    id = %id,
                    from = %envelope.sender,
                    nrcpt = envelope.recipients.len(),
                    size,
                    "message accepted"
                );
                self.summary.accepted.push(id.clone());
                let rcpts = envelope
                    .recipients
                    .iter()
                    .map(|r| r.address.clone())
                    .collect();
                let detail = format!(
                    "listener={} protocol={}",
                    envelope.listener, envelope.protocol
                );
                self.event(
                    "received",
                    "accept",
                    &envelope.sender,
                    rcpts,
                    size,
                    id.clone(),
                    &detail,
                );
                self.error_count = 0;
                self.summary.bytes += size;
                Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
            }
            Err(e) => {
                tracing::error!(cause = %e, "cannot commit a spool file");
                Reply::new(451, "4.3.0", "Error: queue file write error")
            }
        }
    }
}

/// `authzid NUL authcid NUL password`, base64-encoded (RFC 4616).
fn decode_plain(b64: &str) -> Result<(String, String), Reply> {
    let bad = || Reply::new(501, "5.5.2", "Error: invalid AUTH PLAIN response");
    let raw = base64_decode(b64).ok_or_else(bad)?;
    let mut parts = raw.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
    let (authz, user, pass) = (text(authz)?, text(user)?, text(pass)?);
    if !authz.is_empty() && authz != user {
        return Err(Reply::new(
            535,
            "5.7.8",
            "Error: authorization identity differs",
        ));
    }
    Ok((user, pass))
}

fn base64_text(b64: &str) -> Result<String, Reply> {
    base64_decode(b64)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Reply::new(501, "5.5.2", "Error: invalid base64"))
}

/// Standard base64 with padding (RFC 4648 §4), strict.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.is_empty() || s == "=" {
        return Some(Vec::new());
    }
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for (j, c) in chunk.iter().enumerate() {
            let v = if j >= 4 - pad { 0 } else { val(*c)? };
            n = (n << 6) | v;
        }
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}

/// A user name fit for a log line: printable, no spaces, at most 64 characters.
fn loggable(user: &str) -> String {
    user.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

fn protocol(esmtp: bool, tls: bool, auth: bool, utf8: bool) -> String {
    let base = match (utf8, esmtp) {
        (true, _) => "UTF8SMTP",
        (false, true) => "ESMTP",
        (false, false) => "SMTP",
    };
    format!(
        "{base}{}{}",
        if tls { "S" } else { "" },
        if auth { "A" } else { "" }
    )
}

fn describe_tls(state: &rustls::ServerConnection) -> String {
    let version = match state.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let cipher = state
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_string(), |c| format!("{:?}", c.suite()));
    format!("{version} with cipher {cipher}")
}

/// The trace header (RFC 5321 §4.4), prepended to every accepted message.
pub fn received_header(
    hostname: &str,
    helo: &str,
    client: &Client,
    protocol: &str,
    tls: Option<&str>,
    id: &str,
    rcpt: Option<&Mailbox>,
) -> String {
    let literal = match client.ip {
        IpAddr::V4(ip) => format!("[{ip}]"),
        IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
    };
    let mut h = format!(
        "Received: from {} (unknown {literal})\r\n\tby {hostname} (Mailborder) with {protocol} id {id}",
        sanitize(helo)
    );
    if let Some(tls) = tls {
        h.push_str(&format!("\r\n\t(using {tls})"));
    }
    if let Some(r) = rcpt {
        h.push_str(&format!("\r\n\tfor <{r}>"));
    }
    h.push_str(&format!("; {}\r\n", rfc5322_date(SystemTime::now())));
    h
}

fn sanitize(helo: &str) -> String {
    if helo.is_empty() {
        return "unknown".into();
    }
    helo.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// `Sat, 21 Nov 2026 23:59:59 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let ts = mb_runtime::logging::timestamp(t);
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]
        [usize::try_from((secs / 86_400) % 7).unwrap_or(0)];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (date, time) = ts.split_once(' ').unwrap_or((&ts, ""));
    let mut parts = date.split('-');
    let (y, m, d) = (
        parts.next().unwrap_or("1970"),
        parts.next().unwrap_or("01"),
        parts.next().unwrap_or("01"),
    );
    let month = months[m.parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    format!(
        "{weekday}, {} {month} {y} {time} +0000",
        d.trim_start_matches('0')
    )
}
