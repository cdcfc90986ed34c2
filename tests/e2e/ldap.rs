//! LDAP recipient lookups and logins (issue 14, item 2, `ldap` mode) against a real
//! OpenLDAP slapd: addresses found by `mail` and Active Directory's `proxyAddresses`,
//! filter injection that cannot widen a search, the answer cache while the directory is
//! down, a refused service bind that is an error and never "unknown user", and password
//! checks by binding as the user.

use std::process::Command;
use std::time::Duration;

use mb_runtime::ldap::{Directory, LdapError, LdapSettings};
use mb_testkit::Slapd;

fn settings(slapd: &Slapd) -> LdapSettings {
    let cfg = mb_core::Config::from_toml_str(&slapd.config_toml(), "ldap.toml").expect("config");
    LdapSettings::from_config(&cfg).expect("ldap.url is set")
}

/// The directory's own answer to a raw filter, as the service account (ldapsearch):
/// the DNs it matches. Shows what an unescaped address would have found.
fn raw_search(slapd: &Slapd, filter: &str) -> Vec<String> {
    let out = Command::new("/usr/bin/ldapsearch")
        .args(["-x", "-LLL", "-H", &slapd.url(), "-D", Slapd::BIND_DN])
        .args(["-w", Slapd::BIND_PASSWORD, "-b", Slapd::BASE, filter, "1.1"])
        .output()
        .expect("run ldapsearch");
    assert!(out.status.success(), "ldapsearch {filter}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("dn: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_are_found_by_mail_and_proxy_addresses_and_nothing_else() {
    let slapd = Slapd::start().unwrap();
    let dir = Directory::new(settings(&slapd));
    for (address, exists) in [
        ("alice@example.test", true),
        ("ALICE@Example.TEST", true),
        // proxyAddresses (smtp:, any case), the default filter's second half.
        ("a.liddell@example.test", true),
        ("sales@example.test", true),
        ("bob@example.test", true),
        ("nobody@example.test", false),
        ("alice@example.org", false),
        ("alice", false),
    ] {
        assert_eq!(
            dir.recipient_exists(address).await.unwrap(),
            exists,
            "{address}"
        );
    }
}

/// Addresses are RFC 4515-escaped into the filter: `*@example.test` would match every
/// user if pasted in raw (shown with ldapsearch first), and a `)(` cannot add terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_cannot_widen_or_rewrite_the_search() {
    let slapd = Slapd::start().unwrap();
    assert!(
        raw_search(
            &slapd,
            "(|(mail=*@example.test)(proxyAddresses=smtp:*@example.test))"
        )
        .len()
            >= 4,
        "the unescaped filter should match every user: the attack would be real"
    );
    assert_eq!(
        raw_search(
            &slapd,
            "(|(mail=a*@example.test)(proxyAddresses=smtp:a*@example.test))"
        ),
        vec!["uid=alice,ou=people,dc=example,dc=test".to_string()]
    );
    // slapd's matching stops at an escaped NUL: such an address is refused unasked.
    assert_eq!(
        raw_search(&slapd, r"(mail=alice@example.test\00)"),
        vec!["uid=alice,ou=people,dc=example,dc=test".to_string()]
    );
    let dir = Directory::new(settings(&slapd));
    for attack in [
        "*@example.test",
        "a*@example.test",
        "*",
        "*)(mail=*",
        "x)(|(mail=*",
        "nobody@example.test)(mail=alice@example.test",
        "alice@example.test\0",
        "\\2a@example.test",
    ] {
        assert!(
            !dir.recipient_exists(attack).await.unwrap(),
            "{attack:?} must find nobody"
        );
    }
}

/// With slapd stopped, cached answers (found and not found) still come back; an address
/// not yet asked is an error, not "unknown". When slapd is back, the pool reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_while_the_directory_is_down_and_errors_are_not_cached() {
    let mut slapd = Slapd::start().unwrap();
    let dir = Directory::new(settings(&slapd));
    assert!(dir.recipient_exists("alice@example.test").await.unwrap());
    assert!(!dir.recipient_exists("nobody@example.test").await.unwrap());
    slapd.stop();
    assert!(dir.recipient_exists("alice@example.test").await.unwrap());
    assert!(dir.recipient_exists("Alice@Example.Test").await.unwrap());
    assert!(!dir.recipient_exists("nobody@example.test").await.unwrap());
    for _ in 0..2 {
        let err = dir.recipient_exists("bob@example.test").await.unwrap_err();
        assert!(
            matches!(err, LdapError::Connect { .. } | LdapError::Search { .. }),
            "{err}"
        );
    }
    slapd.start_again().unwrap();
    assert!(dir.recipient_exists("bob@example.test").await.unwrap());
}

