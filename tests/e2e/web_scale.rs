//! mb-web at scale and behind nginx: a restricted role's quarantine pages and totals
//! come from mb-rpcd's scoped query (not from a wider list cut down in mb-web), and the
//! socket given to nginx's group (`web.socket_group`) lets that group speak HTTP, with
//! the normal authentication, and nothing else.

use std::fs::Permissions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use hyper::Method;
use mb_proto::v1::QuarantineEntry;
use mb_proto::v1::quarantine_client::QuarantineClient;
use serde_json::Value as Json;

use crate::web_auth::{Reply, Web};

const PASSWORD: &str = "correct horse battery";

/// Entries of the small domain, and of the big one.
const SMALL: usize = 45;
const BIG: usize = 1500;

/// Indexes `n` quarantine entries to `rcpt(i)` through mb-rpcd's `Quarantine.Add`, as
/// the filter workers do, `base_ms + i` apart; returns their ids.
async fn quarantine(
    web: &Web,
    prefix: &str,
    n: usize,
    base_ms: i64,
    rcpt: impl Fn(usize) -> Vec<String>,
) -> Vec<String> {
    let ch = mb_runtime::uds::connect(&web.gw.socket(), "mb-rpcd")
        .await
        .unwrap();
    let mut client = QuarantineClient::new(ch);
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}{i:05}");
        let added = client
            .add(QuarantineEntry {
                id: id.clone(),
                node: "n1".into(),
                at_unix_ms: base_ms + i64::try_from(i).unwrap(),
                queue_id: format!("Q{id}"),
                sender: "spammer@c.test".into(),
                recipients: rcpt(i),
                subject: format!("offer {i}"),
                reason: "spam".into(),
                score: 9.0,
                size: 1000,
                path: format!("2026/12/01/{id}.eml"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .added;
        assert!(added, "{id}");
        ids.push(id);
    }
    ids
}

async fn login(web: &Web, name: &str) -> String {
    let r = web.login(name, PASSWORD, "").await;
    assert_eq!(r.status, 200, "login {name}: {r:?}");
    r.session_cookie()
}

async fn get(web: &Web, cookie: &str, path: &str) -> Reply {
    let r = web
        .https(Method::GET, path, &[("cookie", cookie)], None)
        .await;
    assert_eq!(r.status, 200, "{path}: {r:?}");
    r
}

fn ids(r: &Reply) -> Vec<String> {
    r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_domain_admin_pages_through_its_quarantine_while_another_domain_has_far_more() {
    let web = Web::start("totp_required = \"\"\n");
    web.add("boss", &["--role", "admin"]);
    web.add("dora", &["--role", "domain-admin", "--domains", "a.test"]);
    web.add("jane", &["--role", "user", "--addresses", "jane@a.test"]);
    // b.test's entries are the newest: a list cut from the newest entries of the whole
    // quarantine would hold none of a.test's.
    let now = 1_800_000_000_000;
    let mut small = quarantine(&web, "a", SMALL, now - 1_000_000, |i| {
        // Every third also goes to b.test; some in capitals; a fifth to jane.
        let mut r = vec![if i % 5 == 0 {
            "jane@a.test".to_string()
        } else if i % 4 == 1 {
            format!("User{i}@A.TEST")
        } else {
            format!("u{i}@a.test")
        }];
        if i % 3 == 0 {
            r.push(format!("x{i}@b.test"));
        }
        r
    })
    .await;
    quarantine(&web, "b", BIG, now, |i| vec![format!("v{i}@b.test")]).await;
    small.reverse();

    // The admin sees everything.
    let boss = login(&web, "boss").await;
    let r = get(&web, &boss, "/api/v1/quarantine?limit=10").await;
    let total = (SMALL + BIG) as u64;
    assert_eq!(r.body["total"], total, "{r:?}");
    assert_eq!(r.body["matched"], total, "{r:?}");
    assert_eq!(ids(&r).len(), 10);
    assert!(ids(&r).iter().all(|id| id.starts_with('b')), "{r:?}");

    // The domain admin pages through a.test's 45, newest first, 10 at a time: every
    // page full until the last, the totals its own, and no entry twice or missing.
    let dora = login(&web, "dora").await;
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let r = get(
            &web,
            &dora,
            &format!("/api/v1/quarantine?limit=10&offset={offset}"),
        )
        .await;
        assert_eq!(r.body["total"], SMALL as u64, "{r:?}");
        assert_eq!(r.body["matched"], SMALL as u64, "{r:?}");
        assert_eq!(r.body["total_bytes"], SMALL as u64 * 1000, "{r:?}");
        let page = ids(&r);
        assert_eq!(
            page.len(),
            (SMALL - offset).min(10),
            "offset {offset}: {r:?}"
        );
        // Only its own recipients are shown of a message to both domains.
        for e in r.body["entries"].as_array().unwrap() {
            for rcpt in e["recipients"].as_array().unwrap() {
                let rcpt = rcpt.as_str().unwrap().to_ascii_lowercase();
                assert!(rcpt.ends_with("@a.test"), "{e}");
            }
        }
        seen.extend(page);
        offset += 10;
        if offset >= SMALL {
            break;
        }
    }
    assert_eq!(seen, small);
    // Past the end: an empty page, the same totals.
    let r = get(&web, &dora, "/api/v1/quarantine?limit=10&offset=1000").await;
    assert_eq!(
        (ids(&r).len(), r.body["total"].clone()),
        (0, Json::from(SMALL as u64))
    );
    // A filter narrows what matched, within the scope: another domain's recipient
    // matches nothing for her.
    let r = get(&web, &dora, "/api/v1/quarantine?to=jane@a.test&limit=2").await;
    assert_eq!(r.body["matched"], 9, "{r:?}");
    assert_eq!(ids(&r).len(), 2, "{r:?}");
    let r = get(&web, &dora, "/api/v1/quarantine?to=v7@b.test").await;
    assert_eq!(
        (r.body["matched"].clone(), ids(&r).len()),
        (Json::from(0), 0),
        "{r:?}"
    );
    // The user sees the nine messages to jane@a.test, however many there are in all.
    let jane = login(&web, "jane").await;
    let r = get(&web, &jane, "/api/v1/quarantine?limit=4&offset=8").await;
    assert_eq!(r.body["total"], 9, "{r:?}");
    assert_eq!(ids(&r).len(), 1, "{r:?}");
}

/// Debian's www-data (base-passwd), nginx's user and group.
const WWW_DATA: u32 = 33;

/// `curl ARGS` on mb-web.sock as `uid` (its own group only, as nginx runs), with `stdin`;
/// (exit code, stdout, stderr).
fn curl(web: &Web, uid: u32, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(mb_testkit::require("curl", "curl"))
        .args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(web.socket())
        .args(args)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    mb_testkit::text(&child.wait_with_output().unwrap())
}

/// The HTTP status of a request on the socket as `uid`.
fn status_as(web: &Web, uid: u32, extra: &[&str], path: &str) -> String {
    let url = format!("http://localhost{path}");
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    args.extend_from_slice(extra);
    args.push(&url);
    let (code, out, err) = curl(web, uid, &args, b"");
    assert_eq!(code, 0, "curl {args:?}: {err}");
    out
}

/// `Control.Status` over gRPC (HTTP/2) on the socket as `uid`: the grpc-status header.
fn control_as(web: &Web, uid: u32) -> String {
    // A refusal is answered before curl has sent its body (an empty StatusRequest:
    // uncompressed, length 0); the server then resets the stream, and now and then
    // curl 7.88 reports that reset (exit 92) instead of the answer. The body comes from
    // a file (curl then knows its length and sends it right behind the headers, where a
    // pipe made it a later write), and a reset is asked again after a pause: in CI,
    // ten immediate retries under the load of the parallel tests all met the reset.
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), [0u8; 5]).unwrap();
    std::fs::set_permissions(body.path(), Permissions::from_mode(0o644)).unwrap();
    let data = format!("@{}", body.path().display());
    let mut last = String::new();
    for _ in 0..20 {
        let (code, out, err) = curl(
            web,
            uid,
            &[
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "--data-binary",
                &data,
                "http://localhost/mailborder.v1.Control/Status",
            ],
            b"",
        );
        if let Some(v) = out.lines().find_map(|l| l.strip_prefix("grpc-status:")) {
            return v.trim().to_string();
        }
        last = format!("none (curl exit {code}): {out}{err}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    last
}

#[tokio::test]
async fn nginxs_group_on_the_web_socket_gets_http_with_a_login_and_nothing_more() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test runs curl as www-data: run it as root (CI does)"
    );
    mb_testkit::ensure_mailborder_account();
    let www = nix::unistd::Group::from_name("www-data")
        .unwrap()
        .expect("Debian's www-data group (package base-passwd)");
    assert_eq!(www.gid.as_raw(), WWW_DATA);
    let web = Web::start("totp_required = \"\"\nsocket_group = \"www-data\"\n");
    web.add("boss", &["--role", "admin"]);
    // As the units set up /run/mailborder: traversable, not listable, by others.
    std::fs::set_permissions(web.gw.dir.path(), Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(web.gw.path("run"), Permissions::from_mode(0o1771)).unwrap();

    // The socket is nginx's group's, 0660; the other daemons' stay mailborder's.
    let meta = std::fs::metadata(web.socket()).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (WWW_DATA, 0o660));
    let rpcd = std::fs::metadata(web.gw.socket()).unwrap();
    assert_ne!(rpcd.gid(), WWW_DATA);

    // Root on the socket is the local administrator; www-data is nobody until it logs
    // in, whatever address it says it forwards.
    assert_eq!(status_as(&web, 0, &[], "/api/v1/auth/me"), "200");
    for path in ["/api/v1/auth/me", "/api/v1/status", "/api/v1/quarantine"] {
        assert_eq!(status_as(&web, WWW_DATA, &[], path), "401", "{path}");
        let claim = [
            "-H",
            "X-Real-IP: 127.0.0.1",
            "-H",
            "X-Forwarded-For: 127.0.0.1",
        ];
        assert_eq!(status_as(&web, WWW_DATA, &claim, path), "401", "{path}");
    }
    // Its requests are ordinary HTTP clients': a login works and gives a session.
    let body = serde_json::json!({"name": "boss", "password": PASSWORD, "totp": ""}).to_string();
    let (code, out, err) = curl(
        &web,
        WWW_DATA,
        &[
            "-i",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            "http://localhost/api/v1/auth/login",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let cookie = out
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {out}"))
        .to_string();
    let with_cookie = ["-H", &format!("cookie: {cookie}")];
    assert_eq!(
        status_as(&web, WWW_DATA, &with_cookie, "/api/v1/auth/me"),
        "200"
    );

    // gRPC's Control on the same socket answers root, and refuses www-data
    // (PERMISSION_DENIED, 7).
    assert_eq!(control_as(&web, 0), "0");
    assert_eq!(control_as(&web, WWW_DATA), "7");

    // The other daemons' sockets: not even a connection.
    let connect = |socket: &std::path::Path| {
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(socket)
            .uid(WWW_DATA)
            .gid(WWW_DATA)
            .output()
            .unwrap()
    };
    assert!(connect(&web.socket()).status.success());
    let out = connect(&web.gw.socket());
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("PermissionError"),
        "{out:?}"
    );
    // And the run directory cannot be listed.
    let ls = Command::new("ls")
        .arg(web.gw.path("run"))
        .uid(WWW_DATA)
        .gid(WWW_DATA)
        .output()
        .unwrap();
    assert!(!ls.status.success(), "{ls:?}");
}
