//! mb-web with real daemons: its API over the Unix socket (hyperlocal) and over HTTPS
//! (a rustls client), `/health` following the filter workers, `/metrics` through
//! promtool, the 80→443 redirect, the per-address rate limit, the security headers, the
//! certificate reload on SIGHUP, the bounds on malformed, oversized and slow requests,
//! and the OpenAPI document against the routes that really answer.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::http::HeaderMap;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_testkit::{Gateway, Proc, bin, free_port, require, self_signed, text, wait_until};
use nix::sys::signal::Signal;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gateway (mb-rpcd, mb-smtpd, one filter worker) with mb-web in front.
struct Web {
    gw: Gateway,
    web: Option<Proc>,
    https: u16,
    http: u16,
    /// The certificate mb-web serves (PEM), trusted by the test's client.
    cert: String,
}

impl Web {
    /// Starts everything; `extra` goes into `[network.https]`.
    fn start(extra: &str) -> Web {
        let (https, http) = (free_port(), free_port());
        let mut gw = Gateway::new(&format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp}\n\
             [network.reinject]\nport = {reinject}\n\
             [filter]\nlisten = \"127.0.0.1\"\nport = {filter}\nworkers = 1\n\
             [network.http]\nenabled = true\nport = {http}\n\
             [network.https]\nlisten = \"127.0.0.1\"\nport = {https}\ntimeout = \"2s\"\n{extra}\n\
             [network.https.tls]\ncert = \"CERT\"\nkey = \"KEY\"\n",
            smtp = free_port(),
            reinject = free_port(),
            filter = free_port(),
        ));
        let (cert, key) = self_signed();
        let (cert_path, key_path) = (gw.path("web.crt"), gw.path("web.key"));
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        let config = std::fs::read_to_string(&gw.config)
            .unwrap()
            .replace("CERT", &cert_path.display().to_string())
            .replace("KEY", &key_path.display().to_string());
        std::fs::write(&gw.config, config).unwrap();
        gw.start().unwrap();
        gw.start_smtpd().unwrap();
        gw.start_filter(1).unwrap();
        let log = gw.path("web.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&gw.config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn mb-web");
        let mut web = Proc {
            child,
            name: "mb-web".into(),
        };
        let socket = gw.path("run/mb-web.sock");
        // Listening, not only bound: the file appears a moment before `listen` (a
        // connection in between is refused).
        let started = wait_until("mb-web's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
                || matches!(web.child.try_wait(), Ok(Some(_)))
        });
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            started.is_ok() && web.child.try_wait().is_ok_and(|s| s.is_none()),
            "mb-web did not start:\n{}",
            read_log()
        );
        Web {
            gw,
            web: Some(web),
            https,
            http,
            cert,
        }
    }

    fn socket(&self) -> PathBuf {
        self.gw.path("run/mb-web.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.gw.path("web.log")).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.web.as_ref().map_or(0, Proc::pid)
    }
}

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The server's certificate (DER), over HTTPS.
    peer_cert: Option<Vec<u8>>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A request on mb-web's Unix socket, as root (the local administrator).
fn socket_req(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Reply {
    rt().block_on(async {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(socket, path).into();
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
            .await
            .expect("mb-web answers within 30s")
            .expect("request over the socket");
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes().to_vec(),
            peer_cert: None,
        }
    })
}

fn client_config(trusted: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TCP connection to 127.0.0.1:`port` from `source`.
async fn connect_from(source: IpAddr, port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect")
}

/// One HTTPS request from `source`, trusting `trusted` certificates.
fn https_req(
    port: u16,
    source: &str,
    trusted: &[&str],
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    rt().block_on(async {
        let tcp = connect_from(source.parse().unwrap(), port).await;
        let tls = tokio_rustls::TlsConnector::from(client_config(trusted))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("localhost:{port}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("HTTPS request");
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes().to_vec(),
            peer_cert,
        }
    })
}

/// Writes `request` over TLS as it is and reads what comes back until the server closes
/// (or `wait` passes); returns the bytes and how long the server took to close.
fn raw_tls(port: u16, cert: &str, request: &[u8], wait: Duration) -> (String, Duration) {
    rt().block_on(async {
        let tcp = connect_from([127, 0, 0, 1].into(), port).await;
        let mut tls = tokio_rustls::TlsConnector::from(client_config(&[cert]))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let started = Instant::now();
        // The server may answer and close before the whole request is written.
        let _ = tls.write_all(request).await;
        let _ = tls.flush().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, tls.read_to_end(&mut out)).await;
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    })
}

