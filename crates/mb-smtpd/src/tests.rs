//! The session state machine over an in-memory duplex: every command, extension and error
//! path, without sockets.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use mb_core::EnhancedStatus;
use mb_core::verdict::{Action, Direction, ScanRequest, Verdict};

use crate::session::{Client, Listener, Session, Settings, Summary, TlsMode};
use crate::spool::{Queue, Spool};

/// Pacing of large messages from strangers (tests/data_rate.rs).
mod data_rate;
/// Greylisting at RCPT (tests/greylist.rs).
mod greylist;

pub(crate) fn settings() -> Settings {
    Settings {
        hostname: "mx.served.example".into(),
        domains: vec!["served.example".into(), ".sub.example".into()],
        mynetworks: vec!["10.0.0.0/8".parse().unwrap()],
        max_size: 10_000,
        max_recipients: 3,
        max_errors: 10,
        timeout: Duration::from_secs(10),
        data_deadline: Duration::from_secs(600),
        data_rate: None,
        tls_handshake_timeout: Duration::from_secs(10),
        session_lifetime: Duration::from_secs(3600),
        disk: None,
        tls_mode: TlsMode::Enabled,
        tls: None,
        require_auth: false,
        require_tls: false,
        helo_required: true,
        vrfy: false,
        auth: None,
        events: None,
        phases: None,
        scanner: None,
        accept_unscanned: false,
        // Recipient verification (session/verify.rs): fields below this line.
        recipient_verification: crate::recipients::Mode::None,
        recipient_delimiter: "+".into(),
        verifier: None,
        // Sender binding and per-account limits (session/limits.rs): fields below this line.
        sender_binding: true,
        account_limits: None,
        // Greylisting (session/greylist.rs): fields below this line.
        greylist: None,
    }
}

/// Knows two accounts: alice / correct horse (who may send as alice@served.example) and
/// bob@served.example / bob password (as his login, sales@served.example and all of
/// brand.example); "slow" never gets an answer.
struct Table;

impl crate::session::Authenticator for Table {
    fn verify<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
        _client: IpAddr,
    ) -> crate::session::Verifying<'a> {
        Box::pin(async move {
            if user == "down" {
                return Err(crate::session::AuthError::Unreachable(
                    "mb-rpcd is not running".into(),
                ));
            }
            if user == "slow" {
                std::future::pending::<()>().await;
            }
            let granted: &[&str] = match (user, password) {
                ("alice", "correct horse") => &["alice@served.example"],
                ("bob@served.example", "bob password") => &[
                    "bob@served.example",
                    "sales@served.example",
                    "@brand.example",
                ],
                _ => return Ok(None),
            };
            Ok(Some(granted.iter().map(|s| s.to_string()).collect()))
        })
    }

    /// bob-lists@served.example is another account's login; down-x@ cannot be checked.
    fn owner<'a>(&'a self, address: &'a str) -> crate::session::Owning<'a> {
        Box::pin(async move {
            match address.to_ascii_lowercase().as_str() {
                "bob-lists@served.example" => Ok(Some("bob-lists@served.example".into())),
                "bob@served.example" | "sales@served.example" => {
                    Ok(Some("bob@served.example".into()))
                }
                "bob-down@served.example" => Err(crate::session::AuthError::Unreachable(
                    "mb-rpcd is not running".into(),
                )),
                _ => Ok(None),
            }
        })
    }
}

const OUTSIDE: &str = "198.51.100.7";
const INSIDE: &str = "10.1.2.3";

struct T {
    io: DuplexStream,
    task: Option<JoinHandle<Summary>>,
    dir: tempfile::TempDir,
    spool: Arc<Spool>,
    pending: Vec<u8>,
}

impl T {
    async fn start(settings: Settings, ip: &str, listener: Listener) -> T {
        T::start_with(settings, ip, listener, mb_spool::Config::default()).await
    }

    /// `start` on a spool of this layout.
    async fn start_with(
        settings: Settings,
        ip: &str,
        listener: Listener,
        layout: mb_spool::Config,
    ) -> T {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open_with(dir.path(), layout).unwrap();
        let spool = Arc::new(spool);
        let (client, server) = tokio::io::duplex(1 << 20);
        let s = spool.clone();
        let ip: IpAddr = ip.parse().unwrap();
        let task = tokio::spawn(async move {
            let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
            let session = Session::new(
                Box::new(server),
                &settings,
                &s,
                Client { ip, port: 1234 },
                listener,
            );
            session.run(shutdown).await
        });
        let mut t = T {
            io: client,
            task: Some(task),
            dir,
            spool,
            pending: Vec::new(),
        };
        t.expect(220).await;
        t
    }

    async fn outside() -> T {
        T::start(settings(), OUTSIDE, Listener::Smtp).await
    }

    async fn send(&mut self, s: &str) {
        self.io.write_all(s.as_bytes()).await.unwrap();
    }

    /// Reads one (possibly multi-line) reply and checks its code.
    async fn expect(&mut self, code: u16) -> String {
        let reply = self.reply().await;
        assert!(
            reply.starts_with(&code.to_string()),
            "expected {code}, got {reply:?}"
        );
        reply
    }

    async fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let line = self.line().await;
            let last = line.as_bytes().get(3) == Some(&b' ') || line.len() == 3;
            out.push_str(&line);
            out.push('\n');
            if last {
                return out;
            }
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(pos) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending[..pos]).into_owned();
                self.pending.drain(..pos + 2);
                return line;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut buf))
                .await
                .expect("reply within 10s")
                .unwrap();
            assert!(
                n > 0,
                "connection closed; had {:?}",
                String::from_utf8_lossy(&self.pending)
            );
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    async fn cmd(&mut self, line: &str, code: u16) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(code).await
    }

    /// The session ended: the server closed its side.
    async fn closed(&mut self) -> Summary {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "more data: {:?}", String::from_utf8_lossy(&buf[..n]));
        self.task.take().unwrap().await.unwrap()
    }

    fn spooled(&self) -> Vec<(Vec<u8>, crate::spool::Envelope)> {
        self.spool.messages(Queue::Incoming)
    }

    async fn envelope(&mut self, from: &str, to: &[&str]) {
        self.cmd("EHLO client.example", 250).await;
        self.cmd(&format!("MAIL FROM:<{from}>"), 250).await;
        for r in to {
            self.cmd(&format!("RCPT TO:<{r}>"), 250).await;
        }
    }
}

