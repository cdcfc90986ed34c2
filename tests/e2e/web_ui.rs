//! The web interface in a real browser: Debian's Chromium, headless, driven through
//! chromedriver (WebDriver, fantoccini) against a real gateway (mb-rpcd, mb-smtpd, one
//! filter worker, mb-web over HTTPS) with mail sent through it: login with a password
//! and TOTP (a wrong password refused), the dashboard, message tracking and a message's
//! timeline, hold and release of a really queued message, a configuration edit refused
//! then applied (read back with `mb-config get`), a form without the CSRF token
//! refused, and message data shown as text, never run. Screenshots go to
//! `target/screenshots/`; any browser console error fails the test.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::{BodyExt, Full};
use mb_testkit::browser::{Chromedriver, screenshot_dir};
use mb_testkit::{Gateway, Proc, SmtpSink, bin, free_port, text, wait_until};
use serde_json::{Value as Json, json};

use crate::smtp::Raw;

const PASSWORD: &str = "correct horse battery";
/// A subject that would run script if a page did not escape it.
const EVIL: &str = "<script>alert('xss')</script><img src=x onerror=alert(2)>";

/// A gateway serving a.test (relayed to a sink) and held.test (relayed to a port
/// nobody listens on, so its mail stays queued), and mb-web on HTTPS.
struct Site {
    gw: Gateway,
    _web: Proc,
    sink: SmtpSink,
    smtp: u16,
    https: u16,
}

impl Site {
    fn start() -> Site {
        let sink = SmtpSink::start(&[]).unwrap();
        let (smtp, reinject, https, dead) = (free_port(), free_port(), free_port(), free_port());
        let mut gw = Gateway::new(&format!(
            "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {smtp}\nrate_per_source = 1000\nconnection_rate = 10000\n\
             [network.reinject]\nport = {reinject}\n[network.protection]\nmode = \"public\"\n\
             [smtp]\nhostname = \"gw.served.test\"\ndomains = \"a.test,held.test\"\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\ntransport = \"held.test=smtp:[127.0.0.1]:{dead}\"\n\
             [filter]\nenabled = true\nworkers = 1\nnext_hop = \"127.0.0.1:{reinject}\"\n",
            sink.port
        ));
        let (cert, key) = mb_testkit::self_signed();
        std::fs::write(gw.path("web.crt"), &cert).unwrap();
        std::fs::write(gw.path("web.key"), &key).unwrap();
        let mut cfg = std::fs::read_to_string(&gw.config).unwrap();
        cfg.push_str(&format!(
            "[network.https]\nlisten = \"127.0.0.1\"\nport = {https}\nrate_limit = 1000000\nrate_burst = 100000\n\
             \"tls.cert\" = \"{}\"\n\"tls.key\" = \"{}\"\n",
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
            https,
        };
        wait_until("mb-web's HTTPS port", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", https)).is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}: {}", site.log()));
        site
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.gw.path("web.log")).unwrap_or_default() + &self.gw.log()
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https)
    }

    /// An administrator with a TOTP secret, made with `mb-web account add` as root on
    /// the socket; returns the secret.
    fn admin(&self, name: &str) -> String {
        let mut child = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&self.gw.config)
            .args([
                "account", "add", name, "--role", "admin", "--totp", "--json",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{PASSWORD}\n").as_bytes())
            .unwrap();
        let (code, out, err) = text(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "{out}{err}");
        let v: Json = serde_json::from_str(&out).unwrap();
        v["totp"]["secret"].as_str().unwrap().to_string()
    }

    fn send(&self, rcpt: &str, subject: &str) {
        let mut c = Raw::connect(self.smtp);
        c.reply();
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<alice@sender.test>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("250"), "{rcpt}: {r}");
        c.cmd("DATA");
        let r = c.cmd(&format!(
            "From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\
             Message-ID: <{}@sender.test>\r\n\r\nhello\r\n.",
            rcpt.replace('@', ".")
        ));
        c.cmd("QUIT");
        assert!(r.starts_with("250"), "{r}");
    }

    fn queue(&self) -> Json {
        let (code, out, err) = text(&self.gw.tool("mb-queue", &["list", "--json"]));
        assert_eq!(code, 0, "{out}{err}");
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"))
    }
}

