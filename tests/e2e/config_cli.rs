//! mb-config against mb-rpcd on SQLite: every key, bad input, files, reloads.

use std::fs;

use mb_testkit::{Gateway, text};
use nix::sys::signal::Signal;

const ONLY_RPCD: &str = "[smtp]\nenabled = false\n[filter]\nenabled = false\n";

#[test]
fn every_key_round_trips_on_sqlite() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    crate::round_trip_every_key(&gw);

    // show says where a value comes from; unset restores the file value or the default.
    let (code, out, _) = text(&gw.tool("mb-config", &["--json", "show", "network.smtp"]));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let port = v["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["key"] == "network.smtp.port")
        .unwrap();
    assert_eq!(
        (port["value"].as_str(), port["source"].as_str()),
        (Some("8"), Some("database"))
    );
    let (code, out, _) = text(&gw.tool("mb-config", &["unset", "network.smtp.port"]));
    assert_eq!(code, 0);
    assert!(out.starts_with("network.smtp.port = 25 (default)"), "{out}");
    assert!(
        out.contains("systemctl restart mb-smtpd"),
        "restart hint missing: {out}"
    );
    let (_, out, _) = text(&gw.tool("mb-config", &["unset", "smtp.enabled"]));
    assert!(out.starts_with("smtp.enabled = false (file)"), "{out}");

    // Secrets are masked by show unless asked, and never reach the log or the audit trail.
    let (_, out, _) = text(&gw.tool("mb-config", &["show", "relay.auth"]));
    assert!(
        out.contains("relay.auth.password") && out.contains("********"),
        "{out}"
    );
    assert!(!out.contains("0123456789abcdef-secret"), "{out}");
    let (_, out, _) = text(&gw.tool(
        "mb-config",
        &["show", "--show-secrets", "relay.auth.password"],
    ));
    assert!(out.contains("0123456789abcdef-secret"), "{out}");
    let (code, out, _) = text(&gw.tool("mb-config", &["--json", "history", "relay.auth.password"]));
    assert_eq!(code, 0);
    assert!(
        !out.contains("0123456789abcdef-secret") && out.contains("********"),
        "{out}"
    );
    let (_, out, _) = text(&gw.tool("mb-config", &["history", "network.smtp.port"]));
    assert!(
        out.contains("root unset network.smtp.port") && out.contains("root set network.smtp.port"),
        "{out}"
    );
    assert!(
        !gw.log().contains("0123456789abcdef-secret"),
        "a secret reached the log"
    );
    assert_eq!(
        gw.stop(),
        Some(0),
        "mb-rpcd should exit 0 after SIGTERM:\n{}",
        gw.log()
    );
    assert!(
        !gw.socket().exists(),
        "socket left behind after a clean stop"
    );
}

