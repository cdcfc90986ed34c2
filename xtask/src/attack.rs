//! `cargo xtask bench --attack`: a legitimate sender's throughput while the gateway is
//! under attack, against mb-smtpd with its default defences and against Postfix with its
//! defaults, in one run.
//!
//! The legitimate client sends 4 KiB messages over 4 sessions from its own loopback
//! address (127.0.0.10), reusing each connection for many messages as MTAs do. It is
//! measured alone, then again while, from other loopback addresses:
//! - 20 addresses open and close 200 connections a second in all (127.0.1.x);
//! - 10 addresses try to hold 2,000 idle sessions (127.0.2.x);
//! - 200 slowloris sessions send one byte every 10 seconds (127.0.3.x);
//! - 50 AUTH attempts a second try passwords (127.0.4.x): on mb-smtpd over STARTTLS on
//!   the submission port; Postfix with its defaults offers no AUTH, so they meet its
//!   "authentication not enabled" on port 25;
//! - 5 clients send 20 MB messages one after another (127.0.5.x).
//!
//! The client is measured alone again after the attack (the attackers gone for a few
//! seconds), and the ratio is its rate under attack over the mean of its two rates alone
//! (target 0.9 or more): on a shared machine the capacity drifts during a run, and a
//! before/after bracket keeps that drift from passing as the attack's effect (the two
//! alone rates are printed, so a drift shows). It also reports the legitimate client's
//! refusals (target 0) and the target's peak memory. A harness, not a test: nothing here
//! asserts a rate.
//!
//! The attackers, the legitimate client and the relay's sink all run on the machine that
//! runs the target, and on a small machine they take CPU the target would otherwise have.
//! So that the attackers' own work cannot slow the legitimate client directly, the client
//! has a runtime (one thread, `legit`) of its own, apart from the attackers' (`attack`),
//! as it would be a different machine; and every phase reports the CPU each party used
//! (target, attackers, legitimate client, sink: seconds of CPU per second, 2.0 = both
//! cores of a 2-core machine) and the load average when it started, so a low ratio can
//! be told apart from a starved target. The ratio itself is never corrected.
//!
//! `MB_ATTACK_ONLY=flood,idle,slow,auth,big` (any subset) runs only those attackers, to
//! see what each one costs.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mb_testkit::{Postfix, Proc, free_port, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::bench::{cpu_secs, pss, sink};

const LEGIT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
pub(crate) const LEGIT_SESSIONS: usize = 4;
/// Time between the legitimate sender's first connections, and its pause after a
/// refusal: it behaves as an MTA that respects a 421 (the default per-client rate is
/// 2 connections a second, and autoban counts 10 a minute).
pub(crate) const LEGIT_PACE: Duration = Duration::from_millis(600);
const FLOOD_ADDRESSES: u8 = 20;
const FLOOD_PER_SECOND: u32 = 200;
const IDLE_ADDRESSES: u8 = 10;
const IDLE_SESSIONS: u32 = 2000;
const SLOWLORIS: u32 = 200;
const AUTH_ADDRESSES: u8 = 5;
const AUTH_PER_SECOND: u32 = 50;
const BIG_CLIENTS: u8 = 5;
const BIG_SIZE: usize = 20 << 20;
/// Time the attack runs before the legitimate client is measured under it.
const RAMP: Duration = Duration::from_secs(5);

/// Which attackers run (`MB_ATTACK_ONLY`, default all).
#[derive(Clone, Copy)]
struct Attackers {
    flood: bool,
    idle: bool,
    slow: bool,
    auth: bool,
    big: bool,
}

impl Attackers {
    fn from_env() -> Result<Attackers> {
        let Ok(only) = std::env::var("MB_ATTACK_ONLY") else {
            return Ok(Attackers {
                flood: true,
                idle: true,
                slow: true,
                auth: true,
                big: true,
            });
        };
        let mut a = Attackers {
            flood: false,
            idle: false,
            slow: false,
            auth: false,
            big: false,
        };
        for name in only.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "flood" => a.flood = true,
                "idle" => a.idle = true,
                "slow" => a.slow = true,
                "auth" => a.auth = true,
                "big" => a.big = true,
                other => bail!(
                    "MB_ATTACK_ONLY: unknown attacker {other:?} (flood, idle, slow, auth, big)"
                ),
            }
        }
        Ok(a)
    }

    fn names(self) -> String {
        let all = [
            (self.flood, "flood"),
            (self.idle, "idle"),
            (self.slow, "slow"),
            (self.auth, "auth"),
            (self.big, "big"),
        ];
        let on: Vec<_> = all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
        on.join(",")
    }
}

