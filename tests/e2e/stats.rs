//! The statistics rollups (issue 16 item 4): real mail through mb-smtpd and an mb-filter
//! worker with a real clamd, counted exactly by mb-rpcd and printed by `mb-stats`; not
//! counted twice when mb-rpcd restarts or a publisher sends the same events again;
//! pruned after `stats.retention_days`; and served by mb-web's `/api/v1/stats` to each
//! role as it may see it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::Method;
use mb_proto::v1::events_client::EventsClient;
use mb_proto::v1::{EventBatch, EventQuery, MessageEvent};
use mb_testkit::{Clamd, EICAR, Gateway, SmtpSink, free_port, text, wait_until};
use serde_json::Value as Json;
use tokio_stream::StreamExt;

use crate::filter::with_attachment;
use crate::smtp::Raw;
use crate::web_auth::Web;

const PASSWORD: &str = "correct horse battery";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap())
}

/// One SMTP transaction from `from` to `rcpts`; the replies to each RCPT and to the
/// end of DATA (empty when no recipient was taken).
fn send(port: u16, from: &str, rcpts: &[&str], message: &str) -> (Vec<String>, String) {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.test");
    c.cmd(&format!("MAIL FROM:<{from}>"));
    let replies: Vec<String> = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")))
        .collect();
    if !replies.iter().any(|r| r.starts_with("250")) {
        c.cmd("QUIT");
        return (replies, String::new());
    }
    c.cmd("DATA");
    let r = c.cmd(&format!("{}.", message.replace("\r\n.", "\r\n..")));
    c.cmd("QUIT");
    (replies, r)
}

fn clean(subject: &str, to: &str) -> String {
    format!(
        "From: alice@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 01:00:00 +0000\r\n\
         Message-ID: <{subject}@sender.test>\r\n\r\nhello\r\n"
    )
}