#[test]
fn documented_examples_work_as_written() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    for (key, value, shown) in [
        (
            "network.smtp.listen",
            "203.0.113.10,203.0.113.11",
            "203.0.113.10,203.0.113.11",
        ),
        ("network.submission.require_tls", "true", "true"),
        ("network.dns.cache.ttl", "300", "5m"),
        (
            "network.dns.servers",
            "8.8.8.8,8.8.4.4,1.1.1.1",
            "8.8.8.8,8.8.4.4,1.1.1.1",
        ),
        ("network.tls.min_version", "1.2", "1.2"),
        ("network.smtp.tls.outbound", "mandatory", "mandatory"),
        ("network.https.rate_limit", "60", "60"),
        ("network.rpcd.tcp.bind", "127.0.0.1", "127.0.0.1"),
        ("cluster.bind", "0.0.0.0", "0.0.0.0"),
        ("network.smtp.max_per_source", "10", "10"),
    ] {
        let (code, out, err) = text(&gw.tool("mb-config", &["set", key, value]));
        assert_eq!(code, 0, "{key}: {err}");
        assert_eq!(out.lines().next().unwrap(), format!("{key} = {shown}"));
    }
    let (_, out, _) = text(&gw.tool("mb-config", &["set", "network.smtp.listen", "127.0.0.1"]));
    assert!(
        out.contains("note: restart to apply: systemctl restart mb-smtpd"),
        "{out}"
    );
    let (_, out, _) = text(&gw.tool("mb-config", &["set", "spam.threshold.tag", "5"]));
    assert!(
        !out.contains("restart"),
        "a live key asked for a restart: {out}"
    );
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["set", "network.smtp.prot", "25"],
            "did you mean network.smtp.port?",
        ),
        (
            &["get", "spam.treshold.tag"],
            "did you mean spam.threshold.tag?",
        ),
        (
            &["set", "network.submission.enabled", "maybe"],
            "expected true or false",
        ),
        (
            &["set", "network.smtp.port", "70000"],
            "out of range 1..65535",
        ),
        (
            &["set", "network.smtp.port", "25x"],
            "expected a whole number",
        ),
        (
            &["set", "smtp.message_size_limit", "50Q"],
            "unknown size unit",
        ),
        (
            &["set", "relay.transport", "example.org=uucp:host"],
            "the protocol must be smtp or lmtp",
        ),
        (&["set", "spam.rbl.ip", "zen.example"], "is not LIST=WEIGHT"),
        (
            &["set", "network.smtp.listen", "203.0.113.300"],
            "not an IP address",
        ),
        (
            &["set", "network.smtp.tls.inbound", "required"],
            "expected one of none, enabled, mandatory",
        ),
        (
            &["set", "paths.run_dir", "/tmp/x"],
            "read from the configuration file only",
        ),
        (&["show", "nosuchsection"], "unknown key"),
    ];
    for (args, needle) in cases {
        let (code, out, err) = text(&gw.tool("mb-config", args));
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Usage errors exit 2, like every clap tool.
    let (code, _, _) = text(&gw.tool("mb-config", &["set", "only-a-key"]));
    assert_eq!(code, 2);
    // Nothing above changed anything.
    let (_, out, _) = text(&gw.tool("mb-config", &["--json", "history"]));
    assert_eq!(out.trim(), "[]");
    // A cross-key problem is accepted but warned about.
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "spam.threshold.tag", "50"]));
    assert_eq!(code, 0);
    assert!(err.contains("warning: spam thresholds must rise"), "{err}");
}

#[test]
fn malformed_file_stops_the_daemon_before_binding() {
    let gw =
        Gateway::new("[network.smtp]\nport = 25\nprot = 26\n[smtp]\nmax_recipients = \"lots\"\n");
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(64), "{err}");
    let file = gw.config.display().to_string();
    // The test kit writes its own header first: find the lines rather than count them.
    let written = fs::read_to_string(&gw.config).unwrap();
    let line_of = |needle: &str| 1 + written.lines().position(|l| l == needle).unwrap();
    let (prot, max) = (line_of("prot = 26"), line_of("max_recipients = \"lots\""));
    assert!(
        err.contains(&format!(
            "{file}:{prot}:1: network.smtp.prot: unknown key; did you mean network.smtp.port?"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:{max}:1: smtp.max_recipients: expected a whole number"
        )),
        "{err}"
    );
    assert!(
        !gw.socket().exists() && !gw.path("run").exists(),
        "bound something before failing"
    );
    let (code, _, verr) = text(&gw.tool("mb-config", &["validate"]));
    assert_eq!(code, 1);
    assert!(verr.contains(&format!("{file}:{prot}:1")), "{verr}");

    // TOML syntax errors are located too.
    fs::write(&gw.config, "[network.smtp\nport = 25\n").unwrap();
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains(&format!("{file}:1:")), "{err}");

    // A missing --config file is an error, not silently the defaults.
    let out = std::process::Command::new(mb_testkit::bin("mb-rpcd"))
        .args(["--config", "/nonexistent/mailborder.toml"])
        .output()
        .unwrap();
    let (code, _, err) = text(&out);
    assert_eq!(code, 64);
    assert!(
        err.contains("/nonexistent/mailborder.toml:0:0: cannot read"),
        "{err}"
    );
}

#[test]
fn cross_key_problems_stop_the_daemon() {
    let gw = Gateway::new("[network.rpcd.tcp]\nenabled = true\nbind = \"0.0.0.0\"\n");
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("beyond loopback: set network.rpcd.tcp.tls.cert"),
        "{err}"
    );
    assert!(
        err.contains("beyond loopback: set network.rpcd.tcp.api_key"),
        "{err}"
    );
    assert!(!gw.socket().exists());
}