/// Where the attack goes.
#[derive(Clone, Copy)]
pub(crate) struct Target {
    pub(crate) smtp: u16,
    /// mb-smtpd's submission port (STARTTLS + AUTH); none for Postfix.
    pub(crate) submission: Option<u16>,
}

/// What the attackers and the legitimate client saw.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) legit_sent: AtomicU64,
    pub(crate) legit_refused: AtomicU64,
    pub(crate) legit_reasons: std::sync::Mutex<Vec<String>>,
    /// What each legitimate session is waiting for, and since when.
    legit_waiting: [std::sync::Mutex<Option<(&'static str, Instant)>>; LEGIT_SESSIONS],
    flood_admitted: AtomicU64,
    flood_refused: AtomicU64,
    idle_open: AtomicU64,
    idle_peak: AtomicU64,
    slow_open: AtomicU64,
    slow_peak: AtomicU64,
    auth_tried: AtomicU64,
    auth_refused_password: AtomicU64,
    big_accepted: AtomicU64,
    big_refused: AtomicU64,
    big_reasons: std::sync::Mutex<Vec<String>>,
    /// Connections every attacker opened (or tried to).
    attempts: AtomicU64,
}

fn gauge_up(open: &AtomicU64, peak: &AtomicU64) {
    let n = open.fetch_add(1, Relaxed) + 1;
    peak.fetch_max(n, Relaxed);
}

pub(crate) async fn connect_from(src: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((src, 0)))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Reads one (possibly multi-line) reply and returns its code; 0 when the peer closed.
pub(crate) async fn reply<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(60), r.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "reply timed out"))??;
        if n == 0 {
            return Ok(0);
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0));
        }
    }
}

pub(crate) async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    line: &str,
) -> std::io::Result<u16> {
    s.get_mut().write_all(line.as_bytes()).await?;
    reply(s).await
}

fn message(size: usize, from: &str) -> Vec<u8> {
    let mut m = format!(
        "From: <{from}>\r\nTo: <user@served.test>\r\nSubject: attack bench\r\n\
         Message-ID: <{}@bench.test>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n",
        rand_id()
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// One message on an open session: Ok(()) when it got its 250, else the step and the
/// reply code that refused it (0: the server closed the connection).
async fn send_one<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    from: &str,
    body: &[u8],
) -> std::io::Result<Result<(), String>> {
    let code = command(s, &format!("MAIL FROM:<{from}>\r\n")).await?;
    if code != 250 {
        return Ok(Err(format!("MAIL {code}")));
    }
    let code = command(s, "RCPT TO:<user@served.test>\r\n").await?;
    if code != 250 {
        command(s, "RSET\r\n").await?;
        return Ok(Err(format!("RCPT {code}")));
    }
    let code = command(s, "DATA\r\n").await?;
    if code != 354 {
        return Ok(Err(format!("DATA {code}")));
    }
    s.get_mut().write_all(body).await?;
    let code = reply(s).await?;
    Ok(if code == 250 {
        Ok(())
    } else {
        Err(format!("end of data {code}"))
    })
}

/// The legitimate sender: counts messages accepted while `measuring`, and every refusal
/// (a refused connection, a greeting or reply other than the expected one) meanwhile,
/// keeping the first few reasons.
pub(crate) async fn legit(
    n: usize,
    target: Target,
    tally: Arc<Tally>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let body = message(4096, "news@legit.test");
    let refused = |why: String| {
        if measuring.load(Relaxed) {
            tally.legit_refused.fetch_add(1, Relaxed);
            let mut reasons = tally.legit_reasons.lock().expect("reasons");
            if reasons.len() < 5 && !reasons.contains(&why) {
                reasons.push(why);
            }
        }
    };
    let waiting = |step: &'static str| {
        if let Some(w) = tally.legit_waiting.get(n) {
            *w.lock().expect("waiting") = Some((step, Instant::now()));
        }
    };
    tokio::time::sleep(LEGIT_PACE * u32::try_from(n).unwrap_or(0)).await;
    while !stop.load(Relaxed) {
        waiting("the connection");
        let stream = match connect_from(LEGIT, target.smtp).await {
            Ok(s) => s,
            Err(e) => {
                refused(format!("connect: {e}"));
                waiting("its pause after a refusal");
                tokio::time::sleep(LEGIT_PACE * 4).await;
                continue;
            }
        };
        let mut s = BufReader::new(stream);
        waiting("the greeting");
        let greeting = reply(&mut s).await;
        let ehlo = match greeting {
            Ok(220) => {
                waiting("the reply to EHLO");
                command(&mut s, "EHLO mail.legit.test\r\n").await
            }
            other => {
                refused(format!("greeting {other:?}"));
                waiting("its pause after a refusal");
                tokio::time::sleep(LEGIT_PACE * 4).await;
                continue;
            }
        };
        if !matches!(ehlo, Ok(250)) {
            refused(format!("EHLO {ehlo:?}"));
            waiting("its pause after a refusal");
            tokio::time::sleep(LEGIT_PACE * 4).await;
            continue;
        }
        // One connection for the whole run, as an MTA's connection cache keeps it.
        while !stop.load(Relaxed) {
            waiting("a message's replies");
            match send_one(&mut s, "news@legit.test", &body).await {
                Ok(Ok(())) => {
                    if measuring.load(Relaxed) {
                        tally.legit_sent.fetch_add(1, Relaxed);
                    }
                }
                Ok(Err(why)) => {
                    refused(why);
                    break;
                }
                Err(e) => {
                    refused(format!("i/o: {e}"));
                    break;
                }
            }
        }
        let _ = command(&mut s, "QUIT\r\n").await;
    }
}

