//! Sender binding and per-account limits (issue 14, item 4): a phished account on the
//! submission port, from its own loopback address, can send only as its own addresses,
//! only so much per hour (counted across mb-smtpd processes through Redis), and only
//! mail from our own domains gets our DKIM signature. Real mb-rpcd, mb-smtpd, mb-filter,
//! swaks and Redis.

use std::process::Command;
use std::time::Duration;

use mb_testkit::{Dnsmasq, Gateway, free_port, text, wait_until};

use crate::smtp::mb_user;

/// A gateway serving `served.test` with submission on its own port; loopback is outside
/// mynetworks and the trusted networks unless `extra` says otherwise.
fn gateway(extra: &str) -> (Gateway, u16, u16) {
    let (port, sub) = (free_port(), free_port());
    let mut gw = Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.submission]\nenabled = true\nport = {sub}\n\
         [network.reinject]\nport = {}\n\
         [network.protection]\nmode = \"public\"\ntrusted_networks = \"192.0.2.0/24\"\n\
         [queue]\ndelivery_enabled = false\n{extra}",
        free_port()
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    (gw, port, sub)
}

/// Adds an account through mb-user (the password on stdin).
fn account(gw: &Gateway, name: &str) {
    let (code, out, err) = mb_user(gw, &["add", name], "correct horse battery\n");
    assert_eq!(code, 0, "{out}{err}");
}

/// One message with swaks from `source`: authenticated as `login` over STARTTLS when
/// given. Returns swaks's exit code and its transcript.
fn send(
    port: u16,
    source: &str,
    login: Option<&str>,
    from: &str,
    header_from: Option<&str>,
) -> (i32, String) {
    let swaks = mb_testkit::require("swaks", "swaks");
    let port = port.to_string();
    let mut cmd = Command::new(swaks);
    cmd.args(["--server", "127.0.0.1", "--port", &port])
        .args(["--local-interface", source])
        .args(["--from", from, "--to", "friend@elsewhere.test"])
        .args(["--helo", "client.test", "--body", "submission test body"]);
    if let Some(login) = login {
        cmd.args(["--tls", "--auth", "PLAIN", "--auth-user", login])
            .args(["--auth-password", "correct horse battery"]);
    }
    if let Some(h) = header_from {
        cmd.args(["--header", &format!("From: {h}")]);
    }
    let (code, out, err) = text(&cmd.output().unwrap());
    (code, format!("{out}{err}"))
}

