//! Learning from the quarantine against a real Rspamd 3.4 whose Bayes classifier keeps
//! its statistics in a real Redis, on the site of `web_portal` (mb-rpcd, a filter
//! worker, mb-smtpd, mb-web): `POST /api/v1/quarantine/{id}/learn` and the pages' "Learn
//! as spam/ham" forms reach Rspamd (its `/stat` count of learned messages rises, a
//! second learn of the same message is "already learned"); a domain admin cannot teach
//! from another domain's message, a user not at all; without Rspamd configured, or with
//! an Rspamd that has no Bayes backend, the answer says so in words, never a 500 (that
//! answer is checked by `api::learn`'s unit tests on Rspamd's recorded words: a second
//! Rspamd here doubled the test's start-up time on a loaded machine).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_testkit::{Redis, Rspamd, bin, text, wait_until};
use serde_json::Value as Json;

use crate::web_portal::{Site, smtp_account};

const PASSWORD: &str = "correct horse battery";
const CONTROLLER_PASSWORD: &str = "learn-pw-3c9d1e77";

/// An answer of mb-web.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {self:?}"))
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// `name=value` of a cookie the answer sets.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|c| c.split(';').next().unwrap_or_default())
            .find(|c| c.starts_with(&format!("{name}=")) && !c.ends_with('='))
            .map(str::to_string)
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body));
        let rest = &self.body[at + 19..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

/// A request over mb-web's socket (as root, the local administrator, unless `headers`
/// carry a credential).
fn call(
    site: &Site,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, String)>,
) -> Answer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(site.gw.path("run/mb-web.sock"), path).into();
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "localhost");
        let body = match body {
            Some((content_type, text)) => {
                b = b.header("content-type", content_type);
                text
            }
            None => String::new(),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = client
            .request(b.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    })
}

fn get(site: &Site, path: &str, headers: &[(&str, &str)]) -> Answer {
    call(site, Method::GET, path, headers, None)
}

/// A form's POST, as a browser sends it.
fn form(site: &Site, path: &str, headers: &[(&str, &str)], fields: &str) -> Answer {
    call(
        site,
        Method::POST,
        path,
        headers,
        Some(("application/x-www-form-urlencoded", fields.to_string())),
    )
}

/// `POST /api/v1/quarantine/{id}/learn` with `{"as": class}`.
fn learn(site: &Site, id: &str, class: &str, headers: &[(&str, &str)]) -> Answer {
    call(
        site,
        Method::POST,
        &format!("/api/v1/quarantine/{id}/learn"),
        headers,
        Some(("application/json", format!("{{\"as\":\"{class}\"}}"))),
    )
}

/// Rspamd's own count of learned messages, from its controller's `/stat`.
fn learned(rspamd: &Rspamd) -> u64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", rspamd.controller_port.unwrap()))
        .expect("Rspamd's controller");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /stat HTTP/1.0\r\nPassword: {CONTROLLER_PASSWORD}\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<Json>(body)
        .ok()
        .and_then(|v| v["learned"].as_u64())
        .unwrap_or_else(|| panic!("no learned count in Rspamd's /stat: {out}"))
}

