//! Live keys that rebuild state in a running daemon: `network.dns.*` gives mb-filter a
//! new resolver, so the next verdict is decided from the new servers' answers.

use std::time::Duration;

use mb_testkit::{Dnsmasq, Gateway, SmtpSink, free_port, text, wait_until};

use crate::smtp::Raw;

fn send(port: u16) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO mail.sender.test");
    c.cmd("MAIL FROM:<alice@moving.test>");
    c.cmd("RCPT TO:<bob@served.test>");
    c.cmd("DATA");
    let r = c.cmd(
        "From: alice@moving.test\r\nTo: bob@served.test\r\nSubject: moving\r\n\
         Date: Sun, 22 Nov 2026 01:00:00 +0000\r\nMessage-ID: <m@moving.test>\r\n\r\nhello\r\n.",
    );
    c.cmd("QUIT");
    r
}

/// A DNS server for .test whose SPF record for moving.test allows `spf_ip`; DMARC says
/// reject, so an SPF fail (unaligned, unsigned) is refused in the session.
fn dns(spf_ip: &str) -> Dnsmasq {
    Dnsmasq::start(&[
        "--auth-server=ns.test,127.0.0.1".into(),
        "--auth-zone=test".into(),
        format!("--txt-record=moving.test,v=spf1 ip4:{spf_ip} -all"),
        "--txt-record=_dmarc.moving.test,v=DMARC1; p=reject".into(),
    ])
    .unwrap()
}

