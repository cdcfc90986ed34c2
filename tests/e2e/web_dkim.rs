//! `/api/v1/dkim` against a real mb-rpcd and mb-web: a key made through the API signs
//! mail that a real gateway (mb-smtpd, mb-filter with `dkim.sign = true`) sends out,
//! and dkimpy verifies the signature against the record the API returned, served by
//! dnsmasq and looked up through the DNS; each role is held to what it may do, an
//! existing key is kept unless asked, the refusals carry `mb-dkim`'s words, and the
//! audit trail names who made the key.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use hyper::Method;
use mb_testkit::{Gateway, SmtpSink, free_port, text, wait_until};
use serde_json::{Value as Json, json};

use crate::web_auth::{Reply, Web};

const PASSWORD: &str = "correct horse battery";

/// A session's cookie and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

impl Session {
    async fn login(web: &Web, name: &str) -> Session {
        let r = web.login(name, PASSWORD, "").await;
        assert_eq!(r.status, 200, "login {name}: {r:?}");
        Session {
            cookie: r.session_cookie(),
            csrf: r.body["csrf_token"].as_str().unwrap().to_string(),
        }
    }

    async fn call(&self, web: &Web, method: Method, path: &str, body: Option<Json>) -> Reply {
        web.https(
            method,
            path,
            &[("cookie", &self.cookie), ("x-csrf-token", &self.csrf)],
            body,
        )
        .await
    }
}

/// A refusal: the status, a problem document, and its detail.
fn refused(r: &Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{r:?}"
    );
    r.body["detail"].as_str().unwrap_or_default().to_string()
}

/// mb-web on a gateway whose `dkim.key` is `key` and selector `mb`, with an admin, a
/// domain admin of a.test and a user there.
fn start(key: &Path) -> Web {
    let web = Web::start(&format!(
        "totp_required = \"\"\n[dkim]\nselector = \"mb\"\nkey = \"{}\"\n",
        key.display()
    ));
    web.add("boss", &["--role", "admin"]);
    web.add("dora", &["--role", "domain-admin", "--domains", "a.test"]);
    web.add("jane", &["--role", "user", "--addresses", "jane@a.test"]);
    web
}

/// `mb-dkim ARGS` with the gateway's configuration: (code, stdout, stderr).
fn mb_dkim(web: &Web, args: &[&str]) -> (i32, String, String) {
    text(&web.gw.tool("mb-dkim", args))
}

fn record_path(domain: &str) -> String {
    format!("/api/v1/dkim/record?domain={domain}")
}

