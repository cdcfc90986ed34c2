//! The users' portal with a directory login (issue 17, item 2) against a real OpenLDAP
//! slapd and real daemons (the site of `web_portal`): a user signs in on the portal form
//! with their uid and directory password and sees the mail quarantined for every
//! address of their entry (`mail`, `mailAlternateAddress`, `proxyAddresses`) and no one
//! else's; a wrong or empty password, a filter-injection login and an unknown user get
//! the same answer; SMTP accounts come first and their aliases count; failures lock a
//! login; a directory that is down is a "try again" page, not a crash nor a logout; and
//! the bind password lives in mb-rpcd only: an mb-web run as mb-web.service runs it (as
//! the mb-web user, on the copy `mb-web config-export` writes) is shown the mask and
//! signs directory users in all the same.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_testkit::{Proc, Slapd, bin, text, wait_until};

use crate::web_portal::{Site, smtp_account};

const CAROL_DN: &str = "uid=carol,ou=people,dc=example,dc=test";
const FAILED: &str = "wrong login or password";

fn form(login: &str, password: &str) -> String {
    format!(
        "login={}&password={}",
        urlencode(login),
        urlencode(password)
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An LDAP tool run as the directory's administrator or service account.
fn ldap_tool(program: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (Debian's ldap-utils)"));
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
    }
    text(&child.wait_with_output().unwrap())
}

/// The DNs the service account finds with a raw (unescaped) filter.
fn raw_search(slapd: &Slapd, filter: &str) -> Vec<String> {
    let (code, out, err) = ldap_tool(
        "/usr/bin/ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &slapd.url(),
            "-D",
            Slapd::BIND_DN,
            "-w",
            Slapd::BIND_PASSWORD,
            "-b",
            Slapd::BASE,
            filter,
            "1.1",
        ],
        "",
    );
    assert_eq!(code, 0, "ldapsearch {filter}: {err}");
    out.lines()
        .filter_map(|l| l.strip_prefix("dn: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn directory_users_sign_in_to_their_own_quarantine_and_nothing_else() {
    let mut slapd = Slapd::start().unwrap();
    slapd
        .add(&format!(
            "dn: {CAROL_DN}\nobjectClass: inetOrgPerson\nobjectClass: mbTestMailUser\nuid: carol\ncn: Carol\nsn: C\n\
             mail: carol@a.test\nmailAlternateAddress: carol.alt@b.test\nproxyAddresses: smtp:Team@A.test\n\
             proxyAddresses: X500:/o=Example/cn=carol\nuserPassword: carol-pw\n\n\
             dn: uid=dave,ou=people,dc=example,dc=test\nobjectClass: inetOrgPerson\nuid: dave\ncn: Dave\nsn: D\n\
             mail: dave@a.test\nuserPassword: dave-pw\n"
        ))
        .unwrap();
    // The attacks would be real against this directory: a DN with an empty password
    // binds (an unauthenticated bind), and the wildcard login, pasted in raw, finds
    // carol alone.
    let (code, out, err) = ldap_tool(
        "/usr/bin/ldapwhoami",
        &["-x", "-H", &slapd.url(), "-D", CAROL_DN, "-w", ""],
        "",
    );
    assert_eq!(
        (code, out.trim()),
        (0, "anonymous"),
        "the unauthenticated bind should succeed here: {err}"
    );
    assert_eq!(
        raw_search(&slapd, "(|(uid=car*)(mail=car*)(sAMAccountName=car*))"),
        vec![CAROL_DN.to_string()]
    );

    // The bind password is in the configuration file, as in production (mailborder.toml,
    // root:mailborder 0640); mb-web.service runs mb-web on a copy without it.
    let site = Site::start_with(&format!(
        "\"lockout.failures\" = 4\n{}cache_ttl = \"1s\"\ntimeout = \"3s\"\n",
        slapd.config_toml()
    ));
    // SMTP accounts: jane with an address alias; "dave", whose login is also a
    // directory uid, with his own password and alias.
    smtp_account(&site, "jane@a.test", "jane smtp password");
    smtp_account(&site, "dave", "dave smtp password");
    for (login, alias) in [
        ("jane@a.test", "jane.alias@b.test"),
        ("dave", "dave@a.test"),
    ] {
        let (code, out, err) = site.tool("mb-user", &["alias", "add", login, alias]);
        assert_eq!(code, 0, "{out}{err}");
    }
    for (rcpt, subject) in [
        ("carol@a.test", "carol main"),
        ("carol.alt@b.test", "carol alt"),
        ("team@a.test", "carol team"),
        ("dave@a.test", "dave one"),
        ("jane@a.test", "jane one"),
        ("jane.alias@b.test", "jane alias"),
    ] {
        site.send(rcpt, subject, "", "held");
    }
    site.wait_quarantined(6);
    let all = [
        "carol main",
        "carol alt",
        "carol team",
        "dave one",
        "jane one",
        "jane alias",
    ];
    let sees = |cookie: &str, mine: &[&str]| {
        let list = site.get("/ui/portal", &[("cookie", cookie)]);
        assert_eq!(list.status, 200, "{list:?}\n{}", site.log());
        for s in all {
            assert_eq!(
                list.body.contains(s),
                mine.contains(&s),
                "{s} (expected only {mine:?}):\n{}",
                list.body
            );
        }
        list
    };
    let login =
        |who: &str, password: &str| site.post("/ui/portal/login", &[], &form(who, password));
    let refused = |who: &str, password: &str| {
        let r = login(who, password);
        assert_eq!(r.status, 401, "{who:?}/{password:?}: {r:?}\n{}", site.log());
        assert!(r.body.contains(FAILED), "{who:?}: {}", r.body);
        assert!(r.session().is_none(), "{who:?}: {r:?}");
    };

    // carol with her uid: every address of her entry, the smtp: prefix stripped.
    let r = login("carol", "carol-pw");
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());
    assert_eq!(r.header("location"), "/ui/portal");
    let carol = r.session().unwrap();
    let list = sees(&carol, &["carol main", "carol alt", "carol team"]);
    // Another user's message does not exist for her.
    let dave_id = site.id_of("dave one");
    assert_eq!(
        site.get(&format!("/ui/portal/{dave_id}"), &[("cookie", &carol)])
            .status,
        404
    );
    // She releases the one for her alternate address; the audit names her login.
    let alt_id = site.id_of("carol alt");
    let r = site.post(
        &format!("/ui/portal/{alt_id}/release"),
        &[("cookie", &carol)],
        &format!("csrf={}", list.csrf()),
    );
    assert_eq!(
        (r.status, r.header("location").as_str()),
        (303, "/ui/portal"),
        "{r:?}"
    );
    wait_until(
        "carol's release at the sink",
        Duration::from_secs(20),
        || site.released("carol alt") == 1,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    let (_, history, _) = site.tool("mb-config", &["history"]);
    assert!(history.contains("ldap:carol"), "{history}");

    // Her mail address is a login too (the default ldap.login_filter).
    let r = login("Carol@A.test", "carol-pw");
    assert_eq!(r.status, 303, "{r:?}");

    // Wrong and empty passwords, injected and unknown logins: one answer for all.
    refused("carol", "carol-pw-wrong");
    refused("carol", "");
    refused("*)(uid=*", "carol-pw");
    refused("car*", "carol-pw");
    refused("*", "carol-pw");
    refused("nobody", "carol-pw");
    refused("", "carol-pw");

    // SMTP accounts first: "dave" is one, so his directory password is not his password
    // here; his SMTP password shows his SMTP alias's mail.
    refused("dave", "dave-pw");
    let r = login("dave", "dave smtp password");
    assert_eq!(r.status, 303, "{r:?}");
    sees(&r.session().unwrap(), &["dave one"]);
    // An SMTP account's address aliases are its addresses too.
    let r = login("jane@a.test", "jane smtp password");
    assert_eq!(r.status, 303, "{r:?}");
    let jane = r.session().unwrap();
    sees(&jane, &["jane one", "jane alias"]);

    // The directory's addresses are read again after ldap.cache_ttl: an address the
    // entry loses is gone from her session.
    let (code, _, err) = ldap_tool(
        "/usr/bin/ldapmodify",
        &[
            "-x",
            "-H",
            &slapd.url(),
            "-D",
            Slapd::ADMIN_DN,
            "-w",
            Slapd::ADMIN_PASSWORD,
        ],
        &format!(
            "dn: {CAROL_DN}\nchangetype: modify\ndelete: proxyAddresses\nproxyAddresses: smtp:Team@A.test\n"
        ),
    );
    assert_eq!(code, 0, "{err}");
    wait_until(
        "carol's team address to go",
        Duration::from_secs(10),
        || {
            !site
                .get("/ui/portal", &[("cookie", &carol)])
                .body
                .contains("carol team")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log()));
    sees(&carol, &["carol main"]);

    // mb-web as mb-web.service runs it: as the mb-web user, on the exported copy. It
    // is shown the mask for the bind password, and signs carol in all the same.
    let (web_uid, mailborder_gid) = crate::web_secrets::ensure_web_account();
    let get_as = |uid: Option<u32>| {
        let mut c = Command::new(bin("mb-config"));
        c.arg("--config")
            .arg(&site.gw.config)
            .args(["get", "ldap.bind_password"])
            .current_dir("/");
        if let Some(uid) = uid {
            c.uid(uid).gid(mailborder_gid);
        }
        text(&c.output().unwrap())
    };
    let (web, socket, copy) = web_as_its_user(&site, web_uid, mailborder_gid);
    assert!(!copy.contains(Slapd::BIND_PASSWORD), "{copy}");
    assert_eq!(get_as(Some(web_uid)).1, "********\n");
    assert_eq!(get_as(None).1, format!("{}\n", Slapd::BIND_PASSWORD));
    let status = std::fs::read_to_string(format!("/proc/{}/status", web.child.id())).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:")
            && l.split_whitespace().nth(1) == Some(web_uid.to_string().as_str())),
        "{status}"
    );
    let (code, headers, _) = call(
        &socket,
        "POST",
        "/ui/portal/login",
        &[],
        &form("carol", "carol-pw"),
    );
    let cookie = headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("mb_session=") && !c.starts_with("mb_session=;"))
        .map(|c| c.split(';').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| {
            panic!(
                "no session from mb-web as its user ({code}):\n{}",
                site.log()
            )
        });
    assert_eq!(code, 303);
    let (code, _, body) = call(&socket, "GET", "/ui/portal", &[("cookie", &cookie)], "");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("carol main") && !body.contains("dave one"),
        "{body}"
    );
    drop(web);

    // The directory down: a login is a "try again" page (503), not "wrong password",
    // nor a crash; sessions keep their last known addresses; SMTP accounts still work.
    slapd.stop();
    let r = login("carol", "carol-pw");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body.contains("cannot be checked right now") && !r.body.contains(FAILED),
        "{}",
        r.body
    );
    assert!(r.session().is_none());
    sees(&carol, &["carol main"]);
    let r = login("jane@a.test", "jane smtp password");
    assert_eq!(r.status, 303, "{r:?}");
    slapd.start_again().unwrap();
    let r = login("carol", "carol-pw");
    assert_eq!(r.status, 303, "{r:?}\n{}", site.log());

    // Failures lock a login (web.lockout.failures = 4 here), known or not; while locked
    // even the right password is refused.
    for _ in 0..4 {
        refused("carol", "guess");
    }
    for (who, password) in [("carol", "carol-pw"), ("carol", "guess")] {
        let r = login(who, password);
        assert_eq!(r.status, 429, "{r:?}");
        assert!(r.body.contains("too many failed logins"), "{}", r.body);
        assert!(r.session().is_none());
    }
    for _ in 0..4 {
        refused("nobody-at-all", "guess");
    }
    assert_eq!(login("nobody-at-all", "guess").status, 429);
    // Another login is not affected.
    assert_eq!(login("jane@a.test", "jane smtp password").status, 303);
    let log = site.log();
    assert!(
        log.contains("user=ldap:carol reason=\"bad credentials\""),
        "the fail2ban line: {log}"
    );
    assert!(
        !log.contains(Slapd::BIND_PASSWORD) && !log.contains("carol-pw"),
        "a password in the log"
    );
}