#[test]
fn changing_network_dns_servers_gives_a_running_filter_a_new_resolver() {
    let fails = dns("192.0.2.1");
    let passes = dns("127.0.0.1");
    let sink = SmtpSink::start(&[]).unwrap();
    let port = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [network.dns]\nservers = \"{}\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [filter]\nenabled = true\nworkers = 1\n",
        free_port(),
        fails.servers(),
        sink.port
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    let filter_log = || std::fs::read_to_string(gw.path("filter-1.log")).unwrap_or_default();

    let r = send(port);
    assert!(
        r.starts_with("550 5.7.1") && r.contains("DMARC"),
        "server A says SPF fail: {r}\n{}",
        filter_log()
    );

    let (code, out, err) = text(&gw.tool(
        "mb-config",
        &["set", "network.dns.servers", &passes.servers()],
    ));
    assert_eq!(code, 0, "{out}{err}");
    wait_until("the new resolver", Duration::from_secs(20), || {
        filter_log().contains("the sender checks use a new resolver")
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", filter_log()));
    let r = send(port);
    assert!(
        r.starts_with("250"),
        "server B says SPF pass, but the worker still asked A: {r}\n{}",
        filter_log()
    );

    // network.dns.dnssec: the new resolver validates. This offline zone has no chain of
    // trust to the root, so nothing it says can be validated and SPF is a temporary
    // error instead of a pass.
    let (code, out, err) = text(&gw.tool("mb-config", &["set", "network.dns.dnssec", "true"]));
    assert_eq!(code, 0, "{out}{err}");
    wait_until("the validating resolver", Duration::from_secs(20), || {
        filter_log()
            .matches("the sender checks use a new resolver")
            .count()
            == 2
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", filter_log()));
    let r = send(port);
    assert!(r.starts_with("250"), "{r}\n{}", filter_log());
    // A delivery is complete once its Authentication-Results is there: the sink may
    // show a message while it is still being written.
    wait_until("two deliveries", Duration::from_secs(20), || {
        let m = sink.messages();
        m.len() == 2 && m.iter().all(|m| m.contains("spf="))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", sink.messages()));
    let spf: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            let at = m.find("spf=").expect("an SPF result");
            m[at..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        spf.contains(&"spf=pass".to_string()) && spf.contains(&"spf=temperror".to_string()),
        "{spf:?}"
    );
}

/// `mb-config show --daemon`: what a running worker uses, from the worker itself.
#[test]
fn show_daemon_reports_the_generation_and_values_a_worker_runs_with() {
    let (port, new_port) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nlisten = \"127.0.0.1\"\nport = {port}\n"
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    let show = |gw: &Gateway, prefix: &str| -> serde_json::Value {
        let (code, out, err) = text(&gw.tool(
            "mb-config",
            &["--json", "show", "--daemon", "mb-filter@1", prefix],
        ));
        assert_eq!(code, 0, "{out}{err}");
        serde_json::from_str(&out).unwrap()
    };
    let value = |v: &serde_json::Value, key: &str| -> serde_json::Value {
        v["values"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} missing: {v}"))
    };
    let before = show(&gw, "");
    assert_eq!(before["daemon"], "mb-filter@1");
    assert_eq!(before["confirmed"], true, "{before}");
    // The worker's keys only: filter.port is, network.smtp.port is not.
    assert_eq!(value(&before, "filter.port")["value"], port.to_string());
    assert_eq!(value(&before, "filter.port")["source"], "file");
    assert!(
        !before["values"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["key"] == "network.smtp.port"),
        "{before}"
    );

    let set = |k: &str, v: &str| {
        let (code, out, err) = text(&gw.tool("mb-config", &["set", k, v]));
        assert_eq!(code, 0, "{out}{err}");
    };
    set("spam.threshold.tag", "3.5");
    set("filter.port", &new_port.to_string());
    let mut now = show(&gw, "");
    wait_until("the worker to follow", Duration::from_secs(20), || {
        now = show(&gw, "");
        value(&now, "spam.threshold.tag")["value"] == "3.5"
    })
    .unwrap_or_else(|e| panic!("{e}: {now}"));
    assert!(
        now["generation"].as_u64() > before["generation"].as_u64(),
        "{before}\n{now}"
    );
    assert_eq!(value(&now, "spam.threshold.tag")["source"], "database");
    // A restart-only key runs with its start value until a restart, and says so.
    let fport = value(&now, "filter.port");
    assert_eq!(fport["value"], port.to_string(), "{fport}");
    assert_eq!(fport["restart"], true, "{fport}");
    assert_eq!(fport["pending"], new_port.to_string(), "{fport}");
    let (code, out, _) = text(&gw.tool(
        "mb-config",
        &["show", "--daemon", "mb-filter@1", "filter.port"],
    ));
    assert_eq!(code, 0);
    assert!(
        out.contains("confirmed by mb-rpcd")
            && out.contains(&format!("a restart applies {new_port}")),
        "{out}"
    );

    // mb-rpcd goes away: the worker still answers, and says it runs on its cache.
    assert_eq!(gw.stop(), Some(0));
    wait_until("the worker to notice", Duration::from_secs(20), || {
        show(&gw, "spam")["confirmed"] == false
    })
    .unwrap();
    let (code, out, _) = text(&gw.tool("mb-config", &["show", "--daemon", "mb-filter@1", "spam"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("running on its cached overrides") && out.contains("3.5"),
        "{out}"
    );
}

fn relay(port: u16, subject: &str) -> String {
    let mut c = Raw::connect(port);
    c.reply();
    c.cmd("EHLO client.served.test");
    c.cmd("MAIL FROM:<alice@served.test>");
    c.cmd("RCPT TO:<u@dest.test>");
    c.cmd("DATA");
    let r = c.cmd(&format!(
        "From: alice@served.test\r\nTo: u@dest.test\r\nSubject: {subject}\r\n\r\nhello\r\n."
    ));
    c.cmd("QUIT");
    r
}

/// mb-smtpd's delivery resolver follows `network.dns.servers` too: the next hop's name
/// resolves to an address where nothing listens on server A, to the sink on server B.
#[test]
fn changing_network_dns_servers_gives_a_running_smtpd_a_new_resolver_for_delivery() {
    let sink = SmtpSink::start(&[]).unwrap();
    let nowhere = Dnsmasq::start(&["--host-record=mx.dest.test,127.0.0.4".into()]).unwrap();
    let sink_host = Dnsmasq::start(&["--host-record=mx.dest.test,127.0.0.1".into()]).unwrap();
    let reinject = free_port();
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {}\n[network.smtp.tls]\noutbound = \"none\"\n\
         [network.reinject]\nport = {reinject}\n\
         [network.dns]\nservers = \"{}\"\n\
         [smtp]\nhostname = \"gw.served.test\"\ndomains = \"served.test\"\n\
         [relay]\ntransport = \"dest.test=smtp:[mx.dest.test]:{}\"\n[filter]\nenabled = false\n",
        free_port(),
        nowhere.servers(),
        sink.port
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let subjects = || {
        sink.messages()
            .iter()
            .filter_map(|m| {
                m.lines()
                    .find(|l| l.starts_with("Subject: "))
                    .map(str::to_string)
            })
            .collect::<Vec<_>>()
    };
    let r = relay(reinject, "first");
    assert!(r.starts_with("250"), "{r}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(subjects().is_empty(), "{:?}", subjects());

    let (code, out, err) = text(&gw.tool(
        "mb-config",
        &["set", "network.dns.servers", &sink_host.servers()],
    ));
    assert_eq!(code, 0, "{out}{err}");
    wait_until("the new resolver", Duration::from_secs(20), || {
        gw.smtpd_log().contains("deliveries use a new resolver")
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", gw.smtpd_log()));
    let r = relay(reinject, "second");
    assert!(r.starts_with("250"), "{r}");
    wait_until(
        "the second message at the sink",
        Duration::from_secs(20),
        || subjects().contains(&"Subject: second".to_string()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", subjects(), gw.smtpd_log()));
}

/// From the registry: every live key, set to a new value with `mb-config set`, is what
/// each daemon that reads it runs with (as `Control.RunningConfig` reports) within
/// seconds, without a restart.
#[test]
fn every_live_key_reaches_every_daemon_that_reads_it() {
    use mb_core::registry::{Apply, KEYS};
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {}\n[network.reinject]\nport = {}\n\
         [filter]\nlisten = \"127.0.0.1\"\nport = {}\n\
         [milter]\nlisten = \"127.0.0.1\"\nport = {}\n\
         [cluster]\nbind = \"127.0.0.1\"\nport = {}\n",
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port()
    ));
    gw.start().unwrap();
    gw.start_filter(1).unwrap();
    gw.start_smtpd().unwrap();
    gw.start_milter().unwrap();
    gw.start_cluster().unwrap();
    let live: Vec<_> = KEYS
        .iter()
        .filter(|d| d.apply == Apply::Live && !d.file_only)
        .collect();
    assert!(live.len() > 50, "{} live keys", live.len());
    let mut expected = Vec::new();
    for def in &live {
        let (input, canonical) = crate::sample(def);
        let (code, out, err) = text(&gw.tool("mb-config", &["set", def.key, &input]));
        assert_eq!(code, 0, "set {} {input:?}: {out}{err}", def.key);
        let shown = if def.secret {
            mb_core::config::REDACTED.to_string()
        } else {
            canonical
        };
        expected.push((def.key, def.daemons, shown));
    }
    for daemon in [
        "mb-rpcd",
        "mb-smtpd",
        "mb-filter@1",
        "mb-milter",
        "mb-cluster",
    ] {
        let program = daemon.split('@').next().unwrap();
        let mut wrong = Vec::new();
        let done = wait_until(daemon, Duration::from_secs(20), || {
            let (code, out, err) =
                text(&gw.tool("mb-config", &["--json", "show", "--daemon", daemon]));
            assert_eq!(code, 0, "{daemon}: {out}{err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let values = v["values"].as_array().unwrap();
            wrong = expected
                .iter()
                .filter(|(_, daemons, _)| daemons.contains(&program))
                .filter_map(|(key, _, want)| {
                    let got = values.iter().find(|x| x["key"] == *key);
                    let got = got.and_then(|x| x["value"].as_str()).unwrap_or("<missing>");
                    (got != want).then(|| format!("{key}: runs {got}, stored {want}"))
                })
                .collect();
            wrong.is_empty()
        });
        assert!(
            done.is_ok(),
            "{daemon} does not run these live values:\n{}",
            wrong.join("\n")
        );
    }
}