/// A message body of 60 words no other test message has, so that Rspamd's learn cache
/// and its Bayes probabilities tell the messages apart.
fn words(tag: &str) -> String {
    (0..60u8)
        .map(|i| {
            format!(
                "{tag}{}{}",
                char::from(b'a' + i / 26),
                char::from(b'a' + i % 26)
            )
        })
        .collect::<Vec<_>>()
        .chunks(10)
        .map(|line| line.join(" "))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// A web administrator made with `mb-web account add` (the site requires no TOTP).
fn web_admin(site: &Site, name: &str) {
    let mut child = Command::new(bin("mb-web"))
        .arg("--config")
        .arg(&site.gw.config)
        .args(["account", "add", name, "--role", "admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    drop(stdin);
    let (code, out, err) = text(&child.wait_with_output().unwrap());
    assert_eq!(code, 0, "mb-web account add: {out}{err}");
}

/// An API key's `Authorization` value, made with `mb-web key create ARGS`.
fn api_key(site: &Site, args: &[&str]) -> String {
    let mut all = vec!["key", "create", "--json", "--expires", "1d"];
    all.extend(args);
    let (code, out, err) = site.tool("mb-web", &all);
    assert_eq!(code, 0, "{out}{err}");
    let secret = serde_json::from_str::<Json>(&out).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    format!("Bearer {secret}")
}

fn set(site: &Site, key: &str, value: &str) {
    let (code, out, err) = site.tool("mb-config", &["set", key, value]);
    assert_eq!(code, 0, "mb-config set {key}: {out}{err}");
}

/// The page after a form's redirect, with the flash message it left.
fn after(site: &Site, r: &Answer, session: &str) -> Answer {
    assert_eq!(r.status, 303, "{r:?}");
    let flash = r
        .cookie("mb_flash")
        .unwrap_or_else(|| panic!("no flash message: {r:?}"));
    get(
        site,
        &r.header("location"),
        &[("cookie", &format!("{session}; {flash}"))],
    )
}

#[test]
fn staff_teach_a_real_rspamd_from_the_quarantine_and_nobody_else_does() {
    let started = Instant::now();
    // Rspamd loads for a while (its TLD list alone takes 20 s, far more on a busy
    // machine): start it first, set up the rest meanwhile. It keeps its Bayes
    // statistics in Redis.
    let redis = Redis::start().unwrap();
    let rspamd =
        Rspamd::with_bayes(CONTROLLER_PASSWORD, &format!("127.0.0.1:{}", redis.port)).unwrap();
    let site = Site::start_with(&format!(
        "[rspamd]\ncontroller_password = \"{CONTROLLER_PASSWORD}\"\n"
    ));
    web_admin(&site, "ops");
    smtp_account(&site, "jane@a.test", PASSWORD);
    site.send("ann@a.test", "ann spam", "", &words("alpha"));
    site.send("ann@a.test", "ann ham", "", &words("bravo"));
    site.send("bob@b.test", "bob spam", "", &words("charlie"));
    site.send("jane@a.test", "jane spam", "", &words("delta"));
    site.wait_quarantined(4);
    let (ann_spam, ann_ham, bob_spam, jane_spam) = (
        site.id_of("ann spam"),
        site.id_of("ann ham"),
        site.id_of("bob spam"),
        site.id_of("jane spam"),
    );
    let page = |id: &str| format!("/ui/quarantine/{id}");

    // No Rspamd configured (only the controller URL's default): no button, and the API
    // says what to set.
    let r = learn(&site, &ann_spam, "spam", &[]);
    assert_eq!(r.status, 409, "{r:?}\n{}", site.log());
    assert_eq!(r.header("content-type"), "application/problem+json");
    let detail = r.json()["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("Rspamd is not configured") && detail.contains("rspamd.controller_url"),
        "{detail}"
    );
    let r = get(&site, &page(&ann_spam), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("ann spam") && !r.body.contains("Learn as"),
        "{}",
        r.body
    );

    // The controller set with mb-config: the buttons appear (mb-web reads it live).
    set(
        &site,
        "rspamd.controller_url",
        &rspamd.controller_url().unwrap(),
    );
    wait_until("the learn buttons", Duration::from_secs(20), || {
        get(&site, &page(&ann_spam), &[])
            .body
            .contains("Learn as spam")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    rspamd.wait_ready().unwrap();
    // An administrator teaches it: Rspamd counts one more learned message; the same
    // message again is "already learned", in Rspamd's words, and counts nothing.
    let before = learned(&rspamd);
    let r = learn(&site, &ann_spam, "spam", &[]);
    assert_eq!(r.status, 200, "{r:?}\n{}", site.log());
    assert_eq!(
        (r.json()["id"].as_str(), r.json()["as"].as_str()),
        (Some(ann_spam.as_str()), Some("spam"))
    );
    assert_eq!(learned(&rspamd), before + 1, "Rspamd learned nothing");
    let r = learn(&site, &ann_spam, "spam", &[]);
    assert_eq!(r.status, 409, "{r:?}");
    let detail = r.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("already learned"), "{detail}");
    assert_eq!(learned(&rspamd), before + 1);
    // Neither "eggs" nor a missing class is a class.
    let r = learn(&site, &ann_ham, "eggs", &[]);
    assert!(r.status == 400 || r.status == 422, "{r:?}");

    // A domain admin of a.test: another domain's message does not exist for it (by the
    // API or the page's form), its own domain's it teaches.
    let dora = api_key(&site, &["--role", "domain-admin", "--domains", "a.test"]);
    let dora = [("authorization", dora.as_str())];
    let r = learn(&site, &bob_spam, "spam", &dora);
    assert_eq!(r.status, 404, "{r:?}");
    let r = form(
        &site,
        &format!("{}/learn-spam", page(&bob_spam)),
        &dora,
        "x=1",
    );
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(
        r.header("location"),
        page(&bob_spam),
        "a failure stays on the message"
    );
    assert_eq!(
        learned(&rspamd),
        before + 1,
        "dora taught from b.test's mail"
    );
    let r = learn(&site, &ann_ham, "ham", &dora);
    assert_eq!(r.status, 200, "{r:?}\n{}", site.log());
    assert_eq!(learned(&rspamd), before + 2);

    // A user: refused by the API, no button in the portal, and the portal's form fails.
    let user = api_key(&site, &["--role", "user", "--addresses", "jane@a.test"]);
    let r = learn(
        &site,
        &jane_spam,
        "spam",
        &[("authorization", user.as_str())],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("may not teach Rspamd"), "{r:?}");
    let r = form(
        &site,
        "/ui/portal/login",
        &[],
        "login=jane%40a.test&password=correct+horse+battery",
    );
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());
    let jane = r.cookie("mb_session").unwrap();
    let mine = get(
        &site,
        &format!("/ui/portal/{jane_spam}"),
        &[("cookie", &jane)],
    );
    assert_eq!(mine.status, 200, "{mine:?}");
    assert!(
        mine.body.contains("jane spam") && !mine.body.contains("Learn as"),
        "{}",
        mine.body
    );
    let r = form(
        &site,
        &format!("/ui/portal/{jane_spam}/learn-spam"),
        &[("cookie", &jane)],
        &format!("csrf={}", mine.csrf()),
    );
    let shown = after(&site, &r, &jane);
    assert!(
        shown.body.contains("class=\"flash error\"") && shown.body.contains("may not teach Rspamd"),
        "{}",
        shown.body
    );
    assert_eq!(learned(&rspamd), before + 2, "a user taught Rspamd");

    // An administrator's session on the pages: the list offers the buttons; a form
    // without the session's CSRF token is refused, with it Rspamd learns and the page
    // says so.
    let r = form(
        &site,
        "/ui/login",
        &[],
        "name=ops&password=correct+horse+battery",
    );
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());
    let ops = r.cookie("mb_session").unwrap();
    let list = get(&site, "/ui/quarantine", &[("cookie", &ops)]);
    assert_eq!(list.status, 200, "{list:?}");
    let action = format!("action=\"{}/learn-spam\"", page(&jane_spam));
    assert!(list.body.contains(&action), "{}", list.body);
    let post = format!("{}/learn-spam", page(&jane_spam));
    let r = form(&site, &post, &[("cookie", &ops)], "x=1");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        learned(&rspamd),
        before + 2,
        "learned without the CSRF token"
    );
    let r = form(
        &site,
        &post,
        &[("cookie", &ops)],
        &format!("csrf={}", list.csrf()),
    );
    assert_eq!(r.header("location"), page(&jane_spam), "{r:?}");
    let shown = after(&site, &r, &ops);
    assert!(
        shown.body.contains("class=\"flash ok\"")
            && shown
                .body
                .contains(&format!("Rspamd learned {jane_spam} as spam")),
        "{}",
        shown.body
    );
    assert_eq!(
        learned(&rspamd),
        before + 3,
        "the form's learn did not reach Rspamd"
    );
    // The message stays in the quarantine.
    assert_eq!(site.quarantine()["total"], 4);

    // Each learn is in the audit trail, under who did it.
    let (_, history, _) = site.tool("mb-config", &["history"]);
    for want in [
        format!("quarantine:{jane_spam}"),
        "learn-spam".to_string(),
        "learn-ham".to_string(),
        "web:ops".to_string(),
    ] {
        assert!(history.contains(&want), "{want} not in {history}");
    }

    println!("web_learn took {:?}", started.elapsed());
}
