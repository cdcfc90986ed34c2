//! The configuration store on real MariaDB and PostgreSQL servers started by the test.

use mb_testkit::{Gateway, MariaDb, Postgres, text};

fn exercise(url: &str, dialect: &str) {
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n[database]\nurl = \"{url}\"\n"
    ));
    gw.start().unwrap();
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
