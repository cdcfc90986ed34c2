//! Recipient verification (issue 14, item 2), attacked from loopback addresses: list
//! mode with mb-recipient and a real mb-rpcd + mb-smtpd (unknown users 550 5.1.1, a
//! dictionary attack ended by the error limit while another address delivers, no
//! bounce), and callout mode against a scripted next hop that counts its connections
//! (positive and negative caches, in memory and through Redis; 450 4.1.1 when the next
//! hop cannot answer).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mb_testkit::{Gateway, Redis, free_port, text, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What the scripted next hop saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    messages: AtomicUsize,
    rcpts: std::sync::Mutex<Vec<String>>,
}

/// A tiny SMTP server on 127.0.0.1: refuses local parts starting with `nobody` or
/// `guess` with 550 5.1.1, those starting with `busy` with 450, accepts the rest and
/// any message. Counts connections.
async fn next_hop() -> (u16, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 hop.test ESMTP\r\n").await;
                let mut line = String::new();
                loop {
                    line.clear();
                    if !matches!(r.read_line(&mut line).await, Ok(n) if n > 0) {
                        return;
                    }
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
                        b"250-hop.test\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("RCPT") {
                        let addr = line
                            .split_once('<')
                            .and_then(|(_, r)| r.split_once('>'))
                            .map(|(a, _)| a.to_lowercase())
                            .unwrap_or_default();
                        s.rcpts.lock().unwrap().push(addr.clone());
                        if addr.starts_with("nobody") || addr.starts_with("guess") {
                            b"550 5.1.1 <addr>: Recipient address rejected: User unknown in local recipient table\r\n"
                        } else if addr.starts_with("busy") {
                            b"450 4.2.0 try later\r\n"
                        } else {
                            b"250 2.1.5 Ok\r\n"
                        }
                    } else if upper.starts_with("DATA") {
                        let _ = w.write_all(b"354 go\r\n").await;
                        loop {
                            line.clear();
                            if !matches!(r.read_line(&mut line).await, Ok(n) if n > 0) {
                                return;
                            }
                            if line == ".\r\n" {
                                break;
                            }
                        }
                        s.messages.fetch_add(1, Ordering::SeqCst);
                        b"250 2.0.0 queued\r\n"
                    } else if upper.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 2.0.0 Ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// An SMTP client connected from `source`.
struct Smtp {
    r: BufReader<TcpStream>,
}

impl Smtp {
    async fn open(source: &str, port: u16) -> Smtp {
        match Smtp::try_open(source, port).await {
            Ok(s) => s,
            Err(greeting) => panic!("{source}: {greeting}"),
        }
    }

    /// A session, or the greeting that refused it.
    async fn try_open(source: &str, port: u16) -> Result<Smtp, String> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let mut s = Smtp {
            r: BufReader::new(stream),
        };
        let greeting = s.reply().await;
        if greeting.starts_with("220") {
            Ok(s)
        } else {
            Err(greeting)
        }
    }

    /// The whole reply (its last line); "" when the connection closed.
    async fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.r.read_line(&mut line))
                .await
                .expect("a reply within 30s")
                .unwrap_or(0);
            if n == 0 {
                return String::new();
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line.trim_end().to_string();
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        if self
            .r
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .is_err()
        {
            return String::new();
        }
        self.reply().await
    }

    /// EHLO and MAIL FROM, both accepted.
    async fn begin(&mut self, from: &str) {
        let r = self.cmd("EHLO client.test").await;
        assert!(r.starts_with("250"), "{r}");
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert!(r.starts_with("250"), "{r}");
    }

    /// DATA with a small message; returns the final reply.
    async fn data(&mut self, subject: &str) -> String {
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354"), "{r}");
        self.cmd(&format!(
            "From: <s@sender.test>\r\nSubject: {subject}\r\n\r\nhello\r\n."
        ))
        .await
    }
}

