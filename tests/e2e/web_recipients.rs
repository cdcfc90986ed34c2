//! `/api/v1/recipients` against a real mb-rpcd, mb-smtpd and mb-web: what the API
//! changes is what `mb-recipient list` shows and what RCPT enforces in list mode; a
//! domain admin is held to its domains (a request naming another domain is refused
//! whole, with the same answer whether the pattern is listed or not), a user to
//! nothing; bad bodies get problem documents. And the quarantine leak: an entry of
//! another domain whose file is gone is the same 404 as an id that does not exist.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_proto::v1::QuarantineEntry;
use mb_proto::v1::quarantine_client::QuarantineClient;
use mb_testkit::{Gateway, Proc, bin, free_port, text, wait_until};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// mb-web (stopped first) over an mb-rpcd, and mb-smtpd when asked, serving a.test and
/// b.test in list mode.
struct Rig {
    web: Proc,
    gw: Gateway,
    smtp_port: u16,
}

/// An answer: status, content type, body as JSON (a string when it is not JSON).
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    body: Json,
}

impl Reply {
    /// A refusal with `status`, as a problem document; its detail.
    fn refused(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type, "application/problem+json", "{self:?}");
        assert_eq!(self.body["status"], status, "{self:?}");
        self.body["detail"].as_str().unwrap_or_default().to_string()
    }
}

