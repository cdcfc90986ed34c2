//! Admission under attack (issue 14, item 1): floods and banned sources from their own
//! loopback addresses (127.0.0.2, 127.0.1.x) against mb-smtpd, while other addresses
//! and listeners must keep getting in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mb_testkit::{Gateway, free_port, text};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A gateway serving `served.test`, with `extra` TOML after the common keys. Loopback is
/// taken out of mynetworks and the trusted networks (by default trusted): every loopback
/// address is an internet client here.
fn gateway(smtp: &str, protection: &str, extra: &str) -> Gateway {
    // Every gateway needs a reinjection port of its own (tests run in parallel).
    let reinject = if extra.contains("[network.reinject]") {
        String::new()
    } else {
        format!("[network.reinject]\nport = {}\n", free_port())
    };
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\n{smtp}\n\
         [network.protection]\ntrusted_networks = \"192.0.2.0/24\"\n{protection}\n\
         [smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n{reinject}{extra}"
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    gw
}

/// A connection from `source` to 127.0.0.1:`port`.
async fn connect(source: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
}

/// Connects from `source` and returns the first reply line ("" when the connection
/// failed or closed without one) and the stream, still open.
async fn greet(source: &str, port: u16) -> (String, Option<BufReader<TcpStream>>) {
    let Ok(stream) = connect(source, port).await else {
        return (String::new(), None);
    };
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return (String::new(), None);
    }
    (line, Some(r))
}

/// Connects from `source`, reads the greeting, says QUIT; returns the greeting.
async fn visit(source: &str, port: u16) -> String {
    let (greeting, stream) = greet(source, port).await;
    if let Some(mut s) = stream
        && greeting.starts_with("220")
    {
        let _ = s.get_mut().write_all(b"QUIT\r\n").await;
        let mut bye = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut bye)).await;
    }
    greeting
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What a flood did: attempts and the refusals among them.
#[derive(Default)]
struct Flood {
    attempts: AtomicUsize,
    refused: AtomicUsize,
}

