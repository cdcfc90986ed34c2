//! mb-smtpd for real: independent clients (swaks, Python's smtplib), a raw socket for
//! BDAT, the relay battery, smuggling probes and connection limits, all on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use mb_testkit::{Gateway, free_port, text};

struct Smtp {
    gw: Gateway,
    port: u16,
    reinject: u16,
}

/// mb-rpcd and mb-smtpd serving `served.test`. Loopback is outside `smtp.mynetworks`
/// and the trusted networks, so the tests see what an internet client sees.
fn start(extra: &str) -> Smtp {
    start_protected("public", extra)
}

/// Like `start`, with a protection mode (the other tests open many connections from
/// loopback, so they run in public mode).
fn start_protected(mode: &str, extra: &str) -> Smtp {
    let (port, reinject) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {reinject}\n\
         [network.protection]\nmode = \"{mode}\"\ntrusted_networks = \"192.0.2.0/24\"\n\
         \"autoban.rate\" = \"3/minute\"\n\
         [smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\nmessage_size_limit = \"100K\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n{extra}"
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    Smtp { gw, port, reinject }
}

impl Smtp {
    /// The incoming messages in the spool, oldest first.
    fn spooled(&self) -> Vec<(Vec<u8>, mb_smtpd::spool::Envelope)> {
        crate::queued(&self.gw.path("spool"), "incoming")
    }

    fn swaks(&self, args: &[&str]) -> (i32, String) {
        let swaks = mb_testkit::require("swaks", "swaks");
        let port = self.port.to_string();
        let out = Command::new(swaks)
            .args([
                "--server",
                "127.0.0.1",
                "--port",
                &port,
                "--from",
                "alice@sender.test",
                "--helo",
                "client.test",
            ])
            .args(args)
            .output()
            .unwrap();
        let (code, stdout, stderr) = text(&out);
        (code, format!("{stdout}{stderr}"))
    }
}

/// A raw SMTP client.
pub(crate) struct Raw {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Raw {
    pub(crate) fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    pub(crate) fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    pub(crate) fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).unwrap();
    }

    /// Connects from a chosen loopback source address.
    pub(crate) fn from_source(source: &str, port: u16) -> Raw {
        let sock = connect_from(source, port);
        Raw {
            r: BufReader::new(sock.try_clone().unwrap()),
            w: sock,
        }
    }

    /// Like `send`, for a server that may vanish (the crash test).
    pub(crate) fn try_send(&mut self, s: &str) -> bool {
        self.w.write_all(s.as_bytes()).is_ok()
    }

    pub(crate) fn cmd(&mut self, s: &str) -> String {
        self.send(&format!("{s}\r\n"));
        self.reply()
    }

    pub(crate) fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(self.r.read(&mut buf), Ok(0))
    }
}

