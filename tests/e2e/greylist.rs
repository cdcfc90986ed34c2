//! Greylisting (issue 14, item 5) with a real mb-rpcd and mb-smtpd, clients on loopback
//! addresses: a new triplet is deferred with 451 4.7.1 and passes when retried after
//! `greylist.delay`; clients are grouped by /24 (127.0.0.2 and 127.0.0.77 are one
//! client, 127.0.1.2 another); mynetworks and a policy-allowed sender whose SPF passes
//! (served by the kit's authoritative DNS server) are not greylisted, a forged one is;
//! `mb-greylist list --json` and `flush`; the store in mb-rpcd's database (SQLite,
//! MariaDB, PostgreSQL) and in Redis; mail passes when the store is down.

use std::time::Duration;

use mb_testkit::{AuthDns, Gateway, MariaDb, Postgres, Redis, Rr, Zone, free_port, text};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An SMTP client connected from `source`.
struct Smtp {
    r: BufReader<TcpStream>,
}

impl Smtp {
    async fn open(source: &str, port: u16) -> Smtp {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let mut s = Smtp {
            r: BufReader::new(stream),
        };
        let greeting = s.reply().await;
        assert!(greeting.starts_with("220"), "{source}: {greeting}");
        let r = s.cmd("EHLO client.test").await;
        assert!(r.starts_with("250"), "{source}: {r}");
        s
    }

    /// The whole reply (its last line); "" when the connection closed.
    async fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.r.read_line(&mut line))
                .await
                .expect("a reply within 30s")
                .unwrap_or(0);
            if n == 0 {
                return String::new();
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line.trim_end().to_string();
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.r
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }
}

/// One transaction's RCPT reply, on a connection of its own from `source`.
async fn attempt(source: &str, port: u16, from: &str, to: &str) -> String {
    let mut c = Smtp::open(source, port).await;
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    assert!(r.starts_with("250"), "{source} MAIL FROM:<{from}>: {r}");
    let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
    c.cmd("QUIT").await;
    r
}

fn greylisted(r: &str, rcpt: &str) -> bool {
    r.starts_with(&format!(
        "451 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, please try again in"
    ))
}

/// A gateway greylisting with a 2 s delay and a 30 s retry window, `greylist` more keys
/// of that table and `extra` more TOML. (Times are whole seconds: with a 1 s delay an
/// immediate retry that crosses a second boundary would pass.)
fn gateway(port: u16, dns: &AuthDns, greylist: &str, extra: &str) -> Gateway {
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.reinject]\nport = {}\n\
         [network.dns]\nservers = \"{}\"\n\
         [smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"127.0.5.0/24\"\n\
         [greylist]\nenabled = true\ndelay = \"2s\"\nretry_window = \"30s\"\n{greylist}\n\
         [filter]\nenabled = false\n{extra}",
        free_port(),
        dns.servers()
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    gw
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The SPF records: allowed.test's mail comes from loopback, forged.test has none.
fn zone() -> Zone {
    let mut zone = Zone::new();
    zone.add("allowed.test", Rr::txt("v=spf1 ip4:127.0.0.0/8 -all"))
        .unwrap();
    zone.add("forged.test", Rr::txt("v=spf1 ip4:192.0.2.1 -all"))
        .unwrap();
    zone
}

/// Retries `to` from `source` until it passes (at most 10 s), as an MTA's queue would.
async fn retry_until_accepted(source: &str, port: u16, from: &str, to: &str) -> u32 {
    for n in 1..=20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = attempt(source, port, from, to).await;
        if r.starts_with("250") {
            return n;
        }
        assert!(greylisted(&r, to), "retry {n}: {r}");
    }
    panic!("{from} -> {to} from {source} never passed");
}

