//! mb-status: exit codes and the JSON shape with everything up, a daemon down, mb-rpcd
//! down, and Redis up and down.

use mb_testkit::{Gateway, Redis, text};
use serde_json::Value;

fn status(gw: &Gateway) -> (i32, Value, String) {
    let (code, out, err) = text(&gw.tool("mb-status", &["--json", "--timeout", "5"]));
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("mb-status --json printed {out:?}: {e}; {err}"));
    (code, v, err)
}

fn daemon<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {v}"))
}

fn component<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {v}"))
}

#[test]
fn exit_codes_and_json_shape() {
    let redis = Redis::start().unwrap();
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n[redis]\nurl = \"{}\"\n",
        redis.url()
    ));
    gw.start().unwrap();

    // Everything enabled is up.
    let (code, v, err) = status(&gw);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["healthy"], true);
    let rpcd = daemon(&v, "mb-rpcd");
    assert_eq!(rpcd["state"], "running");
    assert_eq!(rpcd["enabled"], true);
    assert_eq!(
        rpcd["pid"].as_u64(),
        Some(u64::from(gw.rpcd.as_ref().unwrap().child.id()))
    );
    assert_eq!(rpcd["version"], mb_core::VERSION);
    assert!(rpcd["uptime_seconds"].is_u64());
    assert_eq!(
        rpcd["listening"][0],
        format!("unix:{}", gw.socket().display())
    );
    assert!(rpcd["error"].is_null());
    assert_eq!(component(&v, "database")["state"], "ok");
    assert_eq!(component(&v, "redis")["state"], "ok");
    assert_eq!(
        v["daemons"].as_array().unwrap().len(),
        1,
        "only enabled or running daemons are listed: {v}"
    );

    // The text form has a line per daemon and component.
    let (code, out, _) = text(&gw.tool("mb-status", &[]));
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("mb-rpcd") && l.contains("running")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("database") && l.contains("ok sqlite://")),
        "{out}"
    );

    // --verbose adds every counter, one per line and sorted by name (a set and an unset
    // give mb-rpcd two).
    for args in [
        &["set", "spam.threshold.tag", "4.5"][..],
        &["unset", "spam.threshold.tag"],
    ] {
        assert_eq!(text(&gw.tool("mb-config", args)).0, 0);
    }
    let (code, out, _) = text(&gw.tool("mb-status", &["--verbose"]));
    assert_eq!(code, 0);
    let counters: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("mb-rpcd (version"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .collect();
    assert!(counters.len() >= 2, "{out}");
    assert!(counters.is_sorted(), "{counters:?}");

    // Redis down: unhealthy, and said so.
    drop(redis);
    let (code, v, _) = status(&gw);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["healthy"], false);
    assert_eq!(component(&v, "redis")["state"], "down");
    assert_eq!(daemon(&v, "mb-rpcd")["state"], "running");

    // An enabled daemon that is not running makes the node unhealthy.
    let mut gw2 = Gateway::new("[filter]\nenabled = false\n[milter]\nenabled = true\n");
    gw2.start().unwrap();
    let (code, v, _) = status(&gw2);
    assert_eq!(code, 1, "{v}");
    for name in ["mb-smtpd", "mb-milter"] {
        let d = daemon(&v, name);
        assert_eq!(d["state"], "down", "{d}");
        assert!(
            d["error"]
                .as_str()
                .unwrap()
                .contains(&format!("systemctl start {name}")),
            "{d}"
        );
        assert!(d["pid"].is_null());
    }
    assert_eq!(daemon(&v, "mb-rpcd")["state"], "running");
    // mb-rpcd also aggregates what it can reach.
    drop(gw2);

    // mb-rpcd down: still an answer, from the sockets themselves.
    assert_eq!(gw.stop(), Some(0));
    let (code, v, _) = status(&gw);
    assert_eq!(code, 1);
    let rpcd = daemon(&v, "mb-rpcd");
    assert_eq!(rpcd["state"], "down");
    assert!(
        rpcd["error"]
            .as_str()
            .unwrap()
            .contains("mb-rpcd is not running"),
        "{rpcd}"
    );
    assert_eq!(component(&v, "database")["state"], "unknown");

    // Usage errors exit 2.
    let (code, _, _) = text(&gw.tool("mb-status", &["--frobnicate"]));
    assert_eq!(code, 2);
    let (code, _, _) = text(&gw.tool("mb-status", &["--timeout", "0"]));
    assert_eq!(code, 2);
}