impl Rig {
    fn start(smtpd: bool) -> Rig {
        let smtp_port = free_port();
        let https = free_port();
        let mut gw = Gateway::new(&format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp_port}\n\
             [network.reinject]\nport = {}\n\
             [network.https]\nlisten = \"127.0.0.1\"\nport = {https}\nrate_limit = 1000000\nrate_burst = 100000\n\
             [smtp]\nhostname = \"mx.a.test\"\ndomains = \"a.test,b.test\"\nrecipient_verification = \"list\"\n\
             [filter]\nenabled = false\n[web]\ntotp_required = \"\"\n",
            free_port()
        ));
        gw.start().unwrap();
        if smtpd {
            gw.start_smtpd().unwrap();
        }
        let log = std::fs::File::create(gw.path("web.log")).unwrap();
        let child = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&gw.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut rig = Rig {
            web: Proc {
                child,
                name: "mb-web".into(),
            },
            gw,
            smtp_port,
        };
        let socket = rig.socket();
        let up = wait_until("mb-web's socket", Duration::from_secs(30), || {
            socket.exists()
        });
        if up.is_err() || matches!(rig.web.child.try_wait(), Ok(Some(_))) {
            panic!("mb-web did not start: {}", rig.log());
        }
        rig
    }

    fn socket(&self) -> PathBuf {
        self.gw.path("run/mb-web.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.gw.path("web.log")).unwrap_or_default() + &self.gw.log()
    }

    /// `mb-web key create --json ROLE-ARGS`: the key's id and its bearer header value.
    fn key(&self, scope: &[&str]) -> (String, String) {
        let out = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&self.gw.config)
            .args(["key", "create", "--json", "--expires", "1d"])
            .args(scope)
            .output()
            .unwrap();
        let (code, out, err) = text(&out);
        assert_eq!(code, 0, "{out}{err}");
        let v: Json = serde_json::from_str(&out).unwrap();
        (
            v["key"]["id"].as_str().unwrap().to_string(),
            format!("Bearer {}", v["secret"].as_str().unwrap()),
        )
    }

    /// `mb-recipient ARGS`: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        text(&self.gw.tool("mb-recipient", args))
    }

    /// The patterns `mb-recipient --json list` shows.
    fn listed(&self) -> Vec<String> {
        let (code, out, err) = self.cli(&["--json", "list"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Json>(&out)
            .unwrap_or_else(|e| panic!("{e}: {out}"))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["pattern"].as_str().unwrap().to_string())
            .collect()
    }

    /// A request over mb-web's socket with `authorization` (a bearer key).
    async fn send(
        &self,
        method: Method,
        path: &str,
        authorization: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Reply {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(self.socket(), path).into();
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "localhost")
            .header("authorization", authorization);
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        let resp = client
            .request(b.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            content_type,
            body,
        }
    }

    async fn json(&self, method: Method, path: &str, key: &str, body: Json) -> Reply {
        self.send(
            method,
            path,
            key,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    async fn get(&self, path: &str, key: &str) -> Reply {
        self.send(Method::GET, path, key, None, Bytes::new()).await
    }

    /// The reply to `RCPT TO:<rcpt>` in a fresh session.
    async fn rcpt(&self, rcpt: &str) -> String {
        let stream = TcpStream::connect(("127.0.0.1", self.smtp_port))
            .await
            .unwrap();
        let mut r = BufReader::new(stream);
        let mut last = String::new();
        for line in [
            None,
            Some("EHLO client.test".to_string()),
            Some("MAIL FROM:<s@sender.test>".to_string()),
            Some(format!("RCPT TO:<{rcpt}>")),
        ] {
            if let Some(l) = line {
                r.get_mut()
                    .write_all(format!("{l}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            last = reply(&mut r).await;
        }
        let _ = r.get_mut().write_all(b"QUIT\r\n").await;
        last
    }

    /// Waits (mb-smtpd rereads the list within 10 s) until RCPT to `rcpt` answers with
    /// `code`; the last reply.
    async fn rcpt_becomes(&self, rcpt: &str, code: &str) -> String {
        let start = Instant::now();
        loop {
            let r = self.rcpt(rcpt).await;
            if r.starts_with(code) || start.elapsed() > Duration::from_secs(25) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One SMTP reply's last line.
async fn reply(r: &mut BufReader<TcpStream>) -> String {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line))
            .await
            .expect("a reply within 30s")
            .unwrap_or(0);
        if n == 0 || line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line.trim_end().to_string();
        }
    }
}

fn patterns(list: &Reply) -> Vec<String> {
    assert_eq!(list.status, 200, "{list:?}");
    list.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pattern"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_api_changes_what_mb_recipient_lists_and_what_rcpt_enforces() {
    let rig = Rig::start(true);
    let (boss_id, boss) = rig.key(&["--role", "admin"]);
    // No pattern for a.test yet: list mode accepts every address of it.
    let r = rig.rcpt("bob@a.test").await;
    assert!(r.starts_with("250"), "{r}");

    // Add: an address, a wildcard and a Postfix catch-all, plus one refused.
    let r = rig
        .json(
            Method::POST,
            "/api/v1/recipients",
            &boss,
            json!({"patterns": ["Alice@A.test", "sales-*@a.test", "@b.test", "no-at-sign"], "comment": "api"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.body["added"].as_u64(), r.body["unchanged"].as_u64()),
        (Some(3), Some(0))
    );
    let invalid = r.body["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 1, "{r:?}");
    // mb-recipient's words for the same pattern.
    let (code, _, cli_err) = rig.cli(&["add", "no-at-sign"]);
    assert_eq!(code, 1);
    assert!(
        cli_err.contains(invalid[0].as_str().unwrap()),
        "{cli_err} / {invalid:?}"
    );

    // Import a Postfix map as text: comments, blank lines, first fields; line numbers
    // for what is refused.
    let r = rig
        .send(
            Method::POST,
            "/api/v1/recipients/import?comment=hr",
            &boss,
            Some("text/plain"),
            "# a.test users\nbob@a.test OK\ncarol@a.test\n\nbad@@\ndave@a.test\talias\n",
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["added"], 3, "{r:?}");
    assert_eq!(
        r.body["invalid"],
        json!([{"line": 5, "pattern": "bad@@", "error": r.body["invalid"][0]["error"]}])
    );
    // And as a JSON array, with a duplicate.
    let r = rig
        .json(
            Method::POST,
            "/api/v1/recipients/import",
            &boss,
            json!(["erin@a.test", "ERIN@a.test", "bob@a.test"]),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["added"].as_u64(),
            r.body["unchanged"].as_u64()
        ),
        (200, Some(1), Some(1)),
        "{r:?}"
    );

    let all = [
        "*@b.test",
        "alice@a.test",
        "bob@a.test",
        "carol@a.test",
        "dave@a.test",
        "erin@a.test",
        "sales-*@a.test",
    ];
    assert_eq!(rig.listed(), all);
    let r = rig.get("/api/v1/recipients", &boss).await;
    assert_eq!(patterns(&r), all);
    assert_eq!(
        (r.body["total"].as_u64(), r.body["matched"].as_u64()),
        (Some(7), Some(7))
    );
    assert_eq!(r.body["entries"][2]["comment"], "hr");
    // Filtered by domain and text, and paged.
    let r = rig.get("/api/v1/recipients?domain=b.test", &boss).await;
    assert_eq!(patterns(&r), ["*@b.test"]);
    let r = rig.get("/api/v1/recipients?search=HR", &boss).await;
    assert_eq!(patterns(&r), ["bob@a.test", "carol@a.test", "dave@a.test"]);
    let r = rig
        .get("/api/v1/recipients?domain=a.test&limit=2&offset=1", &boss)
        .await;
    assert_eq!(patterns(&r), ["bob@a.test", "carol@a.test"]);
    assert_eq!(
        (r.body["total"].as_u64(), r.body["matched"].as_u64()),
        (Some(6), Some(6))
    );

    // What RCPT makes of it: listed, wildcard, extension and catch-all accepted, an
    // unlisted user of a listed domain refused.
    let r = rig.rcpt_becomes("zed@a.test", "550").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    for ok in [
        "bob@a.test",
        "sales-emea@a.test",
        "bob+news@a.test",
        "anyone@b.test",
    ] {
        let r = rig.rcpt(ok).await;
        assert!(r.starts_with("250"), "{ok}: {r}");
    }

    // Delete through the API: gone from mb-recipient's list, then refused at RCPT.
    let r = rig
        .send(
            Method::DELETE,
            "/api/v1/recipients/bob@a.test",
            &boss,
            None,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert!(!rig.listed().contains(&"bob@a.test".to_string()));
    let r = rig.rcpt_becomes("bob@a.test", "550").await;
    assert!(r.starts_with("550 5.1.1"), "bob@a.test still accepted: {r}");
    let detail = rig
        .send(
            Method::DELETE,
            "/api/v1/recipients/bob@a.test",
            &boss,
            None,
            Bytes::new(),
        )
        .await
        .refused(404);
    assert_eq!(detail, "bob@a.test is not in the list");
    // A catch-all in the path, percent-encoded or not.
    let r = rig
        .send(
            Method::DELETE,
            "/api/v1/recipients/%2A%40b.test",
            &boss,
            None,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = rig
        .json(
            Method::POST,
            "/api/v1/recipients/delete",
            &boss,
            json!({"patterns": ["carol@a.test", "nobody@a.test"]}),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["removed"].as_u64(),
            r.body["unchanged"].as_u64()
        ),
        (200, Some(1), Some(1)),
        "{r:?}"
    );

    // Replace: a refused line changes nothing; then the list is exactly the body.
    let detail = rig
        .send(
            Method::POST,
            "/api/v1/recipients/import?replace=true",
            &boss,
            Some("text/plain"),
            "alice@a.test\nnot an address\n",
        )
        .await
        .refused(400);
    assert!(
        detail.contains("nothing replaced") && detail.contains("line 2"),
        "{detail}"
    );
    assert_eq!(rig.listed().len(), 4, "{:?}", rig.listed());
    let r = rig
        .send(
            Method::POST,
            "/api/v1/recipients/import?replace=true",
            &boss,
            Some("text/plain"),
            "alice@a.test\nzoe@a.test\n",
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["added"].as_u64(),
            r.body["removed"].as_u64()
        ),
        (200, Some(1), Some(3)),
        "{r:?}"
    );
    assert_eq!(rig.listed(), ["alice@a.test", "zoe@a.test"]);

    // Each change is mb-rpcd's, for the web principal.
    let log = rig.log();
    let actor = format!("web:key:{boss_id}");
    for what in [
        "recipients added",
        "recipients imported",
        "recipients removed",
    ] {
        assert!(
            log.lines().any(|l| l.contains(what) && l.contains(&actor)),
            "no {what:?} by {actor} in the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn a_domain_admin_manages_its_domains_only_and_a_user_nothing() {
    let rig = Rig::start(false);
    let (_, boss) = rig.key(&["--role", "admin"]);
    let (dora_id, dora) = rig.key(&["--role", "domain-admin", "--domains", "a.test"]);
    let (_, jane) = rig.key(&["--role", "user", "--addresses", "jane@a.test"]);
    let (code, _, err) = rig.cli(&["add", "x@b.test", "y@a.test", "*@c.test"]);
    assert_eq!(code, 0, "{err}");

    // Listing: its domain only, and another domain asked for by name is refused.
    let r = rig.get("/api/v1/recipients", &dora).await;
    assert_eq!(patterns(&r), ["y@a.test"]);
    assert_eq!(r.body["total"], 1);
    let r = rig.get("/api/v1/recipients?domain=b.test", &dora).await;
    r.refused(403);

    // Another domain's pattern in an add, alone or beside its own: refused whole.
    let before = rig.listed();
    for body in [
        json!({"patterns": ["z@b.test"]}),
        json!({"patterns": ["w@a.test", "z@b.test"]}),
    ] {
        let detail = rig
            .json(Method::POST, "/api/v1/recipients", &dora, body)
            .await
            .refused(403);
        assert!(
            detail.contains("b.test") && detail.contains("nothing was applied"),
            "{detail}"
        );
    }
    assert_eq!(rig.listed(), before);
    // Deleting another domain's pattern: the same 403 whether it is listed or not.
    let listed = rig
        .send(
            Method::DELETE,
            "/api/v1/recipients/x@b.test",
            &dora,
            None,
            Bytes::new(),
        )
        .await;
    let absent = rig
        .send(
            Method::DELETE,
            "/api/v1/recipients/nobody@b.test",
            &dora,
            None,
            Bytes::new(),
        )
        .await;
    assert_eq!(listed.refused(403), absent.refused(403));
    assert_eq!(listed.body, absent.body);
    let r = rig
        .json(
            Method::POST,
            "/api/v1/recipients/delete",
            &dora,
            json!({"patterns": ["y@a.test", "x@b.test"]}),
        )
        .await;
    r.refused(403);
    assert_eq!(rig.listed(), before);
    // An import mixing domains: refused whole, naming the line; nothing of it applied.
    let detail = rig
        .send(
            Method::POST,
            "/api/v1/recipients/import",
            &dora,
            Some("text/plain"),
            "v@a.test\n# b\nx2@b.test\n",
        )
        .await
        .refused(403);
    assert_eq!(
        detail,
        format!("line 3: key:{dora_id} may not act on the domain b.test; nothing was applied")
    );
    assert_eq!(rig.listed(), before);

    // Its own domain: add, and a replace that leaves the other domains alone.
    let r = rig
        .json(
            Method::POST,
            "/api/v1/recipients",
            &dora,
            json!({"patterns": ["w@a.test"]}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["added"].as_u64()),
        (200, Some(1)),
        "{r:?}"
    );
    let r = rig
        .send(
            Method::POST,
            "/api/v1/recipients/import?replace=true",
            &dora,
            Some("text/plain"),
            "v@a.test\n",
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["added"].as_u64(),
            r.body["removed"].as_u64()
        ),
        (200, Some(1), Some(2)),
        "{r:?}"
    );
    assert_eq!(rig.listed(), ["*@c.test", "v@a.test", "x@b.test"]);

    // A user manages no recipients at all.
    rig.get("/api/v1/recipients", &jane).await.refused(403);
    rig.json(
        Method::POST,
        "/api/v1/recipients",
        &jane,
        json!({"patterns": ["jane@a.test"]}),
    )
    .await
    .refused(403);
    rig.send(
        Method::POST,
        "/api/v1/recipients/import",
        &jane,
        Some("text/plain"),
        "jane@a.test\n",
    )
    .await
    .refused(403);
    rig.send(
        Method::DELETE,
        "/api/v1/recipients/v@a.test",
        &jane,
        None,
        Bytes::new(),
    )
    .await
    .refused(403);
    assert_eq!(rig.listed(), ["*@c.test", "v@a.test", "x@b.test"]);

    // Malformed requests: problem documents, nothing changed.
    let post = |ct: &'static str, body: &'static str| {
        rig.send(Method::POST, "/api/v1/recipients", &boss, Some(ct), body)
    };
    post("application/json", "{not json").await.refused(400);
    post("application/json", "{\"patterns\": \"x@a.test\"}")
        .await
        .refused(422);
    let detail = post("application/json", "{\"patterns\": []}")
        .await
        .refused(400);
    assert_eq!(detail, "no pattern given");
    let detail = rig
        .send(
            Method::DELETE,
            "/api/v1/recipients/no-at-sign",
            &boss,
            None,
            Bytes::new(),
        )
        .await
        .refused(400);
    let (_, _, cli_err) = rig.cli(&["del", "no-at-sign"]);
    assert!(cli_err.contains(&detail), "{cli_err} / {detail}");
    let import = |ct: &'static str, body: Vec<u8>| {
        rig.send(
            Method::POST,
            "/api/v1/recipients/import",
            &boss,
            Some(ct),
            body,
        )
    };
    let detail = import("application/json", b"{\"a\": 1}".to_vec())
        .await
        .refused(400);
    assert!(
        detail.starts_with("the body is not a JSON array of patterns"),
        "{detail}"
    );
    import("application/xml", b"<a/>".to_vec())
        .await
        .refused(415);
    import("text/plain", b"\xff\xfe".to_vec())
        .await
        .refused(400);
    let detail = import("text/plain", b"# only a comment\n".to_vec())
        .await
        .refused(400);
    assert_eq!(detail, "no pattern in the body");
    let detail = import("text/plain", b"a\nb\n".to_vec()).await.refused(400);
    assert!(
        detail.starts_with("2 pattern(s) refused: line 1:"),
        "{detail}"
    );
    // Over the pattern count, then over the byte limit (9 MiB of valid lines).
    let many: String = (0..100_001).map(|i| format!("u{i}@a.test\n")).collect();
    let detail = import("text/plain", many.into_bytes()).await.refused(400);
    assert!(detail.contains("at most 100000"), "{detail}");
    let huge = "averyveryverylongusername.forpadding@a.test\n".repeat(9 * 1024 * 1024 / 44 + 1);
    import("text/plain", huge.into_bytes()).await.refused(413);
    assert_eq!(rig.listed(), ["*@c.test", "v@a.test", "x@b.test"]);
}

/// Indexes a quarantined message to `rcpt` as a filter worker does, with its file
/// written and then deleted.
async fn quarantined_without_file(rig: &Rig, id: &str, rcpt: &str) {
    let rel = format!("2026/12/01/{id}.eml");
    let file = rig.gw.path("spool/quarantine").join(&rel);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"Subject: offer\r\n\r\nbuy\r\n").unwrap();
    let ch = mb_runtime::uds::connect(&rig.gw.socket(), "mb-rpcd")
        .await
        .unwrap();
    let added = QuarantineClient::new(ch)
        .add(QuarantineEntry {
            id: id.into(),
            // A minute ago: a fixed date ages past the quarantine's retention and
            // races its pass at start.
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
                - 60_000,
            queue_id: format!("Q{id}"),
            sender: "spammer@c.test".into(),
            recipients: vec![rcpt.into()],
            subject: "offer".into(),
            reason: "spam".into(),
            score: 9.0,
            size: 25,
            path: rel,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .added;
    assert!(added, "{id}");
    std::fs::remove_file(&file).unwrap();
}

#[tokio::test]
async fn another_domains_quarantine_entry_without_its_file_is_a_plain_404() {
    let rig = Rig::start(false);
    let (_, boss) = rig.key(&["--role", "admin"]);
    let (_, dora) = rig.key(&["--role", "domain-admin", "--domains", "a.test"]);
    quarantined_without_file(&rig, "leak-b", "x@b.test").await;
    quarantined_without_file(&rig, "own-a", "y@a.test").await;
    let ask = |method: Method, path: String, key: &str| {
        let key = key.to_string();
        let rig = &rig;
        async move { rig.send(method, &path, &key, None, Bytes::new()).await }
    };

    // The file really is gone: whoever may see the entry gets mb-rpcd's read error.
    let detail = ask(Method::GET, "/api/v1/quarantine/leak-b".into(), &boss)
        .await
        .refused(502);
    assert!(
        detail.contains("cannot read a quarantined message"),
        "{detail}"
    );
    ask(Method::GET, "/api/v1/quarantine/own-a".into(), &dora)
        .await
        .refused(502);

    // Another domain's entry is answered as an id that does not exist, for every way
    // of asking: the same status and the same words (but for the id).
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::GET, "/raw"),
        (Method::DELETE, ""),
        (Method::POST, "/release"),
    ] {
        let leak = ask(
            method.clone(),
            format!("/api/v1/quarantine/leak-b{suffix}"),
            &dora,
        )
        .await;
        let none = ask(
            method.clone(),
            format!("/api/v1/quarantine/none-b{suffix}"),
            &dora,
        )
        .await;
        let (l, n) = (leak.refused(404), none.refused(404));
        assert_eq!(
            l.replace("leak-b", "ID"),
            n.replace("none-b", "ID"),
            "{method} {suffix}"
        );
    }
    // The web interface's page of an entry: the same.
    let leak = ask(Method::GET, "/ui/quarantine/leak-b".into(), &dora).await;
    let none = ask(Method::GET, "/ui/quarantine/none-b".into(), &dora).await;
    assert_eq!((leak.status, none.status), (404, 404), "{leak:?}");
    for (r, id) in [(&leak, "leak-b"), (&none, "none-b")] {
        let page = r.body.as_str().unwrap();
        assert!(
            page.contains(&format!("no message {id} in the quarantine")),
            "{page}"
        );
    }
    // And the entry is still there, untouched by the refused delete and release.
    ask(Method::GET, "/api/v1/quarantine/leak-b".into(), &boss)
        .await
        .refused(502);
}