#[test]
fn independent_clients_deliver_into_the_spool() {
    let s = start("");
    // swaks, plain.
    let (code, out) = s.swaks(&[
        "--to",
        "bob@served.test",
        "--h-Subject",
        "plain",
        "--body",
        "hello",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    // swaks with pipelining.
    let (code, out) = s.swaks(&["--to", "bob@served.test,carol@served.test", "--pipeline"]);
    assert_eq!(code, 0, "{out}");
    // swaks over STARTTLS (self-signed certificate generated at first start).
    let (code, out) = s.swaks(&["--to", "bob@served.test", "--tls", "--h-Subject", "tls"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("220 2.0.0 Ready to start TLS"), "{out}");
    assert_eq!(s.spooled().len(), 3);
    let (msg, env) = s.spooled()[2].clone();
    let body = String::from_utf8_lossy(&msg);
    assert_eq!(env.protocol, "ESMTPS");
    assert!(body.contains("(using TLSv1."), "{body}");
    assert!(
        s.gw.smtpd_log().contains("self-signed certificate"),
        "no warning about the generated certificate"
    );

    // Too big: refused at the end of DATA, nothing spooled.
    let big = s.gw.path("big.txt");
    std::fs::write(
        &big,
        "x".repeat(76)
            .repeat(3000)
            .as_bytes()
            .chunks(76)
            .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
            .collect::<String>(),
    )
    .unwrap();
    let (code, out) = s.swaks(&["--to", "bob@served.test", "--body", big.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(out.contains("552 5.3.4"), "{}", &out[..out.len().min(2000)]);
    assert_eq!(s.spooled().len(), 3);

    // Python's smtplib: 8BITMIME body and an SMTPUTF8 address.
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port})
s.ehlo("py.test")
assert s.has_extn("8bitmime") and s.has_extn("smtputf8")
msg = "Subject: 8bit\r\n\r\nGrüße aus Köln\r\n".encode("utf-8")
s.sendmail("a@sender.test", ["bob@served.test"], msg, mail_options=["BODY=8BITMIME"])
s.sendmail("jörg@sender.test", ["grüße@served.test"], msg, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
try:
    s.sendmail("a@sender.test", ["victim@elsewhere.test"], b"Subject: relay\r\n\r\nx\r\n")
    raise SystemExit("relayed!")
except smtplib.SMTPRecipientsRefused as e:
    code = e.recipients["victim@elsewhere.test"][0]
    assert code == 554, code
s.quit()
print("ok")
"#,
        port = s.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let (code, stdout, stderr) = text(&out);
    assert_eq!((code, stdout.trim()), (0, "ok"), "{stderr}");
    assert_eq!(s.spooled().len(), 5);
    let (msg, env) = s.spooled()[4].clone();
    assert!(env.smtputf8 && env.recipients[0].address == "grüße@served.test");
    assert!(String::from_utf8_lossy(&msg).contains("Grüße aus Köln"));

    // BDAT from a raw socket.
    let mut c = Raw::connect(s.port);
    assert!(c.reply().starts_with("220 mx.served.test"));
    assert!(c.cmd("EHLO raw.test").contains("CHUNKING"));
    c.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@served.test>\r\nBDAT 18\r\nSubject: chunk\r\n\r\n");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250 2.0.0 18 octets"));
    c.send("BDAT 7 LAST\r\nhello\r\n");
    assert!(c.reply().contains("queued as"));
    assert!(c.cmd("QUIT").starts_with("221"));
    assert_eq!(s.spooled().len(), 6);

    // mb-status sees mb-smtpd and its counters.
    let (code, out, _) = text(&s.gw.tool("mb-status", &["--json"]));
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let smtpd = v["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mb-smtpd")
        .unwrap();
    assert_eq!(smtpd["state"], "running");
    assert_eq!(smtpd["counters"]["messages_accepted"], 6);
    assert!(
        smtpd["listening"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == &format!("smtp:127.0.0.1:{}", s.port))
    );
    // The message log in mb-rpcd has every accepted message and the refused relay attempt.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let query = |q: mb_proto::v1::EventQuery| {
        rt.block_on(async {
            let ch = mb_runtime::uds::connect(&s.gw.socket(), "mb-rpcd")
                .await
                .unwrap();
            mb_proto::v1::events_client::EventsClient::new(ch)
                .query(q)
                .await
                .unwrap()
                .into_inner()
                .events
        })
    };
    mb_testkit::wait_until("events in the message log", Duration::from_secs(20), || {
        query(mb_proto::v1::EventQuery::default()).len() >= 7
    })
    .unwrap();
    let (_, env) = s.spooled()[0].clone();
    let ev = query(mb_proto::v1::EventQuery {
        queue_id: env.id.clone(),
        ..Default::default()
    });
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (
            ev[0].stage.as_str(),
            ev[0].verdict.as_str(),
            ev[0].sender.as_str()
        ),
        ("received", "accept", "alice@sender.test")
    );
    assert_eq!(
        (ev[0].client_ip.as_str(), ev[0].helo.as_str()),
        ("127.0.0.1", "client.test")
    );
    let refused = query(mb_proto::v1::EventQuery {
        recipient: "victim@elsewhere.test".into(),
        ..Default::default()
    });
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].stage.as_str(), refused[0].detail.as_str()),
        ("rejected", "relay access denied")
    );
    // Postfix-style summary lines.
    assert!(
        s.gw.smtpd_log().contains(
            "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 bdat=2 quit=1 commands=6"
        ),
        "{}",
        s.gw.smtpd_log()
    );
}