#[test]
fn new_triplets_are_deferred_and_pass_when_retried_after_the_delay() {
    let dns = AuthDns::start(zone()).unwrap();
    let port = free_port();
    let mut gw = gateway(port, &dns, "", "");
    let tool = |args: &[&str]| text(&gw.tool("mb-greylist", args));
    let rt = runtime();
    rt.block_on(async {
        let rcpt = "user@served.test";
        // First attempt and an immediate retry: deferred.
        let r = attempt("127.0.0.2", port, "a@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "{r}");
        let r = attempt("127.0.0.2", port, "A@Sender.test", "USER@served.test").await;
        assert!(
            greylisted(&r, "USER@served.test"),
            "an immediate retry: {r}"
        );
        // After the delay: passes, from any address of the same /24.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let r = attempt("127.0.0.77", port, "a@sender.test", rcpt).await;
        assert!(r.starts_with("250"), "a retry after the delay: {r}");
        let r = attempt("127.0.0.2", port, "a@sender.test", rcpt).await;
        assert!(r.starts_with("250"), "a passed triplet is remembered: {r}");
        // Another sender from that network, and the same sender from another /24.
        let r = attempt("127.0.0.2", port, "b@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "another sender: {r}");
        let r = attempt("127.0.1.2", port, "a@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "another /24: {r}");
        // mynetworks is never greylisted.
        let r = attempt("127.0.5.1", port, "c@sender.test", rcpt).await;
        assert!(r.starts_with("250"), "mynetworks: {r}");
    });

    // An allow policy on a sender needs an authenticated one: SPF at RCPT.
    let (code, out, err) = text(&gw.tool(
        "mb-policy",
        &[
            "add",
            "allowed",
            "--action",
            "allow",
            "--from",
            "allowed.test",
        ],
    ));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = text(&gw.tool(
        "mb-policy",
        &[
            "add",
            "forged",
            "--action",
            "allow",
            "--from",
            "forged.test",
        ],
    ));
    assert_eq!(code, 0, "{out}{err}");
    rt.block_on(async {
        // mb-smtpd reads the policies every few seconds. A new recipient each time, so
        // that no retry passes by the delay.
        let mut last = String::new();
        for i in 0..30 {
            let to = format!("wait{i}@served.test");
            last = attempt("127.0.0.2", port, "news@allowed.test", &to).await;
            if last.starts_with("250") {
                break;
            }
            assert!(greylisted(&last, &to), "{last}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            last.starts_with("250"),
            "an SPF-passing allowed sender: {last}"
        );
        // First attempt of a new recipient, so no earlier attempt can have passed it.
        let r = attempt("127.0.0.2", port, "news@allowed.test", "new@served.test").await;
        assert!(r.starts_with("250"), "allowed, first attempt: {r}");
        let r = attempt("127.0.0.2", port, "news@forged.test", "new@served.test").await;
        assert!(
            greylisted(&r, "new@served.test"),
            "an allowed sender whose SPF fails: {r}"
        );
    });

    // The store, as the administrator sees it.
    let (code, out, err) = tool(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let triplets = v["triplets"].as_array().unwrap();
    let find = |net: &str, from: &str| {
        triplets
            .iter()
            .find(|t| {
                t["network"] == net && t["sender"] == from && t["recipient"] == "user@served.test"
            })
            .unwrap_or_else(|| panic!("no {net} {from} in {out}"))
            .clone()
    };
    let passed = find("127.0.0.0/24", "a@sender.test");
    assert_eq!(passed["state"], "passed", "{passed}");
    assert_eq!(find("127.0.0.0/24", "b@sender.test")["state"], "deferred");
    assert_eq!(find("127.0.1.0/24", "a@sender.test")["state"], "deferred");
    assert!(
        !triplets.iter().any(|t| t["network"] == "127.0.5.0/24"),
        "mynetworks left no entry: {out}"
    );
    let clients = v["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{out}");
    assert_eq!(clients[0]["network"], "127.0.0.0/24");
    assert_eq!(clients[0]["passes"], 1);
    assert_eq!(clients[0]["whitelisted"], false);
    let (code, out, _) = tool(&["list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("127.0.0.0/24") && out.contains("<a@sender.test>"),
        "{out}"
    );

    // The greylisted attempts are in the message log.
    let logged = mb_testkit::wait_until("the greylisted event", Duration::from_secs(10), || {
        let (_, out, _) = text(&gw.tool(
            "mb-log",
            &["--json", "--from", "b@sender.test", "--stage", "greylisted"],
        ));
        out.contains("retry in")
    });
    assert!(logged.is_ok(), "no greylisted event in the message log");

    // Flushing the expired entries keeps the passed triplet; --all forgets everything,
    // and the sender is greylisted again.
    let (code, out, err) = tool(&["flush", "--expired", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(out.trim())["flushed"], "expired", "{out}");
    let (_, out, _) = tool(&["list", "--json"]);
    assert!(out.contains("\"passed\""), "{out}");
    let (code, out, err) = tool(&["flush", "--all", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(out.trim());
    assert!(v["triplets"].as_u64().unwrap() >= 4, "{out}");
    assert_eq!(v["clients"], 1, "{out}");
    let (_, out, _) = tool(&["list", "--json"]);
    assert_eq!(json(&out)["triplets"].as_array().unwrap().len(), 0, "{out}");
    rt.block_on(async {
        let r = attempt("127.0.0.2", port, "a@sender.test", "user@served.test").await;
        assert!(greylisted(&r, "user@served.test"), "after a flush: {r}");
    });

    // With mb-rpcd down, greylisting lets mail through instead of losing it.
    gw.stop();
    rt.block_on(async {
        let r = attempt("127.0.0.2", port, "z@sender.test", "user@served.test").await;
        assert!(r.starts_with("250"), "store down: {r}");
    });
    let log = gw.smtpd_log();
    assert!(log.contains("greylisting skipped"), "{log}");
}

#[test]
fn greylisting_shares_its_triplets_through_redis() {
    let redis = Redis::start().unwrap();
    let dns = AuthDns::start(zone()).unwrap();
    let port = free_port();
    let gw = gateway(
        port,
        &dns,
        "auto_whitelist = 1",
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let tool = |args: &[&str]| text(&gw.tool("mb-greylist", args));
    let rt = runtime();
    rt.block_on(async {
        let rcpt = "user@served.test";
        let r = attempt("127.0.0.2", port, "a@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "{r}");
        let r = attempt("127.0.0.3", port, "a@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "an immediate retry: {r}");
        retry_until_accepted("127.0.0.3", port, "a@sender.test", rcpt).await;
        // One pass whitelists the network (auto_whitelist = 1); another /24 is not.
        let r = attempt("127.0.0.2", port, "new@sender.test", "other@served.test").await;
        assert!(r.starts_with("250"), "auto-whitelisted: {r}");
        let r = attempt("127.0.1.2", port, "new@sender.test", "other@served.test").await;
        assert!(greylisted(&r, "other@served.test"), "{r}");
    });
    let (code, out, err) = tool(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["triplets"].as_array().unwrap().len(), 2, "{out}");
    let clients = v["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{out}");
    assert_eq!(clients[0]["whitelisted"], true, "{out}");
    let (code, out, err) = tool(&["flush", "--all", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(out.trim());
    assert_eq!(
        (v["triplets"].as_u64(), v["clients"].as_u64()),
        (Some(2), Some(1)),
        "{out}"
    );
    // Redis held it all: mb-rpcd's database was not asked.
    assert!(!gw.log().contains("greylist flushed"), "{}", gw.log());
    rt.block_on(async {
        let r = attempt("127.0.0.2", port, "new@sender.test", "other@served.test").await;
        assert!(greylisted(&r, "other@served.test"), "after a flush: {r}");
    });
}

/// The database store's SQL on `url`: deferred, passed after the delay, listed, flushed.
fn on_database(url: &str) {
    let dns = AuthDns::start(zone()).unwrap();
    let port = free_port();
    let gw = gateway(port, &dns, "", &format!("[database]\nurl = \"{url}\"\n"));
    let rcpt = "user@served.test";
    runtime().block_on(async {
        let r = attempt("127.0.0.2", port, "a@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "{r}");
        let r = attempt("127.0.0.2", port, "a@sender.test", rcpt).await;
        assert!(greylisted(&r, rcpt), "an immediate retry: {r}");
        retry_until_accepted("127.0.0.3", port, "a@sender.test", rcpt).await;
    });
    let (code, out, err) = text(&gw.tool("mb-greylist", &["list", "--json"]));
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["triplets"][0]["state"], "passed", "{out}");
    assert_eq!(v["clients"][0]["passes"], 1, "{out}");
    let (code, out, err) = text(&gw.tool("mb-greylist", &["flush", "--all", "--json"]));
    assert_eq!(code, 0, "{err}");
    let v = json(out.trim());
    assert_eq!(
        (v["triplets"].as_u64(), v["clients"].as_u64()),
        (Some(1), Some(1)),
        "{out}"
    );
}

#[test]
fn the_greylist_is_kept_in_mariadb() {
    let db = MariaDb::start().unwrap();
    on_database(&db.url());
}

#[test]
fn the_greylist_is_kept_in_postgresql() {
    let db = Postgres::start().unwrap();
    on_database(&db.url());
}
