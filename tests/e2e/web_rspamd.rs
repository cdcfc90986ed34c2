//! Rspamd over HTTP done once, with a real Rspamd: mb-filter's pooled client scanning over
//! the normal worker's Unix socket and over TCP with its connections kept alive, and
//! mb-web's reverse proxy of the controller under `/rspamd/` (administrators only, the
//! controller password added by mb-web and never shown).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, header};
use hyper_util::rt::TokioIo;
use mb_testkit::{Gateway, Rspamd, SmtpSink, free_port, text, wait_until};

use crate::web_auth::Web;

/// The password `Web::add` gives accounts.
const PASSWORD: &str = "correct horse battery";

/// The test controller's password: distinctive, so any leak is found by a plain search.
const CONTROLLER_PASSWORD: &str = "ctl-pw-5e1f0a9b77";

/// An HTTP/1.1 peer between mb-filter and Rspamd that counts the connections and the
/// `/checkv2` requests it gets, on a loopback port and on a Unix socket, and passes
/// each request to Rspamd's Unix socket. Rspamd 3.4's normal worker closes every
/// connection after its answer (`Connection: close`), so it cannot show keep-alive
/// itself; this peer keeps its client's connections open as any HTTP/1.1 server does,
/// which is what a client with a pool reuses.
struct CountingProxy {
    port: u16,
    socket: PathBuf,
    connections: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl CountingProxy {
    fn start(upstream: PathBuf) -> CountingProxy {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("proxy.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        tcp.set_nonblocking(true).unwrap();
        let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        unix.set_nonblocking(true).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(AtomicUsize::new(0));
        let (conns, counted) = (connections.clone(), checks.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
                let unix = tokio::net::UnixListener::from_std(unix).unwrap();
                loop {
                    tokio::select! {
                        Ok((s, _)) = tcp.accept() => {
                            conns.fetch_add(1, Ordering::SeqCst);
                            serve(TokioIo::new(s), upstream.clone(), counted.clone());
                        }
                        Ok((s, _)) = unix.accept() => {
                            conns.fetch_add(1, Ordering::SeqCst);
                            serve(TokioIo::new(s), upstream.clone(), counted.clone());
                        }
                    }
                }
            });
        });
        CountingProxy {
            port,
            socket,
            connections,
            checks,
            _dir: dir,
        }
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.connections.load(Ordering::SeqCst),
            self.checks.load(Ordering::SeqCst),
        )
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one client connection (kept alive), each request passed to `upstream`.
fn serve<I>(io: I, upstream: PathBuf, checks: Arc<AtomicUsize>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        forward(req, upstream.clone(), checks.clone())
    });
    tokio::spawn(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    });
}

/// Passes one request to Rspamd's socket, on a connection of its own.
async fn forward(
    req: Request<Incoming>,
    upstream: PathBuf,
    checks: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    if req.uri().path() == "/checkv2" {
        checks.fetch_add(1, Ordering::SeqCst);
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let stream = tokio::net::UnixStream::connect(&upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (mut head, body) = resp.into_parts();
    // Rspamd's "close" is about its own connection, not ours.
    head.headers.remove(header::CONNECTION);
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(head, Full::new(body)))
}

/// The `X-Spam-Status` of the delivered message with `subject`, once delivered.
fn status_of(sink: &SmtpSink, subject: &str) -> String {
    let marker = format!("Subject: {subject}");
    let find = || {
        sink.messages()
            .into_iter()
            .find(|m| m.lines().any(|l| l.trim_end() == marker))
    };
    wait_until(
        &format!("the delivery of {subject:?}"),
        Duration::from_secs(30),
        || find().is_some(),
    )
    .unwrap();
    let got = find().unwrap();
    got.lines()
        .find(|l| l.starts_with("X-Spam-Status:"))
        .unwrap_or_else(|| panic!("no X-Spam-Status: {got}"))
        .to_string()
}

/// `rspamd.url` as the filter worker reports it to mb-status (so it is the one it uses).
fn wait_for_url(gw: &Gateway, url: &str) {
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "rspamd.url", url]));
    assert_eq!(code, 0, "{err}");
    wait_until(
        &format!("mb-filter to use {url}"),
        Duration::from_secs(20),
        || {
            let (_, out, _) = text(&gw.tool("mb-status", &["--json"]));
            serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|st| {
                st["components"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["name"] == "rspamd" && c["address"] == url && c["state"] == "ok")
            })
        },
    )
    .unwrap();
}