/// A negative answer is reused for `ldap.cache_ttl`, then asked again; with a TTL of 0
/// nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_expire_after_the_cache_ttl() {
    let slapd = Slapd::start().unwrap();
    let mut s = settings(&slapd);
    s.cache_ttl = Duration::from_millis(1500);
    let dir = Directory::new(s.clone());
    s.cache_ttl = Duration::ZERO;
    let uncached = Directory::new(s);
    assert!(!dir.recipient_exists("carol@example.test").await.unwrap());
    assert!(
        !uncached
            .recipient_exists("carol@example.test")
            .await
            .unwrap()
    );
    slapd
        .add(
            "dn: uid=carol,ou=people,dc=example,dc=test\nobjectClass: inetOrgPerson\nuid: carol\ncn: Carol\nsn: C\nmail: carol@example.test\n",
        )
        .unwrap();
    assert!(
        uncached
            .recipient_exists("carol@example.test")
            .await
            .unwrap()
    );
    assert!(
        !dir.recipient_exists("carol@example.test").await.unwrap(),
        "the negative answer is cached"
    );
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(dir.recipient_exists("carol@example.test").await.unwrap());
}

/// A service account the directory refuses must never look like "no such user": the
/// anonymous search it would fall back to finds nobody here, as in most directories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_service_bind_is_an_error_never_an_unknown_user() {
    let slapd = Slapd::start().unwrap();
    let good = settings(&slapd);
    let mut wrong_password = good.clone();
    wrong_password.bind_password = "not-the-password".into();
    let mut wrong_dn = good.clone();
    wrong_dn.bind_dn = "cn=nobody,ou=services,dc=example,dc=test".into();
    let mut no_password = good.clone();
    no_password.bind_password = String::new();
    for s in [wrong_password, wrong_dn, no_password] {
        let dir = Directory::new(s.clone());
        for address in ["alice@example.test", "nobody@example.test"] {
            match dir.recipient_exists(address).await {
                Err(LdapError::Bind { .. } | LdapError::NoBindPassword { .. }) => {}
                other => panic!("{address} with {s:?}: {other:?}"),
            }
        }
    }
    // The anonymous client (no bind_dn at all) does bind, and then finds nobody: the
    // reason the service account's failures must be errors.
    let mut anonymous = good;
    anonymous.bind_dn = String::new();
    anonymous.bind_password = String::new();
    let dir = Directory::new(anonymous);
    assert!(!dir.recipient_exists("alice@example.test").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_by_binding_as_the_user() {
    let slapd = Slapd::start().unwrap();
    let dir = Directory::new(settings(&slapd));
    let alice = Some("alice@example.test".to_string());
    // By uid, mail and sAMAccountName (the default ldap.login_filter).
    assert_eq!(dir.authenticate("alice", "alice-pw").await.unwrap(), alice);
    assert_eq!(
        dir.authenticate("alice@example.test", "alice-pw")
            .await
            .unwrap(),
        alice
    );
    assert_eq!(
        dir.authenticate("ALiddell", "alice-pw").await.unwrap(),
        alice
    );
    assert_eq!(
        dir.authenticate("bob", "bob-pw").await.unwrap(),
        Some("bob@example.test".into())
    );
    // Wrong, someone else's, and empty passwords; unknown users.
    assert_eq!(dir.authenticate("alice", "wrong").await.unwrap(), None);
    assert_eq!(dir.authenticate("alice", "bob-pw").await.unwrap(), None);
    assert_eq!(dir.authenticate("alice", "").await.unwrap(), None);
    assert_eq!(dir.authenticate("nobody", "alice-pw").await.unwrap(), None);
    // A wildcard login would find alice alone if pasted in raw; escaped it finds nobody.
    assert_eq!(dir.authenticate("ali*", "alice-pw").await.unwrap(), None);
    assert_eq!(dir.authenticate("*", "alice-pw").await.unwrap(), None);
    assert_eq!(dir.authenticate("alice\0", "alice-pw").await.unwrap(), None);
    // Two entries with uid=shared: ambiguous, refused even with the right password.
    assert_eq!(dir.authenticate("shared", "shared-pw").await.unwrap(), None);
    // The user binds happen on connections of their own: the service account's pooled
    // connections still search as the service account.
    assert!(dir.recipient_exists("bob@example.test").await.unwrap());
}

/// mb-smtpd with `smtp.recipient_verification = ldap`: known users (and their aliases and
/// `+tag` forms) 250, unknown ones and wildcards 550 5.1.1; with slapd stopped a cached
/// answer still holds and an uncached address gets 450 4.1.1; a changed bind password
/// takes effect live.
#[test]
fn mb_smtpd_asks_the_directory_at_rcpt() {
    use crate::smtp::Raw;
    let mut slapd = Slapd::start().unwrap();
    let port = mb_testkit::free_port();
    let mut gw = mb_testkit::Gateway::new(&format!(
        "[network.smtp]\nlisten = \"127.0.0.1\"\nport = {port}\nrate_per_source = 1000\nconnection_rate = 10000\n\
         [network.reinject]\nport = {}\n[network.protection]\nmode = \"public\"\n\
         [smtp]\nhostname = \"mx.example.test\"\ndomains = \"example.test\"\nmynetworks = \"192.0.2.0/24\"\n\
         recipient_verification = \"ldap\"\n\
         [filter]\nenabled = false\n[queue]\ndelivery_enabled = false\n{}",
        mb_testkit::free_port(),
        slapd.config_toml()
    ));
    gw.start().unwrap();
    gw.start_smtpd().unwrap();
    let session = || {
        let mut c = Raw::connect(port);
        assert!(c.reply().starts_with("220"));
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        let r = c.cmd("MAIL FROM:<someone@sender.test>");
        assert!(r.starts_with("250"), "{r}");
        c
    };
    let rcpt = |c: &mut Raw, to: &str| c.cmd(&format!("RCPT TO:<{to}>"));
    let mut c = session();
    for to in [
        "alice@example.test",
        "a.liddell@example.test",
        "alice+news@example.test",
        "bob@example.test",
    ] {
        let r = rcpt(&mut c, to);
        assert!(r.starts_with("250"), "{to}: {r}");
    }
    for to in ["nobody@example.test", "*@example.test", "a*@example.test"] {
        let r = rcpt(&mut c, to);
        assert!(r.starts_with("550 5.1.1"), "{to}: {r}");
    }

    slapd.stop();
    let r = rcpt(&mut c, "alice@example.test");
    assert!(r.starts_with("250"), "cached while slapd is down: {r}");
    let r = rcpt(&mut c, "nobody@example.test");
    assert!(
        r.starts_with("550 5.1.1"),
        "cached while slapd is down: {r}"
    );
    let r = rcpt(&mut c, "carol@example.test");
    assert!(
        r.starts_with("450 4.1.1"),
        "uncached while slapd is down: {r}"
    );
    assert!(c.cmd("QUIT").starts_with("221"));

    slapd.start_again().unwrap();
    let mut c = session();
    let r = rcpt(&mut c, "sales@example.test");
    assert!(r.starts_with("250"), "slapd back: {r}");
    assert!(c.cmd("QUIT").starts_with("221"));

    // A wrong bind password, set live: the daemon builds a new directory client (with an
    // empty cache), and the refused bind answers 450, never 550.
    let (code, out, err) = mb_testkit::text(&gw.tool(
        "mb-config",
        &["set", "ldap.bind_password", "not-the-password"],
    ));
    assert_eq!(code, 0, "{out}{err}");
    mb_testkit::wait_until(
        "mb-smtpd to use the new bind password",
        Duration::from_secs(20),
        || {
            let mut c = session();
            let r = rcpt(&mut c, "alice@example.test");
            let _ = c.cmd("QUIT");
            r.starts_with("450 4.1.1")
        },
    )
    .unwrap();
    let mut c = session();
    let r = rcpt(&mut c, "nobody@example.test");
    assert!(r.starts_with("450 4.1.1"), "refused bind: {r}");
    for log in [gw.smtpd_log(), gw.log()] {
        for secret in ["not-the-password", Slapd::BIND_PASSWORD] {
            assert!(
                !log.contains(secret),
                "a bind password reached the log:\n{log}"
            );
        }
    }
    assert!(
        gw.smtpd_log().contains("LDAP"),
        "the refused bind is logged (without the password)"
    );
}

/// Many lookups at once share the pool's few connections and each gets its own answer
/// (LDAP message ids keep multiplexed requests apart). Prints the rate, uncached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_the_pool_and_get_their_own_answers() {
    let slapd = Slapd::start().unwrap();
    let users: String = (0..100)
        .map(|n| {
            format!(
                "dn: uid=user{n},ou=people,dc=example,dc=test\nobjectClass: inetOrgPerson\nuid: user{n}\ncn: User {n}\nsn: U\nmail: user{n}@example.test\n\n"
            )
        })
        .collect();
    slapd.add(&users).unwrap();
    let mut s = settings(&slapd);
    s.cache_ttl = Duration::ZERO;
    let dir = Directory::new(s);
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let dir = dir.clone();
        tasks.spawn(async move {
            let n = i % 200;
            // user0..user99 exist, user100..user199 do not.
            let found = dir
                .recipient_exists(&format!("user{n}@example.test"))
                .await
                .unwrap();
            assert_eq!(found, n < 100, "user{n}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "1000 uncached LDAP lookups, 1000 at once, in {:.0} ms ({:.0}/s)",
        elapsed.as_secs_f64() * 1000.0,
        1000.0 / elapsed.as_secs_f64()
    );
}

/// ldaps:// with `ldap.tls.ca_file`: the directory's certificate is verified against it,
/// and a server the CA file does not vouch for is an error, not a lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldaps_verifies_the_server_against_the_ca_file() {
    let slapd = Slapd::start().unwrap();
    let mut s = settings(&slapd);
    s.url = slapd.ldaps_url();
    s.ca_file = slapd.ca_file();
    let dir = Directory::new(s.clone());
    assert!(dir.recipient_exists("alice@example.test").await.unwrap());
    assert!(!dir.recipient_exists("nobody@example.test").await.unwrap());
    assert_eq!(
        dir.authenticate("bob", "bob-pw").await.unwrap(),
        Some("bob@example.test".into())
    );
    // Another CA: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("other.crt");
    std::fs::write(&other_ca, mb_testkit::self_signed().0).unwrap();
    s.ca_file = other_ca;
    let dir = Directory::new(s.clone());
    let err = dir
        .recipient_exists("alice@example.test")
        .await
        .unwrap_err();
    assert!(matches!(err, LdapError::Connect { .. }), "{err}");
    // A CA file that is not there.
    s.ca_file = other.path().join("missing.crt");
    let err = Directory::new(s)
        .recipient_exists("alice@example.test")
        .await
        .unwrap_err();
    assert!(matches!(err, LdapError::CaFile { .. }), "{err}");
}

/// A directory that hangs (slapd frozen with SIGSTOP) costs one `ldap.timeout` per
/// uncached lookup, not more, and is an error; cached answers are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_directory_is_an_error_after_the_timeout() {
    let slapd = Slapd::start().unwrap();
    let mut s = settings(&slapd);
    s.timeout = Duration::from_secs(2);
    let dir = Directory::new(s);
    // Four lookups open the pool's four connections, so the next one is a search on an
    // open connection (a timeout there is not retried on a new one).
    for address in [
        "alice@example.test",
        "a.liddell@example.test",
        "sales@example.test",
        "nobody@example.test",
    ] {
        dir.recipient_exists(address).await.unwrap();
    }
    slapd.pause();
    let started = std::time::Instant::now();
    let err = dir.recipient_exists("bob@example.test").await.unwrap_err();
    let waited = started.elapsed();
    slapd.resume();
    assert!(matches!(err, LdapError::Search { .. }), "{err}");
    assert!(
        // A second try on a new connection would wait twice (4 s and more).
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(3800),
        "waited {waited:?} for a 2 s timeout"
    );
    assert!(dir.recipient_exists("alice@example.test").await.unwrap());
    assert!(dir.recipient_exists("bob@example.test").await.unwrap());
}

