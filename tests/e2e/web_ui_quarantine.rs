//! The quarantine in a real browser (headless Chromium through chromedriver, the
//! harness of `web_ui`) against real daemons relaying to smtp-sink (the site of
//! `web_portal`): an administrator releases a message from the quarantine page and it
//! arrives at the sink; a user signed in with its SMTP account sees only its own
//! quarantine (another's message is not found, the staff pages send it back); a digest
//! received at the sink leads through its confirmation page, which releases nothing by
//! being opened, to a release by the button, once. Screenshots go to
//! `target/screenshots/`; any browser console error fails the test.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::Locator;
use mb_testkit::browser::Chromedriver;
use mb_testkit::{bin, text, wait_until};

use crate::web_portal::{Site, parts, release_token, smtp_account};
use crate::web_ui::{browser, click, fill, no_console_errors, path, shot, wait_text};

const PASSWORD: &str = "correct horse battery";

/// A web administrator made with `mb-web account add` (no TOTP: the site requires none).
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

/// The quarantine's size through the API, on a thread of its own: `Site`'s client runs
/// its own runtime, which cannot start inside the browser's.
fn total(site: &Site) -> u64 {
    std::thread::scope(|s| {
        s.spawn(|| site.quarantine()["total"].as_u64().unwrap())
            .join()
            .unwrap()
    })
}

#[test]
fn quarantine_release_portal_and_digest_in_a_browser() {
    let started = Instant::now();
    let site = Site::start();
    // The browser resolves only localhost: the digest's links (web.base_url's host) are
    // followed on localhost at the same port.
    let port = site.base_url.rsplit(':').next().unwrap().to_string();
    let url = |p: &str| format!("https://localhost:{port}{p}");
    web_admin(&site, "ops");
    smtp_account(&site, "jane@a.test", PASSWORD);
    site.send("bob@b.test", "release me", "", "held for bob");
    site.send("jane@a.test", "jane one", "", "first held for jane");
    site.send("jane@a.test", "jane two", "", "second held for jane");
    site.send("ann@a.test", "ann one", "", "held for ann");
    site.wait_quarantined(4);
    let ann_id = site.id_of("ann one");
    let (code, out, err) = site.tool("mb-quarantine", &["digest", "--now"]);
    assert_eq!(code, 0, "{out}{err}\n{}", site.log());
    let mut digest = String::new();
    wait_until("jane's digest at the sink", Duration::from_secs(30), || {
        digest = site
            .at_sink("Subject: Quarantine digest")
            .into_iter()
            .find(|d| d.contains("To: <jane@a.test>") || d.contains("To: jane@a.test"))
            .unwrap_or_default();
        !digest.is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    let token = release_token(&site.base_url, &parts(&digest).0, "jane two");
    let link = format!("/ui/digest/{token}");

    let driver = Chromedriver::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        c.set_window_size(1280, 1000).await.unwrap();
        let wait = Duration::from_secs(20);

        // (a) The administrator signs in, finds bob's message on the quarantine page and
        // releases it with the button: it arrives at the sink, and leaves the list.
        c.goto(&url("/ui/quarantine")).await.unwrap();
        assert_eq!(path(&c).await, "/ui/login");
        fill(&c, "input[name=name]", "ops").await;
        fill(&c, "input[name=password]", PASSWORD).await;
        click(&c, "form[action='/ui/login'] button").await;
        wait_text(&c, "h1", "Quarantine", false, wait).await;
        assert_eq!(path(&c).await, "/ui/quarantine");
        let list = wait_text(&c, "table.list", "release me", false, wait).await;
        for subject in ["jane one", "jane two", "ann one"] {
            assert!(list.contains(subject), "{subject} not listed:\n{list}");
        }
        shot(&c, "quarantine").await;
        c.find(Locator::LinkText("release me"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_text(&c, "pre.message", "held for bob", false, wait).await;
        shot(&c, "quarantine-message").await;
        assert_eq!(site.released("release me"), 0, "released before the click");
        click(&c, "form[action$='/release'] button").await;
        wait_text(&c, "p.flash", "released to bob@b.test", false, wait).await;
        assert_eq!(path(&c).await, "/ui/quarantine");
        wait_until("bob's release at the sink", wait, || {
            site.released("release me") == 1
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
        let list = c
            .find(Locator::Css("main"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!list.contains("release me"), "still listed:\n{list}");
        assert_eq!(total(&site), 3);
        click(&c, "form.logout button").await;
        wait_text(&c, "h1", "Mailborder", false, wait).await;

        // (b) Jane signs in to the portal with her SMTP account: her two messages and
        // nobody else's; ann's message is not found for her, and the staff's page sends
        // her back to the portal.
        c.goto(&url("/ui/portal/login")).await.unwrap();
        fill(&c, "input[name=login]", "jane@a.test").await;
        fill(&c, "input[name=password]", PASSWORD).await;
        click(&c, "form[action='/ui/portal/login'] button").await;
        wait_text(&c, "h1", "My quarantine", false, wait).await;
        assert_eq!(path(&c).await, "/ui/portal");
        let mine = wait_text(&c, "main", "jane two", false, wait).await;
        assert!(mine.contains("jane one"), "{mine}");
        for other in ["ann one", "release me", "ann@a.test", "bob@b.test"] {
            assert!(!mine.contains(other), "{other} in jane's portal:\n{mine}");
        }
        shot(&c, "portal").await;
        c.goto(&url(&format!("/ui/portal/{ann_id}"))).await.unwrap();
        // An error page (the 404 the console check allows), not ann's message.
        wait_text(&c, "p.error", "", false, wait).await;
        let page = c
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !page.contains("held for ann") && !page.contains("ann one"),
            "ann's message shown to jane:\n{page}"
        );
        c.goto(&url("/ui/quarantine")).await.unwrap();
        assert_eq!(path(&c).await, "/ui/portal");
        click(&c, "form.logout button").await;
        wait_text(&c, "h1", "Mailborder", false, wait).await;
        assert_eq!(total(&site), 3);

        // (c) Jane's digest link: opening it (twice) shows the confirmation page and
        // releases nothing; the button releases the message, which reaches the sink.
        for _ in 0..2 {
            c.goto(&url(&link)).await.unwrap();
            let page = wait_text(&c, "main", "Release this message?", false, wait).await;
            assert!(page.contains("jane two"), "{page}");
        }
        shot(&c, "digest-confirm").await;
        // A release goes to the sink within a second or so: give a wrong one time to show.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(site.released("jane two"), 0, "the GET released the message");
        assert_eq!(total(&site), 3);
        click(&c, &format!("form[action='{link}'] button")).await;
        wait_text(&c, "main", "was released to jane@a.test", false, wait).await;
        shot(&c, "digest-released").await;
        wait_until("jane's release at the sink", wait, || {
            site.released("jane two") == 1
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
        assert_eq!(total(&site), 2);
        // Used: the link is refused now.
        c.goto(&url(&link)).await.unwrap();
        wait_text(&c, "main", "not valid", false, wait).await;
        assert_eq!(site.released("jane two"), 1);

        no_console_errors(
            &driver,
            &c,
            &[(&format!("/ui/portal/{ann_id}"), 404), (&link, 404)],
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
