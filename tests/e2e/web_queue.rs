//! mb-web's quarantine, message log, queue and cluster areas against real daemons: mail
//! quarantined by a real gateway for two domains, then listed, shown, downloaded,
//! released and deleted over mb-web's socket by an admin, a domain admin and a user,
//! each seeing only its own (another's message is 404, as one that does not exist).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_testkit::{Gateway, Proc, SmtpSink, bin, free_port, text, wait_until};
use serde_json::Value as Json;

use crate::smtp::Raw;

/// A gateway (mb-rpcd, one filter worker, mb-smtpd) serving a.test and b.test, relaying
/// to a sink, quarantining at a score of 1.0, and mb-web on it.
struct Site {
    gw: Gateway,
    _web: Proc,
    sink: SmtpSink,
    smtp: u16,
}

/// An answer: status, headers, body as JSON (the text as a JSON string when not JSON).
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Json,
    bytes: Bytes,
}

impl Site {
    /// With `dead_relay`, the relay is a port nobody listens on: mail stays queued.
    fn start(dead_relay: bool) -> Site {
        let sink = SmtpSink::start(&[]).unwrap();
        let (smtp, reinject, https) = (free_port(), free_port(), free_port());
        let relay = if dead_relay { free_port() } else { sink.port };
        let mut gw = Gateway::new(&format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp}\nrate_per_source = 1000\nconnection_rate = 10000\n\
             [network.reinject]\nport = {reinject}\n[network.protection]\nmode = \"public\"\n\
             [smtp]\nhostname = \"gw.served.test\"\ndomains = \"a.test,b.test\"\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {relay}\ntls = \"none\"\n\
             [filter]\nenabled = true\nworkers = 1\nnext_hop = \"127.0.0.1:{reinject}\"\n\
             [spam.threshold]\ntag = 0.5\nquarantine = 1.0\nreject = 20.0\n"
        ));
        let (cert, key) = mb_testkit::self_signed();
        std::fs::write(gw.path("web.crt"), &cert).unwrap();
        std::fs::write(gw.path("web.key"), &key).unwrap();
        let mut cfg = std::fs::read_to_string(&gw.config).unwrap();
        cfg.push_str(&format!(
            "[network.https]\nlisten = \"127.0.0.1\"\nport = {https}\n\
             \"tls.cert\" = \"{}\"\n\"tls.key\" = \"{}\"\n[web]\ntotp_required = \"\"\n",
            gw.path("web.crt").display(),
            gw.path("web.key").display()
        ));
        std::fs::write(&gw.config, cfg).unwrap();
        gw.start().unwrap();
        gw.start_filter(1).unwrap();
        gw.start_smtpd().unwrap();
        let log = std::fs::File::create(gw.path("web.log")).unwrap();
        let child = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&gw.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let site = Site {
            _web: Proc {
                child,
                name: "mb-web".into(),
            },
            gw,
            sink,
            smtp,
        };
        let socket = site.socket();
        // Listening, not only bound (a connection just before `listen` is refused).
        wait_until("mb-web's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}: {}", site.log()));
        site
    }

    fn socket(&self) -> PathBuf {
        self.gw.path("run/mb-web.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.gw.path("web.log")).unwrap_or_default() + &self.gw.log()
    }

    /// An API key's secret, made with `mb-web key create` (as the local admin).
    fn key(&self, scope: &[&str]) -> String {
        let mut args = vec![
            "--config",
            self.gw.config.to_str().unwrap(),
            "key",
            "create",
        ];
        args.extend(["--json", "--expires", "1d"]);
        args.extend(scope);
        let (code, out, err) = text(&Command::new(bin("mb-web")).args(&args).output().unwrap());
        assert_eq!(code, 0, "{out}{err}");
        let v: Json = serde_json::from_str(&out).unwrap();
        format!("Bearer {}", v["secret"].as_str().unwrap())
    }

    /// A request over mb-web's socket: with an API key, or as the local admin (this
    /// process's user, mb-web's own) without one.
    fn call(&self, key: Option<&str>, method: Method, path: &str) -> Reply {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
            let uri: hyper::Uri = hyperlocal::Uri::new(self.socket(), path).into();
            let mut b = Request::builder()
                .method(method)
                .uri(uri)
                .header("host", "localhost");
            if let Some(k) = key {
                b = b.header("authorization", k);
            }
            let resp = client
                .request(b.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
            Reply {
                status,
                headers,
                body,
                bytes,
            }
        })
    }

    fn get(&self, key: Option<&str>, path: &str) -> Reply {
        self.call(key, Method::GET, path)
    }

    /// Sends a message without a Date field (it scores 1.0: quarantined) to `rcpt`.
    fn send(&self, rcpt: &str, message: &str) {
        let mut c = Raw::connect(self.smtp);
        c.reply();
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<alice@sender.test>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("250"), "{rcpt}: {r}");
        c.cmd("DATA");
        let r = c.cmd(&format!("{message}."));
        c.cmd("QUIT");
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }
}