#[test]
fn relay_battery_is_refused_from_outside() {
    let s = start("");
    // At least twenty relay tricks; each must be refused, never accepted.
    let tricks = [
        "<victim@elsewhere.test>",
        "<@served.test:victim@elsewhere.test>",
        "<@served.test,@other.test:victim@elsewhere.test>",
        "<victim%elsewhere.test@served.test>",
        "<victim!elsewhere.test@served.test>",
        "<elsewhere.test!victim@served.test>",
        "<\"victim@elsewhere.test\"@served.test>",
        "<\"victim%elsewhere.test\"@served.test>",
        "<\"elsewhere.test!victim\"@served.test>",
        "<victim@elsewhere.test@served.test>",
        "<victim@served.test@elsewhere.test>",
        "<victim@served.test.>",
        "<victim@elsewhere.test.>",
        "<victim@[127.0.0.1]>",
        "<victim@[IPv6:::1]>",
        "<victim@served.test.elsewhere.test>",
        "<victim@SERVED.TEST.elsewhere.test>",
        "<victim@elsewhere.test\\@served.test>",
        "<victim@sub.served.test>",
        "<victim@served..test>",
        "victim@elsewhere.test",
        "<victim@elsewhere.test> NOTIFY=NEVER ORCPT=rfc822;x@served.test",
        "<victim(served.test)@elsewhere.test>",
        "<victim@elsewhere.test%served.test>",
    ];
    assert!(tricks.len() >= 20);
    for t in tricks {
        let mut c = Raw::connect(s.port);
        c.reply();
        c.cmd("EHLO outside.test");
        assert!(c.cmd("MAIL FROM:<spammer@outside.test>").starts_with("250"));
        let r = c.cmd(&format!("RCPT TO:{t}"));
        assert!(r.starts_with('5'), "{t} was not refused: {r}");
        assert!(
            c.cmd("DATA").starts_with('5'),
            "{t}: DATA accepted after a refused recipient"
        );
    }
    let mut c = Raw::connect(s.port);
    c.reply();
    c.cmd("EHLO outside.test");
    c.cmd("MAIL FROM:<spammer@outside.test>");
    // Mail for the served domain is taken, in any case.
    assert!(
        c.cmd("RCPT TO:<Bob@Served.TEST>").starts_with("250"),
        "served domain refused"
    );
    assert!(c.cmd("RCPT TO:<Postmaster>").starts_with("250"));
    c.cmd("QUIT");
    assert!(s.spooled().is_empty());

    // The reinjection port serves local clients as trusted (a content filter hands back mail).
    let mut c = Raw::connect(s.reinject);
    c.reply();
    c.cmd("EHLO filter.local");
    c.cmd("MAIL FROM:<a@served.test>");
    assert!(c.cmd("RCPT TO:<someone@elsewhere.test>").starts_with("250"));
}