#[tokio::test]
async fn dkim_keygen_and_record_are_held_to_roles_keep_keys_and_are_audited() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("dkim/private.key");
    let web = start(&key);
    let boss = Session::login(&web, "boss").await;
    let dora = Session::login(&web, "dora").await;
    let jane = Session::login(&web, "jane").await;

    // No key yet: 404, in the words of `mb-dkim record`.
    let (code, _, cli_err) = mb_dkim(&web, &["record", "--domain", "a.test"]);
    assert_eq!(code, 1, "{cli_err}");
    let detail = refused(
        &boss
            .call(&web, Method::GET, &record_path("a.test"), None)
            .await,
        404,
    );
    assert!(
        detail.ends_with("(mb-dkim keygen makes a key)") && cli_err.contains(&detail),
        "{detail:?} vs {cli_err:?}"
    );

    // Neither a user nor a domain admin makes keys; nothing is written.
    for s in [&jane, &dora] {
        let r = s
            .call(
                &web,
                Method::POST,
                "/api/v1/dkim/keygen",
                Some(json!({"domain": "a.test"})),
            )
            .await;
        assert!(
            refused(&r, 403).contains("is not an administrator"),
            "{r:?}"
        );
    }
    // A session's cookie without its CSRF token makes none either.
    let r = web
        .https(
            Method::POST,
            "/api/v1/dkim/keygen",
            &[("cookie", &boss.cookie)],
            Some(json!({"domain": "a.test"})),
        )
        .await;
    assert!(refused(&r, 403).contains("CSRF"), "{r:?}");
    assert!(!key.exists(), "a refused keygen wrote {}", key.display());

    // Bad input: mb-dkim's words, 400.
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/dkim/keygen",
            Some(json!({"domain": "a.test", "bits": 1024})),
        )
        .await;
    assert_eq!(refused(&r, 400), "--bits must be 2048, 3072 or 4096");
    let r = boss
        .call(&web, Method::GET, &record_path("a.test;x"), None)
        .await;
    assert_eq!(refused(&r, 400), "\"a.test;x\" is not a domain name");

    // The administrator makes the key: 0640, the daemons' group, and its record.
    let made = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/dkim/keygen",
            Some(json!({"domain": "a.test"})),
        )
        .await;
    assert_eq!(made.status, 200, "{made:?}\n{}", web.log());
    assert_eq!(made.body["name"], "mb._domainkey.a.test");
    assert_eq!(made.body["type"], "TXT");
    assert_eq!(made.body["algorithm"], "rsa");
    assert_eq!(made.body["bits"], 2048);
    assert_eq!(made.body["replaced"], false);
    assert_eq!(made.body["key"], key.display().to_string());
    let value = made.body["value"].as_str().unwrap().to_string();
    assert!(value.starts_with("v=DKIM1; k=rsa; p=MII"), "{value}");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    if let Some(group) = nix::unistd::Group::from_name("mailborder").unwrap() {
        assert_eq!(
            meta.gid(),
            group.gid.as_raw(),
            "the key is not the daemons'"
        );
    }
    let first = std::fs::read(&key).unwrap();

    // The record: the same through the API and from the tool reading the file.
    let r = boss
        .call(&web, Method::GET, &record_path("a.test"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["value"], value.as_str());
    assert_eq!(r.body["fingerprint"], made.body["fingerprint"]);
    let (code, out, err) = mb_dkim(&web, &["--json", "record", "--domain", "a.test"]);
    assert_eq!(code, 0, "{err}");
    let cli: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(cli["value"], value.as_str());
    assert_eq!(cli["name"], "mb._domainkey.a.test");
    let zone = r.body["zone_line"].as_str().unwrap();
    assert!(
        zone.starts_with("mb._domainkey.a.test. IN TXT ( \"v=DKIM1; k=rsa; p="),
        "{zone}"
    );

    // A domain admin reads its own domain's record (any spelling of it), not another's.
    let r = dora
        .call(&web, Method::GET, &record_path("A.test"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["name"], "mb._domainkey.a.test");
    for d in ["b.test", "a.test.b.test"] {
        let r = dora.call(&web, Method::GET, &record_path(d), None).await;
        assert!(
            refused(&r, 403).contains("may not act on the domain"),
            "{d}: {r:?}"
        );
    }
    let r = jane
        .call(&web, Method::GET, &record_path("a.test"), None)
        .await;
    refused(&r, 403);
    // Over mb-web's socket root is an administrator (hyperlocal).
    let r = web
        .local(Method::GET, &record_path("b.test"), &[], None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["name"], "mb._domainkey.b.test");

    // An existing key is kept without force: 409 with mb-dkim's words.
    let (code, _, cli_err) = mb_dkim(&web, &["keygen", "--domain", "a.test"]);
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/dkim/keygen",
            Some(json!({"domain": "a.test"})),
        )
        .await;
    let detail = refused(&r, 409);
    assert!(
        detail.ends_with("--force replaces it") && cli_err.contains(&detail),
        "{detail:?} vs {cli_err:?}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), first, "the key changed");

    // With force it is replaced.
    let again = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/dkim/keygen",
            Some(json!({"domain": "a.test", "force": true})),
        )
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["replaced"], true);
    assert_ne!(again.body["value"], value.as_str());
    assert_ne!(std::fs::read(&key).unwrap(), first);

    // The audit trail: who made which key, and which one it replaced.
    let h = boss
        .call(&web, Method::GET, "/api/v1/config/history?limit=10", None)
        .await;
    assert_eq!(h.status, 200, "{h:?}");
    let audit_key = format!("dkim-key:{}", key.display());
    let lines: Vec<&Json> = h
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["key"] == audit_key.as_str())
        .collect();
    assert_eq!(lines.len(), 2, "{h:?}");
    let (replace, keygen) = (lines[0], lines[1]);
    let fp1 = made.body["fingerprint"].as_str().unwrap();
    let fp2 = again.body["fingerprint"].as_str().unwrap();
    assert_eq!(keygen["action"], "keygen");
    assert_eq!(keygen["user"], "web:boss");
    assert_eq!(keygen["new"], format!("rsa-2048 selector=mb {fp1}"));
    assert_eq!(replace["action"], "replace");
    assert_eq!(replace["old"], fp1);
    assert_eq!(replace["new"], format!("rsa-2048 selector=mb {fp2}"));
    // Refused attempts left no line.
    assert!(
        h.body
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["key"]
                .as_str()
                .unwrap_or_default()
                .starts_with("dkim-key:"))
            .count()
            == 2
    );
}

