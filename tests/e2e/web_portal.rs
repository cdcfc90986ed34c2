//! The quarantine pages, the users' portal and the quarantine digests against real
//! daemons (mb-rpcd, a filter worker, mb-smtpd relaying to smtp-sink, mb-web), over
//! mb-web's socket with a plain HTTP client: a digest sent with `mb-quarantine digest
//! --now` arrives at the sink listing each message with a link; opening a link releases
//! nothing, the POST of its confirmation page releases once, and a used, tampered or
//! expired link is refused; a user signs in with its SMTP account and sees, previews
//! (hostile HTML sanitised) and releases only its own mail; a domain admin's pages show
//! only its domains.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_testkit::{Gateway, Proc, SmtpSink, bin, free_port, text, wait_until};
use serde_json::Value as Json;

use crate::smtp::Raw;

/// A gateway serving a.test and b.test, quarantining at a score of 1.0 (a message
/// without a Date field), relaying to a sink, and mb-web on it.
pub(crate) struct Site {
    pub(crate) gw: Gateway,
    _web: Proc,
    sink: SmtpSink,
    smtp: u16,
    pub(crate) base_url: String,
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: hyper::HeaderMap,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The session cookie a login set (`mb_session=...`).
    pub(crate) fn session(&self) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("mb_session=") && !c.starts_with("mb_session=;"))
            .map(|c| c.split(';').next().unwrap_or_default().to_string())
    }

    /// The CSRF token of the page's forms.
    pub(crate) fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body));
        let rest = &self.body[at + 19..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

impl Site {
    pub(crate) fn start() -> Site {
        Site::start_with("")
    }

    /// With `extra` appended to the configuration file (tables not otherwise there).
    pub(crate) fn start_with(extra: &str) -> Site {
        let sink = SmtpSink::start(&[]).unwrap();
        let (smtp, reinject, https) = (free_port(), free_port(), free_port());
        let base_url = format!("https://gw.served.test:{https}");
        let mut gw = Gateway::new(&format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp}\nrate_per_source = 1000\nconnection_rate = 10000\n\
             [network.reinject]\nport = {reinject}\n[network.protection]\nmode = \"public\"\n\
             [smtp]\nhostname = \"gw.served.test\"\ndomains = \"a.test,b.test\"\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
             [filter]\nenabled = true\nworkers = 1\nnext_hop = \"127.0.0.1:{reinject}\"\n\
             [spam.threshold]\ntag = 0.5\nquarantine = 1.0\nreject = 20.0\n",
            sink.port
        ));
        let (cert, key) = mb_testkit::self_signed();
        std::fs::write(gw.path("web.crt"), &cert).unwrap();
        std::fs::write(gw.path("web.key"), &key).unwrap();
        let mut cfg = std::fs::read_to_string(&gw.config).unwrap();
        cfg.push_str(&format!(
            "[network.https]\nlisten = \"127.0.0.1\"\nport = {https}\n\
             rate_limit = 1000000\nrate_burst = 100000\n\
             \"tls.cert\" = \"{}\"\n\"tls.key\" = \"{}\"\n\
             [web]\ntotp_required = \"\"\nbase_url = \"{base_url}\"\n{extra}\n",
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
            base_url,
        };
        let socket = site.socket();
        wait_until("mb-web's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}: {}", site.log()));
        site
    }

    fn socket(&self) -> PathBuf {
        self.gw.path("run/mb-web.sock")
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.gw.path("web.log")).unwrap_or_default() + &self.gw.log()
    }

    /// A request over mb-web's socket with these headers and (form) body.
    fn call(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
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
            if !body.is_empty() {
                b = b.header("content-type", "application/x-www-form-urlencoded");
            }
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let resp = client
                .request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            Reply {
                status,
                headers,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }
        })
    }

    pub(crate) fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.call(Method::GET, path, headers, "")
    }

    pub(crate) fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        self.call(Method::POST, path, headers, body)
    }

    /// The quarantine as the local administrator sees it through the API.
    pub(crate) fn quarantine(&self) -> Json {
        let r = self.get("/api/v1/quarantine", &[]);
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_str(&r.body).unwrap()
    }

    pub(crate) fn id_of(&self, subject: &str) -> String {
        let q = self.quarantine();
        q["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["subject"] == subject)
            .unwrap_or_else(|| panic!("{subject} not in {q:#}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub(crate) fn wait_quarantined(&self, n: u64) {
        let mut q = Json::Null;
        wait_until("messages quarantined", Duration::from_secs(30), || {
            q = self.quarantine();
            q["total"] == n
        })
        .unwrap_or_else(|e| panic!("{e}: {q:#}\n{}", self.log()));
    }

    /// Sends `body` (no Date field: quarantined) from alice@sender.test to `rcpt`.
    pub(crate) fn send(&self, rcpt: &str, subject: &str, extra_headers: &str, body: &str) {
        let mut c = Raw::connect(self.smtp);
        c.reply();
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<alice@sender.test>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("250"), "{rcpt}: {r}");
        c.cmd("DATA");
        let r = c.cmd(&format!(
            "From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n{extra_headers}\r\n{body}\r\n."
        ));
        c.cmd("QUIT");
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }

    /// Sends a short message from alice@sender.test and returns the final reply.
    fn try_send(&self, rcpt: &str, subject: &str) -> String {
        let mut c = Raw::connect(self.smtp);
        c.reply();
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<alice@sender.test>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if !r.starts_with("250") {
            return r;
        }
        c.cmd("DATA");
        let r = c.cmd(&format!(
            "From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody\r\n."
        ));
        c.cmd("QUIT");
        r
    }

    pub(crate) fn tool(&self, name: &str, args: &[&str]) -> (i32, String, String) {
        text(&self.gw.tool(name, args))
    }

    /// The messages at the sink whose text contains `needle`.
    pub(crate) fn at_sink(&self, needle: &str) -> Vec<String> {
        self.sink
            .messages()
            .into_iter()
            .filter(|m| m.contains(needle))
            .collect()
    }

    /// The released messages (not the digests that list them) with this subject.
    pub(crate) fn released(&self, subject: &str) -> usize {
        self.at_sink(&format!("\nSubject: {subject}"))
            .iter()
            .filter(|m| !m.contains("Quarantine digest"))
            .count()
    }

    /// Runs SQL on the SQLite database (Python's sqlite3: the tests' own way in).
    fn sql(&self, statement: &str) {
        let db = std::fs::read_dir(self.gw.path("data"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "db"))
            .expect("the SQLite database in paths.data_dir");
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=10); c.execute(sys.argv[2]); c.commit()")
            .arg(&db)
            .arg(statement)
            .output()
            .expect("python3 (Debian's python3) runs the test's SQL");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Adds an SMTP AUTH account with mb-user (the password on stdin).
pub(crate) fn smtp_account(site: &Site, login: &str, password: &str) {
    let mut child = Command::new(bin("mb-user"))
        .arg("--config")
        .arg(&site.gw.config)
        .args(["add", login])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let (code, out, err) = text(&child.wait_with_output().unwrap());
    assert_eq!(code, 0, "{out}{err}");
}

/// The decoded text and HTML parts of a digest (smtp-sink's records before the message
/// are header lines too, so the dump parses as the message).
pub(crate) fn parts(raw: &str) -> (String, String) {
    let m = mail_parser::MessageParser::default()
        .parse(raw.as_bytes())
        .expect("a digest that parses");
    (
        m.body_text(0).unwrap_or_default().into_owned(),
        m.body_html(0).unwrap_or_default().into_owned(),
    )
}

/// The tokens of the `/ui/digest/` links in `text`, in order.
fn tokens(base: &str, text: &str) -> Vec<String> {
    let prefix = format!("{base}/ui/digest/");
    text.match_indices(&prefix)
        .map(|(at, _)| {
            text[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_hexdigit() || *c == '.')
                .collect()
        })
        .collect()
}

/// The release token of the block of the text part that lists `subject`.
pub(crate) fn release_token(base: &str, text: &str, subject: &str) -> String {
    let block = text
        .split("\n\n")
        .find(|b| b.contains(&format!("Subject: {subject}")))
        .unwrap_or_else(|| panic!("{subject} not listed in {text}"));
    tokens(base, block)
        .pop()
        .unwrap_or_else(|| panic!("no link for {subject}: {block}"))
}

#[test]
fn digest_links_confirm_before_they_release_and_work_once() {
    let site = Site::start();
    let base = site.base_url.clone();
    site.send("jane@a.test", "jane one", "", "first held for jane");
    site.send("jane@a.test", "jane two", "", "second held for jane");
    site.send("bob@b.test", "bob one", "", "held for bob");
    site.wait_quarantined(3);
    let first = site.quarantine()["entries"][0].clone();
    let reason = first["reason"].as_str().unwrap().to_string();
    let score = format!("{:.1}", first["score"].as_f64().unwrap());
    let (code, out, err) = site.tool("mb-quarantine", &["digest", "--now"]);
    assert_eq!(code, 0, "{out}{err}\n{}", site.log());
    assert!(out.contains("sent 2 digests listing 3 messages"), "{out}");
    let mut digests = Vec::new();
    wait_until("two digests at the sink", Duration::from_secs(30), || {
        digests = site.at_sink("Subject: Quarantine digest");
        digests.len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}: {digests:?}\n{}", site.log()));
    let jane = digests
        .iter()
        .find(|d| d.contains("To: <jane@a.test>") || d.contains("To: jane@a.test"))
        .unwrap_or_else(|| panic!("no digest to jane: {digests:?}"));
    assert!(jane.contains("Auto-Submitted: auto-generated"), "{jane}");
    let (text, html) = parts(jane);
    for want in [
        "alice@sender.test",
        "jane one",
        "jane two",
        score.as_str(),
        reason.as_str(),
    ] {
        assert!(text.contains(want), "{want} not in {text}");
        assert!(html.contains(want), "{want} not in {html}");
    }
    assert!(
        !text.contains("bob one"),
        "bob's mail in jane's digest: {text}"
    );
    // Two release links and one portal link, each in both parts.
    let all = tokens(&base, &text);
    assert_eq!(all.len(), 3, "{text}");
    assert_eq!(tokens(&base, &html).len(), 3, "{html}");
    let bob = digests.iter().find(|d| !std::ptr::eq(*d, jane)).unwrap();
    let (bob_text, _) = parts(bob);
    assert!(
        bob_text.contains("bob one") && !bob_text.contains("jane"),
        "{bob_text}"
    );

    // Nothing new since: no digest.
    let (code, out, err) = site.tool("mb-quarantine", &["digest", "--now"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no digest to send"), "{out}");

    // Opening a link (a scanner, a preview pane) releases nothing.
    let one = release_token(&base, &text, "jane one");
    let link = format!("/ui/digest/{one}");
    for _ in 0..2 {
        let r = site.get(&link, &[]);
        assert_eq!(r.status, 200, "{r:?}\n{}", site.log());
        assert!(
            r.body.contains("Release this message?") && r.body.contains("jane one"),
            "{}",
            r.body
        );
        assert!(r.body.contains(&format!("action=\"{link}\"")), "{}", r.body);
        assert_eq!(r.header("cache-control"), "no-store");
    }
    assert_eq!(site.quarantine()["total"], 3);

    // A tampered token (one digit of the signature, or of the id) is refused either way.
    let flip = |t: &str, at: usize| {
        let mut b = t.as_bytes().to_vec();
        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    for bad in [flip(&one, one.len() - 1), flip(&one, 0)] {
        assert_eq!(site.get(&format!("/ui/digest/{bad}"), &[]).status, 404);
        assert_eq!(
            site.post(&format!("/ui/digest/{bad}"), &[], "x=1").status,
            404
        );
    }
    assert_eq!(site.quarantine()["total"], 3);

    // The confirmation page's POST releases, once.
    let r = site.post(&link, &[], "x=1");
    assert_eq!(r.status, 200, "{r:?}\n{}", site.log());
    assert!(r.body.contains("released"), "{}", r.body);
    wait_until(
        "the released message at the sink",
        Duration::from_secs(20),
        || site.released("jane one") > 0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    assert_eq!(site.quarantine()["total"], 2);
    let again = site.post(&link, &[], "x=1");
    assert_eq!(again.status, 404, "{again:?}");
    assert!(again.body.contains("not valid"), "{}", again.body);
    assert_eq!(site.get(&link, &[]).status, 404);
    assert_eq!(site.released("jane one"), 1);
    // Audited under the link's recipient.
    let (_, history, _) = site.tool("mb-config", &["history"]);
    assert!(history.contains("link:jane@a.test"), "{history}");

    // An expired link is refused and releases nothing.
    let two = release_token(&base, &text, "jane two");
    let id = two.split('.').next().unwrap();
    site.sql(&format!(
        "UPDATE digest_links SET expires_at = 1 WHERE id = '{id}'"
    ));
    assert_eq!(site.get(&format!("/ui/digest/{two}"), &[]).status, 404);
    assert_eq!(
        site.post(&format!("/ui/digest/{two}"), &[], "x=1").status,
        404
    );
    assert_eq!(site.quarantine()["total"], 2);

    // The portal link signs jane in once, to her own quarantine only.
    let portal = all.last().unwrap();
    let r = site.post(&format!("/ui/digest/{portal}"), &[], "x=1");
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), "/ui/portal");
    let cookie = r.session().unwrap_or_else(|| panic!("no session: {r:?}"));
    let page = site.get("/ui/portal", &[("cookie", &cookie)]);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("jane two") && !page.body.contains("bob one"),
        "{}",
        page.body
    );
    assert_eq!(
        site.post(&format!("/ui/digest/{portal}"), &[], "x=1")
            .status,
        404
    );
}

#[test]
fn portal_users_and_domain_admins_see_only_their_own() {
    let site = Site::start();
    smtp_account(&site, "jane@a.test", "correct horse battery");
    let hostile = "<p onmouseover=\"steal()\">Hello <b>jane</b></p><script>alert(1)</script>\
        <img src=\"https://tracker.evil.test/p.gif\"><a href=\"https://evil.test/login\">log in</a>\
        <div style=\"background:url(https://evil.test/bg.png)\">x</div><iframe src=\"https://evil.test/\"></iframe>";
    site.send(
        "jane@a.test",
        "jane hostile",
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n",
        hostile,
    );
    site.send("jane@a.test", "jane plain", "", "plain text for jane");
    site.send("bob@b.test", "bob one", "", "held for bob");
    site.send("ann@a.test", "ann one", "", "held for ann");
    site.wait_quarantined(4);
    let (hostile_id, plain_id, bob_id) = (
        site.id_of("jane hostile"),
        site.id_of("jane plain"),
        site.id_of("bob one"),
    );

    // The SMTP account's login: a wrong password is refused, the right one opens the portal.
    let form = |pw: &str| format!("login=jane%40a.test&password={pw}");
    let r = site.post("/ui/portal/login", &[], &form("wrong+password+here"));
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.session().is_none());
    let r = site.post("/ui/portal/login", &[], &form("correct+horse+battery"));
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());
    assert_eq!(r.header("location"), "/ui/portal");
    let cookie = r.session().unwrap();
    let me = [("cookie", cookie.as_str())];

    let list = site.get("/ui/portal", &me);
    assert_eq!(list.status, 200, "{list:?}");
    assert!(
        list.body.contains("jane hostile") && list.body.contains("jane plain"),
        "{}",
        list.body
    );
    assert!(
        !list.body.contains("bob one") && !list.body.contains("ann one"),
        "{}",
        list.body
    );
    // The staff's pages send a user to the portal.
    let r = site.get("/ui/quarantine", &me);
    assert_eq!(
        (r.status, r.header("location").as_str()),
        (303, "/ui/portal")
    );
    // Another user's message does not exist for her, and cannot be acted on.
    assert_eq!(site.get(&format!("/ui/portal/{bob_id}"), &me).status, 404);
    let csrf = list.csrf();
    let r = site.post(
        &format!("/ui/portal/{bob_id}/release"),
        &me,
        &format!("csrf={csrf}"),
    );
    assert_eq!(r.status, 303, "{r:?}");
    assert_ne!(
        r.header("location"),
        "/ui/portal",
        "a failure stays on the message"
    );
    assert_eq!(site.quarantine()["total"], 4);

    // The hostile HTML is shown sanitised: no script, handler or remote URL at all.
    let r = site.get(&format!("/ui/portal/{hostile_id}"), &me);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("Hello <b>jane</b>"), "{}", r.body);
    for bad in [
        "<script",
        "onmouseover",
        "evil.test",
        "<img",
        "<iframe",
        "style=\"",
    ] {
        assert!(!r.body.contains(bad), "{bad} in the preview: {}", r.body);
    }
    assert!(
        r.header("content-security-policy")
            .contains("default-src 'none'"),
        "{r:?}"
    );

    // A form without the session's token is refused; with it, the release happens.
    let path = format!("/ui/portal/{plain_id}/release");
    assert_eq!(site.post(&path, &me, "x=1").status, 403);
    assert_eq!(site.quarantine()["total"], 4);
    let r = site.post(&path, &me, &format!("csrf={csrf}"));
    assert_eq!(
        (r.status, r.header("location").as_str()),
        (303, "/ui/portal"),
        "{r:?}\n{}",
        site.log()
    );
    wait_until(
        "jane's release at the sink",
        Duration::from_secs(20),
        || site.released("jane plain") > 0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    assert_eq!(site.quarantine()["total"], 3);
    let (_, history, _) = site.tool("mb-config", &["history"]);
    assert!(history.contains("web:smtp:jane@a.test"), "{history}");

    // Jane blocks the sender for herself: alice's next message to her is refused; the
    // policy is scoped to her address, so it decides nothing for ann.
    let hostile_page = site.get(&format!("/ui/portal/{hostile_id}"), &me);
    let r = site.post(
        &format!("/ui/portal/{hostile_id}/block"),
        &me,
        &format!("csrf={}", hostile_page.csrf()),
    );
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());
    assert_eq!(r.header("location"), format!("/ui/portal/{hostile_id}"));
    let (_, out, err) = site.tool(
        "mb-policy",
        &["test", "--from", "alice@sender.test", "--to", "jane@a.test"],
    );
    assert!(
        out.contains("block alice@sender.test for jane@a.test"),
        "{out}{err}"
    );
    let (_, out, _) = site.tool(
        "mb-policy",
        &["test", "--from", "alice@sender.test", "--to", "ann@a.test"],
    );
    assert!(
        out.contains("no policy matches"),
        "jane's block decides for ann: {out}"
    );
    wait_until(
        "the filter to read the new policy",
        Duration::from_secs(15),
        || site.try_send("jane@a.test", "blocked now").starts_with('5'),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    // And she allows another sender's mail for herself (an authenticated-sender allow).
    let r = site.post(
        &format!("/ui/portal/{hostile_id}/allow"),
        &me,
        &format!("csrf={}", hostile_page.csrf()),
    );
    assert_eq!(r.status, 303, "{r:?}");
    let (_, out, _) = site.tool("mb-policy", &["list"]);
    assert!(
        out.contains("allow alice@sender.test for jane@a.test"),
        "{out}"
    );
    let (_, history, _) = site.tool("mb-config", &["history"]);
    assert!(history.contains("block"), "{history}");

    // A domain admin of a.test (an API key here) sees a.test's mail and never b.test's.
    let (code, out, err) = site.tool(
        "mb-web",
        &[
            "key",
            "create",
            "--json",
            "--expires",
            "1d",
            "--role",
            "domain-admin",
            "--domains",
            "a.test",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let key = format!(
        "Bearer {}",
        serde_json::from_str::<Json>(&out).unwrap()["secret"]
            .as_str()
            .unwrap()
    );
    let dora = [("authorization", key.as_str())];
    let r = site.get("/ui/quarantine", &dora);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("ann one") && r.body.contains("jane hostile"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("bob one"), "{}", r.body);
    assert_eq!(
        site.get(&format!("/ui/quarantine/{bob_id}"), &dora).status,
        404
    );
    let r = site.post(&format!("/ui/quarantine/{bob_id}/delete"), &dora, "x=1");
    assert_ne!(r.header("location"), "/ui/quarantine", "{r:?}");
    assert_eq!(
        site.get(&format!("/api/v1/quarantine/{bob_id}"), &[])
            .status,
        200,
        "bob's message must still be there"
    );
    // The filters narrow the list.
    let r = site.get("/ui/quarantine?to=ann%40a.test", &dora);
    assert!(
        r.body.contains("ann one") && !r.body.contains("jane hostile"),
        "{}",
        r.body
    );
}

#[test]
fn scheduled_digests_go_out_once_and_not_again_after_a_restart() {
    // A daily time two hours ago in the host's local time (as mb-rpcd reads it): due
    // now, and not due again for a day.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let local = now + mb_rpcd::digest::local_offset(now) - 2 * 3600;
    let at = local.rem_euclid(86_400);
    let schedule = format!("daily {:02}:{:02}", at / 3600, at % 3600 / 60);
    let mut site = Site::start_with(&format!("[quarantine.digest]\nschedule = \"{schedule}\"\n"));
    site.send("jane@a.test", "before enabling", "", "held for jane");
    site.wait_quarantined(1);
    // Disabled (the default): nothing goes out, whatever the schedule says.
    std::thread::sleep(Duration::from_secs(3));
    assert!(site.at_sink("Quarantine digest").is_empty());

    let (code, out, err) = site.tool("mb-config", &["set", "quarantine.digest.enabled", "true"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until("the scheduled digest", Duration::from_secs(45), || {
        site.at_sink("Subject: Quarantine digest").len() == 1
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));

    // More mail, then a restart: the time that was run is not run again.
    site.send("jane@a.test", "after the digest", "", "held for jane again");
    site.wait_quarantined(2);
    site.gw.stop();
    site.gw.start().unwrap();
    site.wait_quarantined(2);
    // mb-rpcd's scheduler looks at the clock as it starts, then every 20s.
    std::thread::sleep(Duration::from_secs(4));
    let digests = site.at_sink("Subject: Quarantine digest");
    assert_eq!(digests.len(), 1, "sent again after a restart: {digests:?}");
    // What the scheduler did not send, --now does: only the new message.
    let (code, out, err) = site.tool("mb-quarantine", &["digest", "--now"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent 1 digests listing 1 messages"), "{out}");
}