fn json(out: &std::process::Output) -> Json {
    let (code, stdout, stderr) = text(out);
    assert_eq!(code, 0, "{stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `mb-stats --json` with `args`.
fn stats(gw: &Gateway, args: &[&str]) -> Json {
    let mut all = vec!["--json", "--top", "20"];
    all.extend_from_slice(args);
    json(&gw.tool("mb-stats", &all))
}

/// The messages of the report's totals of a stage and verdict (every direction).
fn messages(r: &Json, stage: &str, verdict: &str) -> u64 {
    r["totals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["stage"] == stage && c["verdict"] == verdict)
        .map(|c| c["messages"].as_u64().unwrap())
        .sum()
}

fn total(r: &Json, field: &str) -> u64 {
    r["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[field].as_u64().unwrap())
        .sum()
}

fn top(r: &Json, list: &str, value: &str) -> Option<u64> {
    r["top"][list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["value"] == value)
        .map(|e| e["messages"].as_u64().unwrap())
}

async fn publish(gw: &Gateway, events: Vec<MessageEvent>) -> (u32, u32) {
    let channel = mb_runtime::uds::connect(&gw.socket(), "mb-rpcd")
        .await
        .unwrap();
    let mut acks = EventsClient::new(channel)
        .publish(tokio_stream::iter(vec![EventBatch {
            sequence: 1,
            events,
        }]))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.next().await.unwrap().unwrap();
    (ack.stored, ack.duplicates)
}

#[tokio::test(flavor = "multi_thread")]
async fn real_mail_is_counted_once_across_restarts_and_pruned() {
    let clamd = Clamd::start().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test, other.test\"\n# The tests connect from 127.0.0.1: from the internet here (inbound, no relaying).\nmynetworks = \"192.0.2.0/24\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n\
         [clamav]\nenabled = true\naddress = \"{}\"\n",
        free_port(),
        sink.port,
        clamd.address()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();

    // Nothing counted yet: an empty report, not an error.
    let empty = stats(&gw, &[]);
    assert_eq!(empty["buckets"], serde_json::json!([]), "{empty:#}");

    // Two clean messages (one to two recipients of two domains), a virus, a blocked
    // attachment, and a recipient refused at RCPT (relay denied).
    let accepted = |(_, r): (Vec<String>, String)| assert!(r.starts_with("250"), "{r}");
    accepted(send(
        port,
        "alice@sender.test",
        &["bob@served.test"],
        &clean("one", "bob@served.test"),
    ));
    accepted(send(
        port,
        "Alice@Sender.test",
        &["bob@served.test", "carol@other.test"],
        &clean("two", "bob@served.test, carol@other.test"),
    ));
    let (_, r) = send(
        port,
        "mallory@evil.test",
        &["bob@served.test"],
        &with_attachment("infected", "readme.txt", EICAR.as_bytes()),
    );
    assert!(r.starts_with("554") && r.contains("virus found"), "{r}");
    let (_, r) = send(
        port,
        "mallory@evil.test",
        &["bob@served.test"],
        &with_attachment("blocked", "invoice.pdf.exe", b"MZ not really"),
    );
    assert!(r.starts_with("554"), "{r}");
    let (rcpt, r) = send(port, "mallory@evil.test", &["someone@elsewhere.test"], "");
    assert!(rcpt[0].starts_with("554") && r.is_empty(), "{rcpt:?}");

    let mut report = Json::Null;
    wait_until("five decisions counted", Duration::from_secs(20), || {
        report = stats(&gw, &[]);
        total(&report, "messages") == 5
    })
    .unwrap_or_else(|e| panic!("{e}: {report:#}\n{}", gw.log()));
    let check = |r: &Json| {
        assert_eq!(messages(r, "scanned", "accept"), 2, "{r:#}");
        assert_eq!(messages(r, "scanned", "reject"), 2, "{r:#}");
        assert_eq!(messages(r, "rejected", "reject"), 1, "{r:#}");
        assert_eq!(total(r, "viruses"), 1, "{r:#}");
        // 1 + 2 + 1 + 1 scanned recipients, and the refused one.
        assert_eq!(total(r, "recipients"), 6, "{r:#}");
        assert!(total(r, "bytes") > 1000, "{r:#}");
        assert!(
            r["totals"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["direction"] == "inbound")
        );
        assert_eq!(top(r, "senders", "alice@sender.test"), Some(2), "{r:#}");
        assert_eq!(top(r, "senders", "mallory@evil.test"), Some(3), "{r:#}");
        assert_eq!(top(r, "sender_domains", "evil.test"), Some(3), "{r:#}");
        assert_eq!(top(r, "recipients", "bob@served.test"), Some(4), "{r:#}");
        assert_eq!(
            top(r, "recipients", "someone@elsewhere.test"),
            Some(1),
            "{r:#}"
        );
        assert_eq!(top(r, "clients", "127.0.0.1"), Some(5), "{r:#}");
    };
    check(&report);
    // Hourly buckets add up to the totals.
    let in_buckets: u64 = report["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["counts"].as_array().unwrap())
        .map(|c| c["messages"].as_u64().unwrap())
        .sum();
    assert_eq!(in_buckets, 5);

    // One domain's view: only the message with a recipient there, only that recipient;
    // the relay-denied refusal names no domain of ours and is in no domain's view.
    let other = stats(&gw, &["--domain", "other.test"]);
    assert_eq!(total(&other, "messages"), 1, "{other:#}");
    assert_eq!(total(&other, "recipients"), 1, "{other:#}");
    assert_eq!(top(&other, "recipients", "carol@other.test"), Some(1));
    assert_eq!(top(&other, "recipients", "bob@served.test"), None);
    let served = stats(&gw, &["--domain", "served.test"]);
    assert_eq!(total(&served, "messages"), 4, "{served:#}");

    // The table a person reads.
    let (code, table, err) = text(&gw.tool("mb-stats", &["--since", "2h", "--step", "day"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("TOTAL") && table.contains("mallory@evil.test"),
        "{table}"
    );
    let (code, _, err) = text(&gw.tool("mb-stats", &["--since", "last week"]));
    assert_eq!(code, 2, "{err}");

    // A publisher that missed its acknowledgement sends the same events again: stored
    // and counted once.
    let channel = mb_runtime::uds::connect(&gw.socket(), "mb-rpcd")
        .await
        .unwrap();
    let logged = EventsClient::new(channel)
        .query(EventQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        logged
            .iter()
            .any(|e| e.direction == "inbound" && e.stage == "scanned")
    );
    let n = u32::try_from(logged.len()).unwrap();
    assert_eq!(publish(&gw, logged).await, (0, n));
    check(&stats(&gw, &[]));

    // An old message (ten days ago) in the rollups, then a retention of five days: the
    // restarted mb-rpcd prunes its hour at once and keeps today's, counted once.
    let old = MessageEvent {
        event_id: "old-1".into(),
        at_unix_ms: now_ms() - 10 * 86_400_000,
        sender: "ancient@sender.test".into(),
        recipients: vec!["bob@served.test".into()],
        stage: "scanned".into(),
        verdict: "accept".into(),
        direction: "inbound".into(),
        ..Default::default()
    };
    assert_eq!(publish(&gw, vec![old]).await, (1, 0));
    let long = stats(&gw, &["--since", "11d", "--step", "day"]);
    assert_eq!(total(&long, "messages"), 6, "{long:#}");
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "stats.retention_days", "5"]));
    assert_eq!(code, 0, "{err}");
    tokio::task::block_in_place(|| {
        assert_eq!(gw.stop(), Some(0));
        gw.start().unwrap();
    });
    let mut long = Json::Null;
    wait_until("the old hour pruned", Duration::from_secs(20), || {
        long = stats(&gw, &["--since", "11d", "--step", "day"]);
        total(&long, "messages") == 5
    })
    .unwrap_or_else(|e| panic!("{e}: {long:#}"));
    assert_eq!(top(&long, "senders", "ancient@sender.test"), None);
    check(&stats(&gw, &[]));

    // After the restart the daemons' events are counted again, each once.
    accepted(send(
        port,
        "alice@sender.test",
        &["bob@served.test"],
        &clean("three", "bob@served.test"),
    ));
    let mut report = Json::Null;
    wait_until(
        "the sixth decision counted",
        Duration::from_secs(30),
        || {
            report = stats(&gw, &[]);
            total(&report, "messages") >= 6
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {report:#}"));
    assert_eq!(messages(&report, "scanned", "accept"), 3, "{report:#}");
    assert_eq!(total(&report, "messages"), 6, "{report:#}");
}

/// GET `path` with a logged-in session of `name`.
async fn get(web: &Web, cookie: &str, path: &str) -> crate::web_auth::Reply {
    web.https(Method::GET, path, &[("cookie", cookie)], None)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_each_role_its_own_statistics() {
    let web = Web::start("totp_required = \"\"\n");
    web.add("boss", &["--role", "admin"]);
    web.add("dora", &["--role", "domain-admin", "--domains", "a.test"]);
    web.add("jane", &["--role", "user", "--addresses", "jane@a.test"]);
    let at = now_ms() - 3_600_000;
    let event =
        |id: &str, direction: &str, sender: &str, rcpts: &[&str], verdict: &str| MessageEvent {
            event_id: id.into(),
            at_unix_ms: at,
            client_ip: "192.0.2.9".into(),
            sender: sender.into(),
            recipients: rcpts.iter().map(|r| (*r).to_string()).collect(),
            size: 1000,
            stage: "scanned".into(),
            verdict: verdict.into(),
            direction: direction.into(),
            ..Default::default()
        };
    let events = vec![
        event("w1", "inbound", "x@far.test", &["u@a.test"], "accept"),
        event("w2", "inbound", "x@far.test", &["v@b.test"], "quarantine"),
        event("w3", "outbound", "me@a.test", &["y@far.test"], "accept"),
        event(
            "w4",
            "inbound",
            "z@far.test",
            &["u@a.test", "v@b.test"],
            "reject",
        ),
    ];
    assert_eq!(publish(&web.gw, events).await, (4, 0));
    let login = |name: &'static str| {
        let web = &web;
        async move {
            let r = web.login(name, PASSWORD, "").await;
            assert_eq!(r.status, 200, "{r:?}");
            r.session_cookie()
        }
    };
    let (boss, dora, jane) = (
        login("boss").await,
        login("dora").await,
        login("jane").await,
    );

    // The admin sees everything, and the same as mb-stats.
    let all = get(&web, &boss, "/api/v1/stats?from=1d&top=20").await;
    assert_eq!(all.status, 200, "{all:?}");
    assert_eq!(total(&all.body, "messages"), 4, "{:#}", all.body);
    assert_eq!(messages(&all.body, "scanned", "quarantine"), 1);
    let cli = stats(&web.gw, &["--since", "1d"]);
    assert_eq!(all.body["totals"], cli["totals"]);
    assert_eq!(all.body["top"], cli["top"]);
    assert_eq!(all.body["buckets"], cli["buckets"]);
    let b = get(&web, &boss, "/api/v1/stats?from=1d&domain=b.test").await;
    assert_eq!(total(&b.body, "messages"), 2, "{:#}", b.body);
    let days = get(&web, &boss, "/api/v1/stats?from=2d&step=day").await;
    assert_eq!(days.status, 200);
    let start = days.body["buckets"][0]["start_unix"].as_i64().unwrap();
    assert_eq!(start % 86_400, 0, "{:#}", days.body);

    // The domain admin of a.test: its inbound mail (w1, w4 with only u@a.test) and its
    // outbound mail (w3), never b.test's recipients.
    let mine = get(&web, &dora, "/api/v1/stats?from=1d&top=20").await;
    assert_eq!(mine.status, 200, "{mine:?}");
    assert_eq!(mine.body["domains"], serde_json::json!(["a.test"]));
    assert_eq!(total(&mine.body, "messages"), 3, "{:#}", mine.body);
    assert_eq!(total(&mine.body, "recipients"), 3, "{:#}", mine.body);
    assert_eq!(messages(&mine.body, "scanned", "quarantine"), 0);
    assert_eq!(top(&mine.body, "recipients", "v@b.test"), None);
    assert_eq!(top(&mine.body, "recipients", "u@a.test"), Some(2));
    let theirs = get(&web, &dora, "/api/v1/stats?from=1d&domain=b.test").await;
    assert_eq!(theirs.status, 403, "{theirs:?}");

    // A user sees no statistics; bad ranges are refused with the reason.
    assert_eq!(get(&web, &jane, "/api/v1/stats").await.status, 403);
    let bad = get(&web, &boss, "/api/v1/stats?step=week").await;
    assert_eq!(bad.status, 400, "{bad:?}");
    let bad = get(&web, &boss, "/api/v1/stats?from=1h&to=2h").await;
    assert_eq!(bad.status, 400, "{bad:?}");
    let anonymous = web.https(Method::GET, "/api/v1/stats", &[], None).await;
    assert_eq!(anonymous.status, 401);
}
