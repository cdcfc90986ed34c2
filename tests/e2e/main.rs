//! End-to-end tests: the real binaries, on temp directories and loopback ports, against
//! real peers (MariaDB, PostgreSQL, Redis, fail2ban-regex, systemd-analyze, lintian, Postfix's
//! smtp-sink, dnsmasq, Dovecot LMTP, clamd).

mod access;
mod admission;
mod backscatter;
mod backup;
mod cases;
mod clamav;
mod cluster;
mod config_cli;
mod corpus;
mod data_rate;
mod databases;
mod dead_keys;
mod delivery;
mod diskguard;
mod filter;
mod first_start;
mod follow;
mod greylist;
mod journal;
mod ldap;
mod live_config;
mod live_rebuild;
mod memory;
mod modes;
mod packaging;
mod recipients;
mod rpcd;
mod smtp;
mod spool_crash;
mod stats;
mod status;
mod submission;
mod web;
mod web_api;
mod web_auth;
mod web_dkim;
mod web_learn;
mod web_portal;
mod web_portal_ldap;
mod web_queue;
mod web_recipients;
mod web_rspamd;
mod web_scale;
mod web_secrets;
mod web_ui;
mod web_ui_pages;
mod web_ui_quarantine;

/// The messages of a queue (`incoming`, `deferred`, `hold`) in a gateway's spool,
/// oldest first, read without changing any file of it (the daemon may be running).
pub fn queued(spool: &std::path::Path, queue: &str) -> Vec<(Vec<u8>, mb_smtpd::spool::Envelope)> {
    mb_smtpd::spool::snapshot(spool)
        .unwrap()
        .into_iter()
        .filter(|m| m.queue.as_str() == queue)
        .map(|m| (m.message, m.envelope))
        .collect()
}

/// The ids in a queue of a gateway's spool, oldest first (as `queued`).
pub fn queued_ids(spool: &std::path::Path, queue: &str) -> Vec<String> {
    queued(spool, queue)
        .into_iter()
        .map(|(_, e)| e.id)
        .collect()
}

/// A value of `def`'s kind other than its default, and the canonical form `get` must
/// print for it.
pub fn sample(def: &mb_core::KeyDef) -> (String, String) {
    use mb_core::Kind;
    if def.key.starts_with("spam.rbl.") {
        return ("bl.example = 2.5".into(), "bl.example = 2.5".into());
    }
    if def.key == "relay.transport" {
        return (
            "a.example=smtp:[192.0.2.1]:25, .b.example=lmtp:unix:/run/lmtp".into(),
            "a.example=smtp:[192.0.2.1]:25,.b.example=lmtp:unix:/run/lmtp".into(),
        );
    }
    if def.key == "ldap.url" {
        return (
            "ldaps://ldap.example:636".into(),
            "ldaps://ldap.example:636".into(),
        );
    }
    if def.key.starts_with("ldap.") && def.key.ends_with("_filter") {
        return ("(uid=%s)".into(), "(uid=%s)".into());
    }
    if def.key == "quarantine.digest.schedule" {
        return ("hourly".into(), "hourly".into());
    }
    if def.key == "rspamd.url" || def.key == "rspamd.controller_url" {
        return (
            "http://127.0.0.1:11999".into(),
            "http://127.0.0.1:11999".into(),
        );
    }
    if def.key == "web.base_url" {
        return ("https://mail.example".into(), "https://mail.example".into());
    }
    let (input, canonical): (String, String) = match def.kind {
        Kind::Bool => {
            let v = if def.default == "true" {
                "false"
            } else {
                "true"
            };
            (v.to_uppercase(), v.into())
        }
        Kind::Int { min, max } => {
            let v = if min + 7 <= max && (min + 7).to_string() != def.default {
                min + 7
            } else {
                max
            };
            (format!(" {v} "), v.to_string())
        }
        Kind::Float { .. } => ("7.25".into(), "7.25".into()),
        Kind::Text { max } if def.secret => {
            let v = "0123456789abcdef-secret"[..max.min(23)].to_string();
            (v.clone(), v)
        }
        Kind::Text { max } if max < 14 => ("-".into(), "-".into()),
        Kind::Text { .. } => ("sample.example".into(), "sample.example".into()),
        Kind::Path => (
            "/srv/mailborder/sample".into(),
            "/srv/mailborder/sample".into(),
        ),
        Kind::Size { .. } => ("10485760".into(), "10M".into()),
        Kind::Duration { min, max } => {
            let pick = [("7200", "2h"), ("90", "90s"), ("0", "0s")]
                .into_iter()
                .find(|(secs, canon)| {
                    let d = std::time::Duration::from_secs(secs.parse().unwrap());
                    d >= min && d <= max && *canon != def.default
                })
                .expect("a sample duration in range");
            (pick.0.into(), pick.1.into())
        }
        Kind::Rate => ("7 / hour".into(), "7/hour".into()),
        Kind::Ip => ("127.0.0.2".into(), "127.0.0.2".into()),
        Kind::IpList { v6: false } => (
            "203.0.113.10, 203.0.113.11".into(),
            "203.0.113.10,203.0.113.11".into(),
        ),
        Kind::IpList { v6: true } => ("2001:DB8::1".into(), "2001:db8::1".into()),
        Kind::CidrList => ("192.0.2.7/24, ::1".into(), "192.0.2.0/24,::1/128".into()),
        Kind::Enum(words) => {
            let w = words
                .iter()
                .find(|w| **w != def.default)
                .expect("another word");
            (w.to_uppercase(), (*w).into())
        }
        Kind::EnumList(words) => (words[words.len() - 1].into(), words[words.len() - 1].into()),
        Kind::List => ("a.example, b.example".into(), "a.example,b.example".into()),
        Kind::DnsServers => (
            "127.0.0.1:5353, 192.0.2.53".into(),
            "127.0.0.1:5353,192.0.2.53".into(),
        ),
    };
    assert_ne!(
        canonical, def.default,
        "sample for {} equals the default",
        def.key
    );
    (input, canonical)
}

/// Sets every key through `mb-config set`, reads it back with `mb-config get`, and
/// checks that `file_only` keys are refused with a message saying why.
pub fn round_trip_every_key(gw: &mb_testkit::Gateway) {
    use mb_testkit::text;
    for def in mb_core::registry::KEYS {
        let (input, canonical) = sample(def);
        let (code, out, err) = text(&gw.tool("mb-config", &["set", def.key, &input]));
        if def.file_only {
            assert_eq!(code, 1, "set {} should be refused: {out}{err}", def.key);
            assert!(
                err.contains("read from the configuration file only"),
                "{}: {err}",
                def.key
            );
            continue;
        }
        assert_eq!(code, 0, "set {} {input:?}: {out}{err}", def.key);
        let (code, out, err) = text(&gw.tool("mb-config", &["get", def.key]));
        assert_eq!(code, 0, "get {}: {err}", def.key);
        assert_eq!(
            out.trim_end_matches('\n'),
            canonical,
            "round trip of {}",
            def.key
        );
        if def.key == "cluster.enabled" {
            // A node in a cluster as a child refuses cluster-wide keys: leave it alone.
            let (code, _, err) = text(&gw.tool("mb-config", &["unset", def.key]));
            assert_eq!(code, 0, "{err}");
        }
    }
    // The samples give greylist.delay and greylist.retry_window the same value, which
    // `Config::check` refuses at the next start (no retry could pass): put the pair back.
    for key in ["greylist.delay", "greylist.retry_window"] {
        let (code, _, err) = text(&gw.tool("mb-config", &["unset", key]));
        assert_eq!(code, 0, "{err}");
    }
}