/// The security headers every answer carries.
fn assert_security_headers(r: &Reply, https: bool) {
    let csp = r.header("content-security-policy");
    assert!(csp.contains("default-src 'none'"), "CSP: {csp:?}");
    assert!(csp.contains("frame-ancestors 'none'"), "CSP: {csp:?}");
    assert!(!csp.contains("unsafe-inline"), "CSP: {csp:?}");
    assert_eq!(r.header("x-frame-options"), "DENY");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    assert_eq!(r.header("referrer-policy"), "no-referrer");
    let hsts = r.header("strict-transport-security");
    if https {
        assert!(hsts.starts_with("max-age=31536000"), "HSTS: {hsts:?}");
    } else {
        assert!(hsts.is_empty(), "HSTS over plain HTTP: {hsts:?}");
    }
}

#[test]
fn status_health_and_metrics_over_the_socket_and_https() {
    let promtool = require("promtool", "prometheus");
    let mut w = Web::start("");
    let sock = w.socket();

    // Status over the socket as root: every daemon of the node, mb-web among them.
    let r = socket_req(&sock, "GET", "/api/v1/status", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_security_headers(&r, false);
    let status = r.json();
    let daemon = |name: &str| {
        status["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {status}"))
    };
    for name in ["mb-rpcd", "mb-smtpd", "mb-filter@1", "mb-web"] {
        assert_eq!(daemon(name)["state"], "running", "{name}: {status}");
    }
    let db = status["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "database")
        .cloned()
        .unwrap();
    assert_eq!(db["state"], "ok", "{status}");

    // The same over HTTPS needs a login: a problem document, not the status.
    let r = https_req(
        w.https,
        "127.0.0.1",
        &[&w.cert],
        "GET",
        "/api/v1/status",
        &[],
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/problem+json");
    assert_eq!(r.json()["status"], 401);
    assert_security_headers(&r, true);

    // mb-status sees mb-web like any daemon.
    let (code, out, err) = text(&w.gw.tool("mb-status", &["--json"]));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    let web = v["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mb-web")
        .cloned()
        .unwrap_or_else(|| panic!("mb-status does not show mb-web: {out}"));
    assert_eq!(web["state"], "running", "{out}");
    assert!(
        web["listening"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str() == Some(&format!("https:127.0.0.1:{}", w.https))),
        "{web}"
    );
    assert_eq!(code, 0, "{out}{err}");

    // /metrics: promtool accepts it, and it carries the daemons' counters.
    let r = socket_req(&sock, "GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = r.text();
    for needle in [
        "mailborder_up{daemon=\"mb-smtpd\"} 1",
        "mailborder_up{daemon=\"mb-filter@1\"} 1",
        "# TYPE mailborder_filter_scanned_total counter",
        "# HELP mailborder_smtpd_delivered_total delivered",
        "mailborder_quarantine_messages 0",
        "# TYPE mailborder_component_latency_seconds gauge",
        "mailborder_queue_messages{queue=\"deferred\"}",
    ] {
        assert!(metrics.contains(needle), "{needle:?} missing in\n{metrics}");
    }
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        r.header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    // OpenMetrics for a scraper that asks for it.
    let om = rt().block_on(async {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let req = Request::get(hyper::Uri::from(hyperlocal::Uri::new(&sock, "/metrics")))
            .header("accept", "application/openmetrics-text; version=1.0.0")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (kind, String::from_utf8_lossy(&body).into_owned())
    });
    assert!(om.0.starts_with("application/openmetrics-text"), "{}", om.0);
    assert!(om.1.ends_with("# EOF\n"), "{}", om.1);
    assert!(
        om.1.contains("# UNIT mailborder_component_latency_seconds seconds"),
        "{}",
        om.1
    );
    // Not for anonymous clients.
    let r = https_req(w.https, "127.0.0.1", &[&w.cert], "GET", "/metrics", &[]);
    assert_eq!(r.status, 401, "{}", r.text());

    // /health: 200 while mail flows, 503 with the reason once the workers stop; over
    // HTTPS with no login, as a load balancer asks.
    let r = https_req(w.https, "127.0.0.1", &[&w.cert], "GET", "/health", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    for mut f in std::mem::take(&mut w.gw.filters) {
        f.stop(Duration::from_secs(15));
    }
    let r = https_req(w.https, "127.0.0.1", &[&w.cert], "GET", "/health", &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    let h = r.json();
    assert_eq!(h["status"], "failing");
    assert!(h["reason"].as_str().unwrap().contains("filter"), "{h}");

    // mb-web never opened the database: no descriptor of it points at a database file.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", w.pid())).unwrap();
    for fd in fds {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        let t = target.display().to_string();
        assert!(
            !t.contains("mailborder.db")
                && !t.starts_with(&w.gw.path("data").display().to_string()),
            "mb-web holds {t} open"
        );
    }
    assert!(!w.log().contains("ERROR"), "{}", w.log());
}

#[test]
fn http_redirects_to_https_and_the_rate_limit_is_per_address() {
    let w = Web::start("rate_limit = 1\nrate_burst = 4");

    // Port 80's role: 301 to the same host and path on the HTTPS port.
    let reply = rt().block_on(async {
        let tcp = connect_from([127, 0, 0, 1].into(), w.http).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("/api/v1/status?verbose=1")
            .header("host", format!("gw.example:{}", w.http))
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await.unwrap()
    });
    assert_eq!(reply.status().as_u16(), 301);
    assert_eq!(
        reply.headers()["location"],
        format!("https://gw.example:{}/api/v1/status?verbose=1", w.https).as_str()
    );

    // A flood from 127.0.0.2: five pass (one a minute plus four), then 429s.
    let get = |source: &str| {
        https_req(
            w.https,
            source,
            &[&w.cert],
            "GET",
            "/api/v1/openapi.json",
            &[],
        )
    };
    let statuses: Vec<u16> = (0..12).map(|_| get("127.0.0.2").status).collect();
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let limited = get("127.0.0.2");
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("content-type"), "application/problem+json");
    let retry: u64 = limited.header("retry-after").parse().expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_security_headers(&limited, true);
    // Another address is not affected.
    assert_eq!(get("127.0.0.3").status, 200);
    let counters = socket_req(&w.socket(), "GET", "/api/v1/status", None).json();
    let web = counters["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mb-web")
        .cloned()
        .unwrap();
    assert!(
        web["counters"]["rate_limited"].as_u64().unwrap() >= 8,
        "{web}"
    );
}

#[test]
fn sighup_reloads_the_certificate() {
    let w = Web::start("");
    let (new_cert, new_key) = self_signed();
    let der = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    };
    let trusted = [w.cert.as_str(), new_cert.as_str()];
    let served = || {
        https_req(w.https, "127.0.0.1", &trusted, "GET", "/health", &[])
            .peer_cert
            .unwrap()
    };
    assert_eq!(served(), der(&w.cert));
    std::fs::write(w.gw.path("web.crt"), &new_cert).unwrap();
    std::fs::write(w.gw.path("web.key"), &new_key).unwrap();
    // Nothing changes before the signal.
    assert_eq!(served(), der(&w.cert));
    w.web.as_ref().unwrap().signal(Signal::SIGHUP);
    let reloaded = wait_until("the new certificate", Duration::from_secs(10), || {
        served() == der(&new_cert)
    });
    assert!(reloaded.is_ok(), "{}", w.log());
    // A broken file is refused and the running certificate stays.
    std::fs::write(w.gw.path("web.key"), "not a key").unwrap();
    w.web.as_ref().unwrap().signal(Signal::SIGHUP);
    let logged = wait_until("the refused reload", Duration::from_secs(10), || {
        w.log().contains("keeping the running certificate")
    });
    assert!(logged.is_ok(), "{}", w.log());
    assert_eq!(served(), der(&new_cert));
}

#[test]
fn malformed_oversized_and_slow_requests_get_a_clean_end() {
    let w = Web::start("max_connections = 6");
    let wait = Duration::from_secs(8);
    let (out, _) = raw_tls(w.https, &w.cert, b"GARBAGE\r\n\r\n", wait);
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (out, _) = raw_tls(w.https, &w.cert, big.as_bytes(), wait);
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    let body = "x".repeat(2 * 1024 * 1024);
    let post = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (out, _) = raw_tls(w.https, &w.cert, post.as_bytes(), wait);
    assert!(
        out.starts_with("HTTP/1.1 413"),
        "{:?}",
        &out[..out.len().min(300)]
    );
    assert!(out.contains("application/problem+json"), "{out:?}");
    // An unknown path is a problem document, headers and all.
    let r = https_req(w.https, "127.0.0.1", &[&w.cert], "GET", "/nowhere", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["detail"], "no such resource: /nowhere");
    assert_security_headers(&r, true);

    // Slowloris: headers that never end are cut off at network.https.timeout (2s).
    let (out, took) = raw_tls(
        w.https,
        &w.cert,
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n",
        wait,
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "closed after {took:?}: {out:?}"
    );
    // A TLS handshake that never starts is cut off too, and beyond max_connections new
    // connections are closed at once.
    rt().block_on(async {
        let mut idle = Vec::new();
        for _ in 0..6 {
            idle.push(connect_from([127, 0, 0, 1].into(), w.https).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut extra = connect_from([127, 0, 0, 1].into(), w.https).await;
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "a connection over the limit stayed open: {n:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        let n = tokio::time::timeout(Duration::from_secs(6), idle[0].read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection was not cut off: {n:?}"
        );
    });
    // The slots are free again.
    let r = https_req(w.https, "127.0.0.1", &[&w.cert], "GET", "/health", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let st = socket_req(&w.socket(), "GET", "/api/v1/status", None).json();
    let web = st["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "mb-web")
        .cloned()
        .unwrap();
    assert!(
        web["counters"]["connections_refused"].as_u64().unwrap() >= 1,
        "{web}"
    );
}

/// Every path and method in `/api/v1/openapi.json` is a route that answers (never the
/// fallback's 404 nor 405), the document's paths are all the router has (the crate's
/// `every_route_is_registered_with_its_document` keeps plain routes out), and each
/// parameterless GET answers with the properties its 200 schema requires.
#[test]
fn the_openapi_document_and_the_routes_agree() {
    let w = Web::start("");
    let sock = w.socket();
    let r = socket_req(&sock, "GET", "/api/v1/openapi.json", None);
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for expected in [
        "/api/v1/status",
        "/api/v1/openapi.json",
        "/health",
        "/metrics",
    ] {
        assert!(paths.contains_key(expected), "{expected} not documented");
    }
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let concrete = fill_params(path);
            let body = matches!(method.as_str(), "post" | "put" | "patch").then_some("{}");
            let r = socket_req(&sock, &method.to_uppercase(), &concrete, body);
            let fallback = r.status == 404
                && r.text().contains(&format!(
                    "no such resource: {}",
                    concrete.split('?').next().unwrap()
                ));
            assert!(
                !fallback && r.status != 405,
                "{method} {path} is documented but not routed: {} {}",
                r.status,
                r.text()
            );
            // The answer is one the document lists.
            let documented = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .any(|k| k == &r.status.to_string());
            // An error is a problem document with the fields RFC 9457 gives it.
            if r.status >= 400 {
                assert_eq!(
                    r.header("content-type"),
                    "application/problem+json",
                    "{method} {path}: {} {}",
                    r.status,
                    r.text()
                );
                let p = r.json();
                assert_eq!(p["status"], r.status, "{method} {path}: {p}");
                assert!(p["title"].is_string() && p["type"].is_string(), "{p}");
            }
            if method == "get" && !path.contains('{') {
                assert!(
                    documented,
                    "{method} {path} answered {}: {}",
                    r.status,
                    r.text()
                );
                if r.status == 200 && r.header("content-type").starts_with("application/json") {
                    let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
                    check_required(&doc, schema, &r.json(), path);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} routes checked");
    // And what is not documented is not routed.
    let r = socket_req(&sock, "GET", "/api/v1/undocumented", None);
    assert_eq!(r.status, 404);
}

/// `{name}` placeholders replaced by a value no object has.
fn fill_params(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map_or(rest.len(), |e| start + e + 1);
        out.push_str("no-such-thing");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The properties `schema` requires are in `value` (following `$ref`s into the
/// document's components, one object level deep).
fn check_required(doc: &Value, schema: &Value, value: &Value, path: &str) {
    let schema = resolve(doc, schema);
    if let Some(required) = schema["required"].as_array() {
        for field in required {
            let f = field.as_str().unwrap();
            assert!(
                value.get(f).is_some(),
                "{path}: the answer lacks {f:?}, which its schema requires: {value}"
            );
        }
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}