#[test]
fn messages_are_scanned_over_rspamds_unix_socket_and_tcp_on_kept_alive_connections() {
    // Rspamd loads for 20-30 s: start it first, set up the rest meanwhile.
    let rspamd = Rspamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [rspamd]\nenabled = true\nurl = \"{}\"\ntimeout = \"10s\"\nunavailable_action = \"tempfail\"\n",
        free_port(),
        sink.port,
        rspamd.unix_url()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    rspamd.wait_ready().unwrap();
    let proxy = CountingProxy::start(rspamd.socket.clone());

    // No Message-ID and no Date: Rspamd's MISSING_MID (2.5) and MISSING_DATE (1.0). With
    // `unavailable_action = "tempfail"`, a 250 means Rspamd answered.
    let send = |subject: &str| {
        let r = crate::filter::send(
            port,
            &format!(
                "From: alice@sender.test\r\nTo: bob@served.test\r\nSubject: {subject}\r\n\r\nrspamd body\r\n"
            ),
        );
        assert!(r.starts_with("250"), "{subject}: {r}\n{}", gw.log());
        let status = status_of(&sink, subject);
        assert!(
            status.contains("MISSING_MID(2.5)") && status.contains("MISSING_DATE(1.0)"),
            "{subject}: Rspamd's symbols join the verdict: {status}"
        );
    };

    // Straight to the normal worker's Unix socket: Rspamd logs where it came from.
    send("over the unix socket");
    let log = std::fs::read_to_string(rspamd.dir.path().join("rspamd.log")).unwrap();
    let from_socket = format!("accepted connection from {}", rspamd.socket.display());
    assert!(
        log.contains(&from_socket),
        "Rspamd saw no scan on its socket: {}",
        log.lines()
            .filter(|l| l.contains("accepted connection"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Over TCP and over a Unix socket to a peer that keeps connections open: the messages
    // share one connection (a few at most), where the hand-written client connected for
    // each one.
    const MESSAGES: usize = 4;
    for (leg, url) in [
        ("tcp", format!("http://127.0.0.1:{}", proxy.port)),
        ("unix", format!("unix:{}", proxy.socket.display())),
    ] {
        // mb-status's ping, which shows the worker took the URL, counts as well: it
        // goes through the same pool.
        let (conns_before, checks_before) = proxy.counts();
        wait_for_url(&gw, &url);
        for n in 0..MESSAGES {
            send(&format!("over {leg}, message {n}"));
        }
        let (conns, checks) = proxy.counts();
        let (conns, checks) = (conns - conns_before, checks - checks_before);
        println!("{leg}: {checks} checks (and pings) on {conns} connections");
        assert_eq!(checks, MESSAGES, "{leg}: each message is checked once");
        assert!(
            conns < checks,
            "{leg}: {checks} checks took {conns} connections: they are not kept alive"
        );
    }

    // And straight over TCP to the real worker, which closes after each answer: the pool
    // notices and connects again.
    wait_for_url(&gw, &rspamd.url());
    send("over tcp to rspamd, first");
    send("over tcp to rspamd, second");
}

/// `GET` over mb-web's Unix socket with a raw request line (as root: the local
/// administrator), for request targets an HTTP library would normalise.
fn raw_local(web: &Web, target: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(web.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// A peer that records the first request it gets, raw, and answers `{}`.
fn capture() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            );
            if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rspamd_controller_is_proxied_for_administrators_with_its_password_added() {
    let rspamd = Rspamd::with_controller(CONTROLLER_PASSWORD).unwrap();
    let controller = rspamd.controller_url().unwrap();
    let web = Web::start(&format!(
        "totp_required = \"\"\n[rspamd]\ncontroller_url = \"{controller}\"\ncontroller_password = \"{CONTROLLER_PASSWORD}\"\n"
    ));
    web.add("alice", &["--role", "admin"]);
    web.add("bob", &["--role", "user", "--addresses", "bob@b.test"]);
    let alice = web.login("alice", PASSWORD, "").await;
    assert_eq!(alice.status, 200, "{alice:?}");
    let admin = alice.session_cookie();
    let bob = web.login("bob", PASSWORD, "").await;
    assert_eq!(bob.status, 200, "{bob:?}");
    let user = bob.session_cookie();
    tokio::task::block_in_place(|| rspamd.wait_ready()).unwrap();
    let mut replies = Vec::new();

    // The controller itself wants the password from loopback too (its secure_ip is
    // elsewhere): what mb-web gets, it gets because mb-web added the password.
    let direct = {
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", rspamd.controller_port.unwrap())).unwrap();
        s.write_all(b"GET /stat HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        direct.starts_with("HTTP/1.1 401") || direct.starts_with("HTTP/1.1 403"),
        "{direct}"
    );

    // An administrator's session reads /stat; a password of the browser's own is
    // replaced by the configured one.
    for extra in [None, Some(("password", "a guess"))] {
        let mut headers = vec![("cookie", admin.as_str())];
        headers.extend(extra);
        let r = web.https(Method::GET, "/rspamd/stat", &headers, None).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", web.log());
        assert_eq!(r.body["version"], "3.4", "{r:?}");
        assert!(r.body["scanned"].is_u64(), "{r:?}");
        replies.push(format!("{r:?}"));
    }
    // The controller's own errors pass through (its 404 becomes a problem document).
    let r = web
        .https(
            Method::GET,
            "/rspamd/no-such-command",
            &[("cookie", &admin)],
            None,
        )
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    replies.push(format!("{r:?}"));

    // A user, and nobody: refused before anything reaches Rspamd.
    let r = web
        .https(Method::GET, "/rspamd/stat", &[("cookie", &user)], None)
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    replies.push(format!("{r:?}"));
    let r = web.https(Method::GET, "/rspamd/stat", &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    replies.push(format!("{r:?}"));
    // A session's POST needs its CSRF token like any other state change.
    let r = web
        .https(
            Method::POST,
            "/rspamd/learnspam",
            &[("cookie", &admin)],
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");

    // Paths that would leave the controller, encoded or not; an absolute URL in the
    // request line still goes to the configured controller.
    for target in [
        "/rspamd/../api/v1/status",
        "/rspamd/%2e%2e/api/v1/status",
        "/rspamd/stat/%2E%2E%2f%2e%2e%2fapi",
        "/rspamd//evil.example/stat",
        "/rspamd/%2fetc%2fpasswd",
        "/rspamd/..%5c..%5cstat",
    ] {
        let (status, out) = tokio::task::block_in_place(|| raw_local(&web, target));
        assert_eq!(status, 400, "{target}: {out}");
        assert!(!out.contains("\"version\""), "{target}: {out}");
        replies.push(out);
    }
    let (status, out) =
        tokio::task::block_in_place(|| raw_local(&web, "http://127.0.0.1:9/rspamd/stat"));
    assert_eq!(status, 200, "{out}");
    assert!(out.contains("\"version\":\"3.4\""), "{out}");
    replies.push(out);

    // What reaches the controller: our password, none of the browser's credentials.
    let (port, seen) = capture();
    let (code, _, err) = text(&web.gw.tool(
        "mb-config",
        &[
            "set",
            "rspamd.controller_url",
            &format!("http://127.0.0.1:{port}"),
        ],
    ));
    assert_eq!(code, 0, "{err}");
    let key = {
        let r = web
            .https(
                Method::POST,
                "/api/v1/keys",
                &[
                    ("cookie", &admin),
                    ("x-csrf-token", alice.body["csrf_token"].as_str().unwrap()),
                ],
                Some(serde_json::json!({"role": "admin", "expires": "1d"})),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        r.body["secret"].as_str().unwrap().to_string()
    };
    let bearer = format!("Bearer {key}");
    let mut request = String::new();
    for _ in 0..100 {
        let r = web
            .https(
                Method::GET,
                "/rspamd/stat?x=1",
                &[
                    ("cookie", &admin),
                    ("x-forwarded-for", "192.0.2.1"),
                    ("password", "a guess"),
                ],
                None,
            )
            .await;
        replies.push(format!("{r:?}"));
        if let Ok(got) = seen.try_recv() {
            request = got;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lower = request.to_ascii_lowercase();
    assert!(lower.starts_with("get /stat?x=1 http/1.1\r\n"), "{request}");
    assert!(
        request.contains(&format!("password: {CONTROLLER_PASSWORD}\r\n")),
        "{request}"
    );
    for never in [
        "cookie:",
        "mb_session",
        "a guess",
        "x-forwarded-for",
        "authorization",
    ] {
        assert!(!lower.contains(never), "{never} passed: {request}");
    }
    let r = web
        .https(
            Method::GET,
            "/rspamd/stat",
            &[("authorization", &bearer)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "an API key works too: {r:?}");
    let request = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        !request.to_ascii_lowercase().contains("authorization"),
        "{request}"
    );

    // The password is in no answer and in no line mb-web logged, and `mb-config show`
    // masks it.
    let log = web.log();
    assert!(log.contains("proxied to the Rspamd controller"), "{log}");
    assert!(
        !log.contains(CONTROLLER_PASSWORD),
        "mb-web logged the password: {log}"
    );
    for r in &replies {
        assert!(
            !r.contains(CONTROLLER_PASSWORD),
            "an answer showed the password: {r}"
        );
    }
    let (_, listed, _) = text(&web.gw.tool("mb-config", &["show"]));
    assert!(
        listed.contains("rspamd.controller_url") || listed.contains("controller_url"),
        "{listed}"
    );
    assert!(!listed.contains(CONTROLLER_PASSWORD), "{listed}");
}