/// Opens and closes connections from `source` as fast as it can (4 at a time) until
/// `stop`, reading each first line to count refusals.
async fn flood(source: &'static str, port: u16, stop: Arc<AtomicBool>, f: Arc<Flood>) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (stop, f) = (stop.clone(), f.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (line, _) = greet(source, port).await;
                f.attempts.fetch_add(1, Ordering::Relaxed);
                if !line.starts_with("220") {
                    f.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// 127.0.0.2 floods port 25 while 127.0.0.3 connects 30 times at an ordinary pace: not
/// one of 127.0.0.3's connections may be refused. Run in autoban mode (the flooder is
/// soon banned) and in public mode (only the per-client limits stop it); the listener
/// rate is the default 20 per second, which the flood alone used to exhaust.
#[test]
fn a_flooding_source_never_shuts_out_another() {
    for mode in ["autoban", "public"] {
        let port = free_port();
        let gw = gateway(
            &format!("port = {port}\nrate_per_source = 10"),
            &format!("mode = \"{mode}\"\n\"autoban.rate\" = \"50/minute\""),
            "",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let f = Arc::new(Flood::default());
        let rt = runtime();
        let flooder = rt.spawn(flood("127.0.0.2", port, stop.clone(), f.clone()));
        let refused: Vec<String> = rt.block_on(async {
            // Let the flood get going first.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut refused = Vec::new();
            for _ in 0..30 {
                let g = visit("127.0.0.3", port).await;
                if !g.starts_with("220") {
                    refused.push(g);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            refused
        });
        stop.store(true, Ordering::Relaxed);
        rt.block_on(flooder).unwrap();
        let (attempts, flood_refused) = (
            f.attempts.load(Ordering::Relaxed),
            f.refused.load(Ordering::Relaxed),
        );
        eprintln!("{mode}: flood of {attempts} connections, {flood_refused} refused");
        assert!(
            refused.is_empty(),
            "{mode}: 127.0.0.3 was refused {} times of 30 during a flood of {attempts}: {refused:?}",
            refused.len()
        );
        // The flood was real and was held off.
        assert!(
            attempts > 300,
            "{mode}: the flood made only {attempts} attempts"
        );
        assert!(
            flood_refused * 10 > attempts * 9,
            "{mode}: only {flood_refused} of {attempts} flood connections were refused"
        );
        let banned = gw.smtpd_log().contains("banned for");
        assert_eq!(banned, mode == "autoban", "{mode}: ban logged: {banned}");
    }
}

/// Port 25 is the MX, and autoban must not punish the busy honest MTA: 127.0.0.4 holds
/// its 10 allowed sessions at once and then opens 40 more, two a second (the per-client
/// rate), under an autoban rate of 3 a minute: not one refusal, no ban. 127.0.0.5 keeps
/// knocking after its 421s: the refusals count, and it is banned from every port.
#[test]
fn port_25_bans_only_clients_that_keep_knocking_over_their_limits() {
    let (port, submission) = (free_port(), free_port());
    let gw = gateway(
        &format!("port = {port}\nmax_per_source = 10\nrate_per_source = 2"),
        "mode = \"autoban\"\n\"autoban.rate\" = \"3/minute\"",
        &format!("[network.submission]\nenabled = true\nport = {submission}\n"),
    );
    let rt = runtime();
    rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..10 {
            let (g, s) = greet("127.0.0.4", port).await;
            assert!(g.starts_with("220"), "held session {i}: {g}");
            held.push(s);
            if i % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
        }
        drop(held);
        // (Closed sessions leave the count when the server sees them close.)
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..40 {
            let g = visit("127.0.0.4", port).await;
            assert!(g.starts_with("220"), "honest connection {i} refused: {g}");
            tokio::time::sleep(Duration::from_millis(520)).await;
        }
        let mut replies = Vec::new();
        for _ in 0..12 {
            replies.push(visit("127.0.0.5", port).await);
        }
        assert!(
            replies
                .iter()
                .any(|r| r.contains("too many connections per second")),
            "{replies:?}"
        );
        assert!(
            replies.last().unwrap().contains("127.0.0.5 is banned"),
            "the knocker was not banned: {replies:?}"
        );
        let (g, _) = greet("127.0.0.5", submission).await;
        assert!(
            g.contains("127.0.0.5 is banned"),
            "banned from every port: {g}"
        );
        let g = visit("127.0.0.4", port).await;
        assert!(g.starts_with("220"), "the honest MTA after the ban: {g}");
    });
    let log = gw.smtpd_log();
    assert_eq!(log.matches("banned for").count(), 1, "{log}");
    assert!(
        log.contains("too many connections over its limits"),
        "{log}"
    );
    mb_testkit::wait_until("the ban to be stored", Duration::from_secs(20), || {
        mb_ban(&gw, &["list"]).1.contains("127.0.0.5")
    })
    .unwrap();
    let (_, out, _) = mb_ban(&gw, &["list"]);
    assert!(!out.contains("127.0.0.4"), "{out}");
}

/// Port 25's pool (max_connections = 5) is full of idle sessions and a sixth is
/// refused; submission still takes 10 connections and reinjection 25 at once (more than
/// port 25's pool and more than the listener rate in one second).
#[test]
fn a_port_25_flood_never_stops_submission_or_reinjection() {
    let (port, submission, reinject) = (free_port(), free_port(), free_port());
    let _gw = gateway(
        &format!("port = {port}\nmax_connections = 5\nrate_per_source = 1000"),
        "mode = \"public\"",
        &format!(
            "[network.submission]\nenabled = true\nport = {submission}\n\
             [network.reinject]\nport = {reinject}\n"
        ),
    );
    let rt = runtime();
    rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..5 {
            let (g, s) = greet(&format!("127.0.0.{}", 10 + i), port).await;
            assert!(g.starts_with("220"), "port 25 connection {i}: {g}");
            held.push(s);
        }
        let (g, _) = greet("127.0.0.20", port).await;
        assert!(
            g.starts_with("421 4.7.0") && g.contains("too many connections"),
            "the sixth port-25 connection: {g}"
        );
        for i in 0..10 {
            let (g, s) = greet("127.0.0.3", submission).await;
            assert!(g.starts_with("220"), "submission connection {i}: {g}");
            held.push(s);
        }
        let started = Instant::now();
        for i in 0..25 {
            let (g, s) = greet("127.0.0.1", reinject).await;
            assert!(g.starts_with("220"), "reinjection connection {i}: {g}");
            held.push(s);
        }
        eprintln!("25 reinjection connections in {:?}", started.elapsed());
        // And port 25 is still full: the other listeners did not take its slots.
        let (g, _) = greet("127.0.0.21", port).await;
        assert!(g.starts_with("421"), "{g}");
    });
}

fn mb_ban(gw: &Gateway, args: &[&str]) -> (i32, String, String) {
    text(&gw.tool("mb-ban", args))
}

/// A banned address (127.0.0.2) and a banned network (127.0.1.0/24) open 150
/// connections at once, five times; each time 127.0.0.3 connects right after and gets
/// in, with the listener rate at 50 per second: refused connections spend nothing.
#[test]
fn banned_sources_never_spend_the_connection_rate() {
    let port = free_port();
    let gw = gateway(
        &format!("port = {port}\nconnection_rate = 50\nrate_per_source = 1000"),
        "mode = \"autoban\"\n\"autoban.rate\" = \"1000/minute\"",
        "",
    );
    for target in ["127.0.0.2", "127.0.1.0/24", "2001:db8:5::/64"] {
        let (code, out, err) = mb_ban(&gw, &["add", target, "--for", "10m"]);
        assert_eq!(code, 0, "mb-ban add {target}: {out}{err}");
    }
    // Change commands answer in JSON when asked.
    let (code, out, err) = mb_ban(&gw, &["--json", "add", "2001:db8:6::/64", "--for", "1m"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(
        (v["ip"].as_str(), v["kind"].as_str()),
        (Some("2001:db8:6::/64"), Some("ban")),
        "{v}"
    );
    let (code, out, err) = mb_ban(&gw, &["--json", "del", "2001:db8:6::/64"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(v["removed"], true, "{v}");
    let (code, out, err) = mb_ban(&gw, &["add", "10.0.0.0/4"]);
    assert_ne!(code, 0, "a /4 was accepted: {out}");
    assert!(err.contains("/8 or narrower"), "{err}");
    let (_, list, _) = mb_ban(&gw, &["list"]);
    for listed in ["127.0.0.2 ", "127.0.1.0/24", "2001:db8:5::/64"] {
        assert!(list.contains(listed), "{listed} is not listed: {list}");
    }
    let rt = runtime();
    rt.block_on(async {
        // Bans reach mb-smtpd within a few seconds.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !visit("127.0.1.77", port).await.contains("is banned") {
            assert!(
                Instant::now() < deadline,
                "the network ban never took effect"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let g = visit("127.0.0.2", port).await;
        assert!(
            g.starts_with("421 4.7.0") && g.contains("127.0.0.2 is banned"),
            "{g}"
        );
        let g = visit("127.0.1.200", port).await;
        assert!(
            g.contains("is banned"),
            "127.0.1.200 is inside the banned /24: {g}"
        );
        let g = visit("127.0.2.1", port).await;
        assert!(
            g.starts_with("220"),
            "127.0.2.1 is outside the banned /24: {g}"
        );
        for round in 0..5 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..150 {
                let source = if i % 2 == 0 {
                    "127.0.0.2".to_string()
                } else {
                    format!("127.0.1.{}", 1 + i % 200)
                };
                tasks.spawn(async move { visit(&source, port).await });
            }
            let mut banned = 0;
            while let Some(g) = tasks.join_next().await {
                if g.unwrap().contains("is banned") {
                    banned += 1;
                }
            }
            assert_eq!(banned, 150, "round {round}");
            let g = visit("127.0.0.3", port).await;
            assert!(
                g.starts_with("220"),
                "round {round}: 127.0.0.3 refused after 150 banned connections: {g}"
            );
        }
    });
    // Lifting the network ban lets its addresses in again.
    let (code, out, err) = mb_ban(&gw, &["del", "127.0.1.0/24"]);
    assert_eq!(code, 0, "{out}{err}");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !visit("127.0.1.77", port).await.starts_with("220") {
            assert!(
                Instant::now() < deadline,
                "the network ban was never lifted"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// A client that stalls in the TLS handshake (SMTPS, or after STARTTLS) is dropped after
/// `network.smtp.tls_handshake_timeout` (1 s here), not the 5 minute command timeout.
#[test]
fn a_stalled_tls_handshake_is_dropped_after_its_own_timeout() {
    let (port, smtps) = (free_port(), free_port());
    let _gw = gateway(
        &format!("port = {port}\ntls_handshake_timeout = \"1s\"\ntimeout = \"5m\""),
        "mode = \"public\"",
        &format!("[network.smtps]\nenabled = true\nport = {smtps}\n"),
    );
    let rt = runtime();
    rt.block_on(async {
        // SMTPS: connected, never says ClientHello.
        let started = Instant::now();
        let mut s = connect("127.0.0.3", smtps).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        .expect("the SMTPS connection stayed open")
        .unwrap_or(0);
        assert_eq!(n, 0, "no bytes before the handshake");
        let smtps_elapsed = started.elapsed();
        // STARTTLS accepted, then silence.
        let (g, s) = greet("127.0.0.3", port).await;
        assert!(g.starts_with("220"), "{g}");
        let mut s = s.unwrap();
        s.get_mut()
            .write_all(b"EHLO client.test\r\n")
            .await
            .unwrap();
        loop {
            let mut l = String::new();
            s.read_line(&mut l).await.unwrap();
            if !l.starts_with("250-") {
                assert!(l.starts_with("250 "), "{l}");
                break;
            }
        }
        s.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
        let mut l = String::new();
        s.read_line(&mut l).await.unwrap();
        assert!(l.starts_with("220"), "{l}");
        let started = Instant::now();
        let mut rest = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), s.read_line(&mut rest))
            .await
            .expect("the STARTTLS connection stayed open")
            .unwrap_or(0);
        assert_eq!(n, 0, "{rest}");
        let starttls_elapsed = started.elapsed();
        eprintln!("dropped after {smtps_elapsed:?} (SMTPS), {starttls_elapsed:?} (STARTTLS)");
        for e in [smtps_elapsed, starttls_elapsed] {
            assert!(e < Duration::from_secs(10), "{e:?}");
        }
    });
}
