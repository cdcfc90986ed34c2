//! `cargo xtask bench --api`: the REST API's latency as a client sees it, p50 and p99 of
//! `GET /api/v1/status`, a quarantine page out of 100,000 entries (an administrator's,
//! and a domain admin's whose domain holds 2,000 of them) and message log searches
//! over a million events, through mb-web over HTTPS (rustls, an API key) and over its
//! Unix socket (root: the local administrator), each on one kept-alive connection.
//!
//! The data is written straight into mb-rpcd's SQLite database once mb-rpcd has
//! migrated it, with one INSERT ... SELECT per table (the same generated events as
//! `--log-search`), which takes seconds where a million `Publish` calls would take an
//! hour. The quarantine entries have no files: mb-rpcd's retention pass drops such
//! entries only at its third pass (ten minutes on), after the measurement. A harness,
//! not a test: nothing here asserts a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mb_testkit::{Gateway, Proc, free_port, require, wait_until};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::logsearch::{EVENTS, INSERT, RECIPIENTS, columns, sql_cat, sql_client};

/// Quarantine entries generated, and the domains their recipients spread over.
const QUARANTINED: u64 = 100_000;
const DOMAINS: u64 = 50;

/// One measured request: what, how, and its latencies.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: &'static str,
    pub transport: &'static str,
    pub requests: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// The answer's size in bytes (the last one).
    pub bytes: usize,
}

/// The requests: (label, path, as the domain admin, repetitions).
const REQUESTS: &[(&str, &str, bool, usize)] = &[
    ("status", "/api/v1/status", false, 200),
    (
        "quarantine, page of 100",
        "/api/v1/quarantine?limit=100",
        false,
        100,
    ),
    (
        "quarantine, page 20 (offset 1900)",
        "/api/v1/quarantine?limit=100&offset=1900",
        false,
        100,
    ),
    (
        "quarantine, domain admin page",
        "/api/v1/quarantine?limit=100&offset=1000",
        true,
        50,
    ),
    (
        "log, last hour",
        "/api/v1/log?since=1h&limit=100",
        false,
        100,
    ),
    (
        "log, subject over 31d",
        "/api/v1/log?subject=invoice&since=31d&limit=100",
        false,
        50,
    ),
    (
        "log, recipient over 31d",
        "/api/v1/log?to=r42@served.test&since=31d&limit=100",
        false,
        50,
    ),
];

/// `cargo xtask bench --api`: measures with the binaries in `bin` and prints the table.
pub fn bench(bin: &Path) -> Result<()> {
    let rows = run(bin)?;
    print(&rows);
    Ok(())
}

/// Prints the rows as a table.
pub fn print(rows: &[Row]) {
    println!(
        "\nmb-web API latency ({QUARANTINED} quarantine entries, {EVENTS} log events, SQLite):"
    );
    println!(
        "{:<36} {:<8} {:>6} {:>10} {:>10} {:>10}",
        "REQUEST", "VIA", "N", "p50 ms", "p99 ms", "bytes"
    );
    for r in rows {
        println!(
            "{:<36} {:<8} {:>6} {:>10.2} {:>10.2} {:>10}",
            r.what,
            r.transport,
            r.requests,
            r.p50.as_secs_f64() * 1000.0,
            r.p99.as_secs_f64() * 1000.0,
            r.bytes
        );
    }
}

/// Starts mb-rpcd and mb-web from `bin` on generated data and measures every request
/// over both transports.
pub fn run(bin: &Path) -> Result<Vec<Row>> {
    let port = free_port();
    let (cert, key) = mb_testkit::self_signed();
    let mut gw = Gateway::new("");
    std::fs::write(gw.path("web.crt"), &cert)?;
    std::fs::write(gw.path("web.key"), &key)?;
    let extra = format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n[log]\nretention_days = 0\n\
         [quarantine]\nretention_days = 3650\n\
         [network.https]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_limit = 1000000\nrate_burst = 1000000\n\
         \"tls.cert\" = \"{}\"\n\"tls.key\" = \"{}\"\n[web]\ntotp_required = \"\"\n",
        gw.path("web.crt").display(),
        gw.path("web.key").display()
    );
    let mut cfg = std::fs::read_to_string(&gw.config)?;
    cfg.push_str(&extra);
    std::fs::write(&gw.config, cfg)?;
    gw.rpcd = Some(spawn(bin, "mb-rpcd", &gw, &gw.socket())?);
    seed(&gw)?;
    let socket = gw.path("run/mb-web.sock");
    let _web = spawn(bin, "mb-web", &gw, &socket)?;
    wait_until("mb-web's HTTPS port", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let admin_key = api_key(bin, &gw, &["--role", "admin"])?;
    let dora_key = api_key(
        bin,
        &gw,
        &["--role", "domain-admin", "--domains", "d7.test"],
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut rows = Vec::new();
        for (what, path, domain_admin, n) in REQUESTS {
            let key = if *domain_admin { &dora_key } else { &admin_key };
            let bearer = format!("Bearer {key}");
            let mut https = connect_https(port, &cert).await?;
            rows.push(measure(&mut https, what, "HTTPS", path, &bearer, *n).await?);
            // Root on the socket is the local administrator: no key needed, unless the
            // request is made as the domain admin.
            let mut local = connect_unix(&socket).await?;
            let auth = if *domain_admin { bearer.as_str() } else { "" };
            rows.push(measure(&mut local, what, "socket", path, auth, *n).await?);
        }
        Ok::<_, anyhow::Error>(rows)
    })
}