/// A second mb-web as mb-web.service runs it: as the mb-web user, on the copy of the
/// configuration `mb-web config-export` writes for it, with its own socket directory
/// (where mb-rpcd's socket is linked) and HTTPS port. Returns it, its socket and the copy.
fn web_as_its_user(site: &Site, uid: u32, gid: u32) -> (Proc, std::path::PathBuf, String) {
    let gw = &site.gw;
    // The test's directories and the TLS key are root's: let the mb-web user through.
    for p in [gw.dir.path().to_path_buf(), gw.path("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(gw.path("web.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let exported = gw.path("mb-web.toml");
    let (code, _, err) = text(
        &Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&gw.config)
            .args(["config-export", "--to"])
            .arg(&exported)
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ldap.bind_password"), "{err}");
    let copy = std::fs::read_to_string(&exported).unwrap();
    let run = gw.path("run-web");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(uid), Some(gid)).unwrap();
    std::os::unix::fs::symlink(gw.path("run/mb-rpcd.sock"), run.join("mb-rpcd.sock")).unwrap();
    let https = site.base_url.rsplit(':').next().unwrap();
    let old_run = format!("\"{}\"", gw.path("run").display());
    let old_port = format!("port = {https}\n");
    assert!(
        copy.contains(&old_run) && copy.contains(&old_port),
        "{copy}"
    );
    let mine = copy
        .replace(&old_run, &format!("\"{}\"", run.display()))
        .replace(&old_port, &format!("port = {}\n", mb_testkit::free_port()));
    std::fs::write(&exported, &mine).unwrap();
    std::os::unix::fs::chown(&exported, Some(uid), Some(gid)).unwrap();
    let log = std::fs::File::create(gw.path("web-user.log")).unwrap();
    let child = Command::new(bin("mb-web"))
        .arg("--config")
        .arg(&exported)
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let web = Proc {
        child,
        name: "mb-web (its user)".into(),
    };
    let socket = run.join("mb-web.sock");
    wait_until(
        "mb-web's socket (as its user)",
        Duration::from_secs(30),
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(gw.path("web-user.log")).unwrap_or_default()
        )
    });
    (web, socket, mine)
}

/// One HTTP request over an mb-web socket: status, headers and body.
fn call(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(socket, path).into();
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
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    })
}