/// A gateway on `port` serving `domains`, every loopback address an internet client
/// (neither in mynetworks nor trusted) held to 5 new connections a second, never banned.
fn gateway(port: u16, domains: &str, smtp: &str, extra: &str) -> Gateway {
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 5\n\
         [network.protection]\nmode = \"public\"\ntrusted_networks = \"192.0.2.0/24\"\n\
         [network.reinject]\nport = {}\n\
         [smtp]\nhostname = \"mx.served.test\"\ndomains = \"{domains}\"\nmynetworks = \"192.0.2.0/24\"\n{smtp}\n\
         [filter]\nenabled = false\n{extra}",
        free_port()
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    gw
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn list_mode_refuses_unknown_users_ends_a_dictionary_attack_and_bounces_nothing() {
    let rt = runtime();
    let (hop_port, hop) = rt.block_on(next_hop());
    let port = free_port();
    let gw = gateway(
        port,
        "served.test,catch.test,open.test",
        "recipient_verification = \"list\"",
        &format!("[relay]\nhost = \"[127.0.0.1]\"\nport = {hop_port}\ntls = \"none\"\n"),
    );
    let tool = |args: &[&str]| text(&gw.tool("mb-recipient", args));

    // Import a file in Postfix's relay_recipients format, then add and check by hand.
    let file = gw.path("recipients.txt");
    std::fs::write(
        &file,
        "# served.test users\nalice@served.test OK\nsales-*@served.test OK\n@catch.test OK\n\nnot-an-address\n",
    )
    .unwrap();
    let (code, out, err) = tool(&["--json", "import", file.to_str().unwrap()]);
    assert_eq!(code, 1, "one line is invalid: {out}{err}");
    let v = json(out.trim());
    assert_eq!(v["added"], 3, "{out}");
    assert_eq!(v["invalid"].as_array().unwrap().len(), 1, "{out}");
    assert!(err.contains("not-an-address"), "{err}");
    let (code, out, err) = tool(&["--json", "add", "Bob@Served.test"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(out.trim())["added"], 1, "{out}");
    let (code, out, err) = tool(&["--json", "list"]);
    assert_eq!(code, 0, "{err}");
    let patterns: Vec<String> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pattern"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        patterns,
        [
            "*@catch.test",
            "alice@served.test",
            "bob@served.test",
            "sales-*@served.test"
        ]
    );
    let (code, out, _) = tool(&["--json", "check", "bob+news@served.test"]);
    assert_eq!(code, 0);
    let v = json(out.trim());
    assert_eq!(
        (
            v["result"].as_str(),
            v["pattern"].as_str(),
            v["looked_up"].as_str()
        ),
        (
            Some("known"),
            Some("bob@served.test"),
            Some("bob@served.test")
        )
    );
    let (code, out, _) = tool(&["--json", "check", "nobody@served.test"]);
    assert_eq!(code, 1, "an unknown address exits 1: {out}");
    assert_eq!(json(out.trim())["result"], "unknown");
    let (code, out, _) = tool(&["--json", "check", "anyone@open.test"]);
    assert_eq!(code, 0);
    assert_eq!(json(out.trim())["result"], "unlisted");

    rt.block_on(async {
        // mb-smtpd reads the list within a few seconds.
        let mut last = String::new();
        for _ in 0..60 {
            let mut probe = Smtp::open("127.0.0.4", port).await;
            probe.begin("s@sender.test").await;
            last = probe.cmd("RCPT TO:<nobody@served.test>").await;
            probe.cmd("QUIT").await;
            if last.starts_with("550") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            last,
            "550 5.1.1 <nobody@served.test>: Recipient address rejected: User unknown"
        );

        // An honest client: known users, a wildcard, a catch-all, an extension, a
        // domain with no entries, postmaster.
        let mut c = Smtp::open("127.0.0.3", port).await;
        c.begin("s@sender.test").await;
        for (rcpt, want) in [
            ("alice@served.test", "250"),
            ("bob+news@served.test", "250"),
            ("BOB@served.test", "250"),
            ("sales-eu@served.test", "250"),
            ("anyone@catch.test", "250"),
            ("whoever@open.test", "250"),
            ("postmaster@served.test", "250"),
            ("carol@served.test", "550 5.1.1"),
            ("sales@served.test", "550 5.1.1"),
        ] {
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert!(r.starts_with(want), "{rcpt}: {r}");
        }
        let r = c.data("first").await;
        assert!(r.starts_with("250"), "{r}");
        c.cmd("QUIT").await;

        // A dictionary attack from 127.0.0.2 (300 guesses, reconnecting whenever it is
        // cut off) while 127.0.0.3 keeps delivering.
        let attack = tokio::spawn(async move {
            let (mut rcpts, mut refused, mut cut_off) = (0, 0, 0);
            while rcpts < 300 {
                // Its own connection rate holds it back too; it retries at once.
                let mut a = match Smtp::try_open("127.0.0.2", port).await {
                    Ok(a) => a,
                    Err(greeting) => {
                        assert!(greeting.starts_with("421"), "{greeting}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                a.begin("s@sender.test").await;
                loop {
                    let r = a.cmd(&format!("RCPT TO:<guess{rcpts}@served.test>")).await;
                    rcpts += 1;
                    if r.starts_with("550 5.1.1") {
                        refused += 1;
                    } else if r.starts_with("421") {
                        cut_off += 1;
                        break;
                    } else {
                        panic!("guess {rcpts}: {r}");
                    }
                }
            }
            (rcpts, refused, cut_off)
        });
        let mut delivered = 0;
        while !attack.is_finished() || delivered < 5 {
            let mut c = Smtp::open("127.0.0.3", port).await;
            c.begin("s@sender.test").await;
            let r = c.cmd("RCPT TO:<alice@served.test>").await;
            assert!(r.starts_with("250"), "during the attack: {r}");
            let r = c.data(&format!("during {delivered}")).await;
            assert!(r.starts_with("250"), "during the attack: {r}");
            c.cmd("QUIT").await;
            delivered += 1;
            // An ordinary pace, within its own 5 connections a second.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (rcpts, refused, cut_off) = attack.await.unwrap();
        // smtp.max_errors = 10: nine 550s, then 421 on the tenth error.
        assert_eq!(cut_off, rcpts / 10, "{rcpts} {refused} {cut_off}");
        assert_eq!(refused, rcpts - cut_off);
        assert!(delivered >= 5);
        eprintln!(
            "dictionary attack: {rcpts} RCPTs, {refused} refused with 550, {cut_off} sessions ended with 421; {delivered} messages delivered from 127.0.0.3 meanwhile"
        );
        // Every accepted message reaches the next hop, and nothing bounces: no refused
        // recipient was ever taken (a bounce to the forged sender would stay queued,
        // its domain having no MX).
        wait_until("the queue to empty", Duration::from_secs(60), || {
            let (_, out, _) = text(&gw.tool("mb-queue", &["--json", "list"]));
            serde_json::from_str::<serde_json::Value>(&out)
                .ok()
                .and_then(|v| v.as_array().map(Vec::is_empty))
                .unwrap_or(false)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.smtpd_log()));
        assert_eq!(hop.messages.load(Ordering::SeqCst), 1 + delivered);
        let seen = hop.rcpts.lock().unwrap().clone();
        assert!(
            !seen.iter().any(|r| r.starts_with("guess") || r.starts_with("carol")),
            "{seen:?}"
        );
    });

    // The refusals are in the message log.
    let mut out = String::new();
    wait_until(
        "the refusals in the message log",
        Duration::from_secs(20),
        || {
            let (code, o, err) = text(&gw.tool(
                "mb-log",
                &["--json", "--since", "1h", "--stage", "rejected"],
            ));
            assert_eq!(code, 0, "{err}");
            out = o;
            out.contains("carol@served.test") && out.contains("guess299@served.test")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(out.contains("user unknown"), "{out}");

    // Removing the last pattern of a domain opens it again.
    let (code, _, err) = tool(&["del", "*@catch.test"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = tool(&["--json", "check", "x@catch.test"]);
    assert_eq!(
        (code, json(out.trim())["result"].clone()),
        (0, "unlisted".into())
    );
    // --replace makes the list exactly the file.
    std::fs::write(&file, "dave@served.test\n").unwrap();
    let (code, out, err) = tool(&["--json", "import", "--replace", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v = json(out.trim());
    assert_eq!(
        (v["added"].clone(), v["removed"].clone()),
        (1.into(), 3.into()),
        "{out}"
    );
    let (_, out, _) = tool(&["list"]);
    assert_eq!(out.trim(), "dave@served.test");
    assert!(
        gw.smtpd_log()
            .contains("domain open.test has no valid recipients listed"),
        "{}",
        gw.smtpd_log()
    );
}

#[test]
fn callout_asks_the_next_hop_once_and_says_450_when_it_cannot_answer() {
    let rt = runtime();
    let (hop_port, hop) = rt.block_on(next_hop());
    let dead = free_port();
    let redis = Redis::start().unwrap();
    let start = |port: u16| {
        gateway(
            port,
            "served.test,down.test,nohop.test,self.test",
            "recipient_verification = \"callout\"\n\"callout.timeout\" = \"5s\"",
            &format!(
                "[redis]\nurl = \"{}\"\n\
                 [relay]\ntransport = \"served.test=smtp:[127.0.0.1]:{hop_port},down.test=smtp:[127.0.0.1]:{dead},self.test=smtp:[127.0.0.1]:{port}\"\n\
                 [queue]\ndelivery_enabled = false\n",
                redis.url()
            ),
        )
    };
    let port = free_port();
    let gw = start(port);
    let connections = || hop.connections.load(Ordering::SeqCst);
    rt.block_on(async {
        let mut c = Smtp::open("127.0.0.3", port).await;
        c.begin("s@sender.test").await;
        for (rcpt, want, probes) in [
            ("alice@served.test", "250", 1),
            (
                "nobody@served.test",
                "550 5.1.1 <nobody@served.test>: Recipient address rejected: User unknown",
                2,
            ),
            // Cached both ways: no new connection.
            ("Alice@served.test", "250", 2),
            ("nobody@served.test", "550 5.1.1", 2),
            // The next hop's 4xx, and a next hop that is down: try again later.
            ("busy@served.test", "450 4.1.1", 3),
            ("anyone@down.test", "450 4.1.1", 3),
            // No relay host nor transport entry, and a next hop that is this gateway:
            // nothing to ask, accepted (with a warning).
            ("anyone@nohop.test", "250", 3),
            ("anyone@self.test", "250", 3),
        ] {
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert!(r.starts_with(want), "{rcpt}: {r}\n{}", gw.smtpd_log());
            assert_eq!(connections(), probes, "after {rcpt}");
        }
        // A 450 is not remembered: asked again.
        let r = c.cmd("RCPT TO:<busy@served.test>").await;
        assert!(r.starts_with("450 4.1.1"), "{r}");
        assert_eq!(connections(), 4);
        c.cmd("QUIT").await;
    });
    // mb-status shows the callouts made.
    let (_, out, _) = text(&gw.tool("mb-status", &["--json"]));
    let smtpd = json(&out)["daemons"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == "mb-smtpd").cloned())
        .unwrap_or_default();
    assert_eq!(smtpd["counters"]["recipient_callouts"], 4, "{smtpd:#}");
    let log = gw.smtpd_log();
    assert!(
        log.contains("callout cannot ask anyone for nohop.test"),
        "{log}"
    );
    assert!(log.contains("refuses to ask this gateway itself"), "{log}");

    // Another mb-smtpd (another node) sharing the Redis gets both answers from it.
    let port2 = free_port();
    let gw2 = start(port2);
    rt.block_on(async {
        let mut c = Smtp::open("127.0.0.5", port2).await;
        c.begin("s@sender.test").await;
        let r = c.cmd("RCPT TO:<alice@served.test>").await;
        assert!(r.starts_with("250"), "{r}\n{}", gw2.smtpd_log());
        let r = c.cmd("RCPT TO:<nobody@served.test>").await;
        assert!(r.starts_with("550 5.1.1"), "{r}");
        assert_eq!(
            connections(),
            4,
            "answered from Redis, not by a new callout"
        );
        let r = c.cmd("RCPT TO:<carol@served.test>").await;
        assert!(r.starts_with("250"), "{r}");
        assert_eq!(connections(), 5);
        c.cmd("QUIT").await;
    });
    drop(gw);
}

/// mb-smtpd restarted while mb-rpcd is down verifies from its cached copy of the list;
/// without that copy it cannot tell, and says 450 4.1.1 rather than guess.
#[test]
fn list_mode_verifies_from_its_cache_while_mb_rpcd_is_down() {
    let rt = runtime();
    let port = free_port();
    let mut gw = gateway(
        port,
        "served.test",
        "recipient_verification = \"list\"",
        "[queue]\ndelivery_enabled = false\n",
    );
    let (code, _, err) = text(&gw.tool("mb-recipient", &["add", "alice@served.test"]));
    assert_eq!(code, 0, "{err}");
    let rcpt = |source: &'static str, to: &'static str| {
        rt.block_on(async move {
            // Within the client's 5 connections a second.
            tokio::time::sleep(Duration::from_millis(250)).await;
            let mut c = Smtp::open(source, port).await;
            c.begin("s@sender.test").await;
            let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
            c.cmd("QUIT").await;
            r
        })
    };
    wait_until("mb-smtpd to read the list", Duration::from_secs(30), || {
        rcpt("127.0.0.3", "nobody@served.test").starts_with("550 5.1.1")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.smtpd_log()));

    drop(gw.smtpd.take());
    assert_eq!(gw.stop(), Some(0), "{}", gw.log());
    gw.start_smtpd().unwrap();
    assert!(rcpt("127.0.0.3", "alice@served.test").starts_with("250"));
    let r = rcpt("127.0.0.3", "nobody@served.test");
    assert!(r.starts_with("550 5.1.1"), "{r}\n{}", gw.smtpd_log());

    drop(gw.smtpd.take());
    std::fs::remove_file(gw.path("data/recipients.json")).unwrap();
    gw.start_smtpd().unwrap();
    let r = rcpt("127.0.0.3", "alice@served.test");
    assert!(
        r.starts_with("450 4.1.1 <alice@served.test>: Recipient address rejected"),
        "{r}\n{}",
        gw.smtpd_log()
    );
}

/// A next hop that speaks implicit TLS (as on port 465) and takes RCPT only after
/// AUTH PLAIN as `gw`/`secret`: 530 before. `nobody*` is unknown (550 5.1.1). Returns
/// its port and the commands it saw, decrypted.
fn tls_auth_next_hop() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{BufRead, Write};
    let (cert, key) = mb_testkit::self_signed();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (config, s) = (config.clone(), s.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut r = std::io::BufReader::new(rustls::StreamOwned::new(conn, stream));
                if r.get_mut().write_all(b"220 hop.test ESMTP\r\n").is_err() {
                    return;
                }
                let mut authenticated = false;
                let mut line = String::new();
                loop {
                    line.clear();
                    if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                        return;
                    }
                    s.lock().unwrap().push(line.trim_end().to_string());
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-hop.test\r\n250 AUTH PLAIN\r\n"
                    } else if upper.starts_with("AUTH PLAIN ") {
                        // base64("\0gw\0secret")
                        if line.trim_end().ends_with("AGd3AHNlY3JldA==") {
                            authenticated = true;
                            b"235 2.7.0 Authentication successful\r\n"
                        } else {
                            b"535 5.7.8 Authentication failed\r\n"
                        }
                    } else if upper.starts_with("MAIL") && !authenticated {
                        b"530 5.7.0 Authentication required\r\n"
                    } else if upper.starts_with("RCPT") && upper.contains("<NOBODY") {
                        b"550 5.1.1 User unknown\r\n"
                    } else if upper.starts_with("QUIT") {
                        let _ = r.get_mut().write_all(b"221 bye\r\n");
                        return;
                    } else {
                        b"250 2.0.0 Ok\r\n"
                    };
                    if r.get_mut().write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// The relay host's `relay.tls = tls` and `relay.auth.*` apply to callouts as to
/// delivery: the probe speaks TLS from the first byte and authenticates, so known and
/// unknown users are told apart instead of every recipient getting 450.
#[test]
fn callout_to_an_implicit_tls_relay_host_authenticates() {
    let rt = runtime();
    let (hop_port, seen) = tls_auth_next_hop();
    let port = free_port();
    let gw = gateway(
        port,
        "served.test",
        "recipient_verification = \"callout\"\n\"callout.timeout\" = \"5s\"",
        &format!(
            "[relay]\nhost = \"[127.0.0.1]\"\nport = {hop_port}\ntls = \"tls\"\n\"tls.verify\" = false\n\
             \"auth.username\" = \"gw\"\n\"auth.password\" = \"secret\"\n\
             [queue]\ndelivery_enabled = false\n"
        ),
    );
    rt.block_on(async {
        let mut c = Smtp::open("127.0.0.3", port).await;
        c.begin("s@sender.test").await;
        let r = c.cmd("RCPT TO:<alice@served.test>").await;
        assert!(r.starts_with("250"), "{r}\n{}", gw.smtpd_log());
        let r = c.cmd("RCPT TO:<nobody@served.test>").await;
        assert!(r.starts_with("550 5.1.1"), "{r}\n{}", gw.smtpd_log());
        c.cmd("QUIT").await;
    });
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|l| l.starts_with("AUTH PLAIN ")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|l| l == "RCPT TO:<nobody@served.test>"),
        "{seen:?}"
    );
}