/// Starts daemon `name` from `bin` on `gw`'s configuration and waits for `socket`.
fn spawn(bin: &Path, name: &str, gw: &Gateway, socket: &Path) -> Result<Proc> {
    let log = std::fs::File::create(gw.path(&format!("{name}.log")))?;
    let child = Command::new(bin.join(name))
        .arg("--config")
        .arg(&gw.config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.join(name).display()))?;
    let mut proc = Proc {
        child,
        name: name.into(),
    };
    let up = wait_until(&format!("{name}'s socket"), Duration::from_secs(60), || {
        socket.exists() || matches!(proc.child.try_wait(), Ok(Some(_)))
    });
    if up.is_err() || matches!(proc.child.try_wait(), Ok(Some(_))) {
        let log = std::fs::read_to_string(gw.path(&format!("{name}.log"))).unwrap_or_default();
        bail!("{name} did not start:\n{log}");
    }
    Ok(proc)
}

/// Fills the quarantine index and the message log of `gw`'s SQLite database.
fn seed(gw: &Gateway) -> Result<()> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let started = Instant::now();
    eprintln!("api bench: generating {QUARANTINED} quarantine entries and {EVENTS} log events ...");
    // 30 days of quarantine, newest first by id; recipients over DOMAINS domains.
    let step = 30 * 86_400_000 / QUARANTINED;
    let quarantine = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {QUARANTINED}) \
         INSERT INTO quarantine (id, node, at_ms, queue_id, client_ip, sender, recipients, subject, \
         reason, score, symbols, size, path) \
         SELECT 'bq' || i, 'node1', {now_ms} - i * {step}, 'Q' || i, '10.0.' || (i % 250) || '.1', \
         's' || (i % 5000) || '@example.org', 'r' || (i % 3000) || '@d' || (i % {DOMAINS}) || '.test', \
         'Offer ' || i, 'spam (score 9.1)', 9.1, 'BAYES_SPAM' || char(10) || 'RBL_LISTED', 4096, \
         '2026/12/01/bq' || i || '.eml' FROM n;"
    );
    let events = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {EVENTS}) \
         {INSERT} SELECT {} FROM n; {RECIPIENTS}",
        columns("i", sql_cat, "/", now_ms)
    );
    sql_client(
        Command::new(require("sqlite3", "sqlite3"))
            .arg(gw.path("data/mailborder.db"))
            .arg(format!(
                "PRAGMA busy_timeout = 30000; {quarantine} {events} ANALYZE;"
            )),
    )?;
    eprintln!(
        "api bench: data generated in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Creates an API key with `scope` through `mb-web key create`; its secret.
fn api_key(bin: &Path, gw: &Gateway, scope: &[&str]) -> Result<String> {
    let out = Command::new(bin.join("mb-web"))
        .arg("--config")
        .arg(&gw.config)
        .args(["key", "create", "--json", "--expires", "1d"])
        .args(scope)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "mb-web key create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("mb-web key create --json printed no JSON")?;
    v["secret"]
        .as_str()
        .map(str::to_string)
        .context("no secret in mb-web key create's answer")
}

async fn connect_https(port: u16, cert: &str) -> Result<SendRequest<Full<Bytes>>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(cert.as_bytes())?)?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn connect_unix(socket: &PathBuf) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// `n` requests for `path` one after the other on `sender` (after a few not counted),
/// each timed from sending to the last byte of the answer.
async fn measure(
    sender: &mut SendRequest<Full<Bytes>>,
    what: &'static str,
    transport: &'static str,
    path: &str,
    authorization: &str,
    n: usize,
) -> Result<Row> {
    let mut times = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..n + 3 {
        let mut req = hyper::Request::builder()
            .uri(path)
            .header("host", "localhost");
        if !authorization.is_empty() {
            req = req.header("authorization", authorization);
        }
        let req = req.body(Full::new(Bytes::new()))?;
        sender.ready().await?;
        let t = Instant::now();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let took = t.elapsed();
        if !status.is_success() {
            bail!(
                "{path} over {transport}: {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        bytes = body.len();
        if i >= 3 {
            times.push(took);
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(Row {
        what,
        transport,
        requests: n,
        p50: at(0.50),
        p99: at(0.99),
        bytes,
    })
}
