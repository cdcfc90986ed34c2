//! The recipients, DKIM and cluster pages of the admin web interface against real
//! daemons (mb-rpcd, mb-cluster standalone, mb-web), over mb-web's socket with a plain
//! HTTP client and an administrator's session: recipients added through the page are
//! what `mb-recipient list` shows and a delete removes them; a form without the
//! session's CSRF field is refused; a key made through the DKIM page is the one whose
//! record `mb-dkim --json record` prints; a user is sent to the portal and a domain
//! admin gets 403 on all three pages.

use std::io::Write;
use std::process::{Command, Stdio};

use mb_testkit::{bin, text};
use serde_json::Value as Json;

use crate::web_portal::{Site, smtp_account};

const PASSWORD: &str = "correct horse battery staple";

/// Adds the web account `name` with `role` as root on the socket and logs it in:
/// the session cookie.
fn session_of(site: &Site, name: &str, role: &[&str]) -> String {
    let mut child = Command::new(bin("mb-web"))
        .arg("--config")
        .arg(&site.gw.config)
        .args(["account", "add", name])
        .args(role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let (code, out, err) = text(&child.wait_with_output().unwrap());
    assert_eq!(code, 0, "{out}{err}");
    let r = site.post(
        "/ui/login",
        &[],
        &format!(
            "name={name}&password={}&totp=&next=",
            PASSWORD.replace(' ', "+")
        ),
    );
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());
    r.session().unwrap_or_else(|| panic!("no session: {r:?}"))
}

fn listed(site: &Site) -> String {
    let (code, out, err) = site.tool("mb-recipient", &["list"]);
    assert_eq!(code, 0, "{out}{err}");
    out
}