#[tokio::test]
async fn a_message_is_spooled_with_its_envelope() {
    let mut t = T::outside().await;
    let ehlo = t.cmd("EHLO client.example", 250).await;
    for ext in [
        "PIPELINING",
        "SIZE 10000",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    assert!(
        !ehlo.contains("STARTTLS"),
        "STARTTLS offered without a certificate"
    );
    assert!(!ehlo.contains("VRFY"));
    t.cmd(
        "MAIL FROM:<alice@sender.example> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=abc",
        250,
    )
    .await;
    t.cmd(
        "RCPT TO:<bob@served.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@served.example",
        250,
    )
    .await;
    t.cmd("RCPT TO:<Carol@X.Sub.Example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send("Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n")
        .await;
    let r = t.expect(250).await;
    assert!(r.contains("2.0.0 Ok: queued as "), "{r}");
    t.cmd("QUIT", 221).await;
    let summary = t.closed().await;
    assert_eq!(
        summary.counts(),
        "ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6"
    );
    let spooled = t.spooled();
    assert_eq!(spooled.len(), 1);
    let (msg, env) = &spooled[0];
    let text = String::from_utf8_lossy(msg);
    assert!(text.starts_with("Received: from client.example (unknown [198.51.100.7])\r\n\tby mx.served.example (Mailborder) with ESMTP id "), "{text}");
    assert!(
        !text.contains("\tfor <"),
        "two recipients, yet one is named: {text}"
    );
    assert!(
        text.ends_with("Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"),
        "{text}"
    );
    assert_eq!(env.sender, "alice@sender.example");
    assert_eq!(env.recipients.len(), 2);
    assert_eq!(env.recipients[0].notify, "SUCCESS,FAILURE");
    assert_eq!(env.recipients[0].orcpt, "rfc822;bob@served.example");
    assert_eq!(env.recipients[1].address, "Carol@x.sub.example");
    assert_eq!(
        (env.body.as_str(), env.ret.as_str(), env.envid.as_str()),
        ("8BITMIME", "HDRS", "abc")
    );
    assert!(r.contains(&env.id));
}

/// 250 comes only once the message is durable: when the spool's commit fails (the
/// next segment's name is taken, so its rotation fails and poisons it), that message
/// gets 451, never 250, and the next one is refused at DATA.
#[tokio::test]
async fn a_message_gets_250_only_once_it_is_durable() {
    let layout = mb_spool::Config {
        // Every batch starts a new segment.
        segment_size: 0,
        ..mb_spool::Config::default()
    };
    let mut t = T::start_with(settings(), OUTSIDE, Listener::Smtp, layout).await;
    t.cmd("EHLO client.example", 250).await;
    let send = |n: u32| format!("Subject: {n}\r\n\r\nbody\r\n.\r\n");
    t.cmd("MAIL FROM:<alice@sender.example>", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send(&send(1)).await;
    t.expect(250).await;
    crate::spool::tests::block_next_segment(t.dir.path());
    t.cmd("MAIL FROM:<alice@sender.example>", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send(&send(2)).await;
    let r = t.expect(451).await;
    assert!(r.contains("4.3.0"), "{r}");
    t.cmd("MAIL FROM:<alice@sender.example>", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 250).await;
    t.cmd("DATA", 451).await;
    assert!(t.spool.is_poisoned());
    let spooled = t.spooled();
    assert_eq!(spooled.len(), 1);
    assert!(String::from_utf8_lossy(&spooled[0].0).ends_with("Subject: 1\r\n\r\nbody\r\n"));
}

/// A spool poisoned after records were written (a message was accepted and completed,
/// and the reclaim its durable completion allowed failed) refuses the next message with
/// 451 at DATA; what was written before stays acknowledged.
#[tokio::test]
async fn a_spool_poisoned_after_writing_answers_451() {
    let layout = mb_spool::Config {
        // Every batch starts a new segment.
        segment_size: 0,
        ..mb_spool::Config::default()
    };
    let mut t = T::start_with(settings(), OUTSIDE, Listener::Smtp, layout).await;
    t.cmd("EHLO client.example", 250).await;
    t.cmd("MAIL FROM:<alice@sender.example>", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send("Subject: 1\r\n\r\nbody\r\n.\r\n").await;
    t.expect(250).await;
    let id = t.spool.ids(Queue::Incoming).remove(0);
    // The segment the message lies in cannot become a spare once it is done.
    let newest = std::fs::read_dir(t.dir.path().join("segments"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".seg").map(str::to_string))
        .max()
        .unwrap();
    std::fs::create_dir(
        t.dir
            .path()
            .join("segments")
            .join(format!("spare-{newest}")),
    )
    .unwrap();
    t.spool
        .update(&id, |_, _| (crate::spool::Change::Complete, ()))
        .await
        .unwrap();
    assert!(t.spool.is_poisoned());
    t.cmd("MAIL FROM:<alice@sender.example>", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 250).await;
    let r = t.cmd("DATA", 451).await;
    assert!(r.contains("4.3.0"), "{r}");
    assert!(t.spooled().is_empty());
}

#[tokio::test]
async fn sequence_errors() {
    let mut t = T::outside().await;
    t.cmd("MAIL FROM:<a@b.example>", 503).await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 503).await;
    t.cmd("DATA", 503).await;
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("MAIL FROM:<a@b.example>", 503).await;
    t.cmd("DATA", 554).await;
    t.cmd("RSET", 250).await;
    t.cmd("RCPT TO:<bob@served.example>", 503).await;
    t.cmd("QUIT", 221).await;
    let s = t.closed().await;
    assert_eq!(s.errors, 6);
}

#[tokio::test]
async fn other_commands() {
    let mut t = T::outside().await;
    t.cmd("HELP", 214).await;
    t.cmd("NOOP", 250).await;
    t.cmd("NOOP ignored argument", 250).await;
    t.cmd("VRFY root", 252).await;
    t.cmd("EXPN staff", 502).await;
    t.cmd("FROB", 502).await;
    t.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==", 538).await;
    assert!(
        !t.cmd("EHLO again.example", 250).await.contains("AUTH"),
        "AUTH offered without TLS"
    );
    t.cmd("STARTTLS", 502).await;
    t.cmd("QUIT now", 501).await;
    t.cmd("QUIT", 221).await;
    t.closed().await;
}

#[tokio::test]
async fn relay_is_refused_from_outside_and_allowed_from_mynetworks() {
    let mut t = T::outside().await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    let r = t.cmd("RCPT TO:<victim@elsewhere.example>", 554).await;
    assert!(
        r.contains("5.7.1") && r.contains("Relay access denied"),
        "{r}"
    );
    t.cmd("RCPT TO:<user@[192.0.2.1]>", 554).await;
    t.cmd("RCPT TO:<user@served.example.evil.example>", 554)
        .await;
    t.cmd("RCPT TO:<user@sub.example>", 554).await;
    t.cmd("RCPT TO:<Postmaster>", 250).await;
    t.cmd("RCPT TO:<USER@SERVED.EXAMPLE>", 250).await;
    t.cmd("QUIT", 221).await;
    let s = t.closed().await;
    assert_eq!(s.relay_denied, 4);

    let mut t = T::start(settings(), INSIDE, Listener::Smtp).await;
    t.envelope("a@served.example", &["someone@elsewhere.example"])
        .await;
    let mut t = T::start(settings(), "127.0.0.1", Listener::Reinject).await;
    t.envelope("a@b.example", &["someone@elsewhere.example"])
        .await;
}

#[tokio::test]
async fn size_and_recipient_limits() {
    let mut t = T::outside().await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("MAIL FROM:<a@b.example> SIZE=10001", 552).await;
    t.cmd("MAIL FROM:<a@b.example> SIZE=9999", 250).await;
    for i in 0..3 {
        t.cmd(&format!("RCPT TO:<u{i}@served.example>"), 250).await;
    }
    t.cmd("RCPT TO:<u4@served.example>", 452).await;
    t.cmd("DATA", 354).await;
    let body = "x".repeat(100);
    for _ in 0..120 {
        t.send(&format!("{body}\r\n")).await;
    }
    t.send(".\r\n").await;
    let r = t.expect(552).await;
    assert!(r.contains("5.3.4"), "{r}");
    assert!(t.spooled().is_empty());
    assert!(
        std::fs::read_dir(t.dir.path().join("bodies"))
            .unwrap()
            .next()
            .is_none(),
        "partial file left"
    );
    // The session goes on after a refused message.
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("RCPT TO:<u@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send(&format!("{}\r\n.\r\n", "y".repeat(1200))).await;
    let r = t.expect(554).await;
    assert!(r.contains("longer than 998"), "{r}");
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("RCPT TO:<u@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send("a\0b\r\n.\r\n").await;
    t.expect(554).await;
    assert!(t.spooled().is_empty());
}

#[tokio::test]
async fn input_limits_and_error_counts() {
    let mut s = settings();
    s.max_errors = 5;
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    let long = format!("NOOP {}", "x".repeat(600));
    t.cmd(&long, 500).await;
    t.cmd("NOOP", 250).await;
    t.send("NOOP \0\r\n").await;
    t.expect(500).await;
    t.cmd("MAIL FROM:<x@y.example>", 503).await;
    t.cmd("XYZZY", 502).await;
    t.send("XYZZY\r\n").await;
    let r = t.expect(421).await;
    assert!(r.contains("too many errors"), "{r}");
    let s = t.closed().await;
    assert_eq!(s.end, "too many errors");
}

#[tokio::test]
async fn bare_lf_in_a_command_ends_the_session() {
    let mut t = T::outside().await;
    t.send("EHLO c.example\n").await;
    let r = t.expect(521).await;
    assert!(r.contains("bare <LF>"), "{r}");
    t.closed().await;
}

#[tokio::test]
async fn smuggling_probes_never_end_data_or_start_a_second_message() {
    for probe in ["\n.\n", "\r.\r", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r"] {
        let mut t = T::outside().await;
        t.envelope("a@b.example", &["u@served.example"]).await;
        t.cmd("DATA", 354).await;
        t.send(&format!("Subject: one\r\n\r\nbody{probe}MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@served.example>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n")).await;
        let r = t.expect(521).await;
        assert!(r.contains("received"), "{probe:?}: {r}");
        let s = t.closed().await;
        assert_eq!(s.end, "smuggling attempt");
        assert!(t.spooled().is_empty(), "{probe:?} produced a message");
        assert!(
            std::fs::read_dir(t.dir.path().join("bodies"))
                .unwrap()
                .next()
                .is_none()
        );
    }
    // NUL in the body is refused, without ending the session.
    let mut t = T::outside().await;
    t.envelope("a@b.example", &["u@served.example"]).await;
    t.cmd("DATA", 354).await;
    t.send("a\0\r\n.\r\n").await;
    t.expect(554).await;
}

#[tokio::test]
async fn pipelining_is_answered_in_order_and_enforced() {
    let mut t = T::outside().await;
    t.cmd("EHLO c.example", 250).await;
    t.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<u@served.example>\r\nRCPT TO:<v@elsewhere.example>\r\nRCPT TO:<w@served.example>\r\nDATA\r\n").await;
    t.expect(250).await;
    t.expect(250).await;
    t.expect(554).await;
    t.expect(250).await;
    t.expect(354).await;
    t.send("Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n").await;
    t.expect(250).await;
    t.expect(221).await;
    let s = t.closed().await;
    assert_eq!(s.accepted.len(), 1);
    let (_, env) = &t.spooled()[0];
    assert_eq!(
        env.recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect::<Vec<_>>(),
        ["u@served.example", "w@served.example"]
    );

    // Message text sent before the 354 is refused, not taken as a message.
    let mut t = T::outside().await;
    t.envelope("a@b.example", &["u@served.example"]).await;
    t.send("DATA\r\nSubject: early\r\n\r\n.\r\n").await;
    let r = t.expect(554).await;
    assert!(r.contains("improper pipelining after DATA"), "{r}");
    t.closed().await;
    assert!(t.spooled().is_empty());

    // Without EHLO there is no pipelining.
    let mut t = T::outside().await;
    t.cmd("HELO c.example", 250).await;
    t.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<u@served.example>\r\n")
        .await;
    let r = t.expect(554).await;
    assert!(r.contains("improper command pipelining"), "{r}");
    t.closed().await;
}

#[tokio::test]
async fn helo_clients_get_plain_smtp() {
    let mut t = T::outside().await;
    t.cmd("HELO c.example", 250).await;
    t.cmd("MAIL FROM:<a@b.example> SIZE=10", 555).await;
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("RCPT TO:<u@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send("x\r\n.\r\n").await;
    t.expect(250).await;
    let (msg, env) = &t.spooled()[0];
    assert_eq!(env.protocol, "SMTP");
    assert!(String::from_utf8_lossy(msg).contains(" with SMTP id "));
}

#[tokio::test]
async fn early_talkers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path()).unwrap();
    let (mut client, server) = tokio::io::duplex(4096);
    client.write_all(b"EHLO fast.example\r\n").await.unwrap();
    let s = settings();
    let (_t, shutdown) = mb_runtime::lifecycle::shutdown_pair();
    let summary = Session::new(
        Box::new(server),
        &s,
        &spool,
        Client {
            ip: OUTSIDE.parse().unwrap(),
            port: 1,
        },
        Listener::Smtp,
    )
    .run(shutdown)
    .await;
    assert_eq!(summary.end, "early talker");
    let mut out = String::new();
    client.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("554 5.5.1"), "{out}");
}

#[tokio::test]
async fn idle_clients_time_out() {
    let mut s = settings();
    s.timeout = Duration::from_millis(200);
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    let r = t.expect(421).await;
    assert!(r.contains("4.4.2") && r.contains("timeout"), "{r}");
    assert_eq!(t.closed().await.end, "timeout");
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let mut t = T::outside().await;
    t.envelope("a@b.example", &["u@served.example"]).await;
    t.send("BDAT 14\r\nSubject: b\r\n\r\n").await;
    t.expect(250).await;
    // Dots are data in BDAT, taken as they come (no stuffing).
    t.send("BDAT 8 LAST\r\n.x\r\n..\r\n").await;
    let r = t.expect(250).await;
    assert!(r.contains("queued as"), "{r}");
    let (msg, _) = &t.spooled()[0];
    assert!(
        msg.ends_with(b"Subject: b\r\n\r\n.x\r\n..\r\n"),
        "{:?}",
        String::from_utf8_lossy(msg)
    );
    // BDAT without a transaction: the chunk is read and thrown away, then 503.
    t.send("BDAT 5 LAST\r\nhello").await;
    t.expect(503).await;
    t.cmd("NOOP", 250).await;
    // DATA after BDAT is refused.
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("RCPT TO:<u@served.example>", 250).await;
    t.send("BDAT 2\r\nab").await;
    t.expect(250).await;
    t.cmd("DATA", 503).await;
    // Too big in total.
    t.cmd("RSET", 250).await;
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("RCPT TO:<u@served.example>", 250).await;
    t.send(&format!("BDAT 6000\r\n{}", "z".repeat(6000))).await;
    t.expect(250).await;
    t.send(&format!("BDAT 6000 LAST\r\n{}", "z".repeat(6000)))
        .await;
    t.expect(552).await;
    assert_eq!(t.spooled().len(), 1);
}

#[tokio::test]
async fn smtputf8_addresses_need_the_parameter() {
    let mut t = T::outside().await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("MAIL FROM:<jöran@b.example>", 553).await;
    t.cmd("MAIL FROM:<a@b.example>", 250).await;
    t.cmd("RCPT TO:<jöran@served.example>", 553).await;
    t.cmd("RSET", 250).await;
    t.cmd("MAIL FROM:<jöran@bücher.example> SMTPUTF8", 250)
        .await;
    t.cmd("RCPT TO:<grüße@served.example>", 250).await;
    t.cmd("DATA", 354).await;
    t.send("Subject: ü\r\n\r\nü\r\n.\r\n").await;
    t.expect(250).await;
    let (msg, env) = &t.spooled()[0];
    assert!(env.smtputf8);
    assert_eq!(env.sender, "jöran@bücher.example");
    assert!(String::from_utf8_lossy(msg).contains(" with UTF8SMTP id "));
}

#[tokio::test]
async fn submission_requires_tls_and_auth() {
    let mut s = settings();
    s.require_auth = true;
    s.require_tls = true;
    let mut t = T::start(s.clone(), OUTSIDE, Listener::Submission).await;
    t.cmd("EHLO c.example", 250).await;
    let r = t.cmd("MAIL FROM:<a@b.example>", 530).await;
    assert!(r.contains("STARTTLS"), "{r}");
    s.require_tls = false;
    let mut t = T::start(s, OUTSIDE, Listener::Submission).await;
    t.cmd("EHLO c.example", 250).await;
    let r = t.cmd("MAIL FROM:<a@b.example>", 530).await;
    assert!(r.contains("Authentication required"), "{r}");

    let mut s = settings();
    s.tls_mode = TlsMode::Mandatory;
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("MAIL FROM:<a@b.example>", 530).await;
}

pub(crate) fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["mx.served.example".to_string()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

#[tokio::test]
async fn starttls_upgrades_and_is_recorded() {
    let (acceptor, connector) = tls_pair();
    let mut s = settings();
    s.tls = Some(acceptor);
    let mut t = T::start(s.clone(), OUTSIDE, Listener::Smtp).await;
    let ehlo = t.cmd("EHLO c.example", 250).await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    t.cmd("STARTTLS", 220).await;
    let name = rustls_pki_types::ServerName::try_from("mx.served.example").unwrap();
    let mut tls = connector.connect(name, t.io).await.unwrap();
    tls.write_all(b"EHLO c.example\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while !String::from_utf8_lossy(&got).contains("250 ") {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let ehlo = String::from_utf8_lossy(&got).into_owned();
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    tls.write_all(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@served.example>\r\nDATA\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("354 ") {
        let n = tls.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    tls.write_all(b"Subject: tls\r\n\r\nx\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    let _ = tls.read_to_string(&mut rest).await;
    assert!(rest.contains("250 2.0.0 Ok: queued as"), "{rest}");
    let summary = t.task.take().unwrap().await.unwrap();
    assert!(summary.tls);
    let (msg, env) = t.spool.messages(Queue::Incoming).remove(0);
    assert_eq!(env.protocol, "ESMTPS");
    let text = String::from_utf8_lossy(&msg);
    assert!(text.contains("(using TLSv1.3 with cipher TLS13_"), "{text}");

    // Commands pipelined behind STARTTLS are refused (CVE-2011-0411 class).
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO c.example", 250).await;
    t.send("STARTTLS\r\nMAIL FROM:<a@b.example>\r\n").await;
    let r = t.expect(554).await;
    assert!(r.contains("after STARTTLS"), "{r}");
    t.closed().await;
}

async fn tls_session(
    listener: Listener,
    auth: bool,
) -> (
    tokio_rustls::client::TlsStream<DuplexStream>,
    JoinHandle<Summary>,
    Arc<Spool>,
    tempfile::TempDir,
) {
    let (acceptor, connector) = tls_pair();
    let mut s = settings();
    s.tls = Some(acceptor);
    if auth {
        s.auth = Some(Arc::new(Table));
    }
    let mut t = T::start(s, OUTSIDE, listener).await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("STARTTLS", 220).await;
    let name = rustls_pki_types::ServerName::try_from("mx.served.example").unwrap();
    let tls = connector.connect(name, t.io).await.unwrap();
    (tls, t.task.take().unwrap(), t.spool.clone(), t.dir)
}

async fn tls_cmd(tls: &mut tokio_rustls::client::TlsStream<DuplexStream>, line: &str) -> String {
    tls.write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(last) = text.lines().last()
            && text.ends_with("\r\n")
            && last.as_bytes().get(3) != Some(&b'-')
        {
            return text;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            return text;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn base64_is_strict() {
    use crate::session::base64_decode;
    assert_eq!(
        base64_decode("AGFsaWNlAHNlY3JldA==").unwrap(),
        b"\0alice\0secret"
    );
    assert_eq!(base64_decode("YQ==").unwrap(), b"a");
    assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
    assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
    for bad in ["YQ", "Y===", "YQ==YQ==", "!!!!", "YW=j"] {
        assert!(base64_decode(bad).is_none(), "{bad}");
    }
}

#[tokio::test]
async fn auth_plain_and_login_under_tls() {
    // AUTH PLAIN with an initial response; then relaying is allowed.
    let (mut tls, task, spool, _dir) = tls_session(Listener::Submission, true).await;
    let ehlo = tls_cmd(&mut tls, "EHLO c.example").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    // \0alice\0correct horse
    assert!(
        tls_cmd(&mut tls, "AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
            .await
            .starts_with("235 2.7.0")
    );
    assert!(
        tls_cmd(&mut tls, "AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
            .await
            .starts_with("503")
    );
    assert!(
        tls_cmd(&mut tls, "MAIL FROM:<alice@served.example>")
            .await
            .starts_with("250")
    );
    assert!(
        tls_cmd(&mut tls, "RCPT TO:<friend@elsewhere.example>")
            .await
            .starts_with("250")
    );
    assert!(tls_cmd(&mut tls, "DATA").await.starts_with("354"));
    assert!(
        tls_cmd(&mut tls, "Subject: out\r\n\r\nx\r\n.")
            .await
            .starts_with("250")
    );
    assert!(tls_cmd(&mut tls, "QUIT").await.starts_with("221"));
    let s = task.await.unwrap();
    assert_eq!(s.auth, 2);
    let (_, env) = spool.messages(Queue::Incoming).remove(0);
    assert_eq!(
        (env.protocol.as_str(), env.auth_user.as_str()),
        ("ESMTPSA", "alice")
    );

    // AUTH LOGIN step by step; a wrong password is refused, three end the session.
    let (mut tls, task, _, _dir) = tls_session(Listener::Submission, true).await;
    tls_cmd(&mut tls, "EHLO c.example").await;
    assert!(
        tls_cmd(&mut tls, "AUTH LOGIN")
            .await
            .starts_with("334 VXNlcm5hbWU6")
    );
    assert!(
        tls_cmd(&mut tls, "YWxpY2U=")
            .await
            .starts_with("334 UGFzc3dvcmQ6")
    );
    assert!(tls_cmd(&mut tls, "d3Jvbmc=").await.starts_with("535 5.7.8"));
    assert!(tls_cmd(&mut tls, "AUTH PLAIN").await.starts_with("334"));
    assert!(tls_cmd(&mut tls, "*").await.starts_with("501"));
    assert!(
        tls_cmd(&mut tls, "AUTH PLAIN AGJvYgB4")
            .await
            .starts_with("535")
    );
    assert!(
        tls_cmd(&mut tls, "AUTH PLAIN AGJvYgB4")
            .await
            .starts_with("421 4.7.0")
    );
    let s = task.await.unwrap();
    assert_eq!((s.auth_failed, s.end), (3, "too many auth failures"));

    // mb-rpcd unreachable: a temporary failure.
    let (mut tls, _task, _, _dir) = tls_session(Listener::Submission, true).await;
    tls_cmd(&mut tls, "EHLO c.example").await;
    // \0down\0whatever
    assert!(
        tls_cmd(&mut tls, "AUTH PLAIN AGRvd24Ad2hhdGV2ZXI=")
            .await
            .starts_with("454 4.7.0")
    );
    assert!(tls_cmd(&mut tls, "AUTH CRAM-MD5").await.starts_with("504"));

    // No AUTH on port 25.
    let (mut tls, _task, _, _dir) = tls_session(Listener::Smtp, false).await;
    let ehlo = tls_cmd(&mut tls, "EHLO c.example").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(
        tls_cmd(&mut tls, "AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
            .await
            .starts_with("503")
    );
}

#[test]
fn cipher_lists_restrict_tls12_only() {
    use crate::server::cipher_suites;
    let all = cipher_suites("").unwrap();
    assert_eq!(
        all.len(),
        rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES.len()
    );
    let one = cipher_suites("ECDHE-ECDSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256:AES128-SHA")
        .unwrap();
    let tls12: Vec<_> = one
        .iter()
        .filter(|s| s.tls13().is_none())
        .map(|s| s.suite())
        .collect();
    assert_eq!(
        tls12,
        [rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    );
    assert!(
        one.iter().any(|s| s.tls13().is_some()),
        "TLS 1.3 suites must stay"
    );
    let err = cipher_suites("DHE-RSA-AES128-GCM-SHA256").unwrap_err();
    assert!(err.to_string().contains("names no TLS 1.2 suite"), "{err}");
}

#[tokio::test]
async fn review_fixes_hold() {
    // BDAT content with a bare LF is refused like DATA's, and nothing is spooled.
    let mut t = T::outside().await;
    t.envelope("a@b.example", &["u@served.example"]).await;
    t.send("BDAT 10 LAST\r\nx\n.\nMAIL\r\n").await;
    let r = t.expect(554).await;
    assert!(r.contains("bare CR or LF"), "{r}");
    assert!(t.spooled().is_empty());
    // Two recipients: the Received header names neither.
    t.envelope("a@b.example", &["u@served.example", "bcc@served.example"])
        .await;
    t.cmd("DATA", 354).await;
    t.send("x\r\n.\r\n").await;
    t.expect(250).await;
    let (msg, _) = &t.spooled()[0];
    assert!(
        !String::from_utf8_lossy(msg).contains("\tfor <"),
        "{}",
        String::from_utf8_lossy(msg)
    );
    // A BDAT line we cannot parse ends the session instead of reading its chunk as commands.
    t.send("BDAT 5x\r\nQUIT\r\n").await;
    t.expect(501).await;
    assert_eq!(t.closed().await.end, "bad BDAT");

    // Under mandatory TLS a refused BDAT's chunk is still read.
    let mut s = settings();
    s.tls_mode = TlsMode::Mandatory;
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO c.example", 250).await;
    t.send("BDAT 6 LAST\r\nNOOP\r\n").await;
    t.expect(530).await;
    t.cmd("NOOP", 250).await;

    // Junk commands are limited.
    let mut t = T::outside().await;
    for _ in 0..100 {
        t.cmd("NOOP", 250).await;
    }
    let r = t.cmd("RSET", 421).await;
    assert!(r.contains("too many commands"), "{r}");
}

#[tokio::test]
async fn a_stalled_password_check_times_out() {
    let (acceptor, connector) = tls_pair();
    let mut s = settings();
    s.tls = Some(acceptor);
    s.auth = Some(Arc::new(Table));
    s.timeout = Duration::from_millis(500);
    let mut t = T::start(s, OUTSIDE, Listener::Submission).await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("STARTTLS", 220).await;
    let name = rustls_pki_types::ServerName::try_from("mx.served.example").unwrap();
    let mut tls = connector.connect(name, t.io).await.unwrap();
    tls_cmd(&mut tls, "EHLO c.example").await;
    // \0slow\0whatever
    let r = tls_cmd(&mut tls, "AUTH PLAIN AHNsb3cAd2hhdGV2ZXI=").await;
    assert!(r.starts_with("454 4.7.0"), "{r}");
}

#[tokio::test]
async fn sessions_report_their_phase() {
    let phases = Arc::new(crate::session::Phases::default());
    let mut s = settings();
    s.phases = Some(phases.clone());
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    use crate::session::Phase;
    assert_eq!(phases.get(Phase::Command), 1);
    t.envelope("a@b.example", &["u@served.example"]).await;
    t.cmd("DATA", 354).await;
    assert_eq!(
        (phases.get(Phase::Command), phases.get(Phase::Data)),
        (0, 1)
    );
    t.send("x\r\n.\r\n").await;
    t.expect(250).await;
    assert_eq!(
        (phases.get(Phase::Command), phases.get(Phase::Data)),
        (1, 0)
    );
    t.cmd("QUIT", 221).await;
    t.closed().await;
    assert_eq!(
        phases.get(Phase::Command),
        0,
        "a closed session still counted"
    );
}

#[tokio::test]
async fn a_trickled_message_hits_the_data_deadline() {
    let mut s = settings();
    s.timeout = Duration::from_millis(400);
    s.data_deadline = Duration::from_millis(900);
    let mut t = T::start(s, OUTSIDE, Listener::Smtp).await;
    t.envelope("a@b.example", &["u@served.example"]).await;
    t.cmd("DATA", 354).await;
    // Each byte comes before the idle timeout, but the whole never ends.
    for _ in 0..8 {
        if t.io.write_all(b"x").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = t.expect(421).await;
    assert!(r.contains("took too long"), "{r}");
    assert_eq!(t.closed().await.end, "DATA deadline");
    assert!(t.spooled().is_empty());
}

#[tokio::test]
async fn a_looping_message_is_refused_by_its_hop_count() {
    let mut t = T::outside().await;
    t.cmd("EHLO c.example", 250).await;
    for (received, code) in [(49, 250), (50, 554)] {
        t.cmd("MAIL FROM:<a@b.example>", 250).await;
        t.cmd("RCPT TO:<u@served.example>", 250).await;
        t.cmd("DATA", 354).await;
        let mut msg = String::new();
        for i in 0..received {
            msg.push_str(&format!("Received: from hop{i}.example by x\r\n"));
        }
        msg.push_str("Subject: loop\r\n\r\nReceived: in the body does not count\r\n.\r\n");
        t.send(&msg).await;
        // Ours makes the count 50 (allowed) or 51 (a loop).
        let r = t.expect(code).await;
        if code == 554 {
            assert!(r.contains("5.4.6") && r.contains("too many hops"), "{r}");
        }
    }
    assert_eq!(t.spooled().len(), 1);
}

/// A scanner that decides by the subject: "virus" rejects, "later" tempfails, "gone"
/// fails like a dead worker, anything else is accepted with a header to add.
struct Verdicts;

#[tonic::async_trait]
impl mb_scan::Scanner for Verdicts {
    async fn scan(
        &self,
        request: &ScanRequest,
        message: mb_scan::Body,
    ) -> Result<Verdict, mb_scan::ScanError> {
        let message = message.read_all().unwrap();
        let text = String::from_utf8_lossy(&message);
        assert!(
            text.starts_with("Received: "),
            "the scanner sees our Received first"
        );
        assert_eq!(request.direction, Direction::Inbound);
        if text.contains("Subject: virus") {
            Ok(Verdict::refuse(
                Action::Reject,
                554,
                EnhancedStatus::POLICY_REJECT,
                "Message refused: virus found (EICAR)",
            ))
        } else if text.contains("Subject: later") {
            Ok(Verdict::refuse(
                Action::Tempfail,
                451,
                EnhancedStatus::POLICY_TEMPFAIL,
                "Virus scanner unavailable, try again later",
            ))
        } else if text.contains("Subject: gone") {
            Err(mb_scan::ScanError::NoWorkers)
        } else {
            let mut ok = Verdict::accept();
            ok.add_headers
                .push(("X-Spam-Status".into(), "No, score=0.0".into()));
            ok.remove_headers.push("X-Spam".into());
            Ok(ok)
        }
    }
}

#[tokio::test]
async fn the_filter_verdict_decides_the_reply() {
    let mut settings = settings();
    settings.scanner = Some(Arc::new(Verdicts));
    let mut t = T::start(settings, OUTSIDE, Listener::Smtp).await;
    t.cmd("EHLO c.example", 250).await;
    for (subject, code) in [
        ("virus", 554),
        ("later", 451),
        ("gone", 451),
        ("clean", 250),
    ] {
        t.cmd("MAIL FROM:<a@b.example>", 250).await;
        t.cmd("RCPT TO:<u@served.example>", 250).await;
        t.cmd("DATA", 354).await;
        t.send(&format!(
            "Subject: {subject}\r\nX-Spam: Yes\r\n\r\nbody\r\n.\r\n"
        ))
        .await;
        let r = t.expect(code).await;
        if subject == "virus" {
            assert!(r.contains("5.7.1") && r.contains("EICAR"), "{r}");
        }
    }
    let spooled = t.spooled();
    assert_eq!(spooled.len(), 1, "only the clean message is queued");
    let (msg, env) = &spooled[0];
    assert_eq!(
        env.add_headers,
        [("X-Spam-Status".to_string(), "No, score=0.0".to_string())]
    );
    let delivered = mb_core::message::with_headers(msg, &env.add_headers, &env.remove_headers);
    let text = String::from_utf8(delivered).unwrap();
    assert!(
        text.starts_with("X-Spam-Status: No, score=0.0\r\nReceived: "),
        "{text}"
    );
    assert!(
        !text.contains("X-Spam: Yes"),
        "the forged field is removed: {text}"
    );
}

/// Standard base64 with padding, for AUTH PLAIN responses in the tests below.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A submission session under TLS with `s`, logged in as `user`.
async fn logged_in(
    mut s: Settings,
    user: &str,
    password: &str,
) -> (
    tokio_rustls::client::TlsStream<DuplexStream>,
    JoinHandle<Summary>,
    tempfile::TempDir,
) {
    let (acceptor, connector) = tls_pair();
    s.tls = Some(acceptor);
    s.auth = Some(Arc::new(Table));
    let mut t = T::start(s, OUTSIDE, Listener::Submission).await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("STARTTLS", 220).await;
    let name = rustls_pki_types::ServerName::try_from("mx.served.example").unwrap();
    let mut tls = connector.connect(name, t.io).await.unwrap();
    tls_cmd(&mut tls, "EHLO c.example").await;
    let plain = b64(format!("\0{user}\0{password}").as_bytes());
    let r = tls_cmd(&mut tls, &format!("AUTH PLAIN {plain}")).await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
    (tls, t.task.take().unwrap(), t.dir)
}

#[tokio::test]
async fn authenticated_senders_are_bound_to_their_addresses() {
    assert_eq!(
        b64(b"\0alice\0correct horse"),
        "AGFsaWNlAGNvcnJlY3QgaG9yc2U="
    );
    let mut s = settings();
    s.recipient_delimiter = "+-".into();
    let (mut tls, _task, _dir) = logged_in(s, "bob@served.example", "bob password").await;
    for (from, code) in [
        (
            "ceo@served.example",
            "553 5.7.1 <ceo@served.example>: Sender address rejected: not owned by user bob@served.example",
        ),
        ("bob@served.example", "250"),
        ("Bob+lists@Served.Example", "250"),
        // With "-" a delimiter too: bob-news@ is nobody's, so it is bob@'s extension...
        ("bob-news@served.example", "250"),
        // ... but bob-lists@ is another account's login, whoever's extension it looks like.
        ("bob-lists@served.example", "553 5.7.1"),
        // And when mb-rpcd cannot say, the sender waits rather than passes.
        ("bob-down@served.example", "451 4.7.1"),
        ("sales@served.example", "250"),
        ("anyone@brand.example", "250"),
        ("bob@elsewhere.example", "553 5.7.1"),
        ("", "250"),
    ] {
        let r = tls_cmd(&mut tls, &format!("MAIL FROM:<{from}>")).await;
        assert!(r.starts_with(code), "{from}: {r}");
        tls_cmd(&mut tls, "RSET").await;
    }
    // A login that is not an address owns only what it was granted.
    let (mut tls, _task, _dir) = logged_in(settings(), "alice", "correct horse").await;
    let r = tls_cmd(&mut tls, "MAIL FROM:<alice@elsewhere.example>").await;
    assert!(
        r.starts_with("553 5.7.1") && r.contains("not owned by user alice"),
        "{r}"
    );

    // smtp.auth.sender_binding = false: any sender, as before.
    let mut s = settings();
    s.sender_binding = false;
    let (mut tls, _task, _dir) = logged_in(s, "alice", "correct horse").await;
    let r = tls_cmd(&mut tls, "MAIL FROM:<ceo@served.example>").await;
    assert!(r.starts_with("250"), "{r}");

    // Clients without AUTH are not bound: mynetworks relays any sender.
    let mut t = T::start(settings(), INSIDE, Listener::Smtp).await;
    t.cmd("EHLO c.example", 250).await;
    t.cmd("MAIL FROM:<ceo@served.example>", 250).await;
}

#[tokio::test]
async fn accounts_have_hourly_message_and_recipient_budgets() {
    let limits = crate::account_limits::AccountLimits {
        local: Arc::default(),
        redis: None,
        messages_per_hour: 2,
        recipients_per_hour: 3,
    };
    let mut s = settings();
    s.account_limits = Some(limits.clone());
    let (mut tls, _task, _dir) = logged_in(s.clone(), "alice", "correct horse").await;
    // Two messages; the second runs out of recipients after one.
    assert!(
        tls_cmd(&mut tls, "MAIL FROM:<alice@served.example>")
            .await
            .starts_with("250")
    );
    for to in ["a@elsewhere.example", "b@elsewhere.example"] {
        let r = tls_cmd(&mut tls, &format!("RCPT TO:<{to}>")).await;
        assert!(r.starts_with("250"), "{r}");
    }
    tls_cmd(&mut tls, "RSET").await;
    assert!(
        tls_cmd(&mut tls, "MAIL FROM:<alice@served.example>")
            .await
            .starts_with("250")
    );
    assert!(
        tls_cmd(&mut tls, "RCPT TO:<c@elsewhere.example>")
            .await
            .starts_with("250")
    );
    let r = tls_cmd(&mut tls, "RCPT TO:<d@elsewhere.example>").await;
    assert!(
        r.starts_with("450 4.7.1 <alice>: account sending limit exceeded (3 recipients per hour)"),
        "{r}"
    );
    tls_cmd(&mut tls, "RSET").await;
    let r = tls_cmd(&mut tls, "MAIL FROM:<alice@served.example>").await;
    assert!(
        r.starts_with("450 4.7.1 <alice>: account sending limit exceeded (2 messages per hour)"),
        "{r}"
    );
    // The budget is the account's, across sessions; another account has its own.
    let (mut tls, _task, _dir) = logged_in(s.clone(), "alice", "correct horse").await;
    assert!(
        tls_cmd(&mut tls, "MAIL FROM:<alice@served.example>")
            .await
            .starts_with("450 4.7.1")
    );
    let (mut tls, _task, _dir) = logged_in(s, "bob@served.example", "bob password").await;
    assert!(
        tls_cmd(&mut tls, "MAIL FROM:<bob@served.example>")
            .await
            .starts_with("250")
    );
    // A refused sender does not use the budget: binding is checked first.
    let mut s = settings();
    s.account_limits = Some(crate::account_limits::AccountLimits {
        local: Arc::default(),
        ..limits
    });
    let (mut tls, _task, _dir) = logged_in(s, "alice", "correct horse").await;
    for _ in 0..3 {
        assert!(
            tls_cmd(&mut tls, "MAIL FROM:<ceo@served.example>")
                .await
                .starts_with("553")
        );
    }
    assert!(
        tls_cmd(&mut tls, "MAIL FROM:<alice@served.example>")
            .await
            .starts_with("250")
    );
    // Mail without AUTH is not counted against anyone.
    let mut s = settings();
    s.account_limits = Some(crate::account_limits::AccountLimits {
        local: Arc::default(),
        redis: None,
        messages_per_hour: 1,
        recipients_per_hour: 1,
    });
    let mut t = T::start(s, INSIDE, Listener::Smtp).await;
    t.cmd("EHLO c.example", 250).await;
    for _ in 0..3 {
        t.cmd("MAIL FROM:<x@served.example>", 250).await;
        t.cmd("RCPT TO:<a@elsewhere.example>", 250).await;
        t.cmd("RCPT TO:<b@elsewhere.example>", 250).await;
        t.cmd("RSET", 250).await;
    }
}