#[test]
fn smuggling_over_tcp_never_makes_a_second_message() {
    let s = start("");
    for probe in ["\n.\n", "\r.\r", "\r\n.\n", "\n.\r\n"] {
        let mut c = Raw::connect(s.port);
        c.reply();
        c.cmd("EHLO smuggler.test");
        c.cmd("MAIL FROM:<a@sender.test>");
        c.cmd("RCPT TO:<bob@served.test>");
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(&format!(
            "Subject: one\r\n\r\nx{probe}MAIL FROM:<evil@sender.test>\r\nRCPT TO:<bob@served.test>\r\nDATA\r\nSubject: two\r\n\r\ny\r\n.\r\n"
        ));
        let r = c.reply();
        assert!(r.starts_with("521 5.5.2"), "{probe:?}: {r}");
        assert!(c.closed(), "{probe:?}: connection left open");
    }
    assert!(s.spooled().is_empty(), "a smuggled message was spooled");
    let (_, out, _) = text(&s.gw.tool("mb-status", &["--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let smtpd = v["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mb-smtpd")
        .unwrap();
    assert_eq!(smtpd["counters"]["ended_smuggling"], 4, "{smtpd}");
}

#[test]
fn per_source_limit_refuses_the_eleventh_connection_only_for_that_address() {
    let s = start("");
    let mut open: Vec<Raw> = (0..10).map(|_| Raw::connect(s.port)).collect();
    for c in &mut open {
        assert!(c.reply().starts_with("220"));
    }
    let mut eleventh = Raw::connect(s.port);
    let r = eleventh.reply();
    assert!(r.starts_with("421 4.7.0"), "{r}");
    assert!(eleventh.closed());
    // Another address still gets in.
    let mut other = Raw::from_source("127.0.0.2", s.port);
    assert!(other.reply().starts_with("220"), "127.0.0.2 was refused");
    // When one closes, the address may connect again.
    drop(open.pop());
    mb_testkit::wait_until("a free slot", Duration::from_secs(10), || {
        let mut c = Raw::connect(s.port);
        c.reply().starts_with("220")
    })
    .unwrap();
}

/// A TCP connection from a chosen loopback source address.
fn connect_from(source: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// 20 lines of 80 characters.
fn payload() -> String {
    format!("{}\r\n", "payload ".repeat(10)).repeat(20)
}

/// Sends messages until told to stop; returns (token, queue id) for each 250.
fn sender_loop(
    port: u16,
    worker: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(String, String)> {
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        if !c.reply().starts_with("220") {
            continue;
        }
        c.cmd("EHLO load.test");
        for _ in 0..5 {
            n += 1;
            let token = format!("w{worker}-m{n}");
            let body = format!("Subject: {token}\r\nX-Token: {token}\r\n\r\n{}", payload());
            if !c.try_send("MAIL FROM:<load@sender.test>\r\nRCPT TO:<bob@served.test>\r\nDATA\r\n")
            {
                break;
            }
            if !(c.reply().starts_with("250")
                && c.reply().starts_with("250")
                && c.reply().starts_with("354"))
            {
                break;
            }
            if !c.try_send(&format!("{body}.\r\n")) {
                break;
            }
            let r = c.reply();
            if let Some(id) = r.strip_prefix("250 2.0.0 Ok: queued as ") {
                acked.push((token, id.trim().to_string()));
            } else {
                break;
            }
        }
    }
    acked
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    let mut s = start("");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = s.port;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            std::thread::spawn(move || sender_loop(port, w, &stop))
        })
        .collect();
    // Kill mb-smtpd at varied moments, four times, restarting it each time.
    for round in 0..4u64 {
        std::thread::sleep(Duration::from_millis(300 + 170 * round));
        let mut smtpd = s.gw.smtpd.take().unwrap();
        smtpd.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = smtpd.child.wait();
        s.gw.start_smtpd().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<(String, String)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acked.len() >= 20,
        "only {} messages were acknowledged",
        acked.len()
    );

    // Every acknowledged message is in the spool, once, whole, under its queue id.
    let mut tokens = std::collections::HashMap::new();
    for (msg, env) in s.spooled() {
        let text = String::from_utf8_lossy(&msg).into_owned();
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Token: "))
            .unwrap()
            .to_string();
        assert!(text.ends_with(&payload()), "{} is cut short", env.id);
        assert!(
            tokens.insert(token.clone(), env.id.clone()).is_none(),
            "{token} spooled twice"
        );
    }
    for (token, id) in &acked {
        assert_eq!(
            tokens.get(token),
            Some(id),
            "acknowledged {token} ({id}) is missing from the spool"
        );
    }
    eprintln!(
        "kill -9 x4: {} acknowledged, {} spooled (the rest were cut before their 250)",
        acked.len(),
        tokens.len()
    );
    let log = s.gw.smtpd_log();
    assert_eq!(log.matches("mb-smtpd started").count(), 5, "{log}");
}

pub(crate) fn mb_user(gw: &Gateway, args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::process::Stdio;
    let mut child = Command::new(mb_testkit::bin("mb-user"))
        .arg("--config")
        .arg(&gw.config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    text(&child.wait_with_output().unwrap())
}

#[test]
fn submission_with_auth_over_tls_relays_and_failures_feed_fail2ban() {
    let sub = free_port();
    let s = start(&format!(
        "[network.submission]\nenabled = true\nport = {sub}\n"
    ));
    // Accounts through mb-user, hashed by mb-rpcd.
    assert_eq!(
        mb_user(
            &s.gw,
            &["add", "alice@served.test"],
            "correct horse battery\n"
        )
        .0,
        0
    );
    let (code, _, err) = mb_user(&s.gw, &["add", "alice@served.test"], "another password\n");
    assert_eq!(code, 1);
    assert!(err.contains("exists"), "{err}");
    let (code, _, err) = mb_user(&s.gw, &["add", "bob"], "short\n");
    assert_eq!(code, 1);
    assert!(err.contains("at least 10 characters"), "{err}");
    let (code, out, _) = mb_user(&s.gw, &["list", "--json"], "");
    assert_eq!(code, 0);
    assert!(out.contains("\"name\": \"alice@served.test\""), "{out}");
    assert!(
        !s.gw.log().contains("correct horse"),
        "a password reached the log"
    );

    let swaks = mb_testkit::require("swaks", "swaks");
    let port = sub.to_string();
    let send = |user: &str, password: &str| {
        let out = Command::new(&swaks)
            .args([
                "--server",
                "127.0.0.1",
                "--port",
                &port,
                "--from",
                "alice@served.test",
                "--to",
                "friend@elsewhere.test",
            ])
            .args([
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                user,
                "--auth-password",
                password,
            ])
            .output()
            .unwrap();
        let (code, o, e) = text(&out);
        (code, format!("{o}{e}"))
    };
    let (code, out) = send("alice@served.test", "correct horse battery");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("235 2.7.0") && out.contains("queued as"),
        "{out}"
    );
    let (code, out) = send("alice@served.test", "wrong password");
    assert_ne!(code, 0);
    assert!(out.contains("535 5.7.8"), "{out}");
    let (_, out) = send("mallory", "guess-guess-guess");
    assert!(out.contains("535 5.7.8"), "{out}");
    // Without AUTH the submission port refuses mail.
    let out = Command::new(&swaks)
        .args([
            "--server",
            "127.0.0.1",
            "--port",
            &port,
            "--from",
            "a@served.test",
            "--to",
            "friend@elsewhere.test",
            "--tls",
        ])
        .output()
        .unwrap();
    let (_, o, e) = text(&out);
    assert!(
        format!("{o}{e}").contains("530 5.7.0 Authentication required"),
        "{o}{e}"
    );
    let (msg, env) = s.spooled()[0].clone();
    assert_eq!(
        (env.auth_user.as_str(), env.protocol.as_str()),
        ("alice@served.test", "ESMTPSA")
    );
    assert!(String::from_utf8_lossy(&msg).contains("with ESMTPSA id"));

    // Both failures are one line each that the shipped fail2ban filter matches.
    let fail2ban = mb_testkit::require("fail2ban-regex", "fail2ban");
    let filter = mb_testkit::source_root().join("etc/fail2ban/filter.d/mailborder-auth.conf");
    let out = Command::new(fail2ban)
        .arg(s.gw.path("smtpd.log"))
        .arg(&filter)
        .output()
        .unwrap();
    let (_, out, _) = text(&out);
    let matched = out
        .lines()
        .find(|l| l.starts_with("Lines:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        matched.contains(", 2 matched,"),
        "{matched}\n{}",
        s.gw.smtpd_log()
    );
    assert!(
        s.gw.smtpd_log()
            .contains("authentication failed client=127.0.0.1 user=mallory service=mb-smtpd")
    );
    assert!(!s.gw.smtpd_log().contains("wrong password"));

    // Changing and removing accounts.
    assert_eq!(
        mb_user(
            &s.gw,
            &["passwd", "alice@served.test"],
            "a new long password\n"
        )
        .0,
        0
    );
    let (code, _) = send("alice@served.test", "a new long password");
    assert_eq!(code, 0);
    assert_eq!(mb_user(&s.gw, &["del", "alice@served.test"], "").0, 0);
    let (code, _, err) = mb_user(&s.gw, &["del", "alice@served.test"], "");
    assert_eq!(code, 1, "{err}");
}

fn mb_ban(gw: &Gateway, args: &[&str]) -> (i32, String, String) {
    text(&gw.tool("mb-ban", args))
}

fn greeting(port: u16) -> String {
    let mut c = Raw::connect(port);
    c.reply()
}

#[test]
fn autoban_bans_fast_sources_and_mb_ban_lifts_it() {
    let sub = free_port();
    let s = start_protected(
        "autoban",
        &format!("[network.submission]\nenabled = true\nport = {sub}\nrequire_tls = false\n"),
    );
    // Port 25 is the MX: connections within the per-client limits never count (a busy
    // MTA opens many a minute).
    for _ in 0..10 {
        assert!(greeting(s.port).starts_with("220"));
    }
    // On the submission port every connection counts: the fourth in a minute is banned,
    // from every port.
    for _ in 0..3 {
        assert!(greeting(sub).starts_with("220"));
    }
    let r = greeting(sub);
    assert!(
        r.starts_with("421 4.7.0") && r.contains("127.0.0.1 is banned"),
        "{r}"
    );
    assert!(greeting(s.port).contains("banned"), "the ban did not hold");
    // Another address is not affected.
    let mut other = Raw::from_source("127.0.0.2", s.port);
    assert!(other.reply().starts_with("220"));
    // The ban is stored in mb-rpcd and listed.
    mb_testkit::wait_until("the ban to be stored", Duration::from_secs(20), || {
        mb_ban(&s.gw, &["list"]).1.contains("127.0.0.1")
    })
    .unwrap();
    let (code, out, _) = mb_ban(&s.gw, &["list", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v[0]["ip"].as_str(),
            v[0]["kind"].as_str(),
            v[0]["added_by"].as_str()
        ),
        (Some("127.0.0.1"), Some("ban"), Some("mb-smtpd"))
    );
    assert!(v[0]["seconds_left"].as_u64().unwrap() > 3500);
    // Bans survive a restart of mb-smtpd.
    let mut s = s;
    let mut smtpd = s.gw.smtpd.take().unwrap();
    assert_eq!(smtpd.stop(Duration::from_secs(20)), Some(0));
    s.gw.start_smtpd().unwrap();
    mb_testkit::wait_until(
        "the stored ban to be loaded",
        Duration::from_secs(20),
        || greeting(s.port).contains("banned"),
    )
    .unwrap();
    assert_eq!(
        s.gw.smtpd_log().matches("too many connections").count(),
        1,
        "banned anew instead of from the store"
    );
    // An administrator bans 127.0.0.3 and lifts the ban of 127.0.0.1; once the unban is
    // seen, the manual ban is in force too (127.0.0.3 never connected, so it is not autoban).
    assert_eq!(
        mb_ban(
            &s.gw,
            &["add", "127.0.0.3", "--for", "10m", "--reason", "spam run"]
        )
        .0,
        0
    );
    let (code, out, _) = mb_ban(&s.gw, &["del", "127.0.0.1"]);
    assert_eq!(code, 0, "{out}");
    mb_testkit::wait_until(
        "the unban to reach mb-smtpd",
        Duration::from_secs(20),
        || greeting(s.port).starts_with("220"),
    )
    .unwrap();
    let mut c = Raw::from_source("127.0.0.3", s.port);
    let r = c.reply();
    assert!(r.contains("127.0.0.3 is banned"), "{r}");
    let (code, _, err) = mb_ban(&s.gw, &["del", "127.0.0.1"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = mb_ban(&s.gw, &["add", "not-an-ip"]);
    assert_eq!(code, 1);
    assert!(err.contains("not an IP address"), "{err}");
}

#[test]
fn protected_mode_opens_submission_to_trusted_addresses_only() {
    let sub = free_port();
    let s = start_protected(
        "protected",
        &format!("[network.submission]\nenabled = true\nport = {sub}\nrequire_tls = false\n"),
    );
    let r = greeting(sub);
    assert!(
        r.starts_with("554 5.7.1") && r.contains("only open to trusted networks"),
        "{r}"
    );
    assert!(
        greeting(s.port).starts_with("220"),
        "port 25 must stay open"
    );
    assert_eq!(mb_ban(&s.gw, &["trust", "127.0.0.1", "--for", "1h"]).0, 0);
    mb_testkit::wait_until(
        "the trust to reach mb-smtpd",
        Duration::from_secs(20),
        || greeting(sub).starts_with("220"),
    )
    .unwrap();
    assert_eq!(mb_ban(&s.gw, &["untrust", "127.0.0.1"]).0, 0);
    mb_testkit::wait_until(
        "the untrust to reach mb-smtpd",
        Duration::from_secs(20),
        || greeting(sub).starts_with("554"),
    )
    .unwrap();
}

#[test]
fn with_redis_a_ban_by_one_process_holds_for_another() {
    let redis = mb_testkit::Redis::start().unwrap();
    let extra = format!("[redis]\nurl = \"{}\"\n", redis.url());
    let (sub_a, sub_b) = (free_port(), free_port());
    let submission = |port| {
        format!("[network.submission]\nenabled = true\nport = {port}\nrequire_tls = false\n")
    };
    let a = start_protected("autoban", &format!("{extra}{}", submission(sub_a)));
    let b = start_protected("autoban", &format!("{extra}{}", submission(sub_b)));
    assert!(
        a.gw.smtpd_log()
            .contains("sharing rate counters and bans through Redis"),
        "{}",
        a.gw.smtpd_log()
    );
    // Two submission connections to each: four in all from one source, over a shared
    // limit of three.
    assert!(greeting(sub_a).starts_with("220"));
    assert!(greeting(sub_b).starts_with("220"));
    assert!(greeting(sub_a).starts_with("220"));
    let r = greeting(sub_b);
    assert!(
        r.contains("127.0.0.1 is banned"),
        "the shared count did not ban: {r}"
    );
    // The ban made on B holds on A at once.
    let r = greeting(a.port);
    assert!(
        r.contains("127.0.0.1 is banned"),
        "A did not see B's ban: {r}"
    );
    // Without Redis the processes would not know of each other: a fresh address on A alone
    // is fine.
    let mut c = Raw::from_source("127.0.0.2", a.port);
    assert!(c.reply().starts_with("220"));
    // Redis going away does not stop mail: counting falls back to each process.
    drop(redis);
    let mut c = Raw::from_source("127.0.0.4", b.port);
    assert!(c.reply().starts_with("220"), "Redis down stopped mail");
}

#[test]
fn certificates_reload_on_sighup_and_the_cipher_policy_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("smtp.crt"), dir.path().join("smtp.key"));
    let (c1, k1) = mb_testkit::self_signed_named("first.served.test");
    std::fs::write(&cert, c1).unwrap();
    std::fs::write(&key, k1).unwrap();
    let s = start(&format!(
        "[network.smtp.tls]\ncert = \"{}\"\nkey = \"{}\"\n[network.tls]\nversions = \"1.2\"\nciphers = \"ECDHE-ECDSA-AES128-GCM-SHA256\"\n",
        cert.display(),
        key.display()
    ));
    let (code, out) = s.swaks(&["--to", "bob@served.test", "--tls"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("CN=first.served.test"), "{out}");
    let (msg, _) = s.spooled()[0].clone();
    let body = String::from_utf8_lossy(&msg);
    assert!(
        body.contains("(using TLSv1.2 with cipher TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)"),
        "{body}"
    );

    let (c2, k2) = mb_testkit::self_signed_named("second.served.test");
    std::fs::write(&cert, c2).unwrap();
    std::fs::write(&key, k2).unwrap();
    s.gw.smtpd
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGHUP);
    mb_testkit::wait_until("the new certificate", Duration::from_secs(20), || {
        s.swaks(&["--to", "bob@served.test", "--tls", "--quit-after", "TLS"])
            .1
            .contains("CN=second.served.test")
    })
    .unwrap();
    // A broken certificate on reload is refused; the running one stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    s.gw.smtpd
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGHUP);
    mb_testkit::wait_until(
        "the failed reload to be logged",
        Duration::from_secs(20),
        || {
            s.gw.smtpd_log()
                .contains("reload failed, keeping the running configuration")
        },
    )
    .unwrap();
    let (code, out) = s.swaks(&["--to", "bob@served.test", "--tls"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("CN=second.served.test"), "{out}");
}

#[test]
fn started_as_root_it_binds_then_runs_as_the_mailborder_user() {
    mb_testkit::ensure_mailborder_account();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n[network.reinject]\nport = {}\n\
         [network.protection]\nmode = \"public\"\n[smtp]\ndomains = \"served.test\"\n[filter]\nenabled = false\n",
        free_port()
    ));
    let text_cfg = std::fs::read_to_string(&gw.config).unwrap().replacen(
        "process.user = \"\"",
        "process.user = \"mailborder\"",
        1,
    );
    std::fs::write(&gw.config, text_cfg).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(gw.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let pid = gw.smtpd.as_ref().unwrap().pid();
    let uid = nix::unistd::User::from_name("mailborder")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(
        uids.split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "{uids}"
    );
    assert!(
        gw.smtpd_log()
            .contains("switched to an unprivileged user user=mailborder"),
        "{}",
        gw.smtpd_log()
    );
    // It still writes its spool.
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO c.test");
    c.cmd("MAIL FROM:<a@sender.test>");
    c.cmd("RCPT TO:<bob@served.test>");
    c.cmd("DATA");
    let r = c.cmd("Subject: x\r\n\r\nunprivileged\r\n.");
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    use std::os::unix::fs::MetadataExt;
    let segments: Vec<std::fs::Metadata> = std::fs::read_dir(gw.path("spool/segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .collect();
    assert!(!segments.is_empty());
    assert!(segments.iter().all(|m| m.uid() == uid));
    // In the spool, incoming or already deferred (served.test has no next hop: the first
    // attempt may have run by now).
    assert_eq!(
        mb_smtpd::spool::snapshot(&gw.path("spool")).unwrap().len(),
        1
    );
    let mut smtpd = gw.smtpd.take().unwrap();
    assert_eq!(smtpd.stop(Duration::from_secs(20)), Some(0));
    assert!(!gw.path("run/mb-smtpd.sock").exists(), "socket left behind");
}

#[test]
fn smtps_speaks_tls_from_the_first_byte_and_offers_auth() {
    let smtps = free_port();
    let s = start(&format!(
        "[network.smtps]\nenabled = true\nport = {smtps}\n"
    ));
    let swaks = mb_testkit::require("swaks", "swaks");
    let out = Command::new(&swaks)
        .args([
            "--server",
            "127.0.0.1",
            "--port",
            &smtps.to_string(),
            "--tls-on-connect",
            "--quit-after",
            "EHLO",
        ])
        .output()
        .unwrap();
    let (code, o, e) = text(&out);
    assert_eq!(code, 0, "{o}{e}");
    assert!(
        o.contains("TLS started") && o.contains("220 mx.served.test ESMTP"),
        "{o}"
    );
    assert!(
        o.contains("AUTH PLAIN LOGIN") && !o.contains("STARTTLS"),
        "{o}"
    );
    // Plaintext on the SMTPS port gets no greeting.
    let mut c = Raw::connect(smtps);
    c.send("EHLO plain.test\r\n");
    assert!(!c.reply().starts_with("220"));
    // And port 25 is unaffected.
    assert!(greeting(s.port).starts_with("220"));
}

#[test]
fn max_connections_is_a_limit_for_everyone() {
    let (port, reinject) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nmax_connections = 2\n[network.reinject]\nport = {reinject}\n\
         [network.protection]\nmode = \"public\"\n[smtp]\ndomains = \"served.test\"\n[filter]\nenabled = false\n"
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let mut a = Raw::connect(port);
    let mut b = Raw::connect(port);
    assert!(a.reply().starts_with("220") && b.reply().starts_with("220"));
    let mut c = Raw::from_source("127.0.0.5", port);
    let r = c.reply();
    assert!(
        r.starts_with("421 4.7.0") && r.contains("too many connections"),
        "{r}"
    );
    a.cmd("QUIT");
    mb_testkit::wait_until("a free slot", Duration::from_secs(10), || {
        greeting(port).starts_with("220")
    })
    .unwrap();
}

fn send_one(port: u16, subject: &str) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO q.test");
    c.cmd("MAIL FROM:<alice@sender.test>");
    c.cmd("RCPT TO:<bob@served.test>");
    c.cmd("DATA");
    let r = c.cmd(&format!("Subject: {subject}\r\n\r\nbody\r\n."));
    r.trim()
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

#[test]
fn mb_queue_lists_shows_holds_releases_and_deletes() {
    let s = start("");
    let ids: Vec<String> = (0..3)
        .map(|i| send_one(s.port, &format!("queued {i}")))
        .collect();
    let q = |args: &[&str]| text(&s.gw.tool("mb-queue", args));
    let (code, out, err) = q(&["--json", "list"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[0]["id"], ids[0].as_str());
    assert_eq!(
        (v[0]["sender"].as_str(), v[0]["queue"].as_str()),
        (Some("alice@sender.test"), Some("incoming"))
    );
    assert_eq!(v[0]["recipients"][0]["address"], "bob@served.test");
    assert_eq!(v[0]["recipients"][0]["state"], "queued");

    let (code, out, _) = q(&["hold", &ids[1]]);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = q(&["--json", "list", "--queue", "hold"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert!(
        crate::queued_ids(&s.gw.path("spool"), "hold").contains(&ids[1]),
        "{} is not on hold",
        ids[1]
    );
    let (_, out, _) = text(&s.gw.tool("mb-status", &["--json"]));
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let smtpd = st["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mb-smtpd")
        .unwrap();
    assert_eq!(
        (
            smtpd["counters"]["queue_incoming"].as_u64(),
            smtpd["counters"]["queue_hold"].as_u64()
        ),
        (Some(2), Some(1))
    );

    let (code, out, _) = q(&["show", &ids[1]]);
    assert_eq!(code, 0);
    assert!(
        out.contains("queue: hold")
            && out.contains("Subject: queued 1")
            && out.contains("helo=q.test"),
        "{out}"
    );
    let (code, _, err) = q(&["release", &ids[0]]);
    assert_eq!(code, 1);
    assert!(err.contains("is not on hold"), "{err}");
    // Change commands print one JSON object with --json.
    let (code, out, _) = q(&["--json", "release", &ids[1]]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], ids[1].as_str(), "{v}");
    assert!(
        crate::queued_ids(&s.gw.path("spool"), "incoming").contains(&ids[1]),
        "{} is not incoming",
        ids[1]
    );

    let (code, _, err) = q(&["show", "../../etc/passwd"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = q(&["show", "ABCDEF"]);
    assert_eq!(code, 1);
    let (code, out, _) = q(&["--json", "delete", &ids[2]]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deleted"], 1, "{v}");
    let (code, out, _) = q(&["delete", "--all"]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted 2 message(s)"), "{out}");
    let (_, out, _) = q(&["list"]);
    assert_eq!(out.trim(), "Mail queue is empty");
    let (code, _, _) = q(&["delete"]);
    assert_eq!(code, 2);
}