#[test]
fn recipients_dkim_and_cluster_pages_work_for_admins_only() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("dkim/private.key");
    let mut site = Site::start_with(&format!(
        "[dkim]\nselector = \"mb\"\nkey = \"{}\"\n",
        key.display()
    ));
    site.gw.start_cluster().unwrap();
    let cookie = session_of(&site, "ada", &["--role", "admin"]);
    let me = [("cookie", cookie.as_str())];

    // Recipients: exact, wildcard and catch-all patterns, added through the page.
    let page = site.get("/ui/recipients", &me);
    assert_eq!(page.status, 200, "{page:?}");
    let csrf = page.csrf();
    let r = site.post(
        "/ui/recipients/add",
        &me,
        &format!(
            "csrf={csrf}&patterns=jane%40a.test%0Asales-*%40a.test+*%40b.test&comment=%3Cscript%3Ealert(1)%3C%2Fscript%3E"
        ),
    );
    assert_eq!(
        (r.status, r.header("location").as_str()),
        (303, "/ui/recipients"),
        "{r:?}"
    );
    let page = site.get("/ui/recipients", &me);
    for p in ["jane@a.test", "sales-*@a.test", "*@b.test"] {
        assert!(
            page.body.contains(&format!("<code>{p}</code>")),
            "{p}: {}",
            page.body
        );
    }
    assert!(
        page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
            && !page.body.contains("<script>alert"),
        "the comment must be escaped: {}",
        page.body
    );
    let cli = listed(&site);
    for p in ["jane@a.test", "sales-*@a.test", "*@b.test"] {
        assert!(cli.lines().any(|l| l.contains(p)), "{p}: {cli}");
    }
    // The domain filter shows one domain's patterns.
    let b = site.get("/ui/recipients?domain=b.test", &me);
    assert!(
        b.body.contains("<code>*@b.test</code>") && !b.body.contains("<code>jane@a.test</code>"),
        "{}",
        b.body
    );

    // A form without this session's CSRF token is refused and changes nothing.
    let r = site.post(
        "/ui/recipients/add",
        &me,
        "patterns=forged%40a.test&comment=",
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = site.post(
        "/ui/recipients/delete",
        &me,
        "pattern=jane%40a.test&domain=",
    );
    assert_eq!(r.status, 403, "{r:?}");
    let cli = listed(&site);
    assert!(
        !cli.contains("forged@a.test") && cli.contains("jane@a.test"),
        "{cli}"
    );

    // Delete through the page.
    let r = site.post(
        "/ui/recipients/delete",
        &me,
        &format!("csrf={csrf}&pattern=jane%40a.test&domain=a.test"),
    );
    assert_eq!(
        (r.status, r.header("location").as_str()),
        (303, "/ui/recipients?domain=a.test"),
        "{r:?}"
    );
    let cli = listed(&site);
    assert!(
        !cli.contains("jane@a.test") && cli.contains("sales-*@a.test"),
        "{cli}"
    );
    let page = site.get("/ui/recipients", &me);
    assert!(
        !page.body.contains("<code>jane@a.test</code>"),
        "{}",
        page.body
    );

    // DKIM: no key yet, a key made through the page, its record as mb-dkim prints it.
    let page = site.get("/ui/dkim?domain=a.test", &me);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("class=\"error\""),
        "no key yet: {}",
        page.body
    );
    let r = site.post(
        "/ui/dkim/keygen",
        &me,
        &format!("csrf={csrf}&domain=a.test&bits=2048"),
    );
    assert_eq!(
        (r.status, r.header("location").as_str()),
        (303, "/ui/dkim?domain=a.test"),
        "{r:?}"
    );
    assert!(key.exists(), "{r:?}\n{}", site.log());
    let first = std::fs::read(&key).unwrap();
    let (code, out, err) = site.tool("mb-dkim", &["--json", "record", "--domain", "a.test"]);
    assert_eq!(code, 0, "{out}{err}");
    let value = serde_json::from_str::<Json>(&out).unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(value.starts_with("v=DKIM1; k=rsa; p="), "{value}");
    let page = site.get("/ui/dkim?domain=a.test", &me);
    assert!(
        page.body
            .contains(&format!("<code class=\"record\">{value}</code>"))
            && page.body.contains("mb._domainkey.a.test"),
        "{}",
        page.body
    );
    // Without the box ticked an existing key is kept; with it, replaced.
    site.post(
        "/ui/dkim/keygen",
        &me,
        &format!("csrf={csrf}&domain=a.test&bits=2048"),
    );
    assert_eq!(std::fs::read(&key).unwrap(), first, "kept without replace");
    site.post(
        "/ui/dkim/keygen",
        &me,
        &format!("csrf={csrf}&domain=a.test&bits=2048&replace=yes"),
    );
    assert_ne!(std::fs::read(&key).unwrap(), first, "replaced when ticked");

    // Cluster: a standalone node.
    let page = site.get("/ui/cluster", &me);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("no (standalone)") && !page.body.contains("class=\"error\""),
        "{}\n{}",
        page.body,
        site.log()
    );
    // The navigation links to the three pages.
    for link in ["/ui/recipients", "/ui/dkim", "/ui/cluster"] {
        assert!(page.body.contains(&format!("href=\"{link}\"")), "{link}");
    }

    // A user is sent to the portal; a domain admin is refused; neither can post.
    smtp_account(&site, "jane@a.test", "correct horse battery");
    let r = site.post(
        "/ui/portal/login",
        &[],
        "login=jane%40a.test&password=correct+horse+battery",
    );
    let user = r.session().unwrap_or_else(|| panic!("{r:?}"));
    let dora = session_of(
        &site,
        "dora",
        &["--role", "domain-admin", "--domains", "a.test"],
    );
    for path in ["/ui/recipients", "/ui/dkim?domain=a.test", "/ui/cluster"] {
        let r = site.get(path, &[("cookie", user.as_str())]);
        assert_eq!(
            (r.status, r.header("location").as_str()),
            (303, "/ui/portal"),
            "{path}"
        );
        let r = site.get(path, &[("cookie", dora.as_str())]);
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert!(!r.body.contains("v=DKIM1"), "{}", r.body);
    }
    let page = site.get("/ui/", &[("cookie", dora.as_str())]);
    let csrf = page.csrf();
    let r = site.post(
        "/ui/recipients/add",
        &[("cookie", dora.as_str())],
        &format!("csrf={csrf}&patterns=dora%40a.test"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(!listed(&site).contains("dora@a.test"));
}
