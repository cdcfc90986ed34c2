//! Delivery for real: mb-smtpd's queue manager hands mail to Postfix's smtp-sink, to
//! MX hosts found through dnsmasq, to another mb-smtpd over STARTTLS, and survives
//! kill -9 under load without losing an accepted message.

use std::time::Duration;

use mb_testkit::{Dnsmasq, Gateway, SmtpSink, free_port, text, wait_until};

use crate::smtp::Raw;

struct Gw {
    gw: Gateway,
    port: u16,
    reinject: u16,
}

/// mb-rpcd and mb-smtpd serving `served.test`, delivering; `extra` adds TOML.
fn start(extra: &str) -> Gw {
    let (port, reinject) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\nmax_per_source = 100\n\
         [network.reinject]\nport = {reinject}\n\
         [network.protection]\nmode = \"public\"\n\
         [filter]\nenabled = false\n{extra}"
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    Gw { gw, port, reinject }
}

/// Sends one message; returns the queue id from the 250.
fn send(port: u16, from: &str, rcpts: &[&str], subject: &str) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.test");
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
    for r in rcpts {
        let reply = c.cmd(&format!("RCPT TO:<{r}>"));
        assert!(reply.starts_with("250"), "{r}: {reply}");
    }
    c.cmd("DATA");
    let r = c.cmd(&format!(
        "Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\nbody of {subject}\r\n."
    ));
    c.cmd("QUIT");
    r.trim()
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

