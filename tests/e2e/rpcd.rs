//! mb-rpcd's services over their real transports: the change feed, the message log,
//! and the TCP listener with its API key, TLS and fail2ban line.

use std::time::Duration;

use mb_proto::v1::config_client::ConfigClient;
use mb_proto::v1::control_client::ControlClient;
use mb_proto::v1::events_client::EventsClient;
use mb_proto::v1::{
    EventBatch, EventQuery, MessageEvent, Source, StatusRequest, VersionRequest, WatchRequest,
};
use mb_testkit::{Gateway, text};
use tokio_stream::StreamExt;

const ONLY_RPCD: &str = "[smtp]\nenabled = false\n[filter]\nenabled = false\n";

async fn channel(gw: &Gateway) -> tonic::transport::Channel {
    mb_runtime::uds::connect(&gw.socket(), "mb-rpcd")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_sees_a_set_from_another_client() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    let mut config = ConfigClient::new(channel(&gw).await);
    let mut feed = config
        .watch(WatchRequest {
            prefix: "network.smtp".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // Another process changes a key outside the prefix, then one inside it.
    let gw_ref = &gw;
    let set = |k: &'static str, v: &'static str| {
        let out = gw_ref.tool("mb-config", &["set", k, v]);
        assert_eq!(text(&out).0, 0, "{}", text(&out).2);
    };
    tokio::task::block_in_place(|| {
        set("spam.threshold.tag", "5");
        set("network.smtp.port", "2526");
    });
    let change = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("a change within 10s")
        .expect("stream open")
        .expect("no error");
    assert_eq!(
        change.key, "network.smtp.port",
        "the prefix filter let {change:?} through"
    );
    assert_eq!(
        (change.old_value.as_str(), change.new_value.as_str()),
        ("25", "2526")
    );
    assert_eq!(change.source, Source::Database as i32);
    assert_eq!(change.changed_by_uid, 0);
    assert!(change.restart_required);
    assert!(change.generation >= 2, "{change:?}");

    // An unset arrives as such, with the value now in force.
    tokio::task::block_in_place(|| {
        let out = gw_ref.tool("mb-config", &["unset", "network.smtp.port"]);
        assert_eq!(text(&out).0, 0);
    });
    let change = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(change.unset);
    assert_eq!(
        (change.key.as_str(), change.new_value.as_str()),
        ("network.smtp.port", "25")
    );

    // The feed ends when the daemon stops, instead of hanging the client.
    tokio::task::block_in_place(|| assert_eq!(gw.stop(), Some(0)));
    let end = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
}

/// An event of a minute ago: within any retention, so the retention pass at start
/// (which may run after the test stored its events) never removes it. A fixed date
/// became older than the 30 days of `log.retention_days` and raced that pass.
fn event(id: &str, queue: &str) -> MessageEvent {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    MessageEvent {
        event_id: id.into(),
        node: "node1".into(),
        daemon: "mb-smtpd".into(),
        at_unix_ms: now - 60_000,
        queue_id: queue.into(),
        sender: "alice@example.org".into(),
        recipients: vec!["bob@example.test".into(), "carol@example.test".into()],
        size: 4096,
        stage: "received".into(),
        verdict: "accept".into(),
        score: 1.5,
        symbols: vec!["SPF_PASS".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_stored_once_and_queried() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    let mut events = EventsClient::new(channel(&gw).await);
    let batches = vec![
        EventBatch {
            sequence: 1,
            events: vec![event("e1", "Q1"), event("e2", "Q2")],
        },
        // A resent batch (after a lost acknowledgement) is not stored twice.
        EventBatch {
            sequence: 2,
            events: vec![event("e2", "Q2"), event("e3", "Q1")],
        },
    ];
    let mut acks = events
        .publish(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let a1 = acks.next().await.unwrap().unwrap();
    let a2 = acks.next().await.unwrap().unwrap();
    assert_eq!((a1.sequence, a1.stored, a1.duplicates), (1, 2, 0));
    assert_eq!((a2.sequence, a2.stored, a2.duplicates), (2, 1, 1));

    let found = events
        .query(EventQuery {
            queue_id: "Q1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        found
            .iter()
            .map(|e| e.event_id.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e3"]
    );
    assert_eq!(
        found[0].recipients,
        ["bob@example.test", "carol@example.test"]
    );
    assert_eq!((found[0].score, found[0].size), (1.5, 4096));
    let by_rcpt = events
        .query(EventQuery {
            recipient: "carol@example.test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(by_rcpt.len(), 3);

    // A malformed event is refused with a reason.
    let mut acks = events
        .publish(tokio_stream::iter(vec![EventBatch {
            sequence: 3,
            events: vec![event("", "Q9")],
        }]))
        .await
        .unwrap()
        .into_inner();
    let err = acks.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let status = ControlClient::new(channel(&gw).await)
        .status(StatusRequest {
            include_daemons: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.counters.get("events_stored"), Some(&3));
    assert_eq!(status.counters.get("events_duplicate"), Some(&1));
}

/// mb-log's event ids, in the order it printed them (`--json`).
fn logged(gw: &Gateway, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = text(&gw.tool("mb-log", &all));
    assert_eq!(code, 0, "mb-log {args:?}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["queue_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn message_log_is_searched_by_subject_client_and_message_id_and_pruned() {
    let mut gw = Gateway::new(&format!("{ONLY_RPCD}{KEEP_THE_LOG}"));
    gw.start().unwrap();
    search_and_prune(&mut gw).await;
}

/// The configuration file section `search_and_prune` needs: no retention at first, so
/// the pass at start cannot race the events the test stores.
pub(crate) const KEEP_THE_LOG: &str = "[log]\nretention_days = 0\n";

/// Stores five events, finds them by subject, client and Message-ID with mb-log, and
/// sees the one beyond the retention pruned at the next start (also run on MariaDB and
/// PostgreSQL by the databases tests).
pub(crate) async fn search_and_prune(gw: &mut Gateway) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day = 86_400_000;
    let at = |queue: &str, ago: i64, subject: &str, ip: &str, mid: &str| MessageEvent {
        at_unix_ms: now - ago,
        subject: subject.into(),
        client_ip: ip.into(),
        message_id: mid.into(),
        ..event(&format!("ev-{queue}"), queue)
    };
    let batch = vec![
        at(
            "Q1",
            60_000,
            "Your Invoice 42",
            "192.0.2.7",
            "a1@mail.example",
        ),
        at(
            "Q2",
            120_000,
            "INVOICE overdue",
            "192.0.2.8",
            "a2@mail.example",
        ),
        at("Q3", 180_000, "Lunch?", "192.0.2.7", "a3@mail.example"),
        // LIKE's wildcards in a search are literal.
        at(
            "Q4",
            240_000,
            "100% off_now",
            "2001:db8::7",
            "a4@mail.example",
        ),
        at(
            "Q5",
            40 * day,
            "old invoice",
            "192.0.2.7",
            "a5@mail.example",
        ),
    ];
    let mut events = EventsClient::new(channel(gw).await);
    let mut acks = events
        .publish(tokio_stream::iter(vec![EventBatch {
            sequence: 1,
            events: batch,
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().stored, 5);

    tokio::task::block_in_place(|| {
        assert_eq!(logged(gw, &["--subject", "invoice"]), ["Q2", "Q1"]);
        assert_eq!(
            logged(gw, &["--subject", "invoice", "--since", "60d"]),
            ["Q5", "Q2", "Q1"]
        );
        assert_eq!(logged(gw, &["--subject", "%"]), ["Q4"]);
        assert_eq!(logged(gw, &["--subject", "off%now"]), Vec::<String>::new());
        assert_eq!(logged(gw, &["--client", "192.0.2.7"]), ["Q3", "Q1"]);
        assert_eq!(logged(gw, &["--client", "2001:db8:0::7"]), ["Q4"]);
        assert_eq!(
            logged(gw, &["--client", "192.0.2.7", "--subject", "lunch"]),
            ["Q3"]
        );
        // A Message-ID is looked for over the whole log, with or without brackets.
        assert_eq!(logged(gw, &["--message-id", "<a5@mail.example>"]), ["Q5"]);
        assert_eq!(logged(gw, &["--message-id", "a2@mail.example"]), ["Q2"]);
        let (code, _, err) = text(&gw.tool("mb-log", &["--client", "not-an-ip"]));
        assert_eq!(code, 2, "{err}");

        // Events beyond log.retention_days are pruned: at start, and every few
        // minutes after.
        let (code, _, err) = text(&gw.tool("mb-config", &["set", "log.retention_days", "30"]));
        assert_eq!(code, 0, "{err}");
        assert_eq!(gw.stop(), Some(0));
        gw.start().unwrap();
        mb_testkit::wait_until("the pass at start", Duration::from_secs(20), || {
            gw.log().contains("message log pruned events=1")
        })
        .unwrap_or_else(|e| panic!("{e}: {}", gw.log()));
        assert_eq!(logged(gw, &["--since", "60d"]), ["Q4", "Q3", "Q2", "Q1"]);
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_listener_requires_the_api_key_and_logs_failures_for_fail2ban() {
    let fail2ban = mb_testkit::require("fail2ban-regex", "fail2ban");
    let port = mb_testkit::free_port();
    let key = "k3y-0123456789abcdef";
    let mut gw = Gateway::new(&format!(
        "{ONLY_RPCD}[network.rpcd.tcp]\nenabled = true\nbind = \"127.0.0.1\"\nport = {port}\napi_key = \"{key}\"\n"
    ));
    gw.start().unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut refused = 0;
    for sent in [None, Some("wrong-key"), Some("k3y-0123456789abcdeF")] {
        let mut req = tonic::Request::new(VersionRequest {});
        if let Some(k) = sent {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        let err = ControlClient::new(ch.clone())
            .version(req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        refused += 1;
    }
    let mut req = tonic::Request::new(mb_proto::v1::GetRequest {
        key: "relay.auth.password".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut config = ConfigClient::new(ch.clone());
    config.get(req).await.unwrap();
    // Secrets are masked for TCP callers.
    let mut req = tonic::Request::new(mb_proto::v1::GetRequest {
        key: "network.rpcd.tcp.api_key".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let v = config.get(req).await.unwrap().into_inner().value.unwrap();
    assert_eq!(v.value, "********");

    let log = gw.path("rpcd.log");
    let filter = mb_testkit::source_root().join("etc/fail2ban/filter.d/mailborder-auth.conf");
    let out = std::process::Command::new(fail2ban)
        .arg(&log)
        .arg(&filter)
        .output()
        .unwrap();
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{out}{err}");
    let matched = out
        .lines()
        .find(|l| l.starts_with("Lines:"))
        .and_then(|l| l.split(',').find(|p| p.contains("matched")))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok());
    assert_eq!(
        matched,
        Some(refused),
        "fail2ban-regex:\n{out}\nlog:\n{}",
        gw.log()
    );
    assert!(
        gw.log()
            .contains("authentication failed client=127.0.0.1 user=api-key service=mb-rpcd")
    );
    assert!(
        !gw.log().contains("wrong-key"),
        "a sent key reached the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_listener_speaks_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (cert, key) = mb_testkit::self_signed();
    let mut gw = Gateway::new("");
    std::fs::write(gw.path("cert.pem"), &cert).unwrap();
    std::fs::write(gw.path("key.pem"), &key).unwrap();
    let port = mb_testkit::free_port();
    let api_key = "0123456789abcdef0123";
    let d = gw.dir.path().display().to_string();
    let base = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        format!(
            "{base}[network.rpcd.tcp]\nenabled = true\nport = {port}\napi_key = \"{api_key}\"\n\
             \"tls.cert\" = \"{d}/cert.pem\"\n\"tls.key\" = \"{d}/key.pem\"\n"
        ),
    )
    .unwrap();
    gw.start().unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&cert))
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(StatusRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {api_key}").parse().unwrap(),
    );
    let status = ControlClient::new(ch)
        .status(req)
        .await
        .unwrap()
        .into_inner();
    assert!(
        status.listening.contains(&format!("tls:127.0.0.1:{port}")),
        "{:?}",
        status.listening
    );
    // Plaintext on the TLS port gets nowhere.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            ControlClient::new(ch)
                .version(VersionRequest {})
                .await
                .is_err()
        );
    }
}

#[test]
fn log_lines_follow_the_documented_formats() {
    // Text: `YYYY-MM-DD HH:MM:SS [LEVEL] daemon: message key=value`.
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    assert_eq!(gw.stop(), Some(0));
    let log = gw.log();
    let first = log
        .lines()
        .find(|l| l.contains("mb-rpcd started"))
        .unwrap_or_else(|| panic!("{log}"));
    let (date, rest) = first.split_at(19);
    assert!(
        date.len() == 19
            && date.as_bytes()[4] == b'-'
            && date.as_bytes()[10] == b' '
            && date.as_bytes()[13] == b':',
        "{first}"
    );
    assert!(
        rest.starts_with(" [INFO] mb-rpcd: mb-rpcd started socket="),
        "{first}"
    );
    assert!(
        log.lines()
            .all(|l| l.len() > 19 && l.as_bytes()[19..].starts_with(b" [")),
        "{log}"
    );

    // JSON on request, one object per line.
    let mut gw = Gateway::new(&format!("{ONLY_RPCD}[log]\nformat = \"json\"\n"));
    gw.start().unwrap();
    assert_eq!(gw.stop(), Some(0));
    let lines: Vec<serde_json::Value> = gw
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "mb-rpcd started")
        .expect("start line");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["daemon"], "mb-rpcd");
    assert!(
        started["socket"]
            .as_str()
            .unwrap()
            .ends_with("mb-rpcd.sock"),
        "{started}"
    );
}