/// A legitimate session that has waited longer than this at the end of a window is
/// reported as stalled (a message's dialogue takes milliseconds; a pause after a
/// refusal is 2.4 s).
const STALLED: Duration = Duration::from_secs(5);

/// The legitimate sessions waiting longer than [`STALLED`] now, each as "N s for STEP":
/// a window with no message and no refusal says where its sessions stood.
pub(crate) fn stalled(tally: &Tally) -> Vec<String> {
    tally
        .legit_waiting
        .iter()
        .filter_map(|w| *w.lock().expect("waiting"))
        .filter(|(_, since)| since.elapsed() > STALLED)
        .map(|(step, since)| {
            format!(
                "stalled {:.0} s waiting for {step}",
                since.elapsed().as_secs_f64()
            )
        })
        .collect()
}

/// Opens and closes connections at a steady rate from one address.
async fn flood(
    src: Ipv4Addr,
    port: u16,
    per_second: u32,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    while !stop.load(Relaxed) {
        tick.tick().await;
        tally.attempts.fetch_add(1, Relaxed);
        let tally = tally.clone();
        tokio::spawn(async move {
            let admitted = match connect_from(src, port).await {
                Ok(stream) => {
                    let mut s = BufReader::new(stream);
                    matches!(reply(&mut s).await, Ok(220))
                }
                Err(_) => false,
            };
            if admitted {
                tally.flood_admitted.fetch_add(1, Relaxed);
            } else {
                tally.flood_refused.fetch_add(1, Relaxed);
            }
        });
    }
}