fn queue_json(gw: &Gateway) -> serde_json::Value {
    let (code, out, err) = text(&gw.tool("mb-queue", &["--json", "list"]));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn wait_empty(gw: &Gateway, limit: Duration) {
    let mut last = serde_json::Value::Null;
    if wait_until("the queue to empty", limit, || {
        last = queue_json(gw);
        last.as_array().is_some_and(Vec::is_empty)
    })
    .is_err()
    {
        panic!(
            "queue not empty: {last:#}\n{}",
            gw.smtpd_log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

fn subjects(sink: &SmtpSink) -> Vec<String> {
    sink.messages()
        .iter()
        .filter_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn relays_to_smtp_sink_and_kill_9_loses_nothing() {
    let sink = SmtpSink::start(&[]).unwrap();
    let mut g = start(&format!(
        "[smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
        sink.port
    ));
    // One message, two recipients: one transaction, Return-Path not added (not final).
    let id = send(
        g.port,
        "alice@sender.test",
        &["bob@served.test", "carol@served.test"],
        "first",
    );
    wait_empty(&g.gw, Duration::from_secs(20));
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].contains("X-Rcpt-Args: <bob@served.test>"),
        "{}",
        msgs[0]
    );
    assert!(msgs[0].contains("X-Rcpt-Args: <carol@served.test>"));
    assert!(msgs[0].contains("X-Mail-Args: <alice@sender.test>"));
    assert!(
        msgs[0].contains(&format!("id {id}")),
        "Received names the queue id"
    );
    let log = g.gw.smtpd_log();
    assert!(
        log.contains(&format!(
            "delivered id={id} to=bob@served.test relay=127.0.0.1[127.0.0.1]:{}",
            sink.port
        )),
        "{log}"
    );

    // Load, with kill -9 of mb-smtpd in the middle of deliveries, and restarts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = g.port;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let subject = format!("w{w}-m{n}");
                    let ok = std::panic::catch_unwind(|| {
                        send(port, "load@sender.test", &["bob@served.test"], &subject)
                    });
                    match ok {
                        Ok(_) => acked.push(subject),
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                acked
            })
        })
        .collect();
    for round in 0..3u64 {
        std::thread::sleep(Duration::from_millis(400 + 200 * round));
        let mut smtpd = g.gw.smtpd.take().unwrap();
        smtpd.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = smtpd.child.wait();
        g.gw.start_smtpd().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(acked.len() >= 20, "only {} acknowledged", acked.len());
    wait_empty(&g.gw, Duration::from_secs(60));
    let got = subjects(&sink);
    let mut missing = Vec::new();
    for s in &acked {
        if !got.contains(s) {
            missing.push(s.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "accepted but never delivered: {missing:?}"
    );
    let duplicates = got.len() - {
        let mut u = got.clone();
        u.sort();
        u.dedup();
        u.len()
    };
    eprintln!(
        "kill -9 x3 during delivery: {} acknowledged, {} delivered, {duplicates} duplicates",
        acked.len(),
        got.len()
    );
    // Some "250"s from smtp-sink may be lost with the process: at most a handful.
    assert!(duplicates <= 3 * 20, "{duplicates} duplicates");
}

#[test]
fn mx_routing_follows_priority_falls_back_and_honours_null_mx() {
    // Two sinks on the same port at different loopback addresses: MX hosts differ by IP.
    let port = free_port();
    let sink_at = |ip: &str| {
        // smtp-sink takes host:port; SmtpSink picks a port, so start it by hand here.
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut cmd = std::process::Command::new(mb_testkit::require("smtp-sink", "postfix"));
        if nix::unistd::Uid::effective().is_root() {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg("-d")
            .arg(dir.path().join("m."))
            .arg(format!("{ip}:{port}"))
            .arg("100")
            .spawn()
            .unwrap();
        let ip2 = ip.to_string();
        wait_until("sink", Duration::from_secs(10), || {
            std::net::TcpStream::connect((ip2.as_str(), port)).is_ok()
        })
        .unwrap();
        SmtpSink {
            port,
            dir,
            server: mb_testkit::Proc {
                child,
                name: "smtp-sink".into(),
            },
        }
    };
    let a = sink_at("127.0.0.2");
    let b = sink_at("127.0.0.3");
    let dns = Dnsmasq::start(&[
        // pri.test: mx1 (10) is A, mx2 (20) is B.
        "--mx-host=pri.test,mx1.pri.test,10".into(),
        "--mx-host=pri.test,mx2.pri.test,20".into(),
        "--host-record=mx1.pri.test,127.0.0.2".into(),
        "--host-record=mx2.pri.test,127.0.0.3".into(),
        // fb.test: the best MX refuses connections (nothing listens on 127.0.0.4).
        "--mx-host=fb.test,mx1.fb.test,10".into(),
        "--mx-host=fb.test,mx2.fb.test,20".into(),
        "--host-record=mx1.fb.test,127.0.0.4".into(),
        "--host-record=mx2.fb.test,127.0.0.3".into(),
        // aonly.test has no MX: its own address is used (RFC 5321 §5.1). dnsmasq is made
        // authoritative for the test zones so that a missing type gets "no data", not a
        // refusal.
        "--auth-server=ns.test,127.0.0.1".into(),
        "--auth-zone=aonly.test".into(),
        "--auth-zone=pri.test".into(),
        "--auth-zone=fb.test".into(),
        "--auth-zone=null.test".into(),
        "--auth-zone=sender.test".into(),
        "--host-record=aonly.test,127.0.0.3".into(),
        // null.test accepts no mail (RFC 7505).
        "--mx-host=null.test,.,0".into(),
        // sender.test, where bounces go: A.
        "--mx-host=sender.test,mx.sender.test,10".into(),
        "--host-record=mx.sender.test,127.0.0.2".into(),
    ])
    .unwrap();
    // The sinks are on loopback, where a domain's own MX may never lead (it would be
    // this gateway: 5.4.6, see backscatter.rs); transport entries naming each domain make
    // them configured next hops, still found by MX lookup with its priorities, fallback,
    // A-record fallback, null MX and NXDOMAIN handling.
    let transport = [
        "pri.test",
        "fb.test",
        "aonly.test",
        "null.test",
        "missing.pri.test",
        "sender.test",
    ]
    .map(|d| format!("{d}=smtp:{d}:{port}"))
    .join(",");
    let g = start(&format!(
        "[smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\ntransport = \"{transport}\"\n\
         [network.dns]\nservers = \"{}\"\n[network.smtp.tls]\noutbound = \"none\"\n",
        dns.servers()
    ));
    // The reinjection port is trusted to relay.
    send(g.reinject, "alice@sender.test", &["u@pri.test"], "to-pri");
    send(g.reinject, "alice@sender.test", &["u@fb.test"], "to-fb");
    send(
        g.reinject,
        "alice@sender.test",
        &["u@aonly.test"],
        "to-aonly",
    );
    let bounced = send(g.reinject, "alice@sender.test", &["u@null.test"], "to-null");
    // A domain that does not exist (NXDOMAIN from the authoritative server) bounces too.
    send(
        g.reinject,
        "alice@sender.test",
        &["u@missing.pri.test"],
        "to-missing",
    );
    wait_empty(&g.gw, Duration::from_secs(30));
    let (sa, sb) = (subjects(&a), subjects(&b));
    assert!(sa.contains(&"to-pri".to_string()), "A got {sa:?}");
    assert!(!sb.contains(&"to-pri".to_string()), "B got {sb:?}");
    assert!(sb.contains(&"to-fb".to_string()), "B got {sb:?}");
    assert!(sb.contains(&"to-aonly".to_string()), "B got {sb:?}");
    // The null MX bounced at once; the bounce went to the sender's MX (A).
    let notice = a
        .messages()
        .into_iter()
        .find(|m| m.contains("Undelivered Mail Returned to Sender") && m.contains("u@null.test"))
        .unwrap_or_else(|| panic!("no bounce at A: {:?}", a.messages()));
    assert!(notice.contains("X-Mail-Args: <>"), "{notice}");
    assert!(notice.contains("X-Rcpt-Args: <alice@sender.test>"));
    assert!(notice.contains("Content-Type: multipart/report; report-type=delivery-status"));
    assert!(notice.contains("Final-Recipient: rfc822; u@null.test"));
    assert!(notice.contains("Status: 5.1.10"), "{notice}");
    assert!(notice.contains(&format!("X-Mailborder-Queue-ID: {bounced}")));
    assert!(
        notice.contains("Subject: to-null"),
        "the message comes back"
    );
    let nx = a
        .messages()
        .into_iter()
        .find(|m| m.contains("Final-Recipient: rfc822; u@missing.pri.test"))
        .unwrap_or_else(|| panic!("no bounce for the missing domain: {:?}", a.messages()));
    assert!(
        nx.contains("Status: 5.1.2") && nx.contains("does not exist"),
        "{nx}"
    );
    let log = g.gw.smtpd_log();
    assert!(log.contains("connect to mx1.fb.test[127.0.0.4]"), "{log}");
}

#[test]
fn tls_policy_mandatory_defers_plaintext_peers_and_starttls_is_used_when_offered() {
    // The peer with STARTTLS: another mb-smtpd (self-signed certificate) serving tls.test.
    let peer_port = free_port();
    let mut peer = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {peer_port}\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"mx.tls.test\"\ndomains = \"tls.test\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n",
        free_port()
    ));
    peer.start().unwrap();
    peer.start_smtpd().unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let g = start(&format!(
        "[smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\ntransport = \"tls.test=smtp:[127.0.0.1]:{peer_port},plain.test=smtp:[127.0.0.1]:{}\"\n\
         [network.smtp.tls]\noutbound = \"mandatory\"\n",
        sink.port
    ));
    let plain = send(g.reinject, "alice@sender.test", &["u@plain.test"], "plain");
    send(g.reinject, "alice@sender.test", &["u@tls.test"], "secure");
    // The TLS peer got its message, over TLS.
    wait_until("the TLS delivery", Duration::from_secs(20), || {
        crate::queued(&peer.path("spool"), "incoming").len() == 1
    })
    .unwrap();
    let (msg, _) = crate::queued(&peer.path("spool"), "incoming").remove(0);
    let msg = String::from_utf8_lossy(&msg);
    assert!(msg.contains("with ESMTPS"), "{msg}");
    assert!(msg.contains("TLS"), "{msg}");
    // The plaintext peer: deferred, with the reason in mb-queue, nothing sent.
    let mut entry = serde_json::Value::Null;
    wait_until("the deferral", Duration::from_secs(20), || {
        entry = queue_json(&g.gw)
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == plain.as_str())
            .cloned()
            .unwrap_or_default();
        entry["queue"] == "deferred"
    })
    .unwrap();
    let err = entry["recipients"][0]["last_error"].as_str().unwrap();
    assert!(
        err.contains("TLS is required") && err.contains("does not offer STARTTLS"),
        "{err}"
    );
    assert_eq!(entry["recipients"][0]["state"], "deferred");
    assert!(
        sink.messages().is_empty(),
        "sent in plaintext: {:?}",
        sink.messages()
    );
    let (code, out, _) = text(&g.gw.tool("mb-queue", &["show", &plain]));
    assert_eq!(code, 0);
    assert!(
        out.contains("history:") && out.contains("TLS is required"),
        "{out}"
    );
    // requeue starts it over: tried at once, fresh counters, the admin named in the history.
    // (The deferral is visible a moment before its attempt ends; a requeue then is
    // refused with "being delivered now; try again", and is accepted once it has.)
    let mut requeued = text(&g.gw.tool("mb-queue", &["requeue", &plain]));
    let started = std::time::Instant::now();
    while requeued.0 != 0
        && requeued.2.contains("being delivered now")
        && started.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
        requeued = text(&g.gw.tool("mb-queue", &["requeue", &plain]));
    }
    let (code, out, err) = requeued;
    assert_eq!(code, 0, "{out}{err}");
    wait_until("the requeued attempt", Duration::from_secs(20), || {
        let (_, out, _) = text(&g.gw.tool("mb-queue", &["--json", "show", &plain]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["queue"] == "deferred"
            && v["attempts"] == 1
            && v["history"].as_array().is_some_and(|h| {
                h.iter()
                    .any(|l| l.as_str().unwrap_or("").contains("requeued by"))
            })
    })
    .unwrap();

    // Opportunistic: the same peer is then used without TLS; flush delivers at once.
    let (code, _, err) = text(&g.gw.tool(
        "mb-config",
        &["set", "network.smtp.tls.outbound", "opportunistic"],
    ));
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = text(&g.gw.tool("mb-queue", &["flush"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 deferred message(s)"), "{out}");
    wait_empty(&g.gw, Duration::from_secs(20));
    assert_eq!(subjects(&sink), ["plain"]);
    // Opportunistic TLS still uses STARTTLS where it is offered.
    send(
        g.reinject,
        "alice@sender.test",
        &["u@tls.test"],
        "secure-again",
    );
    wait_until("the second TLS delivery", Duration::from_secs(20), || {
        crate::queued(&peer.path("spool"), "incoming").len() == 2
    })
    .unwrap();
    for (msg, _) in crate::queued(&peer.path("spool"), "incoming") {
        assert!(String::from_utf8_lossy(&msg).contains("with ESMTPS"));
    }
}

#[test]
fn lmtp_to_dovecot_delivers_the_known_recipients_and_bounces_the_unknown_one() {
    let dovecot = mb_testkit::Dovecot::start(&["alice", "bob"]).unwrap();
    let sink = SmtpSink::start(&[]).unwrap();
    let g = start(&format!(
        "[smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"lmtp\"\ntls = \"none\"\n\
         transport = \"sender.test=smtp:[127.0.0.1]:{}\"\n",
        dovecot.port, sink.port
    ));
    let id = send(
        g.port,
        "carol@sender.test",
        &["alice@served.test", "nobody@served.test", "bob@served.test"],
        "over-lmtp",
    );
    wait_empty(&g.gw, Duration::from_secs(30));
    for user in ["alice", "bob"] {
        let mbox = dovecot.mailbox(user);
        assert_eq!(mbox.len(), 1, "{user}: {mbox:?}\n{}", dovecot.log());
        // Final delivery: Return-Path carries the envelope sender.
        assert!(
            mbox[0].starts_with("Return-Path: <carol@sender.test>"),
            "{}",
            mbox[0]
        );
        assert!(mbox[0].contains("Subject: over-lmtp"));
    }
    let notices = sink.messages();
    assert_eq!(notices.len(), 1, "one bounce: {notices:?}");
    let n = &notices[0];
    assert!(n.contains("X-Rcpt-Args: <carol@sender.test>"), "{n}");
    assert!(
        n.contains("Final-Recipient: rfc822; nobody@served.test"),
        "{n}"
    );
    assert!(
        !n.contains("Final-Recipient: rfc822; alice@served.test"),
        "{n}"
    );
    assert!(
        n.contains("Status: 5.1.1") || n.contains("Status: 5."),
        "{n}"
    );
    assert!(n.contains(&format!("X-Mailborder-Queue-ID: {id}")));
    // The message log in mb-rpcd records what happened to each recipient.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut stages = Vec::new();
    wait_until("delivery events", Duration::from_secs(20), || {
        let events = rt.block_on(async {
            let ch = mb_runtime::uds::connect(&g.gw.socket(), "mb-rpcd")
                .await
                .unwrap();
            mb_proto::v1::events_client::EventsClient::new(ch)
                .query(mb_proto::v1::EventQuery {
                    queue_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .events
        });
        stages = events
            .iter()
            .map(|e| (e.stage.clone(), e.recipients.join(",")))
            .collect();
        stages.len() >= 3
    })
    .unwrap_or_else(|e| panic!("{e}: {stages:?}"));
    stages.sort();
    assert_eq!(
        stages,
        [
            ("bounced".to_string(), "nobody@served.test".to_string()),
            (
                "delivered".into(),
                "alice@served.test,bob@served.test".into()
            ),
            (
                "received".into(),
                "alice@served.test,nobody@served.test,bob@served.test".into()
            ),
        ]
    );

    // The same server over its Unix socket.
    let socket = dovecot.socket();
    let (code, _, err) = text(&g.gw.tool(
        "mb-config",
        &["set", "relay.host", &format!("unix:{}", socket.display())],
    ));
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    send(
        g.port,
        "carol@sender.test",
        &["alice@served.test"],
        "over-unix",
    );
    wait_empty(&g.gw, Duration::from_secs(30));
    let mbox = dovecot.mailbox("alice");
    assert_eq!(mbox.len(), 2, "{mbox:?}");
    assert!(mbox.iter().any(|m| m.contains("Subject: over-unix")));
    assert!(
        g.gw.smtpd_log()
            .contains(&format!("relay=unix:{}", socket.display()))
    );
}

#[test]
fn relays_through_a_private_postfix_instance() {
    let sink = SmtpSink::start(&[]).unwrap();
    let postfix = mb_testkit::Postfix::start(&format!("[127.0.0.1]:{}", sink.port), "").unwrap();
    let g = start(&format!(
        "[smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
        postfix.port
    ));
    let ids: Vec<String> = (0..5)
        .map(|i| {
            send(
                g.port,
                "alice@sender.test",
                &["bob@served.test", "carol@served.test"],
                &format!("via-postfix-{i}"),
            )
        })
        .collect();
    wait_empty(&g.gw, Duration::from_secs(30));
    wait_until(
        "postfix to pass everything on",
        Duration::from_secs(30),
        || subjects(&sink).len() >= 5,
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", subjects(&sink), postfix.log()));
    let mut got = subjects(&sink);
    got.sort();
    assert_eq!(
        got,
        (0..5)
            .map(|i| format!("via-postfix-{i}"))
            .collect::<Vec<_>>()
    );
    let log = postfix.log();
    // Postfix saw our client, both recipients in one transaction, and the DSN extension.
    assert!(
        log.contains("client=localhost[127.0.0.1]") || log.contains("[127.0.0.1]"),
        "{log}"
    );
    for m in sink.messages() {
        assert!(
            m.contains("X-Rcpt-Args: <bob@served.test>")
                && m.contains("X-Rcpt-Args: <carol@served.test>"),
            "{m}"
        );
        assert!(m.contains("by gw.served.test (Mailborder)"), "{m}");
    }
    assert_eq!(ids.len(), 5);
}

#[test]
fn relay_host_certificate_is_verified_and_auth_goes_only_over_tls() {
    // The relay host: another mb-smtpd whose submission port requires STARTTLS and AUTH.
    let (cert, key) = mb_testkit::self_signed();
    let submission = free_port();
    let mut relay = Gateway::new("");
    std::fs::write(relay.path("relay.crt"), &cert).unwrap();
    std::fs::write(relay.path("relay.key"), &key).unwrap();
    std::fs::write(
        &relay.config,
        format!(
            "{}\n[network.smtp]\nlisten = \"127.0.0.1\"\nport = {}\n\
             [network.smtp.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [network.submission]\nenabled = true\nport = {submission}\n\
             [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
             [smtp]\nhostname = \"relay.served.test\"\ndomains = \"served.test\"\n\
             [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n",
            std::fs::read_to_string(&relay.config).unwrap(),
            free_port(),
            relay.path("relay.crt").display(),
            relay.path("relay.key").display(),
            free_port()
        ),
    )
    .unwrap();
    relay.start().unwrap();
    relay.start_smtpd().unwrap();
    let (code, _, err) = crate::smtp::mb_user(&relay, &["add", "gateway"], "relay password 1\n");
    assert_eq!(code, 0, "{err}");
    // The gateway relays other people's mail: its account may send as sender.test
    // (sender binding refuses any other MAIL FROM from an authenticated client).
    let (code, _, err) =
        crate::smtp::mb_user(&relay, &["alias", "add", "gateway", "@sender.test"], "");
    assert_eq!(code, 0, "{err}");

    // An authority that did not sign the relay's certificate.
    let other_ca = relay.path("other-ca.crt");
    std::fs::write(&other_ca, mb_testkit::self_signed().0).unwrap();
    let g = start(&format!(
        "[smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {submission}\ntls = \"starttls\"\n\
         \"auth.username\" = \"gateway\"\n\"auth.password\" = \"wrong password\"\n\
         \"tls.ca_file\" = \"{}\"\n",
        other_ca.display()
    ));
    let id = send(
        g.port,
        "alice@sender.test",
        &["bob@served.test"],
        "to-relay",
    );
    let last_error = |g: &Gw| {
        queue_json(&g.gw)
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id.as_str())
            .map(|e| {
                e["recipients"][0]["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    // A certificate from an unknown authority: deferred, never sent.
    let mut err = String::new();
    wait_until("a verification failure", Duration::from_secs(20), || {
        err = last_error(&g);
        !err.is_empty()
    })
    .unwrap();
    assert!(
        err.contains("STARTTLS") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    // The right authority, the wrong password: AUTH is refused, mail waits.
    let set = |k: &str, v: &str| {
        let (code, _, err) = text(&g.gw.tool("mb-config", &["set", k, v]));
        assert_eq!(code, 0, "{k}: {err}");
    };
    set(
        "relay.tls.ca_file",
        &relay.path("relay.crt").display().to_string(),
    );
    std::thread::sleep(Duration::from_millis(500));
    text(&g.gw.tool("mb-queue", &["flush"]));
    wait_until("an AUTH refusal", Duration::from_secs(20), || {
        err = last_error(&g);
        err.contains("refused AUTH")
    })
    .unwrap_or_else(|e| panic!("{e}: {err}"));
    assert!(
        !g.gw.smtpd_log().contains("wrong password"),
        "a secret reached the log"
    );
    // The right password: delivered over TLS with AUTH.
    set("relay.auth.password", "relay password 1");
    std::thread::sleep(Duration::from_millis(500));
    text(&g.gw.tool("mb-queue", &["flush"]));
    wait_empty(&g.gw, Duration::from_secs(20));
    let (msg, env) = crate::queued(&relay.path("spool"), "incoming").remove(0);
    assert_eq!(env.auth_user, "gateway");
    assert!(String::from_utf8_lossy(&msg).contains("with ESMTPSA"));

    // Without TLS the password is never sent: the message waits with the reason.
    set("relay.tls", "none");
    std::thread::sleep(Duration::from_millis(500));
    let id2 = send(g.port, "alice@sender.test", &["bob@served.test"], "no-tls");
    wait_until(
        "the refusal to authenticate in clear",
        Duration::from_secs(20),
        || {
            queue_json(&g.gw).as_array().unwrap().iter().any(|e| {
                e["id"] == id2.as_str()
                    && e["recipients"][0]["last_error"]
                        .as_str()
                        .unwrap_or("")
                        .contains("not encrypted")
            })
        },
    )
    .unwrap();
}
