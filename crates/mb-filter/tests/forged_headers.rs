//! Property: a sender cannot lower the score of an unauthenticated message by writing
//! header fields that claim authentication or a clean verdict. DKIM-Signature, ARC-Seal,
//! ARC-Message-Signature, ARC-Authentication-Results, Authentication-Results, X-Spam-*
//! and Received fields with arbitrary plausible values (many of them claiming a pass)
//! are added to a message from a domain whose SPF refuses the client; the engine
//! (`engine::scan`, with sender authentication through a real resolver asking a local
//! dnsmasq that is authoritative for the test domains) must score the result at least
//! as high as the message without them.

use std::net::{IpAddr, Ipv4Addr};

use mb_core::Config;
use mb_core::verdict::{Action, Direction, ScanRequest, Verdict};
use mb_filter::auth::Auth;
use mb_filter::engine;
use mb_testkit::Dnsmasq;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

/// A real 1024-bit RSA key (published for the domains forged signatures claim, so
/// their verification gets as far as the signature check and fails there, rather than
/// stopping at a missing key).
const KEY: &str = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCyMWOL5TrThSGMr4muo1RRFyZwQ7+vKjzonGyLuAwGDsOiY95Fmg1xvY4jnklmLUMDz0tXWD12JmCWCHw8+yPWdfhPdbaGTnZ0fZghcikDB8uTKYJyEnz6GsT4e1qQ/c8us4hUuEKpUI/Ogk/y1G//HcvA96yhKXsmijK+ZRL/NQIDAQAB";

/// Domains the forged fields name: the author's own, a p=reject bystander, one with no
/// records at all, and ours.
const DOMAINS: &[&str] = &["unauth.test", "honest.test", "nowhere.test", "served.test"];

/// The message the fields are added to: From unauth.test, whose SPF does not allow the
/// client (127.0.0.1) and whose DMARC policy is none, and no Date. It is scored (SPF
/// fail, DMARC failure under p=none, the missing Date) but neither refused nor
/// quarantined by policy, so its score is what the property is about.
const BASE: &str = "From: Mallory <mallory@unauth.test>\r\nTo: bob@served.test\r\n\
                    Subject: claim your prize\r\nMessage-ID: <p1@unauth.test>\r\n\r\n\
                    You have won.\r\n";

fn records() -> Vec<String> {
    let mut r = vec![
        "--auth-server=ns.test,127.0.0.1".to_string(),
        "--auth-zone=test".to_string(),
        "--txt-record=unauth.test,v=spf1 ip4:192.0.2.1 -all".to_string(),
        "--txt-record=_dmarc.unauth.test,v=DMARC1; p=none".to_string(),
        "--txt-record=honest.test,v=spf1 ip4:192.0.2.2 -all".to_string(),
        "--txt-record=_dmarc.honest.test,v=DMARC1; p=reject".to_string(),
    ];
    for d in ["unauth.test", "honest.test", "served.test"] {
        r.push(format!(
            "--txt-record=s1._domainkey.{d},v=DKIM1; k=rsa; p={KEY}"
        ));
    }
    r
}

fn domain() -> impl Strategy<Value = String> {
    prop::sample::select(DOMAINS).prop_map(str::to_string)
}

fn b64(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::string::string_regex(&format!("[A-Za-z0-9+/]{{{min},{max}}}={{0,2}}"))
        .expect("a valid regex")
}

fn verdict_word() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["pass", "pass", "none", "neutral", "fail", "policy"][..])
}

