//! The configuration store on real MariaDB and PostgreSQL servers started by the test.

use mb_testkit::{Gateway, MariaDb, Postgres, text};

fn exercise(url: &str, dialect: &str) {
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n[database]\nurl = \"{url}\"\n{}",
        crate::rpcd::KEEP_THE_LOG
    ));
    gw.start().unwrap();
    // The message log's searches and retention on this dialect (first: the round trip
    // leaves values set that a restart would refuse).
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(crate::rpcd::search_and_prune(&mut gw));
    // Web accounts, sessions and keys (migration 0015) on this dialect, with the
    // default lockout (the round trip below changes it).
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(crate::web_auth::round_trip(&gw.socket()));
    crate::round_trip_every_key(&gw);

    // The database is reported, without its password.
    let (code, out, err) = text(&gw.tool("mb-status", &["--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let db = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "database")
        .unwrap();
    assert_eq!(
        (db["state"].as_str(), db["detail"].as_str()),
        (Some("ok"), Some(dialect))
    );
    assert!(
        !db["address"].as_str().unwrap().contains("mb-secret-pw"),
        "{db}"
    );

    // The quarantine index and the message log's searches on this dialect: two messages
    // found on disk are indexed by purge, listed by recipient, and their totals summed.
    let root = gw.path("spool/quarantine");
    for (id, rcpt, size) in [
        ("DBQ1", "a@served.test", 100),
        ("DBQ2", "first_last@served.test", 50),
    ] {
        // An hour old: well inside any retention the round trip above left set.
        let at = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
            - 3_600_000;
        let entry = mb_core::quarantine::Entry {
            id: id.into(),
            at_unix_ms: at,
            sender: "x@sender.test".into(),
            recipients: vec![rcpt.into(), "c@served.test".into()],
            // A subject with a terminal escape and a right-to-left override.
            subject: format!("subject {id}\x1b[2J\u{202e}"),
            size,
            path: mb_runtime::quarantine::relative_path(at, id),
            ..Default::default()
        };
        mb_runtime::quarantine::store(&root, &entry, b"Subject: x\r\n\r\nbody\r\n").unwrap();
    }
    let (code, out, err) = text(&gw.tool("mb-quarantine", &["purge", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = text(&gw.tool(
        "mb-quarantine",
        &["list", "--json", "--to", "first_last@served.test"],
    ));
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"].as_array().map(Vec::len), Some(1), "{v:#}");
    assert_eq!(v["entries"][0]["subject"], "subject DBQ2\x1b[2J\u{202e}");
    // Printed for a person, message text cannot act on the terminal.
    for args in [&["list"][..], &["show", "DBQ1"]] {
        let (code, out, err) = text(&gw.tool("mb-quarantine", args));
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("[2J") && !out.contains('\x1b') && !out.contains('\u{202e}'),
            "{args:?}: {out:?}"
        );
    }
    assert_eq!(
        (v["total"].as_u64(), v["total_bytes"].as_u64()),
        (Some(2), Some(150)),
        "{v:#}"
    );
    // `_` and `%` are the address's own characters on every dialect, not wildcards.
    for search in ["first%@served.test", "firstXlast@served.test"] {
        let (code, out, err) = text(&gw.tool("mb-quarantine", &["list", "--json", "--to", search]));
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["entries"].as_array().map(Vec::len),
            Some(0),
            "{search}: {v:#}"
        );
    }
    let (code, out, err) = text(&gw.tool(
        "mb-log",
        &[
            "--json",
            "--to",
            "c@served.test",
            "--verdict",
            "quarantine",
            "--since",
            "2020-01-01",
        ],
    ));
    assert_eq!((code, out.trim()), (0, "[]"), "{err}");

    // Policies on this dialect, with and without thresholds (NULL doubles).
    for add in [
        &[
            "add",
            "strict",
            "--action",
            "score",
            "--to",
            "ceo@served.test",
            "--tag",
            "2.5",
        ][..],
        &[
            "add",
            "partners",
            "--action",
            "allow",
            "--from",
            "*@partner.test",
        ],
    ] {
        let (code, out, err) = text(&gw.tool("mb-policy", add));
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, err) = text(&gw.tool("mb-policy", &["--json", "list"]));
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v[0]["name"].as_str(), v[0]["tag"].as_f64()),
        (Some("strict"), Some(2.5)),
        "{v:#}"
    );
    assert!(v[1]["tag"].is_null(), "{v:#}");
    // Stored through migration 0008's column: a sender allow is authenticated-only
    // unless added with --unauthenticated.
    assert_eq!(v[1]["unauthenticated"], false, "{v:#}");

    // Valid recipients (migration 0011) on this dialect: stored lowercase, versioned,
    // checked with wildcards and extensions, removed.
    let recipient = |args: &[&str]| text(&gw.tool("mb-recipient", args));
    let (code, out, err) = recipient(&["--json", "add", "Bob@Served.test", "sales-*@served.test"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = recipient(&["--json", "check", "sales-eu+x@served.test"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"pattern\":\"sales-*@served.test\""), "{out}");
    let (code, out, err) = recipient(&["--json", "del", "bob@served.test"]);
    assert_eq!(
        (code, out.contains("\"removed\":1")),
        (0, true),
        "{out}{err}"
    );
    let (_, out, _) = recipient(&["list"]);
    assert_eq!(out.trim(), "sales-*@served.test");

    // Overrides survive a restart (the listener keys are put back first so it can start).
    assert_eq!(
        text(&gw.tool("mb-config", &["unset", "network.rpcd.tcp.enabled"])).0,
        0
    );
    assert_eq!(gw.stop(), Some(0), "{}", gw.log());
    gw.start().unwrap();
    let (_, out, _) = text(&gw.tool("mb-config", &["get", "smtp.message_size_limit"]));
    assert_eq!(out.trim(), "10M");
    let (_, out, _) = text(&gw.tool(
        "mb-config",
        &["--json", "history", "smtp.message_size_limit"],
    ));
    let h: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(h[0]["new"], "10M");
    assert_eq!(h[0]["user"], "root");
    assert!(
        !gw.log().contains("mb-secret-pw"),
        "the database password reached the log"
    );
}

#[test]
fn config_store_on_mariadb() {
    let db = MariaDb::start().unwrap();
    exercise(&db.url(), "mysql");
}

#[test]
fn config_store_on_postgresql() {
    let db = Postgres::start().unwrap();
    exercise(&db.url(), "postgres");
}

/// MariaDB compares recipient patterns byte for byte (`utf8mb4_bin`, as sender aliases
/// too), as SQLite and PostgreSQL do: with `utf8mb4_unicode_ci`, `josé` equals `jose` and
/// `ß` equals `ss`, so the second pattern is refused as a duplicate (and that user gets
/// 550) and deleting one removes the other. (Sender aliases are ASCII addresses, so only
/// the recipients can show it.)
#[test]
fn patterns_differing_only_by_an_accent_are_distinct_on_mariadb() {
    let db = MariaDb::start().unwrap();
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n[database]\nurl = \"{}\"\n",
        db.url()
    ));
    gw.start().unwrap();
    let patterns = [
        "josé@served.test",
        "jose@served.test",
        "straße@served.test",
        "strasse@served.test",
    ];
    let mut args = vec!["add"];
    args.extend(patterns);
    let (code, out, err) = text(&gw.tool("mb-recipient", &args));
    assert_eq!(code, 0, "{out}{err}");
    let list = |gw: &Gateway| {
        let (code, out, err) = text(&gw.tool("mb-recipient", &["list"]));
        assert_eq!(code, 0, "{err}");
        let mut lines: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
        lines.sort();
        lines
    };
    let mut want: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    want.sort();
    assert_eq!(list(&gw), want);
    let (code, out, err) = text(&gw.tool("mb-recipient", &["del", "josé@served.test"]));
    assert_eq!(code, 0, "{out}{err}");
    want.retain(|p| p != "josé@served.test");
    assert_eq!(list(&gw), want, "deleting josé left jose");
}