#[tokio::test]
async fn a_key_made_through_the_api_signs_outbound_mail_that_dkimpy_verifies_through_dns() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("private.key");
    let web = start(&key);
    let boss = Session::login(&web, "boss").await;
    let made = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/dkim/keygen",
            Some(json!({"domain": "served.test"})),
        )
        .await;
    assert_eq!(made.status, 200, "{made:?}\n{}", web.log());
    let r = boss
        .call(&web, Method::GET, &record_path("served.test"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (name, value) = (
        r.body["name"].as_str().unwrap().to_string(),
        r.body["value"].as_str().unwrap().to_string(),
    );
    assert_eq!(name, "mb._domainkey.served.test");

    // The record as a zone publishes it: strings of at most 255 bytes.
    let chunks: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert!(chunks.len() >= 2, "a 2048-bit key needs two strings");
    let dns = mb_testkit::Dnsmasq::start(&[
        "--auth-server=ns.test,127.0.0.1".into(),
        "--auth-zone=test".into(),
        format!("--txt-record={name},{}", chunks.join(",")),
    ])
    .unwrap();

    // A gateway that signs with that key file.
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [network.dns]\nservers = \"{}\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"127.0.0.2/32\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\ntransport = \"elsewhere.test=smtp:[127.0.0.1]:{}\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [dkim]\nsign = true\nselector = \"mb\"\nkey = \"{}\"\n",
        free_port(),
        dns.servers(),
        sink.port,
        sink.port,
        key.display()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();

    let out = std::process::Command::new(mb_testkit::require("swaks", "swaks"))
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--local-interface",
            "127.0.0.2",
        ])
        .args(["--from", "bob@served.test", "--to", "carol@elsewhere.test"])
        .args(["--header", "Subject: signed by an API key"])
        .args(["--body", "body signed with the API's key"])
        .output()
        .unwrap();
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{out}{err}");
    let mut sent = String::new();
    wait_until("the outbound delivery", Duration::from_secs(20), || {
        sent = sink
            .messages()
            .into_iter()
            .find(|m| m.contains("body signed with the API's key"))
            .unwrap_or_default();
        !sent.is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}: {}", gw.smtpd_log()));
    assert!(
        sent.contains("d=served.test") && sent.contains("s=mb"),
        "{sent}"
    );

    // dkimpy looks the key up in the DNS (dnspython against dnsmasq), as a receiver does.
    let crlf = sent.replace("\r\n", "\n").replace('\n', "\r\n");
    let verify = format!(
        "import dkim,sys,dns.resolver\n\
         r=dns.resolver.Resolver(configure=False)\nr.nameservers=['127.0.0.1']\nr.port={}\n\
         def txt(name, timeout=5):\n    a=r.resolve(name.decode(),'TXT',lifetime=timeout)\n    return b''.join(a[0].strings)\n\
         print(dkim.verify(sys.stdin.buffer.read(), dnsfunc=txt))",
        dns.port
    );
    assert_eq!(dkimpy(&verify, crlf.as_bytes()).trim(), "True", "{sent}");
    let altered = crlf.replace("body signed with", "body altered after");
    assert_eq!(dkimpy(&verify, altered.as_bytes()).trim(), "False");

    // A replaced key no longer matches the published record: what the 409 protects.
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/dkim/keygen",
            Some(json!({"domain": "served.test", "force": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_ne!(r.body["value"], value.as_str());
    // The key's directory holds the key and nothing else (no staging file left behind).
    let names: Vec<String> = std::fs::read_dir(keys.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["private.key"]);
}

/// Runs Python with dkimpy (Debian's python3-dkim) on `script`, with `stdin`.
fn dkimpy(script: &str, stdin: &[u8]) -> String {
    use std::io::Write;
    assert!(
        Path::new("/usr/lib/python3/dist-packages/dkim/__init__.py").exists(),
        "dkimpy is missing: install it with `apt-get install -y python3-dkim` (`cargo xtask test` does this when run as root)"
    );
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