/// The message log's events at `stage`, as mb-log prints them in JSON.
fn log_events(gw: &Gateway, stage: &str) -> String {
    let (code, out, err) = text(&gw.tool("mb-log", &["--json", "--since", "1h", "--stage", stage]));
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn a_phished_account_sends_only_as_its_own_addresses() {
    let (gw, _, sub) = gateway(
        "[smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [filter]\nenabled = false\n",
    );
    account(&gw, "phished@served.test");
    account(&gw, "ceo@served.test");
    let phished = Some("phished@served.test");

    // The attacker, from 127.0.0.2, tries the CEO's address.
    let (code, out) = send(sub, "127.0.0.2", phished, "ceo@served.test", None);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(
            "553 5.7.1 <ceo@served.test>: Sender address rejected: not owned by user phished@served.test"
        ),
        "{out}"
    );
    // Its own address, with or without an extension, goes.
    for from in ["phished@served.test", "Phished+news@served.test"] {
        let (code, out) = send(sub, "127.0.0.2", phished, from, None);
        assert_eq!(code, 0, "{from}: {out}");
        assert!(out.contains("queued as"), "{out}");
    }
    // The CEO itself may.
    let (code, out) = send(
        sub,
        "127.0.0.3",
        Some("ceo@served.test"),
        "ceo@served.test",
        None,
    );
    assert_eq!(code, 0, "{out}");

    // An alias: granted, used, listed, taken back; each change applies to the next AUTH.
    let (code, out, err) = mb_user(
        &gw,
        &["alias", "add", "phished@served.test", "Sales@Served.test"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("may now send as sales@served.test"), "{out}");
    let (code, out) = send(sub, "127.0.0.2", phished, "sales@served.test", None);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = mb_user(&gw, &["--json", "alias", "list", "phished@served.test"], "");
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["login"], "phished@served.test", "{out}");
    assert_eq!(list[0]["address"], "sales@served.test", "{out}");
    let (code, _, err) = mb_user(
        &gw,
        &["alias", "del", "phished@served.test", "sales@served.test"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let (code, out) = send(sub, "127.0.0.2", phished, "sales@served.test", None);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("553 5.7.1 <sales@served.test>"), "{out}");
    // A whole domain.
    let (code, _, err) = mb_user(
        &gw,
        &["alias", "add", "phished@served.test", "@served.test"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let (code, out) = send(sub, "127.0.0.2", phished, "anyone@served.test", None);
    assert_eq!(code, 0, "{out}");

    // Refusals that say what to do.
    let (code, _, err) = mb_user(
        &gw,
        &["alias", "add", "nobody@served.test", "x@served.test"],
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("mb-user add nobody@served.test"), "{err}");
    let (code, _, err) = mb_user(
        &gw,
        &["alias", "add", "ceo@served.test", "not an address"],
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("@domain"), "{err}");
    let (code, _, err) = mb_user(
        &gw,
        &["alias", "del", "ceo@served.test", "x@served.test"],
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("has no alias"), "{err}");
    // Removing an account takes its aliases with it.
    assert_eq!(mb_user(&gw, &["del", "phished@served.test"], "").0, 0);
    let (_, out, _) = mb_user(&gw, &["alias", "list"], "");
    assert!(!out.contains("phished@served.test"), "{out}");

    // The refusal is in the message log, naming the account.
    let mut events = String::new();
    wait_until(
        "the rejected sender in the message log",
        Duration::from_secs(20),
        || {
            events = log_events(&gw, "rejected");
            events.contains("sender address not owned by user phished@served.test")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {events}"));
    assert!(events.contains("127.0.0.2"), "{events}");
    assert!(events.contains("ceo@served.test"), "{events}");
}

#[test]
fn an_account_over_its_hourly_limit_is_deferred_and_others_are_not() {
    let (gw, _, sub) = gateway(
        "[smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [smtp.auth]\nmessages_per_hour = 3\n[filter]\nenabled = false\n",
    );
    account(&gw, "phished@served.test");
    account(&gw, "other@served.test");
    let phished = Some("phished@served.test");
    for i in 0..3 {
        let (code, out) = send(sub, "127.0.0.2", phished, "phished@served.test", None);
        assert_eq!(code, 0, "message {i}: {out}");
    }
    let (code, out) = send(sub, "127.0.0.2", phished, "phished@served.test", None);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(
            "450 4.7.1 <phished@served.test>: account sending limit exceeded (3 messages per hour)"
        ),
        "{out}"
    );
    // Another account, from another address, is unaffected.
    let (code, out) = send(
        sub,
        "127.0.0.3",
        Some("other@served.test"),
        "other@served.test",
        None,
    );
    assert_eq!(code, 0, "{out}");
    let mut events = String::new();
    wait_until(
        "the deferral in the message log",
        Duration::from_secs(20),
        || {
            events = log_events(&gw, "deferred");
            events
                .contains("account phished@served.test over its sending limit: 3 messages per hour")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {events}"));

    // Live: a higher limit applies to the next session, without a restart.
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "smtp.auth.messages_per_hour", "4"]));
    assert_eq!(code, 0, "{err}");
    let mut out = String::new();
    wait_until("the new limit", Duration::from_secs(20), || {
        let (code, o) = send(sub, "127.0.0.2", phished, "phished@served.test", None);
        out = o;
        code == 0
    })
    .unwrap_or_else(|e| panic!("{e}: {out}"));
    let (_, out) = send(sub, "127.0.0.2", phished, "phished@served.test", None);
    assert!(out.contains("(4 messages per hour)"), "{out}");

    // The recipient budget, counted at RCPT.
    let (code, _, err) =
        text(&gw.tool("mb-config", &["set", "smtp.auth.recipients_per_hour", "1"]));
    assert_eq!(code, 0, "{err}");
    let mut out = String::new();
    wait_until("the recipient limit", Duration::from_secs(20), || {
        let (_, o) = send(
            sub,
            "127.0.0.3",
            Some("other@served.test"),
            "other@served.test",
            None,
        );
        out = o;
        out.contains(
            "450 4.7.1 <other@served.test>: account sending limit exceeded (1 recipients per hour)",
        )
    })
    .unwrap_or_else(|e| panic!("{e}: {out}"));
}

#[test]
fn two_mb_smtpd_processes_share_an_accounts_count_through_redis() {
    let redis = mb_testkit::Redis::start().unwrap();
    let extra = format!(
        "[smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         [smtp.auth]\nmessages_per_hour = 3\n[filter]\nenabled = false\n[redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let (gw1, _, sub1) = gateway(&extra);
    let (gw2, _, sub2) = gateway(&extra);
    for gw in [&gw1, &gw2] {
        account(gw, "phished@served.test");
    }
    let phished = Some("phished@served.test");
    for (i, sub) in [sub1, sub2, sub1].into_iter().enumerate() {
        let (code, out) = send(sub, "127.0.0.2", phished, "phished@served.test", None);
        assert_eq!(code, 0, "message {i}: {out}");
    }
    // The fourth, on the node that has sent only one of them itself: over the limit.
    let (code, out) = send(sub2, "127.0.0.2", phished, "phished@served.test", None);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("450 4.7.1"), "{out}");
    assert!(gw1.smtpd_log().contains("Redis"), "{}", gw1.smtpd_log());
}

#[test]
fn only_mail_from_our_domains_is_dkim_signed() {
    // Every name under .test is answered (NXDOMAIN when unknown), so no check waits.
    let dns = Dnsmasq::start(&[
        "--auth-server=ns.test,127.0.0.1".into(),
        "--auth-zone=test".into(),
    ])
    .unwrap();
    let (mut gw, port, sub) = gateway(&format!(
        "[smtp]\nhostname = \"mx.served.test\"\ndomains = \"served.test\"\nmynetworks = \"127.0.0.4/32\"\n\
         [filter]\nenabled = true\nworkers = 1\n[spam.threshold]\nquarantine = 15.0\n\
         [network.dns]\nservers = \"{}\"\n[dkim]\nsign = true\nselector = \"mb\"\n",
        dns.servers()
    ));
    let key = gw.path("dkim.key");
    let (code, out, err) = text(&gw.tool(
        "mb-dkim",
        &[
            "keygen",
            "--domain",
            "served.test",
            "--key",
            key.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = text(&gw.tool("mb-config", &["set", "dkim.key", key.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    gw.start_filter(1).unwrap();
    account(&gw, "bob@served.test");

    let cases = [
        // An account sending as its own served address: signed.
        (
            "auth own",
            sub,
            "127.0.0.2",
            Some("bob@served.test"),
            "bob@served.test",
            None,
            true,
        ),
        // mynetworks with our envelope and our From: signed.
        (
            "mynetworks own",
            port,
            "127.0.0.4",
            None,
            "app@served.test",
            None,
            true,
        ),
        // mynetworks relaying a foreign From, or a foreign envelope: not signed.
        (
            "mynetworks foreign From",
            port,
            "127.0.0.4",
            None,
            "app@served.test",
            Some("someone@foreign.test"),
            false,
        ),
        (
            "mynetworks foreign envelope",
            port,
            "127.0.0.4",
            None,
            "news@foreign.test",
            Some("news@served.test"),
            false,
        ),
        // An account whose From is foreign: not signed.
        (
            "auth foreign From",
            sub,
            "127.0.0.2",
            Some("bob@served.test"),
            "bob@served.test",
            Some("bob@foreign.test"),
            false,
        ),
    ];
    for (name, port, source, login, from, header_from, signed) in cases {
        let before: std::collections::BTreeSet<String> =
            spooled(&gw).into_iter().map(|e| e.id).collect();
        let (code, out) = send(port, source, login, from, header_from);
        assert_eq!(code, 0, "{name}: {out}");
        let new: Vec<_> = spooled(&gw)
            .into_iter()
            .filter(|e| !before.contains(&e.id))
            .collect();
        assert_eq!(new.len(), 1, "{name}: {new:?}");
        let env = &new[0];
        let signature = env
            .add_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("DKIM-Signature"));
        assert_eq!(signature.is_some(), signed, "{name}: {:?}", env.add_headers);
        if let Some((_, v)) = signature {
            assert!(
                v.contains("d=served.test") && v.contains("s=mb"),
                "{name}: {v}"
            );
        }
    }
}

/// The envelopes of the incoming messages in the spool.
fn spooled(gw: &Gateway) -> Vec<mb_smtpd::spool::Envelope> {
    crate::queued(&gw.path("spool"), "incoming")
        .into_iter()
        .map(|(_, env)| env)
        .collect()
}

/// The aliases table and its queries on a real server of each other dialect: grants,
/// a second grant of the same address, lists by account and in all, removal, and an
/// account's removal taking its aliases.
fn aliases_on(url: &str) {
    let mut gw = Gateway::new(&format!(
        "[smtp]\nenabled = false\n[filter]\nenabled = false\n[database]\nurl = \"{url}\"\n"
    ));
    gw.start().unwrap();
    account(&gw, "alice@served.test");
    account(&gw, "bob");
    for (login, address) in [
        ("alice@served.test", "Sales@served.test"),
        ("alice@served.test", "@brand.test"),
        ("bob", "bob@served.test"),
    ] {
        let (code, out, err) = mb_user(&gw, &["alias", "add", login, address], "");
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, _) = mb_user(&gw, &["alias", "add", "bob", "BOB@served.test"], "");
    assert_eq!(code, 0);
    assert!(
        out.contains("could already send as bob@served.test"),
        "{out}"
    );
    let (code, out, err) = mb_user(&gw, &["alias", "list", "alice@served.test"], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "alice@served.test @brand.test\nalice@served.test sales@served.test\n"
    );
    let (_, out, _) = mb_user(&gw, &["--json", "alias", "list"], "");
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all.as_array().map(Vec::len), Some(3), "{out}");
    let (code, _, err) = mb_user(
        &gw,
        &["alias", "del", "alice@served.test", "@brand.test"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(mb_user(&gw, &["del", "bob"], "").0, 0);
    let (_, out, _) = mb_user(&gw, &["alias", "list"], "");
    assert_eq!(out, "alice@served.test sales@served.test\n");
}

#[test]
fn aliases_on_mariadb() {
    let db = mb_testkit::MariaDb::start().unwrap();
    aliases_on(&db.url());
}

#[test]
fn aliases_on_postgresql() {
    let db = mb_testkit::Postgres::start().unwrap();
    aliases_on(&db.url());
}