#[test]
fn unreachable_database_is_named_with_the_reason() {
    let port = mb_testkit::free_port();
    let gw = Gateway::new(&format!(
        "[database]\nurl = \"postgres://mb:hunter2-pw@127.0.0.1:{port}/mb\"\n"
    ));
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains(&format!(
            "cannot open database postgres://mb:********@127.0.0.1:{port}/mb"
        )),
        "{err}"
    );
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    assert!(!err.contains("hunter2-pw"), "password leaked: {err}");
    let gw = Gateway::new("[database]\nurl = \"oracle://x/y\"\n");
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(69));
    assert!(
        err.contains("unsupported database URL oracle://x/y"),
        "{err}"
    );
    // A SQLite path that cannot be created.
    let gw = Gateway::new("[database]\nurl = \"sqlite:///proc/mailborder/x.db\"\n");
    let (code, err) = gw.run_rpcd_expecting_exit();
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("cannot open database sqlite:///proc/mailborder/x.db"),
        "{err}"
    );
}

#[test]
fn shipped_example_config_is_current_and_valid() {
    let path = mb_testkit::source_root().join("etc/mailborder/mailborder.toml");
    let shipped = fs::read_to_string(&path).unwrap();
    assert!(
        shipped == mb_core::config::render_example(),
        "etc/mailborder/mailborder.toml is stale: run `cargo xtask gen-config`"
    );
    let out = std::process::Command::new(mb_testkit::bin("mb-config"))
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let (code, stdout, err) = text(&out);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("valid"));
    // Every key is in it.
    for def in mb_core::registry::KEYS {
        let (_, name) = mb_core::config::toml_location(def.key);
        assert!(
            shipped.contains(&format!("#{name} = ")),
            "{} missing",
            def.key
        );
    }
}

#[test]
fn list_describes_keys_without_a_daemon() {
    let gw = Gateway::new("");
    let (code, out, err) = text(&gw.tool("mb-config", &["list", "network.smtp"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("network.smtp.port (integer [1..65535]) default \"25\" (restart)"),
        "{out}"
    );
    assert!(
        out.contains("network.smtp.timeout (duration [1s..1h]) default \"5m\""),
        "{out}"
    );
    let (_, out, _) = text(&gw.tool("mb-config", &["--json", "list"]));
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all.as_array().unwrap().len(), mb_core::registry::KEYS.len());
    let (code, _, err) = text(&gw.tool("mb-config", &["list", "netwrok"]));
    assert_eq!(code, 1);
    assert!(err.contains("no key under"), "{err}");
    // Commands that need mb-rpcd say how to start it.
    let (code, _, err) = text(&gw.tool("mb-config", &["get", "smtp.hostname"]));
    assert_eq!(code, 69);
    assert!(
        err.contains("mb-rpcd is not running") && err.contains("systemctl start mb-rpcd"),
        "{err}"
    );
}

#[test]
fn reload_rereads_the_file_and_keeps_it_when_broken() {
    let mut gw = Gateway::new(ONLY_RPCD);
    gw.start().unwrap();
    let base = fs::read_to_string(&gw.config).unwrap();
    fs::write(&gw.config, format!("{base}[relay]\nport = 2526\n")).unwrap();
    gw.rpcd.as_ref().unwrap().signal(Signal::SIGHUP);
    mb_testkit::wait_until("SIGHUP reload", std::time::Duration::from_secs(10), || {
        text(&gw.tool("mb-config", &["get", "relay.port"])).1.trim() == "2526"
    })
    .unwrap();
    let (_, out, _) = text(&gw.tool("mb-config", &["--json", "show", "relay.port"]));
    assert!(out.contains("\"source\": \"file\""), "{out}");

    fs::write(&gw.config, format!("{base}[relay]\nport = 2527\n")).unwrap();
    let (code, out, err) = text(&gw.tool("mb-config", &["reload"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mb-rpcd: reloaded"), "{out}");
    assert_eq!(
        text(&gw.tool("mb-config", &["get", "relay.port"])).1.trim(),
        "2527"
    );

    fs::write(&gw.config, format!("{base}[relay]\nport = \"many\"\n")).unwrap();
    let (code, _, err) = text(&gw.tool("mb-config", &["reload"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("relay.port: expected a whole number"), "{err}");
    assert_eq!(
        text(&gw.tool("mb-config", &["get", "relay.port"])).1.trim(),
        "2527"
    );
}