/// Holds one session open after EHLO, reconnecting a second after it is closed.
async fn idle(src: Ipv4Addr, port: u16, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Relaxed) {
        tally.attempts.fetch_add(1, Relaxed);
        if let Ok(stream) = connect_from(src, port).await {
            let mut s = BufReader::new(stream);
            if matches!(reply(&mut s).await, Ok(220))
                && matches!(command(&mut s, "EHLO idle.example\r\n").await, Ok(250))
            {
                gauge_up(&tally.idle_open, &tally.idle_peak);
                let mut rest = String::new();
                while !stop.load(Relaxed) {
                    rest.clear();
                    let read = tokio::time::timeout(Duration::from_secs(1), s.read_line(&mut rest));
                    if let Ok(Ok(0) | Err(_)) = read.await {
                        break;
                    }
                }
                tally.idle_open.fetch_sub(1, Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A slowloris session: one byte of a command every 10 seconds.
async fn slowloris(src: Ipv4Addr, port: u16, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let line = b"EHLO slow.example.and.a.very.long.name.that.never.ends";
    while !stop.load(Relaxed) {
        tally.attempts.fetch_add(1, Relaxed);
        if let Ok(stream) = connect_from(src, port).await {
            let mut s = BufReader::new(stream);
            if matches!(reply(&mut s).await, Ok(220)) {
                gauge_up(&tally.slow_open, &tally.slow_peak);
                let mut i = 0;
                while !stop.load(Relaxed) {
                    if s.get_mut()
                        .write_all(&line[i % line.len()..][..1])
                        .await
                        .is_err()
                    {
                        break;
                    }
                    i += 1;
                    // Stop waiting early when the server closes the session.
                    let mut buf = String::new();
                    match tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut buf)).await
                    {
                        Ok(Ok(0) | Err(_)) => break,
                        Ok(Ok(_)) => {
                            if !buf.starts_with("2") {
                                break;
                            }
                        }
                        Err(_) => {}
                    }
                }
                tally.slow_open.fetch_sub(1, Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Accepts any certificate: the attacker does not care who it talks to.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One password guess; true when the server answered it with 535 (a real check).
async fn guess(src: Ipv4Addr, target: Target, n: u64) -> std::io::Result<bool> {
    const PLAIN: &[u8] = b"\0ceo@served.test\0";
    let password = format!("Winter{n}!");
    let mut cred = PLAIN.to_vec();
    cred.extend_from_slice(password.as_bytes());
    let auth = format!("AUTH PLAIN {}\r\n", base64(&cred));
    match target.submission {
        Some(port) => {
            let mut s = BufReader::new(connect_from(src, port).await?);
            if reply(&mut s).await? != 220
                || command(&mut s, "EHLO guess.example\r\n").await? != 250
                || command(&mut s, "STARTTLS\r\n").await? != 220
            {
                return Ok(false);
            }
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let tls = tls_connector().connect(name, s.into_inner()).await?;
            let mut s = BufReader::new(tls);
            if command(&mut s, "EHLO guess.example\r\n").await? != 250 {
                return Ok(false);
            }
            Ok(command(&mut s, &auth).await? == 535)
        }
        None => {
            let mut s = BufReader::new(connect_from(src, target.smtp).await?);
            if reply(&mut s).await? != 220
                || command(&mut s, "EHLO guess.example\r\n").await? != 250
            {
                return Ok(false);
            }
            Ok(command(&mut s, &auth).await? == 535)
        }
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn auth_attack(
    src: Ipv4Addr,
    target: Target,
    per_second: u32,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    while !stop.load(Relaxed) {
        tick.tick().await;
        let tally = tally.clone();
        let n = tally.auth_tried.fetch_add(1, Relaxed);
        tally.attempts.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            if matches!(guess(src, target, n).await, Ok(true)) {
                tally.auth_refused_password.fetch_add(1, Relaxed);
            }
        });
    }
}

async fn big(src: Ipv4Addr, port: u16, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let body = Arc::new(message(BIG_SIZE, "big@sender.test"));
    while !stop.load(Relaxed) {
        tally.attempts.fetch_add(1, Relaxed);
        let sent = async {
            let mut s = BufReader::new(connect_from(src, port).await?);
            let greeting = reply(&mut s).await?;
            if greeting != 220 {
                return Ok::<_, std::io::Error>(Err(format!("greeting {greeting}")));
            }
            let ehlo = command(&mut s, "EHLO big.sender.test\r\n").await?;
            if ehlo != 250 {
                return Ok(Err(format!("EHLO {ehlo}")));
            }
            let sent = send_one(&mut s, "big@sender.test", &body).await?;
            let _ = command(&mut s, "QUIT\r\n").await;
            Ok(sent)
        }
        .await;
        let why = match sent {
            Ok(Ok(())) => {
                tally.big_accepted.fetch_add(1, Relaxed);
                continue;
            }
            Ok(Err(why)) => why,
            Err(e) => format!("i/o: {e}"),
        };
        tally.big_refused.fetch_add(1, Relaxed);
        if let Ok(mut reasons) = tally.big_reasons.lock()
            && reasons.len() < 5
            && !reasons.contains(&why)
        {
            reasons.push(why);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Starts every attacker; they run until `stop`.
fn launch(
    rt: &tokio::runtime::Runtime,
    target: Target,
    who: Attackers,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) {
    let t = || tally.clone();
    let s = || stop.clone();
    for a in (1..=FLOOD_ADDRESSES).filter(|_| who.flood) {
        let src = Ipv4Addr::new(127, 0, 1, a);
        rt.spawn(flood(
            src,
            target.smtp,
            FLOOD_PER_SECOND / u32::from(FLOOD_ADDRESSES),
            t(),
            s(),
        ));
    }
    for i in (0..IDLE_SESSIONS).filter(|_| who.idle) {
        let src = Ipv4Addr::new(127, 0, 2, 1 + (i % u32::from(IDLE_ADDRESSES)) as u8);
        rt.spawn(idle(src, target.smtp, t(), s()));
    }
    for i in (0..SLOWLORIS).filter(|_| who.slow) {
        let src = Ipv4Addr::new(127, 0, 3, 1 + (i % 20) as u8);
        rt.spawn(slowloris(src, target.smtp, t(), s()));
    }
    for a in (1..=AUTH_ADDRESSES).filter(|_| who.auth) {
        let src = Ipv4Addr::new(127, 0, 4, a);
        rt.spawn(auth_attack(
            src,
            target,
            AUTH_PER_SECOND / u32::from(AUTH_ADDRESSES),
            t(),
            s(),
        ));
    }
    for a in (1..=BIG_CLIENTS).filter(|_| who.big) {
        rt.spawn(big(Ipv4Addr::new(127, 0, 5, a), target.smtp, t(), s()));
    }
}

/// CPU used during one phase, in seconds of CPU per second of the phase (2.0: both
/// cores of a 2-core machine), by party.
#[derive(Default, Clone, Copy)]
struct Cpu {
    target: f64,
    attackers: f64,
    legit: f64,
    sink: f64,
    /// The 1-minute load average when the phase started.
    load: f64,
    /// Connections the attackers opened per second.
    attempts: f64,
}

/// CPU seconds so far of this process's threads named `name` (the runtimes' workers and
/// their blocking threads are named after the runtime).
fn thread_cpu(name: &str) -> f64 {
    let mut ticks = 0u64;
    if let Ok(rd) = fs::read_dir("/proc/self/task") {
        for e in rd.filter_map(Result::ok) {
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            if &stat[open + 1..close] != name {
                continue;
            }
            // Fields after the name, from 0: state, ..., utime (11), stime (12).
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += field(11) + field(12);
        }
    }
    ticks as f64 / 100.0
}

fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The CPU counters of every party at one moment.
struct CpuMark {
    at: Instant,
    target: f64,
    attackers: f64,
    legit: f64,
    sink: f64,
}

impl CpuMark {
    fn now(target: i32, sink: i32) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            target: cpu_secs(target),
            attackers: thread_cpu("attack"),
            legit: thread_cpu("legit"),
            sink: cpu_secs(sink),
        }
    }

    fn since(&self, start: &CpuMark, load: f64) -> Cpu {
        let secs = self.at.duration_since(start.at).as_secs_f64().max(1e-3);
        Cpu {
            target: (self.target - start.target) / secs,
            attackers: (self.attackers - start.attackers) / secs,
            legit: (self.legit - start.legit) / secs,
            sink: (self.sink - start.sink) / secs,
            load,
            attempts: 0.0,
        }
    }
}

/// One target's figures.
pub(crate) struct Row {
    pub(crate) name: String,
    /// The rate alone before the attack.
    pub(crate) alone: f64,
    /// The rate alone after the attack.
    pub(crate) after: f64,
    pub(crate) attacked: f64,
    pub(crate) refused_alone: u64,
    pub(crate) refused_attacked: u64,
    reasons_alone: Vec<String>,
    /// The target's peak PSS under attack.
    pub(crate) peak_mib: f64,
    cpu_alone: Cpu,
    cpu_attacked: Cpu,
    cpu_after: Cpu,
    tally: Arc<Tally>,
}

impl Row {
    /// The target's CPU milliseconds per legitimate message under attack (its process
    /// family's CPU, the attackers' refused connections included).
    pub(crate) fn cpu_ms_per_message(&self) -> Option<f64> {
        (self.attacked > 0.0).then(|| self.cpu_attacked.target * 1000.0 / self.attacked)
    }

    /// The rate under attack over the mean of the rates alone before and after it.
    pub(crate) fn ratio(&self) -> f64 {
        let alone = (self.alone + self.after) / 2.0;
        if alone > 0.0 {
            self.attacked / alone
        } else {
            f64::NAN
        }
    }
}

/// What one phase measured.
struct Phase {
    rate: f64,
    refused: u64,
    peak_mib: f64,
    cpu: Cpu,
    tally: Arc<Tally>,
}

fn runtime(name: &str, workers: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// Measures the legitimate client for `window`, with or without the attack running.
/// `roots[0]` is the target's process (its family counts), `sink` the relay's sink.
fn measure(
    target: Target,
    window: Duration,
    attack: Option<Attackers>,
    roots: &[i32],
    sink: i32,
) -> Result<Phase> {
    // The legitimate client is another machine: its own thread, so that the attackers'
    // thousands of tasks never stand in its run queue.
    let legit_rt = runtime("legit", 1)?;
    let attack_rt = runtime("attack", 2)?;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    if let Some(who) = attack {
        launch(&attack_rt, target, who, &tally, &stop);
    }
    for n in 0..LEGIT_SESSIONS {
        legit_rt.spawn(legit(
            n,
            target,
            tally.clone(),
            measuring.clone(),
            stop.clone(),
        ));
    }
    let ramp = if attack.is_some() {
        RAMP
    } else {
        LEGIT_PACE * 4
    };
    std::thread::sleep(ramp);
    let load = load_average();
    let root = roots.first().copied().unwrap_or(0);
    let mark = CpuMark::now(root, sink);
    let attempts = tally.attempts.load(Relaxed);
    measuring.store(true, Relaxed);
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < window {
        peak = peak.max(pss(roots));
        std::thread::sleep(Duration::from_millis(200));
    }
    measuring.store(false, Relaxed);
    let stalls = stalled(&tally);
    tally.legit_reasons.lock().expect("reasons").extend(stalls);
    let secs = started.elapsed().as_secs_f64();
    let mut cpu = CpuMark::now(root, sink).since(&mark, load);
    cpu.attempts = (tally.attempts.load(Relaxed) - attempts) as f64 / secs;
    stop.store(true, Relaxed);
    attack_rt.shutdown_timeout(Duration::from_secs(2));
    legit_rt.shutdown_timeout(Duration::from_secs(2));
    let sent = tally.legit_sent.load(Relaxed) as f64;
    Ok(Phase {
        rate: sent / secs,
        refused: tally.legit_refused.load(Relaxed),
        peak_mib: peak as f64 / 1024.0,
        cpu,
        tally,
    })
}

/// Waits until the target and the sink are idle (together under 5% of a core for a
/// second: what the last phase accepted is delivered), at least 3 s and at most 90 s.
fn settle(roots: &[i32], sink: i32) {
    let root = roots.first().copied().unwrap_or(0);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let mut last = cpu_secs(root) + cpu_secs(sink);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_secs(root) + cpu_secs(sink);
        if now - last < 0.05 || started.elapsed() > Duration::from_secs(90) {
            break;
        }
        last = now;
    }
}

fn row(
    name: &str,
    target: Target,
    who: Attackers,
    window: Duration,
    roots: &[i32],
    sink: i32,
) -> Result<Row> {
    eprintln!("xtask: bench --attack: {name}: the legitimate client alone ...");
    let quiet = measure(target, window, None, roots, sink)?;
    let reasons_alone = quiet.tally.legit_reasons.lock().expect("reasons").clone();
    settle(roots, sink);
    eprintln!("xtask: bench --attack: {name}: under attack ...");
    let hit = measure(target, window, Some(who), roots, sink)?;
    // The attackers' sessions are closed; the target delivers what it accepted from
    // them (20 MB messages among it) before it is measured alone again.
    settle(roots, sink);
    eprintln!("xtask: bench --attack: {name}: the legitimate client alone again ...");
    let after = measure(target, window, None, roots, sink)?;
    let mut reasons_alone = reasons_alone;
    reasons_alone.extend(after.tally.legit_reasons.lock().expect("reasons").clone());
    Ok(Row {
        name: name.into(),
        alone: quiet.rate,
        after: after.rate,
        attacked: hit.rate,
        refused_alone: quiet.refused + after.refused,
        refused_attacked: hit.refused,
        reasons_alone,
        peak_mib: hit.peak_mib,
        cpu_alone: quiet.cpu,
        cpu_attacked: hit.cpu,
        cpu_after: after.cpu,
        tally: hit.tally,
    })
}

/// Raises this process's open-file limit (its sockets) to its hard limit; the targets
/// inherit it. Fails when the hard limit is below `need` descriptors (the attack needs
/// about 2,500 on each side, `--idle` its sessions and a few hundred more).
pub(crate) fn raise_nofile(need: u64) -> Result<()> {
    let limits = fs::read_to_string("/proc/self/limits")?;
    let (soft, hard) = limits
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Max open files")?;
            let mut f = rest.split_whitespace();
            let parse = |v: Option<&str>| match v? {
                "unlimited" => Some(u64::MAX),
                n => n.parse::<u64>().ok(),
            };
            Some((parse(f.next())?, parse(f.next())?))
        })
        .context("no open-file limit in /proc/self/limits")?;
    if hard < need {
        bail!(
            "the open-file hard limit is {hard}; this bench needs {need} (raise it with ulimit -Hn as root)"
        );
    }
    if soft < hard {
        let pid = std::process::id().to_string();
        let value = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let status = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={value}:{value}")])
            .status()
            .context("prlimit (util-linux)")?;
        if !status.success() {
            bail!("prlimit could not raise the open-file limit from {soft} to {hard}");
        }
    }
    Ok(())
}

fn mailborder(
    bin: &Path,
    (sink_port, sink_pid): (u16, i32),
    who: Attackers,
    window: Duration,
) -> Result<Row> {
    let dir = tempfile::Builder::new().prefix("mb-attack-").tempdir()?;
    let d = dir.path();
    let (port, submission) = (free_port(), free_port());
    let (cert, key) = mb_testkit::self_signed();
    fs::write(d.join("tls.crt"), cert)?;
    fs::write(d.join("tls.key"), key)?;
    // The defences as shipped (autoban, per-client and per-listener limits); only the
    // loopback trust is narrowed to 127.0.0.1 so the attackers' addresses are judged.
    let config = format!(
        "process.user = \"\"\nprocess.config_wait = \"0s\"\n\
         [paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/log\"\n\
         [log]\nlevel = \"warn\"\n\
         [network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.smtp.tls]\ncert = \"{d}/tls.crt\"\nkey = \"{d}/tls.key\"\n\
         [network.submission]\nenabled = true\nport = {submission}\n\
         [network.reinject]\nport = {}\n\
         [network.protection]\ntrusted_networks = \"127.0.0.1/32\"\n\
         [smtp]\nhostname = \"mb.bench.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [queue]\nmin_free_space = \"0\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"none\"\n\
         [filter]\nenabled = false\n",
        free_port(),
        d = d.display()
    );
    fs::write(d.join("mailborder.toml"), config)?;
    let log = fs::File::create(d.join("smtpd.log"))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(d.join("mailborder.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let smtpd = Proc {
        child,
        name: "mb-smtpd".into(),
    };
    let socket = d.join("run/mb-smtpd.sock");
    wait_until("mb-smtpd", Duration::from_secs(30), || socket.exists())
        .with_context(|| fs::read_to_string(d.join("smtpd.log")).unwrap_or_default())?;
    let target = Target {
        smtp: port,
        submission: Some(submission),
    };
    row("mb-smtpd", target, who, window, &[smtpd.pid()], sink_pid)
}

fn postfix((sink_port, sink_pid): (u16, i32), who: Attackers, window: Duration) -> Result<Row> {
    // Postfix's defaults, except that mynetworks leaves out the attackers' loopback
    // addresses (the test kit trusts 127.0.0.0/8).
    let pf = Postfix::start(
        &format!("[127.0.0.1]:{sink_port}"),
        "mynetworks = 127.0.0.1/32\n",
    )?;
    let master = pf.master_pid().context("no postfix master pid")?;
    let target = Target {
        smtp: pf.port,
        submission: None,
    };
    row("Postfix", target, who, window, &[master], sink_pid)
}

/// Runs the attack against mb-smtpd then Postfix (`MB_ATTACK_ONLY` chooses the
/// attackers): their rows, in that order.
pub(crate) fn run(mb_smtpd: &Path, seconds: u64) -> Result<[Row; 2]> {
    raise_nofile(5000)?;
    let who = Attackers::from_env()?;
    let window = Duration::from_secs(seconds.max(5));
    eprintln!(
        "xtask: bench --attack: the legitimate client (4 sessions from {LEGIT}) for {}s alone, {}s under attack ({}) and {}s alone again, against mb-smtpd then Postfix",
        window.as_secs(),
        window.as_secs(),
        who.names(),
        window.as_secs()
    );
    let (sink_port, sink) = sink()?;
    let sink = (sink_port, sink.pid());
    Ok([
        mailborder(mb_smtpd, sink, who, window)?,
        postfix(sink, who, window)?,
    ])
}

/// `cargo xtask bench --attack`: runs the attack and prints every figure.
pub fn attack(mb_smtpd: &Path, seconds: u64) -> Result<()> {
    let rows = run(mb_smtpd, seconds)?;
    print!("{}", details(&rows)?);
    Ok(())
}

/// The per-attacker table, the CPU by phase and the refusals seen: `--attack`'s output,
/// and what the full bench's attack step writes to its log.
pub(crate) fn details(rows: &[Row]) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    writeln!(out, "attackers: {}", Attackers::from_env()?.names())?;
    writeln!(
        out,
        "{:<10} {:>16} {:>14} {:>7} {:>15} {:>9} {:>16} {:>10} {:>10} {:>14} {:>12}",
        "target",
        "alone msg/s b/a",
        "attacked msg/s",
        "ratio",
        "legit refusals",
        "peak MiB",
        "flood adm/ref",
        "idle held",
        "slow held",
        "auth 535/tried",
        "20MB acc/ref"
    )?;
    for r in rows {
        let t = &r.tally;
        writeln!(
            out,
            "{:<10} {:>16} {:>14.0} {:>7.2} {:>15} {:>9.1} {:>16} {:>10} {:>10} {:>14} {:>12}",
            r.name,
            format!("{:.0}/{:.0}", r.alone, r.after),
            r.attacked,
            r.ratio(),
            format!("{}/{}", r.refused_alone, r.refused_attacked),
            r.peak_mib,
            format!(
                "{}/{}",
                t.flood_admitted.load(Relaxed),
                t.flood_refused.load(Relaxed)
            ),
            t.idle_peak.load(Relaxed),
            t.slow_peak.load(Relaxed),
            format!(
                "{}/{}",
                t.auth_refused_password.load(Relaxed),
                t.auth_tried.load(Relaxed)
            ),
            format!(
                "{}/{}",
                t.big_accepted.load(Relaxed),
                t.big_refused.load(Relaxed)
            ),
        )?;
    }
    writeln!(
        out,
        "{:<10} {:<9} {:>6} {:>8} {:>10} {:>7} {:>7} {:>14} {:>12}",
        "CPU",
        "phase",
        "load",
        "target",
        "attackers",
        "legit",
        "sink",
        "msg/target-s",
        "atk conn/s"
    )?;
    for r in rows {
        for (phase, rate, c) in [
            ("alone", r.alone, r.cpu_alone),
            ("attacked", r.attacked, r.cpu_attacked),
            ("after", r.after, r.cpu_after),
        ] {
            writeln!(
                out,
                "{:<10} {:<9} {:>6.2} {:>8.2} {:>10.2} {:>7.2} {:>7.2} {:>14.0} {:>12.0}",
                r.name,
                phase,
                c.load,
                c.target,
                c.attackers,
                c.legit,
                c.sink,
                if c.target > 0.0 {
                    rate / c.target
                } else {
                    f64::NAN
                },
                c.attempts
            )?;
        }
    }
    for r in rows {
        let big = r.tally.big_reasons.lock().expect("reasons");
        if !big.is_empty() {
            writeln!(out, "{}: 20 MB messages refused by: {:?}", r.name, *big)?;
        }
    }
    for r in rows {
        let reasons = r.tally.legit_reasons.lock().expect("reasons");
        if !reasons.is_empty() || !r.reasons_alone.is_empty() {
            writeln!(
                out,
                "{}: the legitimate sender was refused or stalled: alone {:?}; under attack {:?}",
                r.name, r.reasons_alone, *reasons
            )?;
        }
    }
    writeln!(
        out,
        "alone msg/s b/a: before and after the attack; ratio: under attack over the mean of the two; legit refusals: alone (both)/under attack; idle and slow held: most sessions open at once; auth 535/tried: guesses that reached a password check"
    )?;
    writeln!(
        out,
        "CPU: seconds of CPU per second of the phase (2.00 = two cores) used by the target (its process family), the attackers and the legitimate client (this process's threads of each, on runtimes of their own) and the relay's smtp-sink; msg/target-s: legitimate messages per second of the target's CPU; atk conn/s: connections the attackers opened a second; load: 1-minute load average at the phase's start. Everything shares this machine's {} cores: what the attackers and the sink use, the target cannot, so read the ratio together with these figures (it is not corrected for them).",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_waiting_past_the_limit_is_reported_with_its_step() {
        let tally = Tally::default();
        let long_ago = Instant::now()
            .checked_sub(STALLED + Duration::from_secs(2))
            .expect("monotonic clock past its start");
        *tally.legit_waiting[0].lock().expect("waiting") = Some(("the greeting", long_ago));
        *tally.legit_waiting[1].lock().expect("waiting") =
            Some(("a message's replies", Instant::now()));
        let stalls = stalled(&tally);
        assert_eq!(stalls.len(), 1, "{stalls:?}");
        assert!(
            stalls[0].starts_with("stalled 7 s waiting for the greeting"),
            "{stalls:?}"
        );
    }
}