/// The subjects of a list (quarantine entries or log events), sorted.
fn subjects(list: &Json) -> Vec<String> {
    let mut s: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list:#}"))
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_string())
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

fn id_of(list: &Json, subject: &str) -> String {
    list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == subject)
        .unwrap_or_else(|| panic!("{subject} not in {list:#}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn quarantine_and_log_are_scoped_to_each_role_and_release_delivers() {
    let site = Site::start(false);
    let dora = site.key(&["--role", "domain-admin", "--domains", "a.test"]);
    let jane = site.key(&["--role", "user", "--addresses", "jane@a.test"]);
    let (dora, jane) = (Some(dora.as_str()), Some(jane.as_str()));
    site.send(
        "ann@a.test",
        "From: alice@sender.test\r\nTo: ann@a.test\r\nSubject: for a\r\nMessage-ID: <qa@sender.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/html\r\n\r\n<p>held <b>for</b> ann</p>\r\n\
         --b1\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"notes.txt\"\r\n\r\nnotes\r\n--b1--\r\n",
    );
    site.send(
        "bob@b.test",
        "From: alice@sender.test\r\nTo: bob@b.test\r\nSubject: for b\r\nMessage-ID: <qb@sender.test>\r\n\r\nheld for bob\r\n",
    );
    site.send(
        "jane@a.test",
        "From: alice@sender.test\r\nTo: jane@a.test\r\nSubject: for jane\r\nMessage-ID: <qj@sender.test>\r\n\r\nheld for jane\r\n",
    );

    // The admin (the local admin on the socket) sees all three.
    let mut all = Json::Null;
    wait_until(
        "three messages quarantined",
        Duration::from_secs(30),
        || {
            all = site.get(None, "/api/v1/quarantine").body;
            // The total is counted apart from the list: both must have all three.
            all["total"] == 3 && all["entries"].as_array().is_some_and(|e| e.len() == 3)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {all:#}\n{}", site.log()));
    assert_eq!(
        subjects(&all["entries"]),
        ["for a", "for b", "for jane"],
        "{all:#}"
    );
    let (a, b, j) = (
        id_of(&all, "for a"),
        id_of(&all, "for b"),
        id_of(&all, "for jane"),
    );
    // The filters are mb-quarantine's.
    let r = site.get(None, "/api/v1/quarantine?to=bob@b.test");
    assert_eq!(subjects(&r.body["entries"]), ["for b"], "{r:?}");
    let r = site.get(None, "/api/v1/quarantine?since=soon");
    assert_eq!(r.status, 400, "{r:?}");

    // The domain admin of a.test: its two, not b.test's; the user: its one.
    let r = site.get(dora, "/api/v1/quarantine");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(subjects(&r.body["entries"]), ["for a", "for jane"], "{r:?}");
    assert_eq!(r.body["total"], 2, "totals are of what it may see: {r:?}");
    let r = site.get(jane, "/api/v1/quarantine");
    assert_eq!(subjects(&r.body["entries"]), ["for jane"], "{r:?}");

    // Another domain's message does not exist for it: 404 in mb-rpcd's words for every
    // verb, and the message is still there afterwards.
    let missing = |id: &str| {
        format!("no message {id} in the quarantine (mb-quarantine list shows what is there)")
    };
    for (method, path) in [
        (Method::GET, format!("/api/v1/quarantine/{b}")),
        (Method::GET, format!("/api/v1/quarantine/{b}/raw")),
        (Method::POST, format!("/api/v1/quarantine/{b}/release")),
        (Method::DELETE, format!("/api/v1/quarantine/{b}")),
    ] {
        let r = site.call(dora, method.clone(), &path);
        assert_eq!(r.status, 404, "{method} {path}: {r:?}");
        assert_eq!(r.body["detail"], missing(&b), "{r:?}");
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    for path in [
        format!("/api/v1/quarantine/{a}"),
        format!("/api/v1/quarantine/{a}/raw"),
    ] {
        assert_eq!(site.get(jane, &path).status, 404, "jane sees ann's: {path}");
    }
    assert_eq!(site.get(None, "/api/v1/quarantine").body["total"], 3);

    // Show: headers, text (HTML only as text) and attachment names.
    let r = site.get(dora, &format!("/api/v1/quarantine/{a}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: for a"),
        "{r:?}"
    );
    let shown = r.body["text"].as_str().unwrap();
    assert!(
        shown.contains("held") && shown.contains("ann") && !shown.contains('<'),
        "{r:?}"
    );
    assert_eq!(r.body["attachments"], serde_json::json!(["notes.txt"]));
    assert_eq!(r.body["recipients"], serde_json::json!(["ann@a.test"]));
    // Raw: a download, never rendered.
    let r = site.get(dora, &format!("/api/v1/quarantine/{a}/raw"));
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "message/rfc822");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert!(
        r.headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment;"),
        "{r:?}"
    );
    let raw = String::from_utf8_lossy(&r.bytes);
    assert!(
        raw.contains("Subject: for a") && raw.contains("<p>held"),
        "{raw}"
    );

    // Release by the domain admin: delivered to the sink, gone from the quarantine.
    let r = site.call(
        dora,
        Method::POST,
        &format!("/api/v1/quarantine/{a}/release"),
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", site.log());
    assert_eq!(r.body["recipients"], serde_json::json!(["ann@a.test"]));
    assert!(
        r.body["reply"].as_str().unwrap().starts_with("250"),
        "{r:?}"
    );
    wait_until(
        "the released message at the sink",
        Duration::from_secs(20),
        || {
            site.sink
                .messages()
                .iter()
                .any(|m| m.contains("Subject: for a"))
        },
    )
    .unwrap();
    assert!(
        !site
            .sink
            .messages()
            .iter()
            .any(|m| m.contains("Subject: for b")),
        "only the released message is delivered"
    );
    // A second release: 404 with mb-quarantine's words.
    let again = site.call(
        dora,
        Method::POST,
        &format!("/api/v1/quarantine/{a}/release"),
    );
    assert_eq!(again.status, 404, "{again:?}");
    let (code, _, err) = text(&site.gw.tool("mb-quarantine", &["release", &a]));
    assert_eq!(code, 1);
    assert!(
        err.contains(again.body["detail"].as_str().unwrap()),
        "the API and the CLI word it alike: {err} / {again:?}"
    );

    // Delete by the user: gone.
    let r = site.call(jane, Method::DELETE, &format!("/api/v1/quarantine/{j}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["deleted"], j);
    assert_eq!(
        site.get(jane, &format!("/api/v1/quarantine/{j}")).status,
        404
    );
    let left = site.get(None, "/api/v1/quarantine").body;
    assert_eq!(subjects(&left["entries"]), ["for b"], "{left:#}");

    // The message log, scoped the same way.
    let log = |key: Option<&str>| {
        let r = site.get(key, "/api/v1/log?verdict=quarantine&since=1h");
        assert_eq!(r.status, 200, "{r:?}");
        subjects(&r.body)
    };
    let mut seen = Vec::new();
    wait_until("three scans in the log", Duration::from_secs(20), || {
        seen = log(None);
        seen.len() == 3
    })
    .unwrap_or_else(|e| panic!("{e}: {seen:?}"));
    assert_eq!(seen, ["for a", "for b", "for jane"]);
    assert_eq!(log(dora), ["for a", "for jane"]);
    assert_eq!(log(jane), ["for jane"]);
    let r = site.get(dora, "/api/v1/log?message_id=qb@sender.test");
    assert_eq!(r.body, serde_json::json!([]), "{r:?}");
    let r = site.get(None, "/api/v1/log?message_id=qb@sender.test");
    assert!(!r.body.as_array().unwrap().is_empty(), "{r:?}");
    let r = site.get(None, "/api/v1/log?verdict=maybe");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("verdict must be one of")
    );

    // Queue and cluster: administrators only, through mb-smtpd's and mb-cluster's gRPC.
    let r = site.get(None, "/api/v1/queue");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.is_array(), "{r:?}");
    for path in ["/api/v1/queue", "/api/v1/cluster"] {
        assert_eq!(site.get(dora, path).status, 403, "{path}");
    }
    let r = site.get(None, "/api/v1/queue/NOSUCHID1");
    let (code, _, err) = text(&site.gw.tool("mb-queue", &["show", "NOSUCHID1"]));
    assert_eq!(code, 1, "{err}");
    assert!(r.status == 404 || r.status == 400, "{r:?}");
    assert!(
        err.contains(r.body["detail"].as_str().unwrap()),
        "the API and mb-queue word it alike: {err} / {r:?}"
    );
    let r = site.call(None, Method::POST, "/api/v1/queue/flush");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["flushed"], 0);
    // mb-cluster does not run here: 503 in the CLIs' words.
    let r = site.get(None, "/api/v1/cluster");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("mb-cluster is not running"),
        "{r:?}"
    );
}

#[test]
fn the_queue_is_held_released_requeued_and_deleted_by_admins_only() {
    let site = Site::start(true);
    let dora = site.key(&["--role", "domain-admin", "--domains", "a.test"]);
    let dora = Some(dora.as_str());
    // A clean message (it has a Date field) for a relay that does not answer: it stays.
    site.send(
        "ann@a.test",
        "From: alice@sender.test\r\nTo: ann@a.test\r\nSubject: waiting\r\n\
         Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <w1@sender.test>\r\n\r\nhello\r\n",
    );
    let mut listed = Json::Null;
    wait_until("the message in the queue", Duration::from_secs(30), || {
        listed = site.get(None, "/api/v1/queue").body;
        listed.as_array().is_some_and(|a| !a.is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}: {listed:#}\n{}", site.log()));
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        listed[0]["recipients"][0]["address"], "ann@a.test",
        "{listed:#}"
    );
    // Every verb is an administrator's: a domain admin is refused before mb-smtpd is asked.
    for (method, path) in [
        (Method::GET, "/api/v1/queue".to_string()),
        (Method::GET, format!("/api/v1/queue/{id}")),
        (Method::POST, format!("/api/v1/queue/{id}/hold")),
        (Method::DELETE, format!("/api/v1/queue/{id}")),
        (Method::POST, "/api/v1/queue/flush".to_string()),
    ] {
        let r = site.call(dora, method.clone(), &path);
        assert_eq!(r.status, 403, "{method} {path}: {r:?}");
    }
    let r = site.get(None, &format!("/api/v1/queue/{id}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: waiting"),
        "{r:?}"
    );
    let r = site.call(None, Method::POST, &format!("/api/v1/queue/{id}/hold"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["queue"], "hold", "{r:?}");
    let held = site.get(None, "/api/v1/queue?queue=hold").body;
    assert_eq!(held.as_array().map(Vec::len), Some(1), "{held:#}");
    // mb-queue sees the same.
    let (code, out, err) = text(
        &site
            .gw
            .tool("mb-queue", &["list", "--json", "--queue", "hold"]),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");
    let r = site.call(None, Method::POST, &format!("/api/v1/queue/{id}/release"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_ne!(r.body["queue"], "hold", "{r:?}");
    // Released, it is tried at once against the dead relay; once deferred, start it over.
    let deferred = |site: &Site| {
        wait_until("the message deferred", Duration::from_secs(30), || {
            site.get(None, &format!("/api/v1/queue/{id}")).body["queue"] == "deferred"
        })
        .unwrap_or_else(|e| panic!("{e}: {}", site.log()));
    };
    deferred(&site);
    // "deferred" can be seen before the attempt that deferred it has ended: a requeue
    // then is refused with 409 and "try again" (it would be undone by the attempt's
    // deferral), and is accepted once the attempt is over.
    let mut r = site.call(None, Method::POST, &format!("/api/v1/queue/{id}/requeue"));
    let started = std::time::Instant::now();
    while r.status == 409 && started.elapsed() < Duration::from_secs(30) {
        assert!(
            r.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("being delivered now")),
            "{r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        r = site.call(None, Method::POST, &format!("/api/v1/queue/{id}/requeue"));
    }
    assert_eq!(r.status, 200, "{r:?}");
    deferred(&site);
    let r = site.call(None, Method::POST, "/api/v1/queue/flush");
    assert_eq!(
        (r.status, &r.body["flushed"]),
        (200, &serde_json::json!(1)),
        "{r:?}"
    );
    deferred(&site);
    let r = site.call(None, Method::DELETE, "/api/v1/queue");
    assert_eq!(r.status, 400, "a whole-queue delete names its queue: {r:?}");
    let r = site.call(None, Method::DELETE, &format!("/api/v1/queue/{id}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["deleted"], 1, "{r:?}");
    let r = site.get(None, &format!("/api/v1/queue/{id}"));
    let (code, _, err) = text(&site.gw.tool("mb-queue", &["show", &id]));
    assert_eq!((r.status, code), (404, 1), "{r:?} / {err}");
    assert!(
        err.contains(r.body["detail"].as_str().unwrap()),
        "{err} / {r:?}"
    );
    assert_eq!(site.get(None, "/api/v1/queue").body, serde_json::json!([]));
}