/// Opens a WebDriver session on a headless Chromium.
pub(crate) async fn browser(driver: &Chromedriver) -> Client {
    let chromium = ["/usr/lib/chromium/chromium"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| driver.chromium());
    let caps = json!({
        "browserName": "chrome",
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": chromium.display().to_string(),
            "args": driver.chrome_args(),
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    let Json::Object(caps) = caps else {
        unreachable!("a JSON object")
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url())
        .await
        .unwrap_or_else(|e| panic!("WebDriver session: {e}\n{}", driver.log()))
}

/// The browser's console messages since the last call (chromedriver's log).
async fn console(driver: &Chromedriver, c: &Client) -> Vec<Json> {
    let id = c.session_id().await.unwrap().unwrap();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = hyper::Request::post(format!("{}/session/{id}/se/log", driver.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"type":"browser"}"#)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Json = serde_json::from_slice(&body).unwrap();
    v["value"].as_array().cloned().unwrap_or_default()
}

/// Fails on any console error or warning the pages caused, except Chromium's note
/// about a page answered with an error status that the test asked for (`expected`:
/// path and status, the refused login, the refused value, the forged forms).
pub(crate) async fn no_console_errors(driver: &Chromedriver, c: &Client, expected: &[(&str, u16)]) {
    let bad: Vec<Json> = console(driver, c)
        .await
        .into_iter()
        .filter(|e| e["level"] != "INFO" && e["level"] != "DEBUG")
        .filter(|e| {
            let m = e["message"].as_str().unwrap_or_default();
            !(e["source"] == "network"
                && expected.iter().any(|(path, status)| {
                    m.ends_with(&format!(
                        "{path} - Failed to load resource: the server responded with a status of {status} ()"
                    ))
                }))
        })
        .collect();
    assert!(bad.is_empty(), "browser console: {bad:#?}");
}

pub(crate) async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join(format!("web_ui-{name}.png")), png).unwrap();
}

/// The text of the first element matching `css`, once it contains `needle`; reloads
/// the page (the message log and queue fill in the background) until `limit`.
pub(crate) async fn wait_text(
    c: &Client,
    css: &str,
    needle: &str,
    reload: bool,
    limit: Duration,
) -> String {
    let start = Instant::now();
    loop {
        let seen = match c.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if seen.contains(needle) {
            return seen;
        }
        if start.elapsed() > limit {
            let url = c
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let body = c
                .find(Locator::Css("body"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            panic!("{needle:?} not in {css} at {url} within {limit:?}; page:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if reload {
            c.refresh().await.unwrap();
        }
    }
}

pub(crate) async fn fill(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

pub(crate) async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

pub(crate) async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

/// A script's result (WebDriver's script, not the page's: the CSP binds only the page).
async fn eval(c: &Client, script: &str) -> Json {
    c.execute(script, Vec::new()).await.unwrap()
}

#[test]
fn the_admin_interface_in_a_browser() {
    let started = Instant::now();
    let site = Site::start();
    let secret = site.admin("ops");
    site.send("bob@a.test", "tracking probe 17");
    site.send("carol@a.test", EVIL);
    site.send("dave@held.test", "held in the queue");
    let driver = Chromedriver::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        c.set_window_size(1280, 1000).await.unwrap();
        let wait = Duration::from_secs(20);

        // Any page without a session leads to the login form, and back after it.
        c.goto(&site.url("/ui/tracking")).await.unwrap();
        assert_eq!(path(&c).await, "/ui/login");
        // A wrong password: refused, still on the form.
        fill(&c, "input[name=name]", "ops").await;
        fill(&c, "input[name=password]", "wrong password").await;
        fill(&c, "input[name=totp]", &crate::web_auth::totp(&secret, 0)).await;
        click(&c, "form[action='/ui/login'] button").await;
        let refused = wait_text(&c, "p.flash", "wrong name, password or code", false, wait).await;
        assert!(refused.contains("wrong"), "{refused}");
        assert_eq!(path(&c).await, "/ui/login");
        // The right password without its code: asked for the code.
        fill(&c, "input[name=password]", PASSWORD).await;
        fill(&c, "input[name=totp]", "").await;
        click(&c, "form[action='/ui/login'] button").await;
        wait_text(&c, "p.flash", "TOTP code", false, wait).await;
        // With it: logged in, on the page asked for first.
        fill(&c, "input[name=password]", PASSWORD).await;
        fill(&c, "input[name=totp]", &crate::web_auth::totp(&secret, 0)).await;
        click(&c, "form[action='/ui/login'] button").await;
        wait_text(&c, "h1", "Message tracking", false, wait).await;
        assert_eq!(path(&c).await, "/ui/tracking");

        // The dashboard: the daemons as mb-status sees them, counts and the chart.
        c.goto(&site.url("/ui/")).await.unwrap();
        wait_text(&c, "h1", "Dashboard", false, wait).await;
        // The figures are mb-rpcd's statistics rollups of the three messages.
        let page = wait_text(&c, "main", "alice@sender.test", true, wait).await;
        for needle in [
            "mb-rpcd",
            "mb-smtpd",
            "mb-filter@1",
            "mb-web",
            "Queue: deferred",
            "Top senders",
            "sender.test",
            "From the statistics rollups.",
        ] {
            assert!(page.contains(needle), "{needle} not on the dashboard:\n{page}");
        }
        assert!(!page.contains("down"), "a daemon shows down:\n{page}");
        let chart = eval(
            &c,
            "const i = document.querySelector('img[src^=\"/ui/chart/verdicts.svg\"]'); \
             return i && i.complete ? i.naturalWidth : -1;",
        )
        .await;
        assert!(chart.as_i64().unwrap_or(0) > 0, "the chart did not load: {chart}");
        shot(&c, "dashboard").await;

        // Tracking: the message sent through the gateway, then its timeline with the
        // scan's verdict and the delivery at the sink.
        c.goto(&site.url("/ui/tracking?subject=tracking+probe")).await.unwrap();
        wait_text(&c, "table.results tbody", "tracking probe 17", true, wait).await;
        shot(&c, "tracking").await;
        click(&c, "table.results tbody tr td a").await;
        wait_text(&c, "h1", "Message timeline", false, wait).await;
        let timeline = wait_text(&c, "table.timeline", "delivered", true, wait).await;
        for stage in ["received", "scanned", "delivered"] {
            assert!(timeline.contains(stage), "{stage} not in the timeline:\n{timeline}");
        }
        assert!(
            site.sink.messages().iter().any(|m| m.contains("tracking probe 17")),
            "the sink has the message the timeline says was delivered"
        );
        shot(&c, "timeline").await;

        // Message data is text: the subject shows as written, no element or script
        // comes of it, and no alert opens.
        c.goto(&site.url("/ui/tracking?to=carol%40a.test")).await.unwrap();
        let shown = wait_text(&c, "table.results td.subject", "alert", true, wait).await;
        assert_eq!(shown, EVIL);
        click(&c, "table.results tbody tr td a").await;
        let shown = wait_text(&c, "dd.subject", "alert", false, wait).await;
        assert_eq!(shown, EVIL);
        for probe in [
            "return document.scripts.length",
            "return document.querySelectorAll('img[src=\"x\"], [onerror]').length",
        ] {
            assert_eq!(eval(&c, probe).await, json!(0), "{probe}");
        }
        assert!(c.get_alert_text().await.is_err(), "an alert is open");

        // The queue: the message for held.test, held, then released, as mb-queue sees.
        let dave = |q: &Json| {
            q.as_array()
                .unwrap()
                .iter()
                .find(|e| e["recipients"].to_string().contains("dave@held.test"))
                .cloned()
        };
        let mut queued = Json::Null;
        wait_until("the held.test message in the queue", wait, || {
            queued = site.queue();
            dave(&queued).is_some()
        })
        .unwrap_or_else(|e| panic!("{e}: {queued:#}\n{}", site.log()));
        let id = dave(&queued).unwrap()["id"].as_str().unwrap().to_string();
        c.goto(&site.url("/ui/queue")).await.unwrap();
        let row = format!("tr[data-id='{id}']");
        wait_text(&c, &row, "dave@held.test", true, wait).await;
        shot(&c, "queue").await;
        click(&c, &format!("{row} button[value=hold]")).await;
        wait_text(&c, "p.flash", "is now in the hold queue", false, wait).await;
        assert_eq!(dave(&site.queue()).unwrap()["queue"], "hold");
        assert_eq!(
            c.find(Locator::Css(&format!("{row} td.queue-name"))).await.unwrap().text().await.unwrap(),
            "hold"
        );
        click(&c, &format!("{row} button[value=release]")).await;
        wait_text(&c, "p.flash", "released", false, wait).await;
        let after = dave(&site.queue()).unwrap();
        assert_ne!(after["queue"], "hold", "{after:#}");

        // Configuration: a value the registry refuses is shown with its words and not
        // stored; a good one is stored (mb-config get), and a restart key says so.
        c.goto(&site.url("/ui/config/key/smtp.max_recipients")).await.unwrap();
        wait_text(&c, "h1", "smtp.max_recipients", false, wait).await;
        fill(&c, "form.edit input[name=value]", "lots").await;
        click(&c, "form.edit button").await;
        let why = wait_text(&c, "#config-error", "smtp.max_recipients", false, wait).await;
        assert!(why.contains("invalid value"), "{why}");
        let get = |key: &str| text(&site.gw.tool("mb-config", &["get", key])).1;
        assert_eq!(get("smtp.max_recipients").trim(), "100");
        fill(&c, "form.edit input[name=value]", "77").await;
        click(&c, "form.edit button").await;
        wait_text(&c, "p.flash", "smtp.max_recipients = 77 saved", false, wait).await;
        assert_eq!(get("smtp.max_recipients").trim(), "77");
        shot(&c, "config").await;
        c.goto(&site.url("/ui/config/key/queue.concurrency")).await.unwrap();
        fill(&c, "form.edit input[name=value]", "50").await;
        click(&c, "form.edit button").await;
        let note = wait_text(&c, "p.flash", "saved", false, wait).await;
        assert!(note.contains("restart needed") && note.contains("mb-smtpd"), "{note}");
        c.goto(&site.url("/ui/config/history")).await.unwrap();
        let history = wait_text(&c, "table.history", "smtp.max_recipients", false, wait).await;
        assert!(history.contains("web:ops"), "{history}");
        c.goto(&site.url("/ui/config")).await.unwrap();
        let all = wait_text(&c, "main", "network.smtp", false, wait).await;
        assert!(all.contains("Recipients allowed in one message"), "descriptions are listed");
        shot(&c, "configuration").await;

        // CSRF: the session's own cookie on a form without the token, or with another
        // token, is refused, and nothing changes.
        let before = get("smtp.max_recipients");
        for token in [None, Some("forged")] {
            c.goto(&site.url("/ui/")).await.unwrap();
            let script = format!(
                "const f = document.createElement('form'); f.method = 'post'; \
                 f.action = '/ui/config/key/smtp.max_recipients'; \
                 const v = document.createElement('input'); v.name = 'value'; v.value = '5'; f.appendChild(v); \
                 {} document.body.appendChild(f); f.submit(); return true;",
                token.map_or(String::new(), |t| format!(
                    "const t = document.createElement('input'); t.name = 'csrf'; t.value = '{t}'; f.appendChild(t);"
                ))
            );
            eval(&c, &script).await;
            wait_text(&c, "h1", "Refused", false, wait).await;
            let why = c.find(Locator::Css("p.error")).await.unwrap().text().await.unwrap();
            assert!(why.contains("token"), "{why}");
        }
        assert_eq!(get("smtp.max_recipients"), before, "a forged form changed the value");

        // Logging out ends the session: the pages lead to the login form again.
        c.goto(&site.url("/ui/")).await.unwrap();
        click(&c, "form.logout button").await;
        wait_text(&c, "h1", "Mailborder", false, wait).await;
        c.goto(&site.url("/ui/queue")).await.unwrap();
        assert_eq!(path(&c).await, "/ui/login");

        // Nothing on any page logged an error (a refused inline script, a resource
        // that did not load).
        no_console_errors(
            &driver,
            &c,
            &[
                ("/ui/login", 401),
                ("/ui/config/key/smtp.max_recipients", 400),
                ("/ui/config/key/smtp.max_recipients", 403),
            ],
        )
        .await;
        c.close().await.unwrap();
    });
    assert!(!site.log().contains("panicked"), "{}", site.log());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "the browser test took {took:?}"
    );
}
