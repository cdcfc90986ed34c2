//! Web logins, roles, CSRF, API keys, lockout and TOTP, against a real mb-rpcd and
//! mb-web: over HTTPS (rustls, a test certificate) and over mb-web's Unix socket
//! (hyperlocal), with `mb-web account|key` as the administrator's tool.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use hyperlocal::{UnixClientExt, UnixConnector};
use mb_testkit::{Gateway, Proc, bin, free_port, text, wait_until};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value as Json, json};

const PASSWORD: &str = "correct horse battery";

/// An mb-rpcd and an mb-web on a temp directory, HTTPS on a loopback port.
pub struct Web {
    pub gw: Gateway,
    pub web: Option<Proc>,
    pub port: u16,
    cert: String,
}

/// An answer: status, headers, body as JSON (`Null` when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Json,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The session cookie a login set, as `name=value` for a Cookie header.
    pub fn session_cookie(&self) -> String {
        let set = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .find(|v| v.contains("mb_session=") && !v.contains("Max-Age=0"))
            .unwrap_or_else(|| panic!("no session cookie in {self:?}"));
        set.split(';').next().unwrap().to_string()
    }
}

impl Web {
    /// `web` is TOML for the `[web]` table.
    pub fn start(web: &str) -> Web {
        let port = free_port();
        let (cert, key) = mb_testkit::self_signed();
        let mut gw = Gateway::new("");
        std::fs::write(gw.path("web.crt"), &cert).unwrap();
        std::fs::write(gw.path("web.key"), &key).unwrap();
        let extra = format!(
            "[smtp]\nenabled = false\n[filter]\nenabled = false\n\
             [network.https]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_limit = 1000000\nrate_burst = 100000\n\
             \"tls.cert\" = \"{}\"\n\"tls.key\" = \"{}\"\n[web]\n{web}\n",
            gw.path("web.crt").display(),
            gw.path("web.key").display()
        );
        let mut cfg = std::fs::read_to_string(&gw.config).unwrap();
        cfg.push_str(&extra);
        std::fs::write(&gw.config, cfg).unwrap();
        gw.start().unwrap();
        let log = std::fs::File::create(gw.path("web.log")).unwrap();
        let child = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&gw.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut web = Web {
            web: Some(Proc {
                child,
                name: "mb-web".into(),
            }),
            gw,
            port,
            cert,
        };
        let socket = web.socket();
        let up = wait_until("mb-web's socket and port", Duration::from_secs(30), || {
            socket.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up.is_err() || matches!(web.web.as_mut().unwrap().child.try_wait(), Ok(Some(_))) {
            panic!("mb-web did not start: {}", web.log());
        }
        web
    }

    pub fn socket(&self) -> PathBuf {
        self.gw.path("run/mb-web.sock")
    }

    /// mb-web's and mb-rpcd's logs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.gw.path("web.log")).unwrap_or_default() + &self.gw.log()
    }

    /// `mb-web ARGS` with `stdin` as its input (a password).
    pub fn tool(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        let mut child = Command::new(bin("mb-web"))
            .arg("--config")
            .arg(&self.gw.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{stdin}\n").as_bytes())
            .unwrap();
        text(&child.wait_with_output().unwrap())
    }

    /// Adds an account with [`PASSWORD`] through the socket, as root.
    pub fn add(&self, name: &str, scope: &[&str]) -> (i32, String, String) {
        let mut args = vec!["account", "add", name];
        args.extend(scope);
        let r = self.tool(&args, PASSWORD);
        assert_eq!(r.0, 0, "{r:?}");
        r
    }

    pub async fn https(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Json>,
    ) -> Reply {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = request(method, path.parse().unwrap(), headers, body, "localhost");
        let resp = sender.send_request(req).await.unwrap();
        reply(resp).await
    }

    pub async fn local(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Json>,
    ) -> Reply {
        let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(self.socket(), path).into();
        let resp = client
            .request(request(method, uri, headers, body, "localhost"))
            .await
            .unwrap();
        reply(resp).await
    }

    /// Logs in over HTTPS; the answer, expected 200.
    pub async fn login(&self, name: &str, password: &str, totp: &str) -> Reply {
        self.https(
            Method::POST,
            "/api/v1/auth/login",
            &[],
            Some(json!({"name": name, "password": password, "totp": totp})),
        )
        .await
    }
}

/// A session's cookie and CSRF token as request headers.
fn auth<'a>(cookie: &'a str, csrf: &'a str) -> [(&'a str, &'a str); 2] {
    [("cookie", cookie), ("x-csrf-token", csrf)]
}

/// `GET /api/v1/auth/me` over HTTPS with an `Authorization` header.
async fn me(web: &Web, authorization: &str) -> Reply {
    web.https(
        Method::GET,
        "/api/v1/auth/me",
        &[("authorization", authorization)],
        None,
    )
    .await
}

fn request(
    method: Method,
    uri: hyper::Uri,
    headers: &[(&str, &str)],
    body: Option<Json>,
    host: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let body = match body {
        Some(j) => {
            b = b.header("content-type", "application/json");
            Bytes::from(j.to_string())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body)).unwrap()
}

async fn reply(resp: hyper::Response<hyper::body::Incoming>) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Json::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// The TOTP code of a base32 secret, `offset` steps from now.
pub fn totp(secret: &str, offset: i64) -> String {
    let raw = mb_rpcd::web_accounts::unbase32(secret).expect("base32 secret");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    mb_rpcd::web_accounts::totp_code(&raw, now.div_euclid(30) + offset)
}

#[tokio::test]
async fn login_and_logout_over_https_and_the_socket_with_csrf() {
    let web = Web::start("totp_required = \"\"\n");
    web.add("alice", &["--role", "admin"]);

    // A wrong password and an unknown name: the same answer, no cookie.
    let wrong = web.login("alice", "wrong password 1", "").await;
    let unknown = web.login("mallory", "wrong password 2", "").await;
    assert_eq!((wrong.status, unknown.status), (401, 401), "{wrong:?}");
    assert_eq!(wrong.body, unknown.body);
    assert_eq!(wrong.header("set-cookie"), None);

    // HTTPS: a __Host- cookie, HttpOnly, Secure, SameSite=Strict, and a CSRF token.
    let r = web.login("Alice", PASSWORD, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    let set = r.header("set-cookie").unwrap();
    assert!(set.starts_with("__Host-mb_session="), "{set}");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{attr}: {set}");
    }
    // web.session_lifetime, 8h (less the second that may tick between the daemons).
    let max_age: i64 = set
        .split("Max-Age=")
        .nth(1)
        .and_then(|v| v.split(';').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Max-Age: {set}"));
    assert!((28_790..=28_800).contains(&max_age), "{set}");
    let cookie = r.session_cookie();
    let csrf = r.body["csrf_token"].as_str().unwrap().to_string();
    assert_eq!(r.body["principal"]["name"], "alice");
    let me = web
        .https(Method::GET, "/api/v1/auth/me", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(
        (me.status, me.body["principal"]["role"].as_str()),
        (200, Some("admin"))
    );
    assert_eq!(me.body["csrf_token"], csrf.as_str());

    // A state change with the cookie but without the token (a cross-site form), or
    // with a wrong one: 403, nothing created.
    let key = json!({"role": "admin", "expires": "1d"});
    for headers in [
        vec![("cookie", cookie.as_str())],
        vec![("cookie", cookie.as_str()), ("x-csrf-token", "0000")],
    ] {
        let r = web
            .https(Method::POST, "/api/v1/keys", &headers, Some(key.clone()))
            .await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    let keys = web
        .https(Method::GET, "/api/v1/keys", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(keys.body.as_array().map(Vec::len), Some(0), "{keys:?}");
    let r = web
        .https(
            Method::POST,
            "/api/v1/keys",
            &[("cookie", &cookie), ("x-csrf-token", &csrf)],
            Some(key),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");

    // The socket (nginx's way in): the same login, a cookie without __Host- unless nginx
    // says its client came over HTTPS.
    let s = web
        .local(
            Method::POST,
            "/api/v1/auth/login",
            &[],
            Some(json!({"name": "alice", "password": PASSWORD})),
        )
        .await;
    assert_eq!(s.status, 200, "{s:?}");
    let socket_cookie = s.session_cookie();
    assert!(socket_cookie.starts_with("mb_session="), "{socket_cookie}");
    let socket_csrf = s.body["csrf_token"].as_str().unwrap().to_string();
    let proxied = web
        .local(
            Method::POST,
            "/api/v1/auth/login",
            &[
                ("x-forwarded-proto", "https"),
                ("x-real-ip", "198.51.100.4"),
            ],
            Some(json!({"name": "alice", "password": PASSWORD})),
        )
        .await;
    assert!(
        proxied.session_cookie().starts_with("__Host-mb_session="),
        "{proxied:?}"
    );
    // Behind nginx the failures name the client nginx forwarded, for fail2ban.
    let r = web
        .local(
            Method::POST,
            "/api/v1/auth/login",
            &[("x-real-ip", "198.51.100.4")],
            Some(json!({"name": "alice", "password": "wrong password 3"})),
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let out = web
        .local(
            Method::POST,
            "/api/v1/auth/logout",
            &[("cookie", &socket_cookie)],
            None,
        )
        .await;
    assert_eq!(out.status, 403, "logout without the token: {out:?}");
    let out = web
        .local(
            Method::POST,
            "/api/v1/auth/logout",
            &[("cookie", &socket_cookie), ("x-csrf-token", &socket_csrf)],
            None,
        )
        .await;
    assert_eq!(out.status, 204, "{out:?}");
    // An ended session is refused even on the socket as root: a request that brings
    // credentials is judged by them, never taken for the local administrator.
    let me = web
        .local(
            Method::GET,
            "/api/v1/auth/me",
            &[("cookie", &socket_cookie)],
            None,
        )
        .await;
    assert_eq!(me.status, 401, "{me:?}");
    let me = web
        .local(
            Method::GET,
            "/api/v1/auth/me",
            &[("authorization", "Bearer mbk_0_0")],
            None,
        )
        .await;
    assert_eq!(me.status, 401, "{me:?}");
    // Without credentials, root on the socket is the local administrator.
    let me = web.local(Method::GET, "/api/v1/auth/me", &[], None).await;
    assert_eq!(
        (me.status, me.body["principal"]["name"].as_str()),
        (200, Some("local:root")),
        "{me:?}"
    );
    // ... but not over HTTPS.
    let me = web.https(Method::GET, "/api/v1/auth/me", &[], None).await;
    assert_eq!(me.status, 401, "{me:?}");

    // HTTPS logout ends the session; the old cookie is refused and cleared.
    let out = web
        .https(
            Method::POST,
            "/api/v1/auth/logout",
            &[("cookie", &cookie), ("x-csrf-token", &csrf)],
            None,
        )
        .await;
    assert_eq!(out.status, 204, "{out:?}");
    let me = web
        .https(Method::GET, "/api/v1/auth/me", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(me.status, 401, "{me:?}");
    assert!(
        me.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );

    // Every password this test sent, right or wrong, is in no log.
    let logs = web.log();
    for p in [
        PASSWORD,
        "wrong password 1",
        "wrong password 2",
        "wrong password 3",
    ] {
        assert!(!logs.contains(p), "{p:?} reached a log:\n{logs}");
    }
    assert!(
        logs.contains("web login failed client=127.0.0.1 user=alice"),
        "{logs}"
    );
}

#[tokio::test]
async fn each_role_sees_only_its_own() {
    let web = Web::start("totp_required = \"\"\n");
    web.add("boss", &["--role", "admin"]);
    web.add("dora", &["--role", "domain-admin", "--domains", "a.test"]);
    web.add("jane", &["--role", "user", "--addresses", "jane@a.test"]);
    web.add("bob", &["--role", "user", "--addresses", "bob@b.test"]);
    // The tool's refusals: exit 1 with the reason.
    for (args, stdin, says) in [
        (
            &["account", "add", "bob", "--role", "admin"][..],
            PASSWORD,
            "exists",
        ),
        (
            &["account", "add", "weak", "--role", "admin"][..],
            "short",
            "at least 10",
        ),
        (
            &["account", "add", "d2", "--role", "domain-admin"][..],
            PASSWORD,
            "at least one domain",
        ),
        (
            &["account", "del", "nobody"][..],
            "",
            "no web account nobody",
        ),
    ] {
        let (code, out, err) = web.tool(args, stdin);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, out, _) = web.tool(&["account", "list"], "");
    assert_eq!(code, 0);
    assert!(out.contains("dora domain-admin a.test"), "{out}");
    let session = |r: Reply| {
        assert_eq!(r.status, 200, "{r:?}");
        (
            r.session_cookie(),
            r.body["csrf_token"].as_str().unwrap().to_string(),
        )
    };
    let (dora, dora_csrf) = session(web.login("dora", PASSWORD, "").await);
    let (dora, dora_csrf) = (dora.as_str(), dora_csrf.as_str());

    // A domain admin lists its domain's users (and itself), not another domain's.
    let list = web
        .https(
            Method::GET,
            "/api/v1/accounts",
            &auth(dora, dora_csrf),
            None,
        )
        .await;
    assert_eq!(list.status, 200, "{list:?}");
    let mut names: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["dora", "jane"]);
    // Another domain's account does not exist for it; it cannot create one there.
    let del = web
        .https(
            Method::DELETE,
            "/api/v1/accounts/bob",
            &auth(dora, dora_csrf),
            None,
        )
        .await;
    assert_eq!(del.status, 404, "{del:?}");
    let add = |name: &str, address: &str| json!({"name": name, "password": PASSWORD, "role": "user", "addresses": [address]});
    let r = web
        .https(
            Method::POST,
            "/api/v1/accounts",
            &auth(dora, dora_csrf),
            Some(add("eve", "eve@b.test")),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = web
        .https(
            Method::POST,
            "/api/v1/accounts",
            &auth(dora, dora_csrf),
            Some(json!({"name": "root2", "password": PASSWORD, "role": "admin"})),
        )
        .await;
    assert_eq!(r.status, 403, "a domain admin made an admin: {r:?}");
    let r = web
        .https(
            Method::POST,
            "/api/v1/accounts",
            &auth(dora, dora_csrf),
            Some(add("ann", "ann@a.test")),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["account"]["created_by"], "dora");
    // Nor may it read the node's status, keys or change roles.
    for (method, path) in [
        (Method::GET, "/api/v1/status"),
        (Method::GET, "/api/v1/keys"),
    ] {
        let r = web.https(method, path, &auth(dora, dora_csrf), None).await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    let r = web
        .https(
            Method::PUT,
            "/api/v1/accounts/dora/role",
            &auth(dora, dora_csrf),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");

    // A user changes nothing but its own password.
    let (jane, jane_csrf) = session(web.login("jane", PASSWORD, "").await);
    let (jane, jane_csrf) = (jane.as_str(), jane_csrf.as_str());
    let me = web
        .https(Method::GET, "/api/v1/auth/me", &auth(jane, jane_csrf), None)
        .await;
    assert_eq!(me.body["principal"]["addresses"], json!(["jane@a.test"]));
    for (method, path, body) in [
        (Method::GET, "/api/v1/accounts", None),
        (
            Method::POST,
            "/api/v1/accounts",
            Some(add("x", "jane@a.test")),
        ),
        (
            Method::PUT,
            "/api/v1/accounts/jane/role",
            Some(json!({"role": "admin"})),
        ),
        (
            Method::POST,
            "/api/v1/keys",
            Some(json!({"role": "admin", "expires": "1d"})),
        ),
        (Method::GET, "/api/v1/status", None),
    ] {
        let r = web.https(method, path, &auth(jane, jane_csrf), body).await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    let r = web
        .https(
            Method::POST,
            "/api/v1/accounts/bob/password",
            &auth(jane, jane_csrf),
            Some(json!({"password": "jane owns bob now"})),
        )
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = web
        .https(
            Method::POST,
            "/api/v1/accounts/jane/password",
            &auth(jane, jane_csrf),
            Some(json!({"password": "a new one for jane"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    // The new password ended jane's sessions.
    let me = web
        .https(Method::GET, "/api/v1/auth/me", &auth(jane, jane_csrf), None)
        .await;
    assert_eq!(me.status, 401, "{me:?}");

    // The changes are in mb-config's audit trail under the web principal's name.
    let (code, out, err) = text(&web.gw.tool("mb-config", &["--json", "history"]));
    assert_eq!(code, 0, "{err}");
    let h: Json = serde_json::from_str(&out).unwrap();
    let entry = |key: &str, action: &str| {
        h.as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == key && e["action"] == action)
            .cloned()
            .unwrap_or_else(|| panic!("no {action} of {key} in {h:#}"))
    };
    assert_eq!(entry("web-account:ann", "create")["user"], "dora");
    assert_eq!(entry("web-account:jane", "password")["user"], "jane");
    assert_eq!(entry("web-account:boss", "create")["user"], "local:root");
    assert!(
        !out.contains(PASSWORD) && !out.contains("a new one"),
        "{out}"
    );
}

#[tokio::test]
async fn api_keys_expire_and_are_revoked() {
    let web = Web::start("totp_required = \"\"\n");
    let create = |expires: &str| {
        let (code, out, err) = web.tool(
            &[
                "key",
                "create",
                "--json",
                "--role",
                "domain-admin",
                "--domains",
                "a.test",
                "--expires",
                expires,
            ],
            "",
        );
        assert_eq!(code, 0, "{out}{err}");
        let v: Json = serde_json::from_str(&out).unwrap();
        (
            v["key"]["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        )
    };
    let (id, secret) = create("90d");
    let (_, short) = create("2s");
    let bearer = |s: &str| format!("Bearer {s}");
    let r = me(&web, &bearer(&secret)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["principal"]["name"], format!("key:{id}"));
    assert_eq!(r.body["principal"]["domains"], json!(["a.test"]));
    // A key is not a session: state changes need no CSRF token.
    let r = web
        .https(
            Method::POST,
            "/api/v1/accounts",
            &[("authorization", &bearer(&secret))],
            Some(json!({"name": "ann", "password": PASSWORD, "role": "user", "addresses": ["ann@a.test"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    // A forged secret for a real id.
    let forged = format!("mbk_{id}_{}", "ab".repeat(32));
    assert_eq!(me(&web, &bearer(&forged)).await.status, 401);
    // Listed with its last use, never with its secret.
    let (code, out, _) = web.tool(&["key", "list", "--json"], "");
    assert_eq!(code, 0);
    let keys: Json = serde_json::from_str(&out).unwrap();
    let k = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert!(k["last_used"].as_i64().unwrap() > 0, "{k}");
    assert!(!out.contains(&secret[secret.len() - 64..]), "{out}");

    // Revoked: refused at once.
    let (code, out, err) = web.tool(&["key", "revoke", &id], "");
    assert_eq!(code, 0, "{out}{err}");
    let r = me(&web, &bearer(&secret)).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.body["detail"].as_str().unwrap().contains("revoked"),
        "{r:?}"
    );
    let (code, _, err) = web.tool(&["key", "revoke", "ffffffffffff"], "");
    assert_eq!(code, 1, "{err}");

    // Expired: the two-second key stops working.
    std::thread::sleep(Duration::from_millis(2500));
    let r = me(&web, &bearer(&short)).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.body["detail"].as_str().unwrap().contains("expired"),
        "{r:?}"
    );
    let (code, _, err) = web.tool(
        &["key", "create", "--role", "admin", "--expires", "soon"],
        "",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid expiry"), "{err}");
    let logs = web.log();
    assert!(!logs.contains(&secret), "a key secret reached a log");
}

#[tokio::test]
async fn five_failed_logins_lock_the_account_and_fail2ban_sees_them() {
    let fail2ban = mb_testkit::require("fail2ban-regex", "fail2ban");
    let web = Web::start("totp_required = \"\"\n");
    web.add("carol", &["--role", "admin"]);
    for n in 0..5 {
        let r = web.login("carol", &format!("guess number {n}"), "").await;
        assert_eq!(r.status, 401, "{r:?}");
    }
    // Locked: even the right password is refused, with the time left.
    let r = web.login("carol", PASSWORD, "").await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.body["type"], "urn:mailborder:locked-out");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((800..=900).contains(&retry), "{retry}");
    let (_, out, _) = web.tool(&["account", "list", "--json"], "");
    let v: Json = serde_json::from_str(&out).unwrap();
    assert!(v[0]["locked_until"].as_i64().unwrap() > 0, "{v}");
    // An administrator's new password unlocks it.
    let (code, out, err) = web.tool(&["account", "passwd", "carol"], "a fresh password");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(web.login("carol", "a fresh password", "").await.status, 200);

    // Each failure (and the refusal while locked) is one line fail2ban's filter matches.
    let log = web.gw.log();
    assert!(
        log.contains("web account locked client=127.0.0.1 user=carol"),
        "{log}"
    );
    let filter = mb_testkit::source_root().join("etc/fail2ban/filter.d/mailborder-web.conf");
    let (_, out, _) = text(
        &Command::new(fail2ban)
            .arg(web.gw.log_path())
            .arg(&filter)
            .output()
            .unwrap(),
    );
    let summary = out
        .lines()
        .find(|l| l.starts_with("Lines:"))
        .unwrap_or_default()
        .to_string();
    assert!(summary.contains(", 6 matched,"), "{summary}\n{out}\n{log}");
    assert!(out.contains("127.0.0.1"), "{out}");
    for n in 0..5 {
        assert!(
            !log.contains(&format!("guess number {n}")),
            "a password reached the log"
        );
    }
}

#[tokio::test]
async fn admins_need_a_second_factor_enrolled_at_their_first_login() {
    // The default web.totp_required: admin.
    let web = Web::start("");
    web.add("root-admin", &["--role", "admin"]);
    web.add("jane", &["--role", "user", "--addresses", "jane@a.test"]);
    // A user logs in with the password alone.
    assert_eq!(web.login("jane", PASSWORD, "").await.status, 200);

    // The admin's first login: no session, a secret to enrol.
    let r = web.login("root-admin", PASSWORD, "").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.body["type"], "urn:mailborder:totp-enrol");
    assert_eq!(r.header("set-cookie"), None);
    let secret = r.body["totp_secret"].as_str().unwrap().to_string();
    assert!(r.body["otpauth_uri"].as_str().unwrap().contains(&secret));
    // Someone with the password but a wrong code gets nothing.
    let wrong = (0..)
        .map(|n| format!("{n:06}"))
        .find(|c| (-1..=1).all(|o| totp(&secret, o) != *c))
        .unwrap();
    let r = web.login("root-admin", PASSWORD, &wrong).await;
    assert_eq!(
        (r.status, &r.body["type"]),
        (401, &json!("about:blank")),
        "{r:?}"
    );
    // The very code used is replayed below (recomputing it could give the next step's
    // code when a 30-second boundary passes meanwhile).
    let first = totp(&secret, 0);
    let r = web.login("root-admin", PASSWORD, &first).await;
    assert_eq!(r.status, 200, "{r:?}");
    // From now on the code is asked for, and each code works once.
    let r = web.login("root-admin", PASSWORD, "").await;
    assert_eq!(r.body["type"], "urn:mailborder:totp-required", "{r:?}");
    let r = web.login("root-admin", PASSWORD, &first).await;
    assert_eq!(r.status, 401, "a replayed code worked: {r:?}");
    let r = web.login("root-admin", PASSWORD, &totp(&secret, 1)).await;
    assert_eq!(r.status, 200, "{r:?}");

    // Enrolled by the tool: the secret is printed once; the database does not hold it.
    let (code, out, err) = web.tool(
        &[
            "account", "add", "ops", "--role", "admin", "--totp", "--json",
        ],
        PASSWORD,
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: Json = serde_json::from_str(&out).unwrap();
    let ops_secret = v["totp"]["secret"].as_str().unwrap().to_string();
    let r = web.login("ops", PASSWORD, &totp(&ops_secret, 0)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let db = std::fs::read(web.gw.path("data/mailborder.db")).unwrap();
    let db = String::from_utf8_lossy(&db);
    for s in [&secret, &ops_secret] {
        let raw = mb_rpcd::web_accounts::unbase32(s).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !db.contains(s.as_str()) && !db.contains(&hex),
            "a TOTP secret is in the database"
        );
    }
    // The sealing key is the daemon's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(web.gw.path("data/web-totp.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// Web accounts on another database (MariaDB, PostgreSQL): the queries of migration
/// 0015 through mb-rpcd's gRPC service, as mb-web makes them.
pub async fn round_trip(socket: &Path) {
    use mb_proto::v1::web_accounts_client::WebAccountsClient;
    use mb_proto::v1::web_authenticate_request::Credential;
    use mb_proto::v1::*;
    let ch = mb_runtime::uds::connect(socket, "mb-rpcd").await.unwrap();
    let mut c = WebAccountsClient::new(ch);
    let created = c
        .create(WebAccountCreateRequest {
            name: "Dora".into(),
            password: PASSWORD.into(),
            role: WebRole::DomainAdmin as i32,
            domains: vec!["a.test".into()],
            actor: "tester".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.account.unwrap().name, "dora");
    let login = |password: &str| WebLoginRequest {
        name: "dora".into(),
        password: password.into(),
        client_ip: "192.0.2.1".into(),
        ..Default::default()
    };
    let r = c.login(login(PASSWORD)).await.unwrap().into_inner();
    assert_eq!(r.outcome, WebLoginOutcome::WebLoginOk as i32, "{r:?}");
    let a = c
        .authenticate(WebAuthenticateRequest {
            credential: Some(Credential::SessionId(r.session_id.clone())),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.principal.unwrap().domains, ["a.test"]);
    assert_eq!(a.csrf_token, r.csrf_token);
    for _ in 0..5 {
        let r = c
            .login(login("wrong password!"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outcome, WebLoginOutcome::WebLoginBadCredentials as i32);
    }
    let r = c.login(login(PASSWORD)).await.unwrap().into_inner();
    assert_eq!(r.outcome, WebLoginOutcome::WebLoginLockedOut as i32);
    let k = c
        .create_key(WebKeyCreateRequest {
            role: WebRole::Admin as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = |secret: &str| WebAuthenticateRequest {
        credential: Some(Credential::ApiKey(secret.into())),
        client_ip: String::new(),
    };
    assert!(c.authenticate(key(&k.secret)).await.is_ok());
    c.revoke_key(WebKeyRevokeRequest {
        id: k.key.unwrap().id,
        actor: "tester".into(),
    })
    .await
    .unwrap();
    assert!(c.authenticate(key(&k.secret)).await.is_err());
    let d = c
        .delete(WebAccountDeleteRequest {
            name: "dora".into(),
            actor: "tester".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.sessions, 1);
    assert!(
        c.list(WebAccountListRequest {})
            .await
            .unwrap()
            .into_inner()
            .accounts
            .is_empty()
    );
}