/// A search the server refers elsewhere is an error (the RCPT is deferred), never "no
/// such user": a base DN the server does not hold (slapd answers referral, result code
/// 10, as a domain controller does for another domain of its forest), and a subtree part
/// of which lives on another server (success with no entry but continuation references).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_is_an_error_never_an_unknown_user() {
    let slapd = Slapd::start().unwrap();
    let mut elsewhere = settings(&slapd);
    elsewhere.base = "dc=other-domain,dc=test".into();
    let dir = Directory::new(elsewhere);
    for address in ["alice@example.test", "nobody@example.test"] {
        match dir.recipient_exists(address).await {
            Err(LdapError::Referral { refs, .. }) => {
                assert!(
                    refs.iter().any(|r| r.starts_with(Slapd::REFERRAL)),
                    "{refs:?}"
                )
            }
            other => panic!("{address} under a base slapd does not hold: {other:?}"),
        }
    }
    // Part of the subtree held by another server: a `referral` entry below the base.
    slapd
        .add(
            "dn: ou=remote,dc=example,dc=test\nobjectClass: referral\nobjectClass: extensibleObject\nou: remote\nref: ldap://127.0.0.1:1/ou=remote,dc=example,dc=test\n",
        )
        .unwrap();
    let dir = Directory::new(settings(&slapd));
    assert!(dir.recipient_exists("alice@example.test").await.unwrap());
    match dir.recipient_exists("nobody@example.test").await {
        Err(LdapError::Referral { refs, .. }) => {
            assert!(refs.iter().any(|r| r.contains("ou=remote")), "{refs:?}")
        }
        other => panic!("nobody@ with a continuation reference: {other:?}"),
    }
    // Errors are not cached: the same question is an error again.
    assert!(dir.recipient_exists("nobody@example.test").await.is_err());
}