/// One forged field, as (name, value).
fn forged_field() -> impl Strategy<Value = (String, String)> {
    let selector = prop::sample::select(&["s1", "s2", "default"][..]);
    let instance = 1u8..4;
    prop_oneof![
        (domain(), selector.clone(), b64(43, 43), b64(20, 172)).prop_map(|(d, s, bh, b)| (
            "DKIM-Signature".to_string(),
            format!(
                "v=1; a=rsa-sha256; c=relaxed/relaxed; d={d}; s={s}; t=1795827600; \
                 h=from:to:subject:message-id; bh={bh}; b={b}"
            )
        )),
        (instance.clone(), prop::sample::select(&["none", "pass", "fail"][..]), domain(), selector.clone(), b64(20, 172))
            .prop_map(|(i, cv, d, s, b)| (
                "ARC-Seal".to_string(),
                format!("i={i}; a=rsa-sha256; t=1795827600; cv={cv}; d={d}; s={s}; b={b}")
            )),
        (instance.clone(), domain(), selector, b64(43, 43), b64(20, 172)).prop_map(|(i, d, s, bh, b)| (
            "ARC-Message-Signature".to_string(),
            format!(
                "i={i}; a=rsa-sha256; c=relaxed/relaxed; d={d}; s={s}; t=1795827600; \
                 h=from:to:subject; bh={bh}; b={b}"
            )
        )),
        (instance, domain(), verdict_word(), verdict_word()).prop_map(|(i, d, dkim, dmarc)| (
            "ARC-Authentication-Results".to_string(),
            format!("i={i}; mx.{d}; dkim={dkim} header.d=unauth.test; spf=pass smtp.mailfrom=unauth.test; dmarc={dmarc} header.from=unauth.test")
        )),
        (domain(), verdict_word(), verdict_word(), verdict_word(), prop::bool::ANY).prop_map(
            |(d, spf, dkim, dmarc, space)| (
                // The obsolete syntax (white space before the colon) is the same field.
                if space { "Authentication-Results " } else { "Authentication-Results" }.to_string(),
                format!(
                    "{d}; spf={spf} smtp.mailfrom=unauth.test; dkim={dkim} header.d=unauth.test; \
                     dmarc={dmarc} header.from=unauth.test; arc=pass"
                )
            )
        ),
        (0u32..1000).prop_map(|n| (
            "X-Spam-Status".to_string(),
            format!("No, score=-{}.{} required=5.0 tests=[ALL_TRUSTED,USER_IN_WELCOMELIST]", n / 10, n % 10)
        )),
        (0u32..1000).prop_map(|n| ("X-Spam-Score".to_string(), format!("-{}.{}", n / 10, n % 10))),
        prop::sample::select(&["NO", "No", "no"][..]).prop_map(|v| ("X-Spam-Flag".to_string(), v.to_string())),
        prop::sample::select(&["", "*", "-"][..]).prop_map(|v| ("X-Spam-Level".to_string(), v.to_string())),
        prop::sample::select(&["No", "Clean", "no; score=-100"][..]).prop_map(|v| ("X-Spam".to_string(), v.to_string())),
        (domain(), 0u8..=255, 0u8..=255).prop_map(|(d, a, b)| (
            "Received".to_string(),
            format!(
                "from mail.{d} (mail.{d} [10.{a}.{b}.1]) by mx.served.test with ESMTPS id {a}{b}X; \
                 Sun, 22 Nov 2026 00:59:00 +0000"
            )
        )),
    ]
}

fn request() -> ScanRequest {
    ScanRequest {
        queue_id: "prop".into(),
        client_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        helo: "mail.unauth.test".into(),
        sender: "mallory@unauth.test".into(),
        recipients: vec!["bob@served.test".into()],
        direction: Direction::Inbound,
        ..ScanRequest::default()
    }
}

#[test]
fn forged_authentication_and_status_fields_never_lower_the_score() {
    let dns = Dnsmasq::start(&records()).expect("dnsmasq");
    let cfg = Config::from_toml_str(
        &format!("[network.dns]\nservers = \"{}\"\n", dns.servers()),
        "forged_headers",
    )
    .expect("config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let auth = rt
        .block_on(async { Auth::from_config(&cfg) })
        .expect("resolver");
    let scan = |message: &[u8]| -> Verdict {
        rt.block_on(engine::scan(&cfg, &request(), message, Some(&auth), &[]))
    };

    let base = scan(BASE.as_bytes());
    // The property is only worth something if the message is scored at all and the
    // checks really ran: SPF failed for the envelope domain.
    let names: Vec<&str> = base.symbols.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"SPF_FAIL") && base.score >= 4.0,
        "the unauthenticated message should score SPF_FAIL and at least 4.0: {base:?}"
    );

    let mut runner = TestRunner::new(RunnerConfig {
        cases: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&prop::collection::vec(forged_field(), 1..6), |fields| {
        let mut message = String::new();
        for (name, value) in &fields {
            message.push_str(&format!("{name}: {value}\r\n"));
        }
        message.push_str(BASE);
        let v = scan(message.as_bytes());
        if v.score + 1e-9 < base.score {
            return Err(TestCaseError::fail(format!(
                "score {:.1} below {:.1} with {fields:?}: {:?}",
                v.score, base.score, v.symbols
            )));
        }
        // Nothing forged survives on a message that is passed on or kept.
        let kept = matches!(v.action, Action::Accept | Action::Tag | Action::Quarantine);
        for (name, _) in fields.iter().filter(|_| kept) {
            let name = name.trim_end();
            let forgeable = mb_core::message::FORGEABLE
                .iter()
                .any(|f| f.eq_ignore_ascii_case(name));
            if forgeable
                && !v
                    .remove_headers
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(name))
            {
                return Err(TestCaseError::fail(format!(
                    "{name} is not removed: {:?}",
                    v.remove_headers
                )));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
